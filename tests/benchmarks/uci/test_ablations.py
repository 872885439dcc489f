"""The ablation switches of the MC-dropout protocol (and Deep Ensembles' adversarial training):
each runs one split at a tiny budget and writes rows named by its tag."""

from __future__ import annotations

import dataclasses
import math

import pytest

from benchmarks.uci.protocol import run_dataset
from tests.benchmarks.uci.conftest import needs_data


@pytest.mark.slow
@needs_data
@pytest.mark.parametrize(
    ("changes", "tag"),
    [
        ({"batch_size": 32}, "batch32"),
        ({"init": "glorot"}, "glorot"),
        ({"input_dropout": False}, "no_input_dropout"),
        ({"lengthscale": None}, "lengthscale2016"),
        ({"tau_search": "bo", "bo_evals": 4}, "bo_tau4"),
        ({"method": "deep_ensembles", "adversarial": True, "budget": "2017"}, "adversarial"),
        ({"method": "deep_ensembles", "lr": 0.1, "budget": "2017"}, "lr0.1"),
    ],
)
def test_ablation_runs_and_names_its_rows(tiny, changes, tag):
    opts = dataclasses.replace(tiny, splits=(0,), **changes)
    result = run_dataset("yacht", opts)
    assert result.splits, "no rows"
    for method, (row,) in result.splits.items():
        assert method.endswith(f"+{tag}")
        assert math.isfinite(row.rmse)
        assert math.isfinite(row.ll)
    if changes.get("tau_search") == "bo":
        (row, *_) = next(iter(result.splits.values()))
        assert row.dropout == 0.01  # yacht's p in the ICML code
        assert 0.01 <= row.tau <= 10.0
