"""What the protocols share: a JSON body read as ``json.loads`` reads it, only faster."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mcdrop.checkpoint import ModelSpec
from service import dataplane
from service.errors import LimitExceededError


def _same(a: Any, b: Any) -> bool:
    """Equal values of equal types all the way down (NaN equal to NaN, key order too)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    return bool(a == b)


@pytest.mark.parametrize(
    "body",
    [
        b'{"inputs": [[0.0, 1.5, -2, 3e-7]]}',
        b"[NaN, Infinity, -Infinity]",  # json reads them: the schema then refuses them
        b"[1e400, -1e400, 1e-400]",
        b"[" + b"9" * 30 + b", -" + b"9" * 20 + b", 18446744073709551616]",  # big integers stay int
        b'{"a": 1, "b": 2, "a": 3}',  # the last of repeated keys, in the first one's place
        b'["\\ud800"]',  # a lone surrogate
        b'\xef\xbb\xbf{"inputs": []}',  # a UTF-8 byte-order mark
        b"[" * 300 + b"]" * 300,  # deep, within json's recursion limit
        b'{"s": "\\u00e9\\n\\"", "t": true, "f": false, "n": null}',
    ],
)
def test_loads_reads_what_json_reads(body: bytes) -> None:
    assert _same(dataplane.loads(body), json.loads(body))


@pytest.mark.parametrize(
    "body",
    [b"", b"{", b"[1,]", b"[.5]", b"[01]", b"{'a': 1}", b'"\xff"', b"[1] x", b"[" * 100_000],
)
def test_loads_fails_as_json_fails(body: bytes) -> None:
    with pytest.raises(Exception) as expected:
        json.loads(body)
    with pytest.raises(type(expected.value)) as got:
        dataplane.loads(body)
    assert str(got.value) == str(expected.value)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=30,
)


@given(_json)
def test_loads_reads_any_json_as_json_does(value: Any) -> None:
    body = json.dumps(value).encode()
    assert _same(dataplane.loads(body), json.loads(body))


# -- the values a body may hold ------------------------------------------------------------------

_SPEC = ModelSpec(
    name="m", task="classification", input_shape=[2, 3], labels=["a", "b"], architecture={}
)


def _body(values: int, **fields: Any) -> bytes:
    return json.dumps({"inputs": [[0] * values], **fields}).encode()


def test_a_body_of_the_most_rows_and_options_is_taken() -> None:
    # 4 rows of 2 x 3 values: 24 values; and up to MAX_BODY_KEYS fields of options
    rows = json.dumps([[[0.5] * 3] * 2] * 4)
    options = ", ".join(f'"o{i}": [1, 2]' for i in range(dataplane.MAX_BODY_KEYS // 2))
    dataplane.check_values(f'{{"inputs": {rows}, {options}}}'.encode(), _SPEC, max_rows=4)


def test_a_body_of_more_values_than_its_rows_can_hold_is_refused_unparsed() -> None:
    limit = 4 * 6 + dataplane.MAX_BODY_KEYS
    dataplane.check_values(_body(limit + 1), _SPEC, max_rows=4)  # limit commas: taken
    with pytest.raises(LimitExceededError) as refused:
        dataplane.check_values(_body(limit + 2), _SPEC, max_rows=4)
    assert str(refused.value) == (
        f"the request body holds {limit + 2} or more JSON values, more than a request to model "
        f"'m' can: at most 4 rows (the server's max_request_rows) of 6 values (shape [2, 3]), "
        f"and its options, {limit} in all; send fewer rows, each of shape [2, 3]"
    )


@pytest.mark.parametrize("text", ["," * 5000, '\\",' * 2000 + "\\\\", "\\\\" + "," * 5000])
def test_commas_in_strings_are_no_values(text: str) -> None:
    dataplane.check_values(_body(3, id=text), _SPEC, max_rows=1)
    with pytest.raises(LimitExceededError):
        dataplane.check_values(_body(2000, id=text), _SPEC, max_rows=1)
