"""How the recipes write numbers: manifests and reports keep five decimals."""

from __future__ import annotations

from typing import Any

#: Decimals of every number written to a model manifest or an evaluation report.
DIGITS = 5


def rounded(value: Any) -> Any:
    """``value`` with every float rounded to :data:`DIGITS` decimals, inside dicts and lists
    too; other values (ints, strings, None) unchanged."""
    if isinstance(value, float):
        return round(value, DIGITS)
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v) for v in value]
    return value
