"""Statistics against closed forms, naive loops (float64), and hypothesis invariants."""

from __future__ import annotations

import dataclasses
import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from mcdrop import stats
from mcdrop.exceptions import InvalidArgumentError

# -- strategies ---------------------------------------------------------------------------


@st.composite
def logits_tensors(draw: st.DrawFn) -> Tensor:
    s = draw(st.integers(1, 12))
    n = draw(st.integers(1, 5))
    k = draw(st.integers(2, 6))
    seed = draw(st.integers(0, 2**31))
    scale = draw(st.sampled_from([0.01, 1.0, 10.0, 80.0]))
    g = torch.Generator().manual_seed(seed)
    return torch.randn(s, n, k, generator=g, dtype=torch.float64) * scale


def _chunks(total: int, draw_sizes: list[int]) -> list[slice]:
    out, start = [], 0
    for size in draw_sizes:
        if start >= total:
            break
        out.append(slice(start, min(total, start + size)))
        start += size
    if start < total:
        out.append(slice(start, total))
    return out


# -- classification -----------------------------------------------------------------------


def test_closed_forms() -> None:
    k = 5
    uniform = torch.zeros(1, 1, k, dtype=torch.float64)
    assert stats.predictive_entropy(uniform).item() == pytest.approx(math.log(k))
    assert stats.mutual_information(uniform).item() == pytest.approx(0.0, abs=1e-12)
    confident = torch.tensor([[[50.0, 0.0]], [[0.0, 50.0]]], dtype=torch.float64)
    # Two samples, each certain but of opposite classes: all uncertainty is epistemic.
    assert stats.expected_entropy(confident).item() == pytest.approx(0.0, abs=1e-15)
    assert stats.mutual_information(confident).item() == pytest.approx(math.log(2))
    assert stats.variation_ratio(confident).item() == pytest.approx(0.5)
    assert stats.class_variance(confident)[0].tolist() == pytest.approx([0.25, 0.25])


def test_entropy_of_zero_probability_is_finite() -> None:
    assert stats.entropy(torch.tensor([1.0, 0.0])).item() == 0.0
    huge = torch.tensor([[[1e4, -1e4, 0.0]]])
    assert torch.isfinite(stats.predictive_entropy(huge)).all()
    assert torch.isfinite(stats.expected_entropy(huge)).all()


def naive_classification(logits: Tensor) -> dict[str, Tensor]:
    """Loops over samples and rows in float64, no vectorisation."""
    s_count, n_rows, k = logits.shape
    out = {name: torch.zeros(n_rows, dtype=torch.float64) for name in ("h", "eh", "vr")}
    for n in range(n_rows):
        probs = [torch.softmax(logits[s, n].double(), -1) for s in range(s_count)]
        mean = sum(probs) / s_count
        out["h"][n] = -sum(p * math.log(p) for p in mean.tolist() if p > 0)
        out["eh"][n] = (
            sum(-sum(p * math.log(p) for p in q.tolist() if p > 0) for q in probs) / s_count
        )
        labels = [int(q.argmax()) for q in probs]
        out["vr"][n] = 1 - max(labels.count(c) for c in range(k)) / s_count
    return out


@settings(max_examples=60, deadline=None)
@given(logits_tensors())
def test_invariants_and_naive_reference(logits: Tensor) -> None:
    k = logits.shape[-1]
    h = stats.predictive_entropy(logits)
    eh = stats.expected_entropy(logits)
    mi = stats.mutual_information(logits)
    assert bool((h >= -1e-12).all())
    assert bool((h <= math.log(k) + 1e-9).all())
    assert bool((mi >= 0).all())
    assert torch.allclose(mi, (h - eh).clamp_min(0), atol=1e-12)
    assert bool((eh <= h + 1e-9).all())  # Jensen: H is concave
    ref = naive_classification(logits)
    assert torch.allclose(h, ref["h"], atol=1e-9)
    assert torch.allclose(eh, ref["eh"], atol=1e-9)
    vr = stats.variation_ratio(logits)
    assert torch.allclose(vr, ref["vr"], atol=1e-12)
    assert bool((vr >= 0).all())
    assert bool((vr <= 1 - 1 / k + 1e-12).all())


