"""The adaptive sample-count benchmark's quick mode, so it cannot rot (no accuracy assertions
beyond what holds by construction)."""

from __future__ import annotations

import re

import pytest

from benchmarks import adaptive


def _tables(text: str) -> dict[str, list[list[str]]]:
    """Each data set's table rows, as cells."""
    tables: dict[str, list[list[str]]] = {}
    name = ""
    for line in text.splitlines():
        heading = re.match(r"#### (\w+):", line)
        if line.startswith("#### Regressors"):
            heading = None
            name = ""
        if heading:
            name = heading.group(1)
            tables[name] = []
        elif line.startswith("| 0") and name:
            tables[name].append([cell.strip() for cell in line.strip("|").split("|")])
    return tables


@pytest.mark.slow
def test_adaptive_quick() -> None:
    text = adaptive.run(quick=True)
    tables = _tables(text)
    assert set(tables) == set(adaptive.DATASETS)
    for rows in tables.values():
        assert len(rows) == 2 * len(adaptive.QUICK.tolerances)
        for auto, fixed in zip(rows[::2], rows[1::2], strict=True):
            assert (auto[1], fixed[1]) == ("auto", "fixed")
            mean = float(auto[2])
            assert 16 <= mean <= adaptive.QUICK.max_n
            assert int(fixed[2]) == round(mean)  # equal cost: the same samples in all
            for row in (auto, fixed):
                errors = [float(x) for cell in row[4:7] for x in cell.split(" / ")]
                assert all(e >= 0 for e in errors)
                assert 0.5 <= float(row[7]) <= 1.0  # label agreement with the reference
    assert "reference, whose own MC standard error" in text
    assert "#### Regressors" in text
    _check_regression_rows(text)


def _check_regression_rows(text: str) -> None:
    rows = [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in text.splitlines()
        if line.startswith("| diabetes")
    ]
    labels = (
        "diabetes, data",
        f"diabetes, far ×{adaptive.FAR:g}",
        "diabetes, data + 10 % far",
    )
    assert [r[0] for r in rows] == [
        label for label in labels for _ in range(2 * len(adaptive.QUICK.tolerances))
    ]
    for auto, fixed in zip(rows[::2], rows[1::2], strict=True):
        assert (auto[2], fixed[2]) == ("auto", "fixed")
        mean = float(auto[3])
        assert 16 <= mean <= adaptive.QUICK.max_n
        assert int(fixed[3]) == round(mean)  # equal cost
        for row in (auto, fixed):
            errors = [float(x) for cell in row[5:8] for x in cell.split(" / ")]
            assert all(e >= 0 for e in errors)
    # The far rows need more samples than the test rows (the point of an adaptive count).
    assert float(rows[2 * len(adaptive.QUICK.tolerances)][3]) > float(rows[0][3])


@pytest.mark.slow
def test_adaptive_regression_quick() -> None:
    text = adaptive.regression_table(adaptive.QUICK, with_uci=False)
    assert "in units of the 100-sample reference's predictive std" in text
    _check_regression_rows(text)


@pytest.mark.slow
def test_adaptive_decisions_quick() -> None:
    text = adaptive.decisions_table(quick=True)
    rows = [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in text.splitlines()
        if re.match(r"\| (digits|fashion) \|", line)
    ]
    assert [(r[0], r[1] == "auto") for r in rows] == [
        (name, auto) for name in adaptive.DATASETS for auto in (True, False)
    ]
    for row in rows:
        assert 16 <= float(row[2]) <= (100 if row[1] == "auto" else int(row[1]))
        shares = [float(row[i]) for i in (3, 5, 7, 9)]  # coverages and rejected shares
        assert all(0.0 <= s <= 1.0 for s in shares)
        assert float(row[3]) <= float(row[5])  # a set at 0.95 holds the one at 0.9
