"""Adaptive sample counts: the schedule, the stopping rule against a naive reference, and the
promise that a row that stopped at n samples has the result of a fixed n-sample request."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import Tensor, nn

from mcdrop import adaptive, checkpoint, sample
from mcdrop.exceptions import InvalidArgumentError, SamplingStoppedError
from mcdrop.predictor import Predictor, Summary, check_finite
from mcdrop.recipes import datasets
from tests.conftest import MODELS


@pytest.fixture(scope="module")
def digits() -> Predictor:
    return Predictor(checkpoint.load(MODELS / "digits"))


@pytest.fixture(scope="module")
def diabetes() -> Predictor:
    return Predictor(checkpoint.load(MODELS / "diabetes"))


@pytest.fixture(scope="module")
def digits_rows() -> Tensor:
    """Clear digits and blends of two digits (hard): rows that stop early and rows that do not."""
    x = datasets.digits().x_test[:24]
    return torch.cat([x[:16], (x[16:24] + x[:8]) / 2])


@pytest.fixture(scope="module")
def diabetes_rows() -> Tensor:
    return datasets.diabetes().x_test[:20]


def test_checkpoints() -> None:
    points = adaptive.checkpoints(1000)
    assert points == [16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1000]
    assert all(b <= 1.5 * a for a, b in itertools.pairwise(points))
    assert adaptive.checkpoints(16) == [16]
    assert adaptive.checkpoints(17) == [16, 17]
    assert adaptive.checkpoints(5) == [5]  # below the first check: every row uses all


def _naive_error(samples: Tensor, regression_noise: Tensor | None = None) -> Tensor:
    """The stopping statistic from raw samples ``(n, N, K)`` in float64: the largest over
    outputs of the unbiased sample std over sqrt(n); for a regressor (``regression_noise``: the
    ``(N, K)`` noise variance of every sample) that of the mean and that of the predictive std,
    the larger, in units of the predictive std (the std's from the spread of each sample's term
    ``(μ_s - mean)² + noise`` of the predictive variance, over 2 std)."""
    s = samples.double()
    n = s.shape[0]
    se = s.std(0, correction=1) / math.sqrt(n)
    if regression_noise is not None:
        std = (s.var(0, correction=0) + regression_noise).sqrt()
        terms = (s - s.mean(0)).square() + regression_noise
        se_std = terms.std(0, correction=1) / math.sqrt(n) / (2 * std)
        se = torch.maximum(se, se_std) / std
    return se.amax(-1)


def _fields(summary: Summary) -> dict[str, Tensor]:
    return {k: v for k, v in vars(summary).items() if isinstance(v, Tensor)}


@pytest.mark.parametrize("per_row_seeds", [False, True])
@pytest.mark.parametrize(("model", "tolerance"), [("digits", 0.01), ("diabetes", 0.03)])
def test_each_row_has_the_result_of_a_fixed_request_with_its_count(
    request: pytest.FixtureRequest, model: str, tolerance: float, per_row_seeds: bool
) -> None:
    predictor: Predictor = request.getfixturevalue(model)
    x: Tensor = request.getfixturevalue(f"{model}_rows")
    seed: int | Tensor = torch.arange(x.shape[0]) * 7 + 1 if per_row_seeds else 5
    auto, samples = predictor.uncertainty(
        x, "auto", seed=seed, tolerance=tolerance, max_n_samples=300, return_samples=True
    )
    assert samples is not None
    used = auto.row_n_samples
    assert len(used.unique()) >= 3  # early stops and late ones: the comparison means something
    assert auto.n_samples == int(used.max()) == samples.shape[0]
    for n in used.unique().tolist():
        rows = (used == n).nonzero().flatten()
        rows_seed = seed[rows] if isinstance(seed, Tensor) else seed
        fixed, fixed_samples = predictor.uncertainty(
            x[rows], n, seed=rows_seed, return_samples=True
        )
        assert fixed_samples is not None
        # The same masks; values differ only by the rounding of different pass sizes.
        torch.testing.assert_close(samples[:n, rows], fixed_samples, rtol=1e-5, atol=1e-6)
        assert bool(samples[n:, rows].isnan().all())
        for name, value in _fields(fixed).items():
            got = getattr(auto, name)[rows]
            torch.testing.assert_close(got, value, rtol=1e-5, atol=1e-6, msg=name)


def test_the_stopping_rule_matches_a_naive_reference(
    digits: Predictor, diabetes: Predictor, digits_rows: Tensor, diabetes_rows: Tensor
) -> None:
    cases = [(digits, digits_rows, 0.01, None), (diabetes, diabetes_rows, 0.03, diabetes)]
    for predictor, x, tolerance, regressor in cases:
        most = 300
        summary, samples = predictor.uncertainty(
            x, "auto", seed=2, tolerance=tolerance, max_n_samples=most, return_samples=True
        )
        assert samples is not None
        noise = None
        if regressor is not None:
            assert regressor.spec.tau is not None
            noise = torch.full(samples.shape[1:], 1 / regressor.spec.tau, dtype=torch.float64)
        points = adaptive.checkpoints(most)
        for i, n in enumerate(summary.row_n_samples.tolist()):
            assert n in points
            row_noise = None if noise is None else noise[i : i + 1]
            errors = [float(_naive_error(samples[:c, i : i + 1], row_noise)[0]) for c in points]
            # Over tolerance at every earlier checkpoint; within it at the last, unless at max.
            assert all(e > tolerance * (1 - 1e-6) for e in errors[: points.index(n)]), (i, n)
            if n < most:
                assert errors[points.index(n)] <= tolerance * (1 + 1e-6), (i, n)


def test_easy_rows_stop_at_the_first_check_and_hard_ones_go_on(
    digits: Predictor, digits_rows: Tensor
) -> None:
    summary, _ = digits.uncertainty(digits_rows, "auto", seed=0, tolerance=0.01)
    used = summary.row_n_samples
    assert int(used[:16].min()) == adaptive.FIRST_CHECK  # some clear digit stops at once
    assert float(used[16:].double().mean()) > 2 * float(used[:16].double().mean())  # blends


def test_regressor_rows_far_from_the_data_sample_longer_at_the_default_tolerance(
    diabetes: Predictor,
) -> None:
    # Test rows in original units (easy: the noise dominates their predictive spread), and the
    # same rows moved 10x as far from the training mean (hard: mostly epistemic spread).
    x = datasets.diabetes().x_test[:40]
    spec = diabetes.spec.input_normalization
    assert spec is not None
    centre = torch.tensor(spec.mean)
    far = centre + (x - centre) * 10
    summary, _ = diabetes.uncertainty(torch.cat([x, far]), "auto", seed=0)
    used = summary.row_n_samples.double()
    easy, hard = used[:40], used[40:]
    assert float((easy == adaptive.FIRST_CHECK).double().mean()) >= 0.5  # most stop at once
    assert float(hard.mean()) > 8 * float(easy.mean())
    assert bool((hard > adaptive.FIRST_CHECK).all())
    assert adaptive.default_tolerance("regression") != adaptive.default_tolerance("classification")


def test_seeded_counts_are_reproducible_and_independent_of_the_batch(
    digits: Predictor, digits_rows: Tensor
) -> None:
    a, _ = digits.uncertainty(digits_rows, "auto", seed=9, tolerance=0.01)
    b, _ = digits.uncertainty(digits_rows, "auto", seed=9, tolerance=0.01)
    for name, value in _fields(a).items():
        assert torch.equal(getattr(b, name), value), name
    # Each row alone, and the batch reversed: the same count and the same statistics.
    reverse = torch.arange(digits_rows.shape[0] - 1, -1, -1)
    c, _ = digits.uncertainty(digits_rows[reverse], "auto", seed=9, tolerance=0.01)
    assert torch.equal(c.row_n_samples, a.row_n_samples[reverse])
    torch.testing.assert_close(c.probabilities, a.probabilities[reverse], rtol=1e-5, atol=1e-6)
    for i in (0, 20):
        alone, _ = digits.uncertainty(digits_rows[i : i + 1], "auto", seed=9, tolerance=0.01)
        assert int(alone.row_n_samples[0]) == int(a.row_n_samples[i])
    other, _ = digits.uncertainty(digits_rows, "auto", seed=10, tolerance=0.01)
    assert not torch.equal(other.probabilities, a.probabilities)


def test_max_n_samples_bounds_every_row(digits: Predictor, digits_rows: Tensor) -> None:
    tight, _ = digits.uncertainty(digits_rows, "auto", seed=0, tolerance=1e-9, max_n_samples=40)
    assert tight.row_n_samples.tolist() == [40] * digits_rows.shape[0]
    few, _ = digits.uncertainty(digits_rows, "auto", seed=0, max_n_samples=8)
    fixed, _ = digits.uncertainty(digits_rows, 8, seed=0)
    assert few.row_n_samples.tolist() == [8] * digits_rows.shape[0]
    torch.testing.assert_close(few.probabilities, fixed.probabilities)


def test_returned_samples_are_padded_with_nan_and_pass_the_finite_check(
    digits: Predictor, digits_rows: Tensor
) -> None:
    summary, samples = digits.uncertainty(
        digits_rows, "auto", seed=0, tolerance=0.01, return_samples=True
    )
    assert samples is not None
    assert samples.shape == (summary.n_samples, digits_rows.shape[0], 10)
    own = torch.arange(samples.shape[0])[:, None] < summary.row_n_samples[None, :]  # (S, N)
    assert bool(samples[own].isfinite().all())
    assert bool(samples[~own].isnan().all())
    check_finite(summary, samples)
    # A NaN among a row's own samples is still found.
    broken = samples.clone()
    broken[0, 3, 0] = math.inf
    with pytest.raises(Exception, match=r"\b3\b"):
        check_finite(summary, broken)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_samples": "auto", "tolerance": 0.0}, "tolerance"),
        ({"n_samples": "auto", "tolerance": -0.1}, "tolerance"),
        ({"n_samples": "auto", "tolerance": math.nan}, "tolerance"),
        ({"n_samples": "auto", "tolerance": math.inf}, "tolerance"),
        ({"n_samples": "auto", "tolerance": True}, "tolerance"),
        ({"n_samples": "auto", "max_n_samples": 0}, "max_n_samples"),
        ({"n_samples": "auto", "max_n_samples": 2.5}, "max_n_samples"),
        ({"n_samples": 10, "tolerance": 0.01}, "'auto' only"),
        ({"n_samples": None, "max_n_samples": 100}, "'auto' only"),
        ({"n_samples": "fixed"}, "integer or 'auto'"),
    ],
)
def test_bad_arguments(digits: Predictor, kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(InvalidArgumentError, match=match):
        digits.uncertainty(torch.zeros(2, 64), seed=0, **kwargs)  # type: ignore[arg-type]


def test_stop_is_checked_between_passes(digits: Predictor, digits_rows: Tensor) -> None:
    passes = []

    def stop() -> bool:
        passes.append(1)
        return len(passes) > 2

    with pytest.raises(SamplingStoppedError):
        digits.uncertainty(digits_rows, "auto", seed=0, tolerance=1e-9, stop=stop)


def test_sample_chunks_until_drops_the_rows_that_stopped(mlp: nn.Module, x: Tensor) -> None:
    # A made-up error: even rows are precise at once, odd rows never.
    def error(rows: Tensor) -> Tensor:
        return (rows % 2).double()

    counts = torch.zeros(x.shape[0], dtype=torch.int64)
    got = torch.full((50, x.shape[0], 3), math.nan)
    for chunk in adaptive.sample_chunks_until(
        mlp, x, error, tolerance=0.5, max_n_samples=50, seed=3, max_pass_rows=40
    ):
        assert isinstance(chunk.rows, Tensor)
        counts[chunk.rows] += chunk.values.shape[0]
        got[chunk.samples, chunk.rows] = chunk.values
    assert counts.tolist() == [16, 50] * (x.shape[0] // 2)
    whole = sample(mlp, x, 50, seed=3)
    torch.testing.assert_close(got[:, 1::2], whole[:, 1::2], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got[:16, ::2], whole[:16, ::2], rtol=1e-6, atol=1e-6)