@settings(max_examples=40, deadline=None)
@given(logits_tensors(), st.lists(st.integers(1, 5), min_size=1, max_size=6))
def test_classification_accumulator_equals_batch(logits: Tensor, sizes: list[int]) -> None:
    s_count, n_rows, k = logits.shape
    acc = stats.ClassificationAccumulator(n_rows, k)
    for rows in _chunks(n_rows, sizes[:2]):
        for samples in _chunks(s_count, sizes):
            acc.update(logits[samples, rows], rows)
    got = acc.result()
    assert got.n_samples == s_count
    assert torch.allclose(got.probabilities.double(), stats.mean_probabilities(logits), atol=1e-6)
    assert torch.allclose(got.entropy.double(), stats.predictive_entropy(logits), atol=1e-5)
    assert torch.allclose(got.expected_entropy.double(), stats.expected_entropy(logits), atol=1e-5)
    assert torch.allclose(
        got.mutual_information.double(), stats.mutual_information(logits), atol=1e-5
    )
    assert torch.allclose(got.variation_ratio.double(), stats.variation_ratio(logits), atol=1e-6)
    assert torch.allclose(got.variance.double(), stats.class_variance(logits), atol=1e-6)
    assert torch.allclose(got.probabilities.sum(-1), torch.ones(n_rows), atol=1e-5)


