"""benchmarks.uci.baselines: heteroscedastic MC dropout, Concrete dropout and Deep Ensembles on
one split at a tiny budget: finite metrics, the LL in original units as the MC-dropout rows
compute it, determinism, and a winner saved and served as a model directory."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from torch.nn import functional as F

from benchmarks.uci import baselines, protocol
from benchmarks.uci.data import UCISplit, read_split
from benchmarks.uci.protocol import run_dataset
from mcdrop import checkpoint, predict, sample, stats
from service.app import create_app
from service.config import Settings
from tests.benchmarks.uci.conftest import needs_data
from tests.service.conftest import wait_ready

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


@pytest.mark.slow
@needs_data
def test_saved_model_is_served_by_the_service(tiny, tmp_path):
    # The saved split's model directory is served like any other: the service's registry loads
    # it from model_dir, and /predict and /uncertainty answer in original units.
    opts = dataclasses.replace(
        tiny, method="concrete_dropout", splits=(0,), save_models=tmp_path / "models"
    )
    run_dataset("yacht", opts)
    (directory,) = (tmp_path / "models").iterdir()
    split = read_split(opts.data, "yacht", 0)
    rows = split.x_test[:4].tolist()
    expected = predict(checkpoint.load(directory).module, torch.tensor(rows, dtype=torch.float32))
    with TestClient(create_app(Settings(model_dir=tmp_path / "models"))) as http:
        wait_ready(http)
        (model,) = http.get("/models").json()["models"]
        assert (model["name"], model["likelihood"]) == (directory.name, "heteroscedastic")
        served = http.post(f"/models/{directory.name}/predict", json={"inputs": rows})
        assert served.status_code == 200
        means = [p["mean"][0] for p in served.json()["predictions"]]
        noise = [p["noise_variance"][0] for p in served.json()["predictions"]]
        assert means == pytest.approx(expected[:, 0].tolist(), rel=1e-5, abs=1e-4)
        assert noise == pytest.approx(expected[:, 1].exp().tolist(), rel=1e-4)
        body = {"inputs": rows, "n_samples": 50, "seed": 1}
        mc = http.post(f"/models/{directory.name}/uncertainty", json=body)
        assert mc.status_code == 200
        for result in mc.json()["results"]:
            assert result["aleatoric_variance"][0] > 0
            assert result["lower"][0] < result["mean"][0] < result["upper"][0]


def _normal_pdf(y: float, mean: float, var: float) -> float:
    return math.exp(-0.5 * (y - mean) ** 2 / var) / math.sqrt(2 * math.pi * var)


def test_ensemble_ll_is_the_closed_form_mixture_in_original_units(tiny):
    # Two members with constant outputs (μ_k, s_k) in standardised units: the ensemble's LL must
    # be log(½ N(y; m_1, v_1) + ½ N(y; m_2, v_2)) with m_k = μ_k·σ_y + ȳ and
    # v_k = (softplus(s_k) + 1e-6)·σ_y², written out by hand; its moment-matched LL and RMSE too.
    recipe = baselines.RECIPES["deep_ensembles"]
    stack = baselines.build_stack(1, 1, [0.0, 0.0], [1, 2], recipe, "torch")
    heads = [(0.5, -1.0), (-1.5, 2.0)]  # (μ_k, s_k)
    with torch.no_grad():
        stack.w1.zero_()
        stack.b1.fill_(1.0)  # hidden = relu(1) = 1 for every row
        stack.w2.copy_(torch.tensor([[list(h)] for h in heads]))
        stack.b2.zero_()
    y = [9.0, 14.0, 5.5]
    part = baselines.Part(
        torch.zeros(4, 1),
        torch.zeros(4, 1),
        torch.zeros(3, 1),
        torch.tensor(y, dtype=torch.float64)[:, None],
        10.0,
        2.0,
    )
    metrics = baselines.ensemble_metrics(stack, range(2), part, tiny, recipe)
    means = [mu * 2.0 + 10.0 for mu, _ in heads]
    variances = [(float(F.softplus(torch.tensor(s))) + 1e-6) * 4.0 for _, s in heads]
    mixture = [
        math.log(sum(0.5 * _normal_pdf(t, m, v) for m, v in zip(means, variances, strict=True)))
        for t in y
    ]
    mean = sum(means) / 2
    var = sum(variances) / 2 + sum(m * m for m in means) / 2 - mean**2
    matched = [math.log(_normal_pdf(t, mean, var)) for t in y]
    assert metrics["ll"] == pytest.approx(sum(mixture) / 3, rel=1e-5)
    assert metrics["ll_moment_matched"] == pytest.approx(sum(matched) / 3, rel=1e-5)
    rmse = math.sqrt(sum((t - mean) ** 2 for t in y) / 3)
    assert metrics["rmse"] == pytest.approx(rmse, rel=1e-5)


def test_deep_ensembles_reach_the_noise_level_on_a_linear_dataset():
    # y = x·w + 100 + N(0, 0.5²) with badly scaled inputs: with the normalisation, the variance
    # head and the original units right, 40 epochs of the ensemble get within 0.15 of the
    # oracle's LL (the test set's own noise is ±0.05) and near the noise's RMSE.
    rng = np.random.default_rng(0)
    sigma = 0.5
    x = rng.normal(0.0, 1.0, (1000, 3)) * [1.0, 10.0, 100.0] + [0.0, 5.0, -50.0]
    y = x @ np.array([[3.0], [-0.2], [0.01]]) + 100 + sigma * rng.standard_normal((1000, 1))
    split = UCISplit("synthetic", 0, x[:800], y[:800], x[800:], y[800:])
    opts = protocol.Options(method="deep_ensembles", budget="2017", progress=False)
    (row,) = baselines.run_ensembles("synthetic", [split], 20, 40, opts)
    oracle = -0.5 * math.log(2 * math.pi * sigma**2) - 0.5
    assert row.ll > oracle - 0.15
    assert row.rmse < 1.2 * sigma
    assert row.lr in baselines.DE_LRS


def test_fine_lr_chooses_from_the_fine_grid_on_validation():
    # --fine-lr: each split's rate comes from DE_LRS_FINE (a superset of DE_LRS) by validation
    # LL; every split gets a finite row.
    rng = np.random.default_rng(1)
    x = rng.normal(0.0, 1.0, (300, 2))
    y = np.sin(3 * x[:, :1]) + 0.1 * rng.standard_normal((300, 1))
    splits = [UCISplit("synthetic", k, x[:240], y[:240], x[240:], y[240:]) for k in range(2)]
    opts = protocol.Options(method="deep_ensembles", budget="2017", progress=False, fine_lr=True)
    rows = baselines.run_ensembles("synthetic", splits, 10, 5, opts)
    assert [r.split for r in rows] == [0, 1]
    for row in rows:
        assert row.lr in baselines.DE_LRS_FINE
        assert math.isfinite(row.val_ll)
        assert math.isfinite(row.ll)
    assert set(baselines.DE_LRS) < set(baselines.DE_LRS_FINE)


@needs_data
def test_deep_ensembles_fit_yacht_at_the_papers_budget():
    # The paper's yacht RMSE is 1.58 (Table 1). Adam at lr 0.1 for 40 epochs of 3 steps left
    # every member unconverged (split 0: test RMSE 1.9-9.8, 6.8 for a 2-split smoke run); the
    # rate chosen on validation fits it.
    split = read_split(protocol.data_root(), "yacht", 0)
    opts = protocol.Options(method="deep_ensembles", budget="2017", progress=False)
    (row,) = baselines.run_ensembles("yacht", [split], 50, 40, opts)
    assert row.rmse < 1.58
    assert row.ll > -1.6
    assert math.isfinite(row.val_ll)


@pytest.mark.parametrize(
    ("last", "diverged"),
    [
        (-2.3, False),
        (0.4, False),  # back up from -2.2, but still better than the constant predictor
        (0.6, True),  # worse than predicting the training mean with unit variance
        (math.nan, True),
        (math.inf, True),
    ],
)
def test_diverged_is_a_member_that_ends_worse_than_the_constant_predictor(last, diverged):
    # (epochs, M): three members fall steadily; the third one's last epoch varies.
    history = torch.tensor(
        [[0.5, 0.4, 0.3], [-0.5, -1.0, -1.8], [-0.9, -1.2, -2.2], [-1.0, -1.3, last]],
        dtype=torch.float64,
    )
    assert baselines.diverged(history) is diverged


def test_the_constant_predictor_scores_the_divergence_bar():
    # On standardised targets, the training mean with unit variance has mean NLL 0.5 (constant
    # dropped) under the loss the members train on.
    y = torch.randn(1, 500, 1, dtype=torch.float64)
    y = (y - y.mean()) / y.std(correction=0)
    out = torch.zeros(1, 500, 2, dtype=torch.float64)
    out[..., 1] = 0.0  # log-variance head of the "log" recipe: σ² = 1
    nll = baselines.gaussian_nll(out, y, "log")
    assert float(nll) == pytest.approx(baselines.CONSTANT_NLL)


@needs_data
def test_a_diverged_retrain_steps_down_the_learning_rate():
    # Boston split 14 at 80 epochs chooses lr 0.1 on validation; retrained on all its rows at
    # that rate, two members end at training NLL 2.2 and 0.9 (the constant predictor: 0.5)
    # and the ensemble's test RMSE is 5.2. The split is retrained at 0.01, the next rate.
    split = read_split(protocol.data_root(), "bostonHousing", 14)
    opts = protocol.Options(method="deep_ensembles", budget="2017x2", progress=False)
    (row,) = baselines.run_ensembles("bostonHousing", [split], 50, 80, opts)
    assert row.lr_backoffs == 1
    assert row.lr == 0.01
    assert row.rmse < 3.0
    assert row.ll > -2.5


def test_val_epochs_choose_the_epochs_on_validation_from_the_grid():
    # --val-epochs 1,2: one validation run to 2 × 5 epochs per rate, scored at 5 and 10; every
    # split trains its final members for epochs of that grid.
    rng = np.random.default_rng(2)
    x = rng.normal(0.0, 1.0, (300, 2))
    y = np.sin(3 * x[:, :1]) + 0.1 * rng.standard_normal((300, 1))
    splits = [UCISplit("synthetic", k, x[:240], y[:240], x[240:], y[240:]) for k in range(3)]
    opts = protocol.Options(
        method="deep_ensembles", budget="2017", progress=False, val_epochs=(1, 2)
    )
    rows = baselines.run_ensembles("synthetic", splits, 10, 5, opts)
    assert [r.split for r in rows] == [0, 1, 2]
    for row in rows:
        assert row.n_epochs in (5, 10)
        assert row.lr in baselines.DE_LRS
        assert math.isfinite(row.val_ll)
    # Without the option, the budget's epochs.
    plain = baselines.run_ensembles(
        "synthetic", splits[:1], 10, 5, dataclasses.replace(opts, val_epochs=())
    )
    assert plain[0].n_epochs == 5
