"""mcdrop.calibration: rejection thresholds, split-conformal quantiles, the calibration file."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mcdrop
from mcdrop import calibration as cal
from mcdrop.stats import ClassificationSummary, RegressionSummary
from tests.conftest import MODELS


def classification_summary(p: torch.Tensor) -> ClassificationSummary:
    """A summary of mean probabilities ``p (N, K)`` (the other statistics as the scores need)."""
    n = p.shape[0]
    h = -(p * p.clamp_min(1e-300).log()).sum(-1)
    return ClassificationSummary(
        probabilities=p,
        variance=torch.zeros_like(p),
        label=p.argmax(-1),
        entropy=h,
        expected_entropy=h / 2,
        mutual_information=h / 2,
        variation_ratio=torch.zeros(n),
        n_samples=10,
        row_n_samples=torch.full((n,), 10),
    )


def regression_summary(mean: torch.Tensor, std: torch.Tensor) -> RegressionSummary:
    """A summary with predictive ``mean`` and ``std`` ``(N, K)``, half of the variance epistemic."""
    n = mean.shape[0]
    var = std**2
    return RegressionSummary(
        mean=mean,
        variance=var,
        std=std,
        epistemic_variance=var / 2,
        aleatoric_variance=var / 2,
        lower=mean - 2 * std,
        upper=mean + 2 * std,
        level=0.95,
        n_samples=10,
        row_n_samples=torch.full((n,), 10),
    )


def regression_calibration(residuals: list[float]) -> cal.Calibration:
    """A calibration whose conformal scores are ``|residuals|`` (std 1, mean 0)."""
    n = len(residuals)
    summary = regression_summary(torch.zeros(n, 1, dtype=torch.float64), torch.ones(n, 1))
    y = torch.tensor(residuals, dtype=torch.float64)[:, None]
    return cal.from_statistics(summary, y, model="m", seed=0, data="synthetic")


# -- order statistics ------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 400),
    rate=st.floats(0.0, 0.999),
    seed=st.integers(0, 2**31 - 1),
)
def test_the_threshold_at_rate_r_rejects_r_of_the_calibration_rows(
    n: int, rate: float, seed: int
) -> None:
    scores = torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    threshold = cal.rejection_threshold(scores.sort().values, rate)
    rejected = float((scores > threshold).double().mean())
    # At most r, and (distinct scores) less than one row short of it, but never all rows.
    assert rejected <= rate + 1e-9
    assert rejected >= min(rate, (n - 1) / n) - 1 / n - 1e-9


def test_closed_form_order_statistics() -> None:
    s = torch.arange(1.0, 10.0, dtype=torch.float64)  # 1..9
    assert cal.rejection_threshold(s, 0.0) == 9.0  # nothing of the calibration above it
    assert cal.rejection_threshold(s, 1 / 9) == 8.0  # one row of nine
    assert cal.rejection_threshold(s, 0.5) == 5.0  # ceil(4.5) = 5th
    # Conformal: the ceil((n + 1) c)-th smallest: (10 * 0.9) = 9th; (10 * 0.5) = 5th.
    assert cal.conformal_quantile(s, 0.9) == 9.0
    assert cal.conformal_quantile(s, 0.5) == 5.0
    with pytest.raises(mcdrop.InvalidArgumentError, match="at least 10 calibration rows"):
        cal.conformal_quantile(s, 0.91)  # above n / (n + 1) = 0.9: the quantile is infinite


@pytest.mark.parametrize("rate", [-0.1, 1.0, math.nan])
def test_a_rate_outside_0_1_is_refused(rate: float) -> None:
    with pytest.raises(mcdrop.InvalidArgumentError, match="reject_rate"):
        cal.rejection_threshold(torch.ones(3, dtype=torch.float64), rate)


# -- conformal coverage ----------------------------------------------------------------------


def _binomial_bound(p: float, n: int) -> float:
    """Four standard errors of a binomial share."""
    return 4 * math.sqrt(p * (1 - p) / n)


@settings(max_examples=10, deadline=None)
@given(
    coverage=st.sampled_from([0.5, 0.8, 0.9, 0.95]),
    n_cal=st.integers(40, 200),
    seed=st.integers(0, 2**31 - 1),
)
def test_regression_intervals_cover_exchangeable_rows(
    coverage: float, n_cal: int, seed: int
) -> None:
    # Heteroscedastic Gaussian rows whose std the model knows up to a factor of 2: split
    # conformal covers at least the target on average over calibration sets (marginally).
    g = torch.Generator().manual_seed(seed)
    trials, n_test = 100, 50
    covered = []
    for _ in range(trials):
        n = n_cal + n_test
        mean = torch.randn(n, 1, generator=g, dtype=torch.float64)
        scale = 0.5 + torch.rand(n, 1, generator=g, dtype=torch.float64)
        y = mean + 2 * scale * torch.randn(n, 1, generator=g, dtype=torch.float64)
        part = regression_summary(mean[:n_cal], scale[:n_cal])
        calibration = cal.from_statistics(part, y[:n_cal], model="m", seed=0, data="synthetic")
        request = cal.resolve("regression", calibration, coverage=coverage)
        test = regression_summary(mean[n_cal:], scale[n_cal:])
        decisions = cal.decide(request, test)
        assert decisions.lower is not None
        assert decisions.upper is not None
        inside = (decisions.lower <= y[n_cal:]) & (y[n_cal:] <= decisions.upper)
        assert torch.equal(inside[:, 0], cal.coverage_of(request, test, y[n_cal:]))
        covered.append(inside.double().mean())
    mean_coverage = float(torch.stack(covered).mean())
    # E[coverage] = ceil((n+1)c)/(n+1) >= c; the estimate's s.e. over trials * n_test rows.
    expected = math.ceil((n_cal + 1) * coverage - 1e-9) / (n_cal + 1)
    spread = math.sqrt(coverage * (1 - coverage) / (n_cal + 2))  # per-trial (calibration)
    se = math.sqrt(spread**2 / trials + coverage * (1 - coverage) / (trials * n_test))
    assert mean_coverage >= coverage - 4 * se
    assert abs(mean_coverage - expected) <= 4 * se


@settings(max_examples=10, deadline=None)
@given(coverage=st.sampled_from([0.8, 0.9, 0.95]), seed=st.integers(0, 2**31 - 1))
def test_classification_sets_cover_exchangeable_rows(coverage: float, seed: int) -> None:
    # Labels drawn from the model's own probabilities: exchangeable, calibrated rows.
    g = torch.Generator().manual_seed(seed)
    n_cal, n_test, k = 500, 4000, 5
    logits = 2 * torch.randn(n_cal + n_test, k, generator=g, dtype=torch.float64)
    p = logits.softmax(-1)
    y = torch.multinomial(p, 1, generator=g)[:, 0]
    calibration = cal.from_statistics(
        classification_summary(p[:n_cal]), y[:n_cal], model="m", seed=0, data="synthetic"
    )
    request = cal.resolve("classification", calibration, coverage=coverage)
    test = classification_summary(p[n_cal:])
    decisions = cal.decide(request, test)
    assert decisions.prediction_set is not None
    inside = decisions.prediction_set.gather(1, y[n_cal:, None])[:, 0]
    assert torch.equal(inside, cal.coverage_of(request, test, y[n_cal:]))
    empirical = float(inside.double().mean())
    spread = math.sqrt(coverage * (1 - coverage) / (n_cal + 2))
    se = math.sqrt(spread**2 + coverage * (1 - coverage) / n_test)
    # A calibration set's coverage is Beta(k, n + 1 - k), skewed left: 4 standard errors below
    # is a 1-in-5,000 draw at 0.95 (hypothesis found seed 849 at 4.3), 6 one in ~10^6; a set
    # that missed its coverage (0.85 for 0.95) is 9.7 below.
    assert empirical >= coverage - 6 * se


def test_closed_form_prediction_sets_and_intervals() -> None:
    # Conformal scores 1 - p_y of four rows: 0.1, 0.2, 0.3, 0.4; coverage 0.6: the
    # ceil(5 * 0.6) = 3rd smallest, q = 0.3: a class is in the set when p >= 0.7.
    p = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.6, 0.4]], dtype=torch.float64)
    calibration = cal.from_statistics(
        classification_summary(p), torch.zeros(4, dtype=torch.long), model="m", seed=0, data="d"
    )
    request = cal.resolve("classification", calibration, coverage=0.6)
    assert request.quantile == pytest.approx(0.3)
    new = torch.tensor([[0.75, 0.25], [0.5, 0.5], [0.2, 0.8]], dtype=torch.float64)
    decisions = cal.decide(request, classification_summary(new))
    assert decisions.prediction_set is not None
    assert decisions.prediction_set.tolist() == [[True, False], [False, False], [False, True]]
    # Regression: residuals 1..4 (std 1); coverage 0.6: q = 3, so mean ± 3 std.
    reg = regression_calibration([1.0, -2.0, 3.0, -4.0])
    request = cal.resolve("regression", reg, coverage=0.6)
    out = cal.decide(request, regression_summary(torch.tensor([[10.0]]), torch.tensor([[2.0]])))
    assert out.lower is not None
    assert out.upper is not None
    assert (float(out.lower), float(out.upper)) == (4.0, 16.0)


# -- requests --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reg() -> cal.Calibration:
    return regression_calibration([float(i) for i in range(1, 20)])


def test_reject_rate_uses_the_stored_threshold(reg: cal.Calibration) -> None:
    request = cal.resolve("regression", reg, reject_rate=0.1)
    assert request.reject_score == "std"
    assert request.reject_threshold == reg.threshold(0.1, "std")
    # std is 1 on every calibration row: none is above it, rows with std 2 are.
    summary = regression_summary(torch.zeros(2, 1), torch.tensor([[1.0], [2.0]]))
    decisions = cal.decide(request, summary)
    assert decisions.reject is not None
    assert decisions.reject.tolist() == [False, True]


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"reject_rate": 0.1, "reject_threshold": 1.0}, mcdrop.InvalidArgumentError, "not both"),
        ({"reject_rate": 0.1, "reject_score": "entropy"}, mcdrop.InvalidArgumentError, "std"),
        ({"reject_score": "std"}, mcdrop.InvalidArgumentError, "applies with"),
        ({"reject_rate": 1.5}, mcdrop.InvalidArgumentError, "reject_rate must be in"),
        ({"coverage": 0.999}, mcdrop.InvalidArgumentError, "calibration rows"),
        ({"coverage": 0.0}, mcdrop.InvalidArgumentError, "coverage must be in"),
        ({"reject_threshold": math.inf}, mcdrop.InvalidArgumentError, "finite"),
    ],
)
def test_bad_requests_say_what_to_fix(
    reg: cal.Calibration, options: dict[str, object], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        cal.resolve("regression", reg, **options)  # type: ignore[arg-type]


def test_the_contract_names_every_score() -> None:
    from mcdrop_client.schemas import REJECT_SCORES

    assert sorted(REJECT_SCORES) == sorted({s for scores in cal.SCORES.values() for s in scores})
    assert set(cal.DEFAULT_SCORE) == set(cal.SCORES)


@pytest.mark.parametrize(
    ("options", "instead"),
    [({"reject_rate": 0.1}, " or send an explicit reject_threshold"), ({"coverage": 0.9}, "")],
)
def test_rates_and_coverages_need_a_calibration(options: dict[str, float], instead: str) -> None:
    # A threshold is no way to a coverage; and a served model calibrated after it loaded stayed
    # uncalibrated, with no word of why.
    with pytest.raises(mcdrop.NotCalibratedError) as info:
        cal.resolve("classification", None, **options)  # type: ignore[arg-type]
    assert str(info.value).endswith(
        f"calibrate it (`mcdrop calibrate MODEL_DIR`){instead} (a server reads the file when it "
        "loads the model: restart one that runs)"
    )


def test_an_explicit_threshold_needs_no_calibration() -> None:
    request = cal.resolve("classification", None, reject_threshold=0.5, reject_score="entropy")
    p = torch.tensor([[0.5, 0.5], [0.99, 0.01]], dtype=torch.float64)
    decisions = cal.decide(request, classification_summary(p))
    assert decisions.reject is not None
    assert decisions.reject.tolist() == [True, False]  # ln 2 = 0.69 > 0.5; 0.056 < 0.5


# -- the file, loaded with the model ---------------------------------------------------------


@pytest.fixture
def digits_dir(tmp_path: Path) -> Path:
    return Path(shutil.copytree(MODELS / "digits", tmp_path / "digits"))


def test_calibrate_saves_a_file_the_model_loads_with(digits_dir: Path) -> None:
    (digits_dir / cal.CALIBRATION).unlink()
    model = mcdrop.load(digits_dir)
    assert model.calibration is None
    x = torch.rand(30, 64) * 16
    y = torch.arange(30) % 10
    made = mcdrop.calibrate(model, x, y, n_samples=8, seed=3, data="random rows", save=True)
    assert model.calibration is made
    loaded = mcdrop.load(digits_dir).calibration
    assert loaded is not None
    assert (loaded.n_rows, loaded.n_samples, loaded.seed, loaded.data) == (30, 8, 3, "random rows")
    for name in cal.SCORES["classification"]:
        assert torch.equal(loaded.scores[name], made.scores[name])  # float64 round trip
    assert torch.equal(loaded.conformal, made.conformal)
    assert loaded.threshold(0.2) == made.threshold(0.2)


def test_a_calibration_file_that_is_a_symlink_is_replaced_not_written_through(
    tmp_path: Path, reg: cal.Calibration
) -> None:
    victim = tmp_path / "victim"
    victim.write_text("not a calibration")
    (tmp_path / cal.CALIBRATION).symlink_to(victim)
    reg.save(tmp_path)
    assert victim.read_text() == "not a calibration"
    assert not (tmp_path / cal.CALIBRATION).is_symlink()
    read = cal.read(tmp_path)
    assert read is not None
    assert torch.equal(read.conformal, reg.conformal)


def test_calibrate_takes_the_arrays_of_an_npz(digits_dir: Path) -> None:
    """Arrays as np.load gives them (it was an AttributeError: 'numpy.ndarray' has no 'dim')."""
    model = mcdrop.load(digits_dir)
    x = torch.rand(30, 64, dtype=torch.float64) * 16
    y = torch.arange(30) % 10
    from_arrays = mcdrop.calibrate(model, x.numpy(), y.numpy(), n_samples=8, seed=3)
    from_lists = mcdrop.calibrate(model, x.tolist(), y.tolist(), n_samples=8, seed=3)
    from_tensors = mcdrop.calibrate(model, x, y, n_samples=8, seed=3)
    for made in [from_arrays, from_lists]:
        assert torch.equal(made.conformal, from_tensors.conformal)
        assert made.threshold(0.2) == from_tensors.threshold(0.2)


def _edit(directory: Path, change: dict[str, object]) -> None:
    path = directory / cal.CALIBRATION
    data = json.loads(path.read_text())
    data.update(change)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"format_version": 2}, "format_version"),
        ({"weights_sha256": "0" * 64}, "other weights"),
        ({"n_outputs": 3}, "3 outputs"),
        ({"task": "regression"}, "conformal_method"),
        ({"n_rows": 3}, "n_rows=3"),
        ({"conformal": [1.0, 0.0]}, "conformal"),
        ({"__reduce__": "os.system"}, "unknown field"),
        ({"scores": {"entropy": []}}, "scores"),
    ],
)
def test_a_broken_calibration_is_a_load_error(
    digits_dir: Path, change: dict[str, object], match: str
) -> None:
    _edit(digits_dir, change)
    with pytest.raises(mcdrop.CheckpointError, match=match) as info:
        mcdrop.load(digits_dir)
    assert cal.CALIBRATION in str(info.value)


def test_an_unsorted_or_non_json_file_is_a_load_error(digits_dir: Path) -> None:
    path = digits_dir / cal.CALIBRATION
    data = json.loads(path.read_text())
    data["scores"]["entropy"] = data["scores"]["entropy"][::-1]
    path.write_text(json.dumps(data))
    with pytest.raises(mcdrop.CheckpointError, match="sorted ascending"):
        mcdrop.load(digits_dir)
    path.write_bytes(b"\x80not json")
    with pytest.raises(mcdrop.CheckpointError, match="not valid JSON"):
        mcdrop.load(digits_dir)
    # Calibrating again reads the model without the broken file.
    assert mcdrop.load(digits_dir, read_calibration=False).calibration is None


@pytest.mark.parametrize("name", ["digits", "fashion", "diabetes"])
def test_the_bundled_models_are_calibrated_on_their_validation_split(name: str) -> None:
    model = mcdrop.load(MODELS / name)
    calibration = model.calibration
    assert calibration is not None
    assert calibration.data == f"{name} validation split"
    assert calibration.n_samples == model.spec.default_n_samples
    assert calibration.seed == 0
    assert calibration.n_rows == {"digits": 270, "fashion": 5000, "diabetes": 66}[name]