@pytest.mark.parametrize("chunk", [1, 2])
def test_classification_summary_of_underflowing_and_non_finite_logits(chunk: int) -> None:
    # Probabilities that underflow to 0 (0 log 0 = 0) give the functions' finite entropies; a
    # non-finite logit gives NaN, as torch's arithmetic does (the Predictor refuses it), and no
    # warning.
    logits = torch.tensor([[[0.0, -1000.0, 5.0]], [[1.0, -2000.0, 2.0]]], dtype=torch.float64)
    acc = stats.ClassificationAccumulator(1, 3)
    for start in range(0, 2, chunk):
        acc.update(logits[start : start + chunk])
    got = acc.result()
    assert float(got.probabilities[0, 1]) == 0.0
    for field, function in (
        ("entropy", stats.predictive_entropy),
        ("expected_entropy", stats.expected_entropy),
        ("mutual_information", stats.mutual_information),
    ):
        value = getattr(got, field).double()
        assert bool(torch.isfinite(value).all())
        assert torch.allclose(value, function(logits).float().double(), rtol=1e-6, atol=1e-7)
    bad = logits.clone()
    bad[0, 0, 0] = math.inf
    acc = stats.ClassificationAccumulator(1, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        acc.update(bad)
        assert bool(torch.isnan(acc.result().entropy).all())


# -- regression ----------------------------------------------------------------------------


def test_gaussian_interval_closed_form() -> None:
    lo, hi = stats.gaussian_interval(torch.tensor([1.0]), torch.tensor([4.0]), 0.95)
    assert lo.item() == pytest.approx(1 - 1.959964 * 2, abs=1e-5)
    assert hi.item() == pytest.approx(1 + 1.959964 * 2, abs=1e-5)
    lo, hi = stats.gaussian_interval(torch.tensor([0.0]), torch.tensor([1.0]), 0.6826894921)
    assert hi.item() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("level", [0.0, 1.0, -0.5, 1.5])
def test_bad_levels(level: float) -> None:
    with pytest.raises(InvalidArgumentError):
        stats.gaussian_interval(torch.zeros(1), torch.ones(1), level)


def test_mixture_interval_of_one_gaussian() -> None:
    means = torch.full((1, 2, 1), 3.0, dtype=torch.float64)
    lo, hi = stats.mixture_interval(means, 0.25, 0.95)
    assert lo.flatten().tolist() == pytest.approx([3 - 1.959964 * 0.5] * 2, abs=1e-5)
    assert hi.flatten().tolist() == pytest.approx([3 + 1.959964 * 0.5] * 2, abs=1e-5)


def test_mixture_interval_covers_the_level() -> None:
    means = torch.randn(200, 3, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    lo, hi = stats.mixture_interval(means, 0.1, 0.9)
    mass = stats.mixture_cdf(hi, means, 0.1) - stats.mixture_cdf(lo, means, 0.1)
    assert torch.allclose(mass, torch.full_like(mass, 0.9), atol=1e-8)


def naive_log_likelihood(y: float, means: list[float], noise_var: float) -> float:
    densities = [
        math.exp(-0.5 * (y - m) ** 2 / noise_var) / math.sqrt(2 * math.pi * noise_var)
        for m in means
    ]
    return math.log(sum(densities) / len(means))


def test_log_likelihood_matches_paper_formula_and_naive_loop() -> None:
    g = torch.Generator().manual_seed(0)
    means = torch.randn(50, 4, 1, generator=g, dtype=torch.float64)
    y = torch.randn(4, 1, generator=g, dtype=torch.float64)
    tau = 2.5
    got = stats.mixture_log_likelihood(y, means, 1 / tau)
    # Gal & Ghahramani's expression (shared/data/uci/README.md).
    paper = (
        torch.logsumexp(-0.5 * tau * (y - means) ** 2, 0)
        - math.log(50)
        - 0.5 * math.log(2 * math.pi)
        + 0.5 * math.log(tau)
    )
    assert torch.allclose(got, paper, atol=1e-12)
    for n in range(4):
        ref = naive_log_likelihood(float(y[n]), means[:, n, 0].tolist(), 1 / tau)
        assert got[n, 0].item() == pytest.approx(ref, abs=1e-10)


def test_log_likelihood_is_stable_far_from_the_mean() -> None:
    means = torch.zeros(10, 1, 1, dtype=torch.float64)
    ll = stats.mixture_log_likelihood(torch.tensor([[1e3]], dtype=torch.float64), means, 1e-4)
    expected = -0.5 * math.log(2 * math.pi * 1e-4) - 0.5 * 1e6 / 1e-4
    assert ll.item() == pytest.approx(expected)


def test_crps_closed_form_for_one_gaussian() -> None:
    sigma, mu, y = 2.0, 1.0, 2.5
    z = (y - mu) / sigma
    phi = math.exp(-z * z / 2) / math.sqrt(2 * math.pi)
    big_phi = 0.5 * (1 + math.erf(z / math.sqrt(2)))
    expected = sigma * (z * (2 * big_phi - 1) + 2 * phi - 1 / math.sqrt(math.pi))
    got = stats.mixture_crps(torch.tensor([[y]]), torch.tensor([[[mu]]]), sigma**2)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_crps_of_a_mixture_matches_monte_carlo() -> None:
    g = torch.Generator().manual_seed(1)
    means = torch.randn(5, 1, 1, generator=g, dtype=torch.float64)
    y = torch.tensor([[0.3]], dtype=torch.float64)
    # CRPS = E|X - y| - ½ E|X - X'| for X, X' drawn from the mixture.
    draws = means[torch.randint(0, 5, (400_000,), generator=g), 0, 0]
    draws = draws + 0.5 * torch.randn(400_000, generator=g, dtype=torch.float64)
    mc = (draws - 0.3).abs().mean() - 0.5 * (draws[::2] - draws[1::2]).abs().mean()
    assert stats.mixture_crps(y, means, 0.25).item() == pytest.approx(mc.item(), abs=4e-3)


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 30),
    st.integers(1, 4),
    st.integers(1, 3),
    st.integers(0, 2**31),
    st.lists(st.integers(1, 7), min_size=1, max_size=5),
    st.booleans(),
)
def test_regression_accumulator_equals_batch(
    s: int, n: int, k: int, seed: int, sizes: list[int], heteroscedastic: bool
) -> None:
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(s, n, k, generator=g, dtype=torch.float64) * 3 + 100  # offset: cancellation
    log_var = torch.randn(s, n, k, generator=g, dtype=torch.float64) * 0.3
    y = torch.randn(n, k, generator=g, dtype=torch.float64) + 100
    values = torch.cat([means, log_var], -1) if heteroscedastic else means
    noise: Tensor | float = log_var.exp() if heteroscedastic else 0.3
    acc = stats.RegressionAccumulator(
        n, k, noise_variance=None if heteroscedastic else 0.3, targets=y, level=0.9
    )
    for samples in _chunks(s, sizes):
        acc.update(values[samples])
    got = acc.result()
    assert torch.allclose(got.mean.double(), means.mean(0), atol=1e-4)
    epistemic = stats.epistemic_variance(means)
    assert torch.allclose(got.epistemic_variance.double(), epistemic, atol=1e-3)
    aleatoric = stats.aleatoric_variance(noise, means)
    assert torch.allclose(got.aleatoric_variance.double(), aleatoric, atol=1e-5)
    assert torch.allclose(got.variance, got.epistemic_variance + got.aleatoric_variance, atol=1e-4)
    assert torch.allclose(got.std.square(), got.variance, rtol=1e-4)
    ll = stats.mixture_log_likelihood(y, means, noise)
    assert got.log_likelihood is not None
    assert torch.allclose(got.log_likelihood.double(), ll, atol=1e-4)
    assert bool((got.lower <= got.mean).all())
    assert bool((got.upper >= got.mean).all())


