"""Every example of README.md runs as written and prints what the README shows.

Each code block (bash or python) runs on its own, in README order, in a scratch folder with
``models`` linked in, against a real ``mcdrop serve`` of the bundled models: ``localhost:8000``
becomes the test server's address, ``.venv/bin/`` the running interpreter's environment, and
``MCDROP_URL`` points the CLI at the server. The fenced block right after a code block (blank
lines between at most) is its expected output: ```json is compared value by value, anything else
line by line, numbers to the precision printed (``200.17`` matches 200.1725, not 200.18). A code
block without an output block must print nothing. A block that must not run says so, with its
reason, on the line before it: ``<!-- not-run: starts a server -->``.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import CHECKOUT_PATH, MODELS, ROOT
from tests.e2e.server import Server, clean_env, serve

README = ROOT / "README.md"
#: Code block languages that run, and how.
RUNNABLE = {"bash": "shell", "sh": "shell", "shell": "shell", "python": "python", "py": "python"}
FENCE = re.compile(
    r"^(?P<indent> {0,3})```(?P<lang>[\w+-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$",
    re.MULTILINE | re.DOTALL,
)
NOT_RUN = re.compile(r"<!--\s*not-run:\s*(?P<reason>\S.*?)\s*-->")
NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")
TIMEOUT_S = 180


@dataclass(frozen=True)
class Block:
    """A fenced block: its language, text, first line number, and the text since the previous
    block."""

    lang: str
    body: str
    line: int
    before: str


@dataclass(frozen=True)
class Example:
    """A runnable block, the output block that follows it (if any), and why it does not run (if
    it is marked)."""

    code: Block
    kind: str
    expected: Block | None
    not_run: str | None


def blocks(markdown: str) -> list[Block]:
    found, end = [], 0
    for match in FENCE.finditer(markdown):
        line = markdown.count("\n", 0, match.start()) + 1
        body = textwrap.dedent(match["body"]) if match["indent"] else match["body"]
        found.append(Block(match["lang"].lower(), body, line, markdown[end : match.start()]))
        end = match.end()
    return found


def examples(markdown: str) -> list[Example]:
    """The runnable blocks of ``markdown``, each with its expected output."""
    found, pending = [], blocks(markdown)
    while pending:
        block = pending.pop(0)
        kind = RUNNABLE.get(block.lang)
        if kind is None:
            continue
        lines = block.before.strip().splitlines()
        marker = NOT_RUN.fullmatch(lines[-1].strip()) if lines else None
        expected = None
        if pending and pending[0].lang not in RUNNABLE and not pending[0].before.strip():
            expected = pending.pop(0)
        found.append(Example(block, kind, expected, marker["reason"] if marker else None))
    return found


class Printed(str):
    """A number as the README prints it, e.g. ``"200.17"``."""

    def tolerance(self) -> float:
        """Half a unit of the last printed digit: ``200.17`` covers [200.165, 200.175]."""
        exponent = Decimal(self).as_tuple().exponent
        assert isinstance(exponent, int)
        return 0.5 * 10.0**exponent * (1 + 1e-9)

    def matches(self, value: float) -> bool:
        return abs(value - float(self)) <= self.tolerance()


def json_mismatches(expected: Any, actual: Any, where: str = "$") -> list[str]:
    """Where ``actual`` differs from ``expected`` (parsed with :class:`Printed` numbers)."""
    if isinstance(expected, Printed):
        is_number = isinstance(actual, int | float) and not isinstance(actual, bool)
        if is_number and expected.matches(actual):
            return []
        return [f"{where}: the README shows {expected}, the run gave {actual!r}"]
    if isinstance(expected, dict):
        if not isinstance(actual, dict):
            return [f"{where}: the README shows an object, the run gave {actual!r}"]
        problems = [f"{where}: the run has no {k!r}" for k in expected.keys() - actual.keys()]
        problems += [f"{where}: the README lacks {k!r}" for k in actual.keys() - expected.keys()]
        for key in expected.keys() & actual.keys():
            problems += json_mismatches(expected[key], actual[key], f"{where}.{key}")
        return problems
    if isinstance(expected, list):
        if not isinstance(actual, list) or len(actual) != len(expected):
            return [f"{where}: the README shows {len(expected)} items, the run gave {actual!r}"]
        return [
            problem
            for i, (e, a) in enumerate(zip(expected, actual, strict=True))
            for problem in json_mismatches(e, a, f"{where}[{i}]")
        ]
    return [] if expected == actual else [f"{where}: README {expected!r}, run {actual!r}"]


def text_mismatches(expected: str, actual: str) -> list[str]:
    """Lines of ``actual`` that differ from ``expected``; numbers to the printed precision."""
    want = [line.rstrip() for line in expected.rstrip("\n").splitlines()]
    got = [line.rstrip() for line in actual.rstrip("\n").splitlines()]
    if len(want) != len(got):
        return [f"the README shows {len(want)} lines, the run printed {len(got)}:\n{actual}"]
    problems = []
    for i, (w, g) in enumerate(zip(want, got, strict=True), 1):
        same_words = NUMBER.split(w) == NUMBER.split(g)
        numbers = list(zip(NUMBER.findall(w), NUMBER.findall(g), strict=False))
        same_numbers = len(NUMBER.findall(w)) == len(NUMBER.findall(g)) and all(
            Printed(e).matches(float(a)) for e, a in numbers
        )
        if not (same_words and same_numbers):
            problems.append(f"line {i}: the README shows {w!r}, the run printed {g!r}")
    return problems


def output_mismatches(expected: Block | None, stdout: str) -> list[str]:
    if expected is None:
        if not stdout.strip():
            return []
        return [
            "the block prints output but the README shows none: add an output block (```text or "
            "```json) right after it, or mark it <!-- not-run: reason -->. It printed:\n" + stdout
        ]
    if expected.lang == "json":
        try:
            actual = json.loads(stdout)
        except ValueError:
            return [f"the README shows JSON, the run printed:\n{stdout}"]
        want = json.loads(expected.body, parse_float=Printed, parse_int=Printed)
        return json_mismatches(want, actual)
    return text_mismatches(expected.body, stdout)


# ---- the README's own examples, run against a real server ----------------------------------

EXAMPLES = examples(README.read_text())
RUN = [e for e in EXAMPLES if e.not_run is None]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serve(tmp_path_factory.mktemp("readme") / "serve.log") as running:
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
    command = (
        ["bash", "-e", "-o", "pipefail", "-c", code]
        if example.kind == "shell"
        else [sys.executable, "-c", code]
    )
    # The working tree's code, even where .venv has another checkout installed.
    env = clean_env(PYTHONPATH=CHECKOUT_PATH, MCDROP_URL=server.url)
    done = subprocess.run(
        command, cwd=workdir, env=env, capture_output=True, text=True, timeout=TIMEOUT_S
    )
    where = f"README.md line {example.code.line}"
    assert done.returncode == 0, f"{where} failed ({done.returncode}):\n{code}\n{done.stderr}"
    problems = output_mismatches(example.expected, done.stdout)
    assert not problems, f"{where}:\n" + "\n".join(problems)


def test_the_readme_shows_each_way_in() -> None:
    """The README keeps runnable examples of curl, the Python client, the CLI and the library,
    each with the output it prints."""
    shown = {
        way
        for e in RUN
        if e.expected is not None
        for way, needle in {
            "curl": "curl ",
            "client": "from mcdrop_client import",
            "cli": "mcdrop predict",
            "library": "import mcdrop",
        }.items()
        if needle in e.code.body
    }
    assert shown == {"curl", "client", "cli", "library"}


def test_not_run_markers_sit_on_runnable_blocks() -> None:
    """A marker anywhere else (a typo, a moved block) would silently mark nothing."""
    markdown = README.read_text()
    marked = {e.code.line for e in EXAMPLES if e.not_run is not None}
    assert len(NOT_RUN.findall(markdown)) == len(marked)
    assert all(e.not_run for e in EXAMPLES if e.code.line in marked)


# ---- the extraction and comparison themselves ----------------------------------------------

SAMPLE = """# Title

