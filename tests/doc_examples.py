"""Running the code blocks of a markdown page as written, and comparing what they print with
the output the page shows (README.md, docs/*.md).

Conventions of a page:

* A ```bash (``sh``, ``shell``) or ```python block runs: bash with ``-e -o pipefail``, python
  with ``-c``, each in a fresh process.
* The fenced block right after a code block (blank lines between at most) is its expected
  output: ```json is compared value by value, anything else line by line, numbers to the
  precision printed (``200.17`` matches 200.1725, not 200.18), and ``...`` in a line matches any
  text (a measured time). A code block without an output block must print nothing.
* A marker on the line before a code block changes what happens to it:
  ``<!-- not-run: reason -->`` (it does not run), ``<!-- file: path/name.py -->`` (the block is
  that file's contents: it is written, not run), ``<!-- background: reason -->`` (it starts a
  process that the blocks after it use, such as ``mcdrop serve``; the page's test says how it
  knows the process is ready, and stops it at the end).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

#: Code block languages that run, and how.
RUNNABLE = {"bash": "shell", "sh": "shell", "shell": "shell", "python": "python", "py": "python"}
FENCE = re.compile(
    r"^(?P<indent> {0,3})```(?P<lang>[\w+-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$",
    re.MULTILINE | re.DOTALL,
)
MARKER = re.compile(r"<!--\s*(?P<kind>not-run|file|background):\s*(?P<value>\S.*?)\s*-->")
NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")
ELLIPSIS = "..."
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
    """A runnable block, the output block that follows it (if any), and its marker (if any):
    why it does not run, the file it is, or why it runs in the background."""

    code: Block
    kind: str
    expected: Block | None
    not_run: str | None = None
    file: str | None = None
    background: str | None = None


def blocks(markdown: str) -> list[Block]:
    found, end = [], 0
    for match in FENCE.finditer(markdown):
        line = markdown.count("\n", 0, match.start()) + 1
        body = textwrap.dedent(match["body"]) if match["indent"] else match["body"]
        found.append(Block(match["lang"].lower(), body, line, markdown[end : match.start()]))
        end = match.end()
    return found


def examples(markdown: str) -> list[Example]:
    """The runnable blocks of ``markdown``, each with its expected output and marker."""
    found, pending = [], blocks(markdown)
    while pending:
        block = pending.pop(0)
        kind = RUNNABLE.get(block.lang)
        if kind is None:
            continue
        lines = block.before.strip().splitlines()
        marker = MARKER.fullmatch(lines[-1].strip()) if lines else None
        expected = None
        if pending and pending[0].lang not in RUNNABLE and not pending[0].before.strip():
            expected = pending.pop(0)
        options = {}
        if marker is not None:
            options[marker["kind"].replace("-", "_")] = marker["value"]
        found.append(Example(block, kind, expected, **options))
    return found


def markers_misplaced(markdown: str) -> list[str]:
    """Markers that do not sit right before a runnable block (a typo, a moved block): they would
    silently mark nothing."""
    found = examples(markdown)
    marked = sum(1 for e in found if e.not_run or e.file or e.background)
    count = len(MARKER.findall(markdown))
    return [] if count == marked else [f"{count} markers, {marked} on runnable blocks"]


class Printed(str):
    """A number as the page prints it, e.g. ``"200.17"``."""

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
        return [f"{where}: the page shows {expected}, the run gave {actual!r}"]
    if isinstance(expected, dict):
        if not isinstance(actual, dict):
            return [f"{where}: the page shows an object, the run gave {actual!r}"]
        problems = [f"{where}: the run has no {k!r}" for k in expected.keys() - actual.keys()]
        problems += [f"{where}: the page lacks {k!r}" for k in actual.keys() - expected.keys()]
        for key in expected.keys() & actual.keys():
            problems += json_mismatches(expected[key], actual[key], f"{where}.{key}")
        return problems
    if isinstance(expected, list):
        if not isinstance(actual, list) or len(actual) != len(expected):
            return [f"{where}: the page shows {len(expected)} items, the run gave {actual!r}"]
        return [
            problem
            for i, (e, a) in enumerate(zip(expected, actual, strict=True))
            for problem in json_mismatches(e, a, f"{where}[{i}]")
        ]
    return [] if expected == actual else [f"{where}: the page shows {expected!r}, run {actual!r}"]


def _line_matches(want: str, got: str) -> bool:
    if ELLIPSIS in want:
        pattern = ".*".join(re.escape(part) for part in want.split(ELLIPSIS))
        return re.fullmatch(pattern, got) is not None
    numbers = list(zip(NUMBER.findall(want), NUMBER.findall(got), strict=False))
    return (
        NUMBER.split(want) == NUMBER.split(got)
        and len(NUMBER.findall(want)) == len(NUMBER.findall(got))
        and all(Printed(e).matches(float(a)) for e, a in numbers)
    )


def text_mismatches(expected: str, actual: str) -> list[str]:
    """Lines of ``actual`` that differ from ``expected``; numbers to the printed precision,
    ``...`` matching anything."""
    want = [line.rstrip() for line in expected.rstrip("\n").splitlines()]
    got = [line.rstrip() for line in actual.rstrip("\n").splitlines()]
    if len(want) != len(got):
        return [f"the page shows {len(want)} lines, the run printed {len(got)}:\n{actual}"]
    return [
        f"line {i}: the page shows {w!r}, the run printed {g!r}"
        for i, (w, g) in enumerate(zip(want, got, strict=True), 1)
        if not _line_matches(w, g)
    ]


def output_mismatches(expected: Block | None, stdout: str) -> list[str]:
    if expected is None:
        if not stdout.strip():
            return []
        return [
            "the block prints output but the page shows none: add an output block (```text or "
            "```json) right after it, or mark it <!-- not-run: reason -->. It printed:\n" + stdout
        ]
    if expected.lang == "json":
        try:
            actual = json.loads(stdout)
        except ValueError:
            return [f"the page shows JSON, the run printed:\n{stdout}"]
        want = json.loads(expected.body, parse_float=Printed, parse_int=Printed)
        return json_mismatches(want, actual)
    return text_mismatches(expected.body, stdout)


def command(example: Example, code: str) -> list[str]:
    """The command line that runs ``code`` (``example``'s block, adapted) as the page means."""
    if example.kind == "shell":
        return ["bash", "-e", "-o", "pipefail", "-c", code]
    return [sys.executable, "-c", code]


def run(
    example: Example, code: str, *, cwd: Path, env: dict[str, str], where: str
) -> subprocess.CompletedProcess[str]:
    """Run ``code`` and assert that it succeeds and prints what the page shows."""
    done = subprocess.run(
        command(example, code), cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S
    )
    assert done.returncode == 0, f"{where} failed ({done.returncode}):\n{code}\n{done.stderr}"
    problems = output_mismatches(example.expected, done.stdout)
    assert not problems, f"{where}:\n" + "\n".join(problems)
    return done