def test_regression_accumulator_rejects_bad_noise() -> None:
    with pytest.raises(InvalidArgumentError):
        stats.RegressionAccumulator(1, 1, noise_variance=0.0)


# -- per-row counts and Monte Carlo standard errors (adaptive sampling) ----------------------


@settings(max_examples=30, deadline=None)
@given(logits_tensors(), st.integers(0, 2**31))
def test_classification_accumulator_takes_row_indices_and_counts_per_row(
    logits: Tensor, seed: int
) -> None:
    s_count, n_rows, k = logits.shape
    # Row i gets its first used[i] samples: half of them in a first round of every row, the
    # rest in rounds of index-tensor updates.
    half = s_count // 2
    g = torch.Generator().manual_seed(seed)
    used = torch.randint(max(half, 1), s_count + 1, (n_rows,), generator=g)
    acc = stats.ClassificationAccumulator(n_rows, k)
    acc.update(logits[:half], torch.arange(n_rows))
    for n in used.unique().tolist():
        rows = (used == n).nonzero().flatten()
        acc.update(logits[half:n][:, rows], rows)
    got = acc.result()
    assert torch.equal(got.row_n_samples, used)
    assert got.n_samples == int(used.max())
    for i, n in enumerate(used.tolist()):
        row = logits[:n, i : i + 1]
        assert torch.allclose(got.probabilities[i].double(), stats.mean_probabilities(row)[0])
        assert torch.allclose(
            got.mutual_information[i].double(), stats.mutual_information(row)[0], atol=1e-5
        )
        # Naive standard error: the unbiased sample std of each class over sqrt(n), largest.
        p = torch.softmax(row[:, 0], -1)  # (n, K)
        naive = (p.std(0, correction=1) / math.sqrt(n)).max() if n >= 2 else math.inf
        # abs 1e-9: the accumulator merges mean and spread per chunk (no E[p²] - E[p]², which
        # cancelled to ~3e-8 after the square root when a class's probabilities barely vary).
        assert float(acc.standard_error()[i]) == pytest.approx(float(naive), rel=1e-6, abs=1e-9)


def test_classification_standard_error_of_closed_forms() -> None:
    acc = stats.ClassificationAccumulator(3, 2)
    certain = torch.tensor([[30.0, -30.0]]).expand(8, 1, 2)  # every sample p = (1, 0)
    coin = torch.tensor([[30.0, -30.0], [-30.0, 30.0]]).repeat(4, 1)[:, None]  # 0/1 flips
    acc.update(certain, slice(0, 1))
    acc.update(coin, slice(1, 2))
    acc.update(certain[:1], slice(2, 3))
    se = acc.standard_error()
    assert float(se[0]) == pytest.approx(0.0, abs=1e-12)
    # Probabilities 1, 0, 1, 0, ... over 8 samples: s² = 0.25 · 8/7, SE = sqrt(s² / 8).
    assert float(se[1]) == pytest.approx(math.sqrt(0.25 / 7), rel=1e-9)
    assert math.isinf(float(se[2]))  # one sample: no variance estimate, never "precise"


