"""A split's result depends on its own seeds only, not on which splits train beside it."""

from __future__ import annotations

import dataclasses
import math

import pytest

from benchmarks.uci.protocol import Options, network_seed, run_dataset
from tests.benchmarks.uci.conftest import needs_data


def _split_result(opts: Options, splits: tuple[int, ...], split_batch: int, split: int):
    opts = dataclasses.replace(opts, splits=splits, split_batch=split_batch)
    result = run_dataset("yacht", opts)
    return {m: next(r for r in rows if r.split == split) for m, rows in result.splits.items()}


def test_network_seed_ignores_the_group():
    opts = Options()
    seed = network_seed(opts, "yacht", 3, "mc_dropout", 400, "grid", 0.01, 0.5)
    assert seed == network_seed(opts, "yacht", 3, "mc_dropout", 400, "grid", 0.01, 0.5)
    others = {
        network_seed(opts, "yacht", 4, "mc_dropout", 400, "grid", 0.01, 0.5),
        network_seed(opts, "yacht", 3, "het_mc_dropout", 400, "grid", 0.01, 0.5),
        network_seed(opts, "yacht", 3, "mc_dropout", 400, "grid", 0.01, 0.75),
        network_seed(dataclasses.replace(opts, init="glorot"), "yacht", 3, "mc_dropout", 400),
    }
    assert seed not in others


@pytest.mark.slow
@needs_data
@pytest.mark.parametrize("method", ["mc_dropout", "het_mc_dropout", "deep_ensembles"])
def test_split_alone_equals_split_in_a_group(tiny, method):
    opts = dataclasses.replace(tiny, method=method)
    alone = _split_result(opts, (3,), 20, 3)
    grouped = _split_result(opts, (1, 3, 6), 20, 3)
    assert alone.keys() == grouped.keys()
    for method_name, row in alone.items():
        other = grouped[method_name]
        for field in dataclasses.fields(row):
            a, b = getattr(row, field.name), getattr(other, field.name)
            if isinstance(a, float) and math.isnan(a):
                assert math.isnan(b), field.name
            else:
                assert a == pytest.approx(b, rel=1e-5, abs=1e-6), (method_name, field.name)
