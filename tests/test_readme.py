"""Every example of README.md runs as written and prints what the README shows.

Each code block (bash or python) runs on its own, in README order, in a scratch folder with
``models`` linked in, against a real ``mcdrop serve`` of the bundled models: ``localhost:8000``
becomes the test server's address, ``.venv/bin/`` the running interpreter's environment, and
``MCDROP_URL`` points the CLI at the server. How blocks, output blocks and markers such as
``<!-- not-run: starts a server -->`` work is in :mod:`tests.doc_examples`.
"""

from __future__ import annotations

import re
import shlex
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import CHECKOUT_PATH, MODELS, ROOT
from tests.doc_examples import Example, examples, markers_misplaced, run
from tests.e2e.server import Server, clean_env, serve

README = ROOT / "README.md"


# ---- the README's own examples, run against a real server ----------------------------------

EXAMPLES = examples(README.read_text())
RUN = [e for e in EXAMPLES if e.not_run is None]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serve(tmp_path_factory.mktemp("readme")) as running:
        yield running


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A scratch folder like the repository root: blocks find ``models/`` and write files."""
    folder = tmp_path_factory.mktemp("readme-run")
    (folder / "models").symlink_to(MODELS)
    return folder


def _as_run_here(code: str, server: Server) -> str:
    """The block with the test server's address and this interpreter's environment."""
    code = code.replace("localhost:8000", f"127.0.0.1:{server.port}")
    bin_dir = Path(sys.executable).parent
    if not (bin_dir / "mcdrop").exists():  # not installed: the same command via its module
        code = code.replace(".venv/bin/mcdrop", f"{shlex.quote(sys.executable)} -m service.cli")
    return code.replace(".venv/bin/", f"{shlex.quote(str(bin_dir))}/")


@pytest.mark.slow
@pytest.mark.parametrize("example", RUN, ids=[f"line{e.code.line}-{e.code.lang}" for e in RUN])
def test_readme_example(example: Example, server: Server, workdir: Path) -> None:
    code = _as_run_here(example.code.body, server)
    if re.search(r"\bcurl\b", code) and shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    # The working tree's code, even where .venv has another checkout installed.
    env = clean_env(PYTHONPATH=CHECKOUT_PATH, MCDROP_URL=server.url)
    run(example, code, cwd=workdir, env=env, where=f"README.md line {example.code.line}")


def test_the_readme_shows_each_way_in() -> None:
    """The README keeps runnable examples of curl, the Python client, the CLI, the library and
    Triton's client, each with the output it prints."""
    shown = {
        way
        for e in RUN
        if e.expected is not None
        for way, needle in {
            "curl": "curl ",
            "client": "from mcdrop_client import",
            "cli": "mcdrop predict",
            "library": "import mcdrop",
            "tritonclient": "import tritonclient",
        }.items()
        if needle in e.code.body
    }
    assert shown == {"curl", "client", "cli", "library", "tritonclient"}


def test_the_readme_imports_the_client_by_the_name_it_installs_as() -> None:
    """The client a caller installs alone is ``mcdrop_client``; one example imported it as
    ``service.client``, which only a full install of mcdrop has."""
    assert not [e.code.line for e in EXAMPLES if "from service.client import" in e.code.body]


def test_not_run_markers_sit_on_runnable_blocks() -> None:
    """A marker anywhere else (a typo, a moved block) would silently mark nothing."""
    markdown = README.read_text()
    marked = {e.code.line for e in EXAMPLES if e.not_run is not None}
    assert not markers_misplaced(markdown)
    assert all(e.not_run for e in EXAMPLES if e.code.line in marked)