def _naive_regression_error(mu: Tensor, noise: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """From one row's raw samples ``(m, K)`` (sampled means, noise variances), two-pass in
    float64: (the error, the mean's term, the std's term), each ``(K,)`` in units of the
    predictive std. The std's SE: the sample std of each sample's term of the predictive
    variance, ``(μ_s - mean)² + noise_s``, over sqrt(m), over 2 std (the delta method)."""
    m = mu.shape[0]
    std = (mu.var(0, correction=0) + noise.mean(0)).sqrt()
    se_mean = mu.std(0, correction=1) / math.sqrt(m) / std
    terms = (mu - mu.mean(0)).square() + noise
    se_std = terms.std(0, correction=1) / math.sqrt(m) / (2 * std) / std
    return torch.maximum(se_mean, se_std), se_mean, se_std


@pytest.mark.parametrize("heavy_tails", [False, True])
@pytest.mark.parametrize("heteroscedastic", [False, True])
def test_regression_standard_error_of_the_mean_and_std_in_units_of_the_std(
    heteroscedastic: bool, heavy_tails: bool
) -> None:
    g = torch.Generator().manual_seed(0)
    s, n, k = 40, 3, 2
    if heavy_tails:
        # As a low dropout rate: most masks agree, a few move the output a lot. The std's term
        # is then the larger one (checked below), which a mean-only error would miss.
        jumps = torch.rand(s, n, k, generator=g) < 0.08
        means = 1e4 + jumps * torch.randn(s, n, k, generator=g, dtype=torch.float64) * 5
        means[0] += 5.0  # every row and output has a jump (the spread is never 0)
    else:
        means = torch.randn(s, n, k, generator=g, dtype=torch.float64) * 2 + 1e4
    # A mean of 1e4 with a spread of a few units: moments about zero would cancel.
    log_var = torch.randn(s, n, k, generator=g, dtype=torch.float64) * 0.3 - 2
    values = torch.cat([means, log_var], -1) if heteroscedastic else means
    acc = stats.RegressionAccumulator(n, k, noise_variance=None if heteroscedastic else 0.1)
    # Three rounds of index updates, rows in any order; the later ones leave row 0 out.
    rounds = [(slice(0, 10), [2, 0, 1]), (slice(10, 17), [1, 2]), (slice(17, s), [2, 1])]
    streamed: dict[int, list[Tensor]] = {i: [] for i in range(n)}
    for samples, rows in rounds:
        acc.update(values[samples, : len(rows)], torch.tensor(rows))
        for j, row in enumerate(rows):
            streamed[row].append(values[samples, j])
    got = acc.result()
    assert got.row_n_samples.tolist() == [10, s, s]
    std_larger = []
    for i, parts in streamed.items():
        row = torch.cat(parts)  # (m, K) or (m, 2K)
        mu = row[:, :k]
        noise = row[:, k:].exp() if heteroscedastic else torch.full_like(mu, 0.1)
        naive, se_mean, se_std = _naive_regression_error(mu, noise)
        assert float(acc.standard_error()[i]) == pytest.approx(float(naive.max()), rel=1e-7)
        assert torch.allclose(got.mean[i].double(), mu.mean(0), rtol=1e-6)
        std_larger.append(bool((se_std > se_mean).any()))
    assert any(std_larger) == heavy_tails  # the case tests the term it means to


def test_regression_standard_error_of_a_closed_form() -> None:
    # Means 0, 0, 0, 4 (homoscedastic noise 1): mean 1, epistemic variance 3, std 2. The mean's
    # SE is sqrt(s² / 4) = sqrt(4 / 4) = 1; the terms (μ - 1)² + 1 are 2, 2, 2, 10, whose
    # unbiased variance is 16, so SE(var) = sqrt(16 / 4) = 2 and SE(std) = 2 / (2·2) = 0.5.
    # In units of the std: max(1, 0.5) / 2.
    acc = stats.RegressionAccumulator(1, 1, noise_variance=1.0)
    acc.update(torch.tensor([0.0, 0.0, 0.0, 4.0]).reshape(4, 1, 1))
    assert float(acc.standard_error()[0]) == pytest.approx(1.0 / 2.0, rel=1e-12)
    # Means 1, 1, 1, 1 and noise variances e^0, e^0, e^0, e^ln 9: the mean is certain, the
    # variance's terms are the noises 1, 1, 1, 9 (mean 3, std 2, unbiased variance 16): the
    # std's term alone, SE(std) / std = (sqrt(16 / 4) / (2·√3)) / √3 = 1/3.
    het = stats.RegressionAccumulator(1, 1, noise_variance=None)
    log_var = torch.tensor([0.0, 0.0, 0.0, math.log(9.0)], dtype=torch.float64)
    het.update(torch.stack([torch.ones(4, dtype=torch.float64), log_var], -1).reshape(4, 1, 2))
    assert float(het.standard_error()[0]) == pytest.approx(1.0 / 3.0, rel=1e-9)


def test_regression_standard_error_needs_the_tracked_moments() -> None:
    acc = stats.RegressionAccumulator(2, 1, noise_variance=1.0, track_error=False)
    acc.update(torch.randn(8, 2, 1))
    with pytest.raises(InvalidArgumentError, match="track_error"):
        acc.standard_error()
    tracked = stats.RegressionAccumulator(2, 1, noise_variance=1.0)
    values = torch.randn(8, 2, 1)
    acc = stats.RegressionAccumulator(2, 1, noise_variance=1.0, track_error=False)
    acc.update(values)
    tracked.update(values)
    for name, value in vars(acc.result()).items():  # the summary is the same either way
        other = getattr(tracked.result(), name)
        assert torch.equal(value, other) if isinstance(value, Tensor) else value == other


def test_regression_standard_error_of_a_certain_row_is_zero() -> None:
    acc = stats.RegressionAccumulator(1, 1, noise_variance=None)
    acc.update(torch.tensor([[[3.0, -200.0]]]).expand(4, 1, 2))  # noise variance e^-200 ≈ 0
    assert float(acc.standard_error()[0]) == 0.0


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_classification_variance_of_a_confident_row_does_not_cancel(chunk: int) -> None:
    # p ≈ (1 - 1e-9, 1e-9) varying by ~1e-12 (variance ~1e-24): E[p²] - E[p]² in float64 would
    # be rounding error of ~1e-16, 8 orders too large; the merged spread keeps it to 1e-3 (p_0
    # itself is held to ~1e-16 near 1, so both answers carry that quantisation).
    g = torch.Generator().manual_seed(0)
    logits = torch.zeros(64, 1, 2, dtype=torch.float64)
    logits[..., 0] = 20.7 + 1e-3 * torch.randn(64, 1, generator=g, dtype=torch.float64)
    acc = stats.ClassificationAccumulator(1, 2)
    for start in range(0, 64, chunk):
        acc.update(logits[start : start + chunk])
    p = torch.softmax(logits[:, 0], -1)  # (S, K), two-pass reference below
    exact = p.var(0, correction=0)
    assert float(exact[0]) > 0
    got = acc.result().variance[0].double()
    assert torch.allclose(got, exact, rtol=1e-3, atol=0)
    exact_se = (p.std(0, correction=1) / math.sqrt(64)).max()
    assert float(acc.standard_error()[0]) == pytest.approx(float(exact_se), rel=1e-3)


_BITS = {torch.float32: torch.int32, torch.float64: torch.int64}


def _summaries_equal(a: object, b: object) -> bool:
    """Every field equal, float tensors bit for bit (NaN where NaN, the sign of zero too)."""
    for name, value in vars(a).items():
        other = getattr(b, name)
        if isinstance(value, Tensor):
            bits = _BITS.get(value.dtype, value.dtype)
            if not torch.equal(value.view(bits), other.view(bits)):
                return False
        elif value != other:
            return False
    return True


@settings(max_examples=30, deadline=None)
@given(logits_tensors(), st.booleans())
def test_one_chunk_of_every_row_is_the_merge_into_zeros_bit_for_bit(
    logits: Tensor, regression: bool
) -> None:
    # A first update of every row (a slice) sets the sums from the chunk; the same update by
    # row indices merges it into zero sums. Both give the same summary, bit for bit.
    _, n, k = logits.shape
    accs: list[stats.ClassificationAccumulator | stats.RegressionAccumulator] = []
    for _ in range(2):
        if regression:
            accs.append(stats.RegressionAccumulator(n, k, noise_variance=0.3))
        else:
            accs.append(stats.ClassificationAccumulator(n, k))
    accs[0].update(logits, slice(0, n))
    accs[1].update(logits, torch.arange(n))
    assert _summaries_equal(accs[0].result(), accs[1].result())
    assert torch.equal(accs[0].standard_error(), accs[1].standard_error())
    # Later chunks merge into the first as ever.
    accs[0].update(logits[:1])
    accs[1].update(logits[:1], torch.arange(n))
    assert _summaries_equal(accs[0].result(), accs[1].result())


@settings(max_examples=30, deadline=None)
@given(logits_tensors(), st.booleans(), st.sampled_from([0.5, 0.9, 0.95]))
def test_regression_summary_on_the_cpu_is_torchs_bit_for_bit(
    values: Tensor, heteroscedastic: bool, level: float
) -> None:
    # On the CPU the summary is worked out in NumPy; with targets (for the log-likelihood) in
    # torch. The fields both give agree bit for bit (heteroscedastic: K means, K log-variances).
    s, n, k2 = values.shape
    k = k2 // 2 if heteroscedastic else k2
    noise = None if heteroscedastic else 0.7
    plain = stats.RegressionAccumulator(n, k, noise_variance=noise, level=level)
    with_targets = stats.RegressionAccumulator(
        n, k, noise_variance=noise, level=level, targets=torch.zeros(n, k)
    )
    values = values[..., : 2 * k] if heteroscedastic else values
    for acc in (plain, with_targets):
        acc.update(values[: s // 2 + 1])
        acc.update(values[s // 2 + 1 :])
    got, want = plain.result(), with_targets.result()
    assert want.log_likelihood is not None
    assert got.log_likelihood is None
    assert _summaries_equal(dataclasses.replace(want, log_likelihood=None), got)
