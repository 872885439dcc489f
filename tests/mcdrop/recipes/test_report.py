"""mcdrop.recipes.report: the numbers the recipes write."""

from __future__ import annotations

from mcdrop.recipes.report import rounded


def test_rounded_rounds_floats_at_any_depth_and_keeps_the_rest() -> None:
    value = {"a": 0.123456789, "n": 3, "rows": [1.000004, {"b": -2.0000051}], "s": "x", "z": None}
    assert rounded(value) == {
        "a": 0.12346,
        "n": 3,
        "rows": [1.0, {"b": -2.00001}],
        "s": "x",
        "z": None,
    }
    assert isinstance(rounded(value)["n"], int)