Some prose.

<!-- not-run: starts a server -->
```bash
make serve
```

```bash
curl localhost:8000/x
```
```json
{"a": [1.25, 3], "b": "text"}
```

More prose added later, and a request body shown on its own:

```json
{"inputs": [[1, 2]]}
```

```python
print("hi")
```

Prose between a block and its output makes that output a separate block:

```text
hi
```
"""


def test_extraction_pairs_blocks_with_their_output() -> None:
    found = examples(SAMPLE)
    assert [(e.code.lang, e.not_run) for e in found] == [
        ("bash", "starts a server"),
        ("bash", None),
        ("python", None),
    ]
    assert found[0].expected is None
    assert found[1].expected is not None
    assert found[1].expected.body == '{"a": [1.25, 3], "b": "text"}\n'
    assert found[2].expected is None
    # ... so a block that prints with no output block right after it fails.
    assert output_mismatches(found[2].expected, "hi\n")
    assert not output_mismatches(found[1].expected, '{"b": "text", "a": [1.2549, 3.4]}')


@pytest.mark.parametrize(
    ("printed", "value", "matches"),
    [
        ("200.17", 200.1725, True),
        ("200.17", 200.1751, False),
        ("58.80", 58.7996, True),
        ("3457", 3457.39, True),
        ("3457", 3457.6, False),
        ("0.95", 0.95, True),
        ("5e-05", 4.9952e-05, True),
        ("5e-05", 5.6e-05, False),
        ("-0.5", -0.52, True),
    ],
)
def test_numbers_match_to_the_printed_precision(printed: str, value: float, matches: bool) -> None:
    assert Printed(printed).matches(value) is matches


@pytest.mark.parametrize(
    ("actual", "problem"),
    [
        ('{"a": [1.26, 3], "b": "text"}', "$.a[0]"),
        ('{"a": [1.25], "b": "text"}', "$.a"),
        ('{"a": [1.25, 3], "b": "other"}', "$.b"),
        ('{"a": [1.25, 3], "b": "text", "c": 1}', "lacks 'c'"),
        ('{"a": [1.25, 3]}', "no 'b'"),
        ('{"a": [1.25, true], "b": "text"}', "$.a[1]"),
    ],
)
def test_json_mismatches_name_the_place(actual: str, problem: str) -> None:
    expected = json.loads('{"a": [1.25, 3], "b": "text"}', parse_float=Printed, parse_int=Printed)
    problems = json_mismatches(expected, json.loads(actual))
    assert len(problems) == 1
    assert problem in problems[0]


def test_text_lines_compare_words_exactly_and_numbers_to_precision() -> None:
    assert not text_mismatches("0 0.502 0.110\n", "0 0.5021 0.1104  \n")
    assert text_mismatches("0 0.502 0.110\n", "0 0.503 0.110\n")
    assert text_mismatches("label 1\n", "label 1\nextra\n")
    assert text_mismatches("tensor([4, 1])\n", "tensor([4, 1, 2])\n")
    assert text_mismatches("digits  input [64]\n", "digits  output [64]\n")
