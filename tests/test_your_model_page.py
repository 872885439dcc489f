"""docs/your-model.md runs as written: a package of the user's own, trained, saved with
``mcdrop.save``, checked with ``mcdrop check``, served by a real ``mcdrop serve`` (opting in to
the package's code) and queried with curl and the client, each block printing what the page
shows.

The blocks run in page order in one empty folder, as a user would type them: ``python`` and
``mcdrop`` are this interpreter and its ``mcdrop``, with the working tree's code (the client's
included) on the path after whatever the block puts there, and no other folder: ``mypkg`` is
importable only where the page makes it so. The ``background`` block (``mcdrop serve``) listens
on a free port given as ``MCDROP_PORT``, which ``localhost:8000`` in the later blocks becomes; it
is stopped at the end. Markers and output comparison: :mod:`tests.doc_examples`.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx2
import pytest

from tests.conftest import CHECKOUT_PATH, ROOT
from tests.doc_examples import Example, command, examples, markers_misplaced, run
from tests.e2e.server import clean_env, free_port

PAGE = ROOT / "docs" / "your-model.md"
EXAMPLES = examples(PAGE.read_text())


def _shims(folder: Path) -> Path:
    """``folder/python`` and ``folder/mcdrop``: this interpreter, its sys.path as an installed
    ``mcdrop`` would have it (``-P``: no current folder), the working tree's code after the
    block's own ``PYTHONPATH``."""
    folder.mkdir()
    path = f'PYTHONPATH="${{PYTHONPATH:+$PYTHONPATH:}}"{shlex.quote(CHECKOUT_PATH)}'
    python = shlex.quote(sys.executable)
    for name, run_as in {"python": python, "mcdrop": f"{python} -P -m service.cli"}.items():
        shim = folder / name
        shim.write_text(f'#!/bin/sh\n{path} exec {run_as} "$@"\n')
        shim.chmod(0o755)
    return folder


@contextmanager
def _background(
    example: Example, code: str, cwd: Path, env: dict[str, str], url: str
) -> Iterator[None]:
    """Run ``code`` until the block after the last; wait until ``url/ready`` answers 200."""
    log = cwd.parent / "background.log"
    with log.open("wb") as sink:
        # A session of its own: the block's shell and the server it starts are one group.
        proc = subprocess.Popen(
            command(example, code),
            cwd=cwd,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 90
        with httpx2.Client(base_url=url, timeout=5) as http:
            while True:
                assert proc.poll() is None, f"{PAGE.name}: the server exited:\n{log.read_text()}"
                assert time.monotonic() < deadline, f"not ready in 90 s:\n{log.read_text()}"
                try:
                    if http.get("/ready").status_code == 200:
                        break
                except httpx2.TransportError:
                    pass
                time.sleep(0.2)
        yield
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.mark.slow
def test_the_page_runs_as_written(tmp_path: Path) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    workdir = tmp_path / "project"
    workdir.mkdir()
    port = free_port()
    shims = _shims(tmp_path / "bin")
    env = clean_env(PATH=f"{shims}{os.pathsep}{os.environ['PATH']}", MCDROP_PORT=str(port))
    env.pop("PYTHONPATH", None)
    with ExitStack() as stack:
        for example in EXAMPLES:
            where = f"{PAGE.name} line {example.code.line}"
            if example.not_run:
                continue
            if example.file:
                target = workdir / example.file
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(example.code.body)
                continue
            code = example.code.body.replace("localhost:8000", f"127.0.0.1:{port}")
            if example.background:
                url = f"http://127.0.0.1:{port}"
                stack.enter_context(_background(example, code, workdir, env, url))
                continue
            run(example, code, cwd=workdir, env=env, where=where)


def test_the_page_shows_each_step() -> None:
    """Saved with one call, checked, served with the opt-in, asked with curl and the client,
    each with the output it prints; the package, the training script and the model that drops
    in eval mode too are files."""
    files = {e.file for e in EXAMPLES if e.file}
    assert files == {"mypkg/nets.py", "train.py", "always_drops.py"}
    shown = {
        step
        for e in EXAMPLES
        if e.expected is not None or e.background
        for step, needle in {
            "train": "python train.py",
            "check": "mcdrop check models/blobs --allowed-factories mypkg",
            "serve": "mcdrop serve --allowed-factories mypkg",
            "curl": "curl ",
            "client": "from mcdrop_client import Client",
            "always drops": "python always_drops.py",
        }.items()
        if needle in e.code.body
    }
    assert shown == {"train", "check", "serve", "curl", "client", "always drops"}
    assert re.search(r"mcdrop\.save\(\s*net,", (ROOT / "docs" / "your-model.md").read_text())


def test_markers_sit_on_runnable_blocks() -> None:
    assert not markers_misplaced(PAGE.read_text())
