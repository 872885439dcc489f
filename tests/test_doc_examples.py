"""The machinery that runs a markdown page's code blocks: extraction, markers and the
comparison of what a block prints with the output the page shows."""

from __future__ import annotations

import json

import pytest

from tests.doc_examples import (
    Printed,
    examples,
    json_mismatches,
    markers_misplaced,
    output_mismatches,
    text_mismatches,
)

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


MARKED = """<!-- file: pkg/nets.py -->
```python
def build(): ...
```

<!-- background: serves the blocks below -->
```bash
mcdrop serve
```

```bash
curl localhost:8000/x
```

<!-- not-run: a stray marker before prose -->
Prose.
"""


def test_markers_say_what_happens_to_a_block() -> None:
    found = examples(MARKED)
    assert [(e.file, e.background, e.not_run) for e in found] == [
        ("pkg/nets.py", None, None),
        (None, "serves the blocks below", None),
        (None, None, None),
    ]
    assert markers_misplaced(MARKED) == ["3 markers, 2 on runnable blocks"]
    assert markers_misplaced(SAMPLE) == []


def test_an_ellipsis_matches_any_text() -> None:
    assert not text_mismatches("cost: ... ms per sample\n", "cost: 0.0113 ms per sample\n")
    assert text_mismatches("cost: ... ms per sample\n", "cost: 0.0113 s per sample\n")
    assert text_mismatches("rows [64], ...\n", "rows [65], 10 outputs\n")
