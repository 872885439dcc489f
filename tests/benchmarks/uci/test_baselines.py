"""benchmarks.uci.baselines: heteroscedastic MC dropout, Concrete dropout and Deep Ensembles on
one split at a tiny budget: finite metrics, the LL in original units as the MC-dropout rows
compute it, determinism, and a winner saved and served as a model directory."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from benchmarks.uci import baselines, protocol
from benchmarks.uci.data import read_split
from benchmarks.uci.protocol import run_dataset
from mcdrop import checkpoint, predict, sample, stats
from tests.benchmarks.uci.conftest import needs_data

METHODS = ["het_mc_dropout", "concrete_dropout", "deep_ensembles"]


@pytest.mark.slow
@needs_data
@pytest.mark.parametrize("method", METHODS)
def test_baseline_runs_one_split_deterministically(tiny, method):
    opts = dataclasses.replace(tiny, method=method, splits=(0,))
    first = run_dataset("yacht", opts)
    again = run_dataset("yacht", opts)
    assert list(first.splits) == [method]
    (row,) = first.splits[method]
    for name in ("rmse", "ll", "picp95", "width95", "crps", "ll_moment_matched"):
        assert math.isfinite(getattr(row, name)), name
    assert row.rmse > 0
    assert 0 <= row.picp95 <= 1
    assert again.splits[method][0] == row


def test_concrete_rates_are_learned():
    torch.manual_seed(0)
    x, y = torch.randn(1, 64, 3), torch.randn(1, 64, 1)
    recipe = baselines.RECIPES["concrete_dropout"]
    stack = baselines.build_stack(3, 8, [0.1, 0.1], [1, 2], recipe, "torch")
    before = stack.rates.clone()
    baselines.fit_gaussian_stack(
        stack,
        x,
        y,
        torch.zeros(2, dtype=torch.int64),
        recipe=recipe,
        epochs=3,
        weight_decay=torch.zeros(2),
        seeds=[1, 2],
    )
    assert not torch.equal(stack.rates, before)
    assert bool(((stack.rates > 0) & (stack.rates < 1)).all())


def test_mixture_ll_matches_mcdrop_stats_in_original_units(tiny):
    # The baselines' LL: mixture over samples of N(μ_s, σ²_s) in original units, exactly the
    # formula of the MC-dropout rows (mcdrop.stats.mixture_log_likelihood).
    gen = torch.Generator().manual_seed(0)
    part = baselines.Part(
        torch.zeros(4, 2),
        torch.zeros(4, 1),
        torch.zeros(7, 2),
        torch.randn(7, 1, generator=gen, dtype=torch.float64) * 3 + 10,
        10.0,
        3.0,
    )
    standardised = torch.randn(5, 7, 2, generator=gen)  # (S, N, [μ, log σ²]) standardised
    values = baselines.original_units(standardised, part)
    metrics = baselines.mixture_metrics([values], part, tiny, rmse_det=0.0)
    mean = standardised[..., :1].double() * 3 + 10
    var = standardised[..., 1:].double().exp() * 9
    expected = stats.mixture_log_likelihood(part.y_eval, mean, var).mean()
    assert metrics["ll"] == pytest.approx(float(expected), rel=1e-6)  # the summary is float32


@pytest.mark.slow
@needs_data
def test_het_model_saves_and_serves_like_any_model_directory(tiny, tmp_path):
    opts = dataclasses.replace(
        tiny, method="het_mc_dropout", splits=(0,), save_models=tmp_path / "models"
    )
    run_dataset("yacht", opts)
    (directory,) = (tmp_path / "models").iterdir()
    loaded = checkpoint.load(directory)
    assert loaded.spec.likelihood == "heteroscedastic"
    split = read_split(opts.data, "yacht", 0)
    part = protocol.test_part(split)
    x = torch.as_tensor(split.x_test, dtype=torch.float32)
    # Masks are keyed on a row's contents, which differ between original and standardised
    # units, so compare the dropout-free predictions exactly and the samples by shape.
    served = predict(loaded.module, x)  # (N, 2): mean and log-variance in original units
    spec = loaded.spec.architecture["params"]
    net = baselines.MLP(
        spec["in_features"], spec["hidden"], 2, spec["dropout"], spec["input_dropout"]
    )
    net.load_state_dict(loaded.module.net.state_dict())
    direct = baselines.original_units(predict(net.eval(), part.x_eval)[None], part)[0]
    torch.testing.assert_close(served.double(), direct, rtol=1e-5, atol=1e-4)
    samples = sample(loaded.module, x, 20, seed=3)
    assert samples.shape == (20, x.shape[0], 2)
    assert bool(samples.isfinite().all())
