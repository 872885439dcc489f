"""Uncertainty statistics of MC-dropout samples: pure functions and streaming accumulators.

Shape legend: ``S`` samples, ``N`` rows, ``K`` classes or regression outputs; samples first.
Entropies are in nats. Classification functions take **logits** (never probabilities: they are
never guessed), and work through ``log_softmax`` so no probability is ever logged at 0.

Regression follows Gal & Ghahramani (2016): the predictive distribution of a row is the mixture
``1/S Σ_s N(μ_s, σ²_s)`` where ``μ_s`` is sample ``s``'s output and ``σ²_s`` the noise variance
(``1/τ`` for a homoscedastic model, or the network's own predicted variance). Its variance
splits into the epistemic part (spread of the ``μ_s``) and the aleatoric part (mean of ``σ²_s``).

Variances are of the empirical MC distribution (divisor ``S``), matching that mixture.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch
from torch import Tensor

from mcdrop.exceptions import InvalidArgumentError

# -- classification ---------------------------------------------------------------------------


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of ``softmax(logits)`` over the last dimension: ``(..., K) -> (...)``."""
    log_p = torch.log_softmax(logits, dim=-1)
    return -(log_p.exp() * log_p).sum(-1)


def entropy(probabilities: Tensor) -> Tensor:
    """Entropy of probability vectors over the last dimension, with ``0 log 0 = 0``:
    ``(..., K) -> (...)``."""
    return -torch.special.xlogy(probabilities, probabilities).sum(-1)


def mean_probabilities(logits: Tensor) -> Tensor:
    """MC predictive distribution ``1/S Σ_s softmax(logits_s)``: ``(S, N, K) -> (N, K)``."""
    return torch.softmax(logits, dim=-1).mean(0)


def predictive_entropy(logits: Tensor) -> Tensor:
    """Total uncertainty ``H[1/S Σ_s p_s]``: ``(S, N, K) -> (N,)``."""
    return entropy(mean_probabilities(logits))


def expected_entropy(logits: Tensor) -> Tensor:
    """Aleatoric uncertainty ``1/S Σ_s H[p_s]``: ``(S, N, K) -> (N,)``."""
    return entropy_from_logits(logits).mean(0)


def mutual_information(logits: Tensor) -> Tensor:
    """Epistemic uncertainty (BALD, Houlsby et al. 2011): ``H[E p] - E H[p] ≥ 0``.

    ``(S, N, K) -> (N,)``; clamped at 0 against rounding.
    """
    return (predictive_entropy(logits) - expected_entropy(logits)).clamp_min(0.0)


def variation_ratio(logits: Tensor) -> Tensor:
    """Fraction of samples that disagree with the modal label: ``(S, N, K) -> (N,)``."""
    n_classes = logits.shape[-1]
    votes = torch.nn.functional.one_hot(logits.argmax(-1), n_classes).sum(0)  # (N, K)
    return 1.0 - votes.max(-1).values.to(logits.dtype) / logits.shape[0]


def class_variance(logits: Tensor) -> Tensor:
    """Per-class variance of the sampled probabilities: ``(S, N, K) -> (N, K)``."""
    return torch.softmax(logits, dim=-1).var(0, correction=0)


# -- regression -----------------------------------------------------------------------------


def epistemic_variance(means: Tensor) -> Tensor:
    """Spread of the sampled means: ``(S, N, K) -> (N, K)``."""
    return means.var(0, correction=0)


def aleatoric_variance(noise_variance: Tensor | float, like: Tensor) -> Tensor:
    """Mean noise variance: a scalar ``1/τ``, or ``(S, N, K)`` predicted variances -> ``(N, K)``."""
    if isinstance(noise_variance, Tensor) and noise_variance.dim() > 0:
        return noise_variance.mean(0)
    return torch.full_like(like[0], float(noise_variance))


def _check_level(level: float) -> None:
    if not 0.0 < level < 1.0:
        raise InvalidArgumentError(f"interval level must be in (0, 1), got {level}")


def gaussian_interval(mean: Tensor, variance: Tensor, level: float = 0.95) -> tuple[Tensor, Tensor]:
    """Central interval of a Gaussian with the predictive mean and variance.

    The moment-matched Gaussian of the MC mixture; exact mixture quantiles are
    :func:`mixture_interval`.
    """
    _check_level(level)
    half = _z(level) * variance.clamp_min(0.0).sqrt()
    return mean - half, mean + half


@functools.lru_cache(maxsize=16)
def _z(level: float) -> float:
    """The standard normal's ``(1 + level) / 2`` quantile: a pure function of ``level``, kept
    because a tensor round trip for one scalar costs ~10 µs a call."""
    return math.sqrt(2.0) * torch.special.erfinv(torch.tensor(level, dtype=torch.float64)).item()


def _noise_std(noise_variance: Tensor | float, means: Tensor) -> Tensor:
    if isinstance(noise_variance, Tensor):
        return noise_variance.expand_as(means).sqrt()
    if noise_variance <= 0:
        raise InvalidArgumentError(f"noise variance must be positive, got {noise_variance}")
    return torch.full_like(means, math.sqrt(noise_variance))


def mixture_cdf(y: Tensor, means: Tensor, noise_variance: Tensor | float) -> Tensor:
    """CDF of the MC Gaussian mixture at ``y`` ``(N, K)``: ``(S, N, K) -> (N, K)``."""
    std = _noise_std(noise_variance, means)
    return torch.special.ndtr((y - means) / std).mean(0)


def mixture_interval(
    means: Tensor, noise_variance: Tensor | float, level: float = 0.95, *, iterations: int = 60
) -> tuple[Tensor, Tensor]:
    """Central interval of the MC Gaussian mixture, by bisection on its CDF.

    Args:
        means: ``(S, N, K)`` sampled means; noise_variance: ``1/τ`` or ``(S, N, K)``.

    Returns:
        lower and upper bounds, each ``(N, K)``.
    """
    _check_level(level)
    std = _noise_std(noise_variance, means)
    lo_all = (means - 10 * std).min(0).values
    hi_all = (means + 10 * std).max(0).values
    bounds = []
    for target in ((1.0 - level) / 2.0, (1.0 + level) / 2.0):
        lo, hi = lo_all.clone(), hi_all.clone()
        for _ in range(iterations):
            mid = (lo + hi) / 2
            below = mixture_cdf(mid, means, noise_variance) < target
            lo = torch.where(below, mid, lo)
            hi = torch.where(below, hi, mid)
        bounds.append((lo + hi) / 2)
    return bounds[0], bounds[1]


def mixture_log_likelihood(y: Tensor, means: Tensor, noise_variance: Tensor | float) -> Tensor:
    """Test log-likelihood under the MC Gaussian mixture (Gal & Ghahramani 2016, eq. 8).

    ``log 1/S Σ_s N(y; μ_s, σ²_s)`` by ``logsumexp`` over samples.

    Args:
        y: ``(N, K)`` targets; means: ``(S, N, K)``; noise_variance: ``1/τ`` or ``(S, N, K)``.

    Returns:
        ``(N, K)`` log-likelihoods (average them for the paper's figure).
    """
    var = _noise_std(noise_variance, means).square()
    log_density = -0.5 * (torch.log(2 * math.pi * var) + (y - means).square() / var)
    return torch.logsumexp(log_density, dim=0) - math.log(means.shape[0])


def mixture_crps(y: Tensor, means: Tensor, noise_variance: Tensor | float) -> Tensor:
    """Continuous ranked probability score of the MC Gaussian mixture (lower is better).

    Closed form for Gaussian mixtures (Grimit et al. 2006):
    ``CRPS = Σ w_i A(y-μ_i, σ²_i) - ½ Σ w_i w_j A(μ_i-μ_j, σ²_i+σ²_j)`` with
    ``A(m, s²) = 2s φ(m/s) + m (2Φ(m/s) - 1)``. ``O(S²)`` per row.

    Shapes: ``y (N, K)``, ``means (S, N, K)`` -> ``(N, K)``.
    """
    var = _noise_std(noise_variance, means).square()

    def a(m: Tensor, v: Tensor) -> Tensor:
        s = v.sqrt()
        z = m / s
        pdf = torch.exp(-0.5 * z.square()) / math.sqrt(2 * math.pi)
        return 2 * s * pdf + m * (2 * torch.special.ndtr(z) - 1)

    first = a(y - means, var).mean(0)
    pair = a(means[:, None] - means[None, :], var[:, None] + var[None, :]).mean((0, 1))
    return first - 0.5 * pair


# -- streaming summaries ----------------------------------------------------------------------


@dataclass(frozen=True)
class ClassificationSummary:
    """MC summary of a classifier, all per row.

    Attributes:
        probabilities: ``(N, K)`` mean predictive probabilities (the MC mean).
        variance: ``(N, K)`` per-class variance of the sampled probabilities.
        label: ``(N,)`` argmax of ``probabilities``.
        entropy: ``(N,)`` predictive entropy (total uncertainty).
        expected_entropy: ``(N,)`` mean entropy of the samples (aleatoric).
        mutual_information: ``(N,)`` BALD score (epistemic).
        variation_ratio: ``(N,)`` fraction of samples whose label is not the modal label.
        n_samples: samples per row (the most any row used, when rows stopped early).
        row_n_samples: ``(N,)`` int64, the samples each row used.
    """

    probabilities: Tensor
    variance: Tensor
    label: Tensor
    entropy: Tensor
    expected_entropy: Tensor
    mutual_information: Tensor
    variation_ratio: Tensor
    n_samples: int
    row_n_samples: Tensor


@dataclass(frozen=True)
class RegressionSummary:
    """MC summary of a regressor, all per row, in the units of the model's output.

    Attributes:
        mean, variance, std, epistemic_variance, aleatoric_variance: ``(N, K)``; ``variance =
            epistemic_variance + aleatoric_variance``.
        lower, upper: ``(N, K)`` central interval at ``level`` of the moment-matched Gaussian.
        n_samples: samples per row (the most any row used, when rows stopped early).
        row_n_samples: ``(N,)`` int64, the samples each row used.
        log_likelihood: ``(N, K)`` mixture test log-likelihood, when targets were given.
    """

    mean: Tensor
    variance: Tensor
    std: Tensor
    epistemic_variance: Tensor
    aleatoric_variance: Tensor
    lower: Tensor
    upper: Tensor
    level: float
    n_samples: int
    row_n_samples: Tensor
    log_likelihood: Tensor | None = None


def _samples_of_first_row(rows: slice | Tensor, s: int) -> int:
    """The samples a chunk of ``s`` samples of ``rows`` adds to row 0 (counted in Python, so a
    fixed-count result needs no read of a device tensor); 0 for row indices (adaptive
    sampling, where rows stop apart and the most any row used is read from the counts)."""
    return s if isinstance(rows, slice) and rows.start in (None, 0) else 0


def _all_rows(rows: slice | Tensor, n_rows: int) -> bool:
    """Whether ``rows`` names every row, in order."""
    return isinstance(rows, slice) and rows.indices(n_rows) == (0, n_rows, 1)


class _Counts:
    """``count`` per row and the Python count of row 0 (see :func:`_samples_of_first_row`)."""

    count: Tensor
    n_samples: int
    indexed: bool = False  # some update named rows by index: counts differ between rows

    def _note(self, rows: slice | Tensor, s: int) -> None:
        self.n_samples += _samples_of_first_row(rows, s)
        self.indexed = self.indexed or not isinstance(rows, slice)

    def _most_samples(self) -> int:
        """The most samples any row has: one read of the counts only when rows stopped apart."""
        return int(self.count.max()) if self.indexed else self.n_samples


class ClassificationAccumulator(_Counts):
    """Streams logits chunks ``(s, n, K)`` into a :class:`ClassificationSummary` in ``O(N·K)``
    memory whatever S is. The probabilities' mean and spread merge chunk by chunk as
    :class:`RegressionAccumulator`'s do (Chan et al.), in float64 whatever the chunks' dtype
    (bfloat16 included): E[p²] - E[p]² would lose the variance of a confident row (1e-12 and
    below) to cancellation.

    Args:
        n_rows: N.
        n_classes: K.
        device: where the sums live: the chunks' device (no copy per chunk).
    """

    def __init__(
        self, n_rows: int, n_classes: int, *, device: torch.device | str | None = None
    ) -> None:
        self.n_rows, self.k, self.device = n_rows, n_classes, device
        self.n_samples = 0  # of row 0
        # The sums are made by the first update (or read): a call whose samples all come in one
        # chunk (most requests) sets them from that chunk, with no zeros to merge into.
        self._started = False

    def _start(self) -> None:
        """Zero sums for a first update of some rows only (or a read before any update)."""
        if self._started:
            return

        def zeros(*shape: int) -> Tensor:
            return torch.zeros(shape, dtype=torch.float64, device=self.device)

        n_rows, n_classes = self.n_rows, self.k
        self.count = zeros(n_rows)
        self.mean_p = zeros(n_rows, n_classes)
        self.m2_p = zeros(n_rows, n_classes)  # sum of squared deviations from mean_p
        self.sum_h = zeros(n_rows)
        self.votes = zeros(n_rows, n_classes)
        self._started = True

    def update(self, logits: Tensor, rows: slice | Tensor = slice(None)) -> None:
        """Add samples ``(s, n, K)`` of the rows ``rows`` (a slice, or ``(n,)`` distinct row
        indices)."""
        if logits.shape[0] == 0:  # nothing to merge (and 0/0 in the merge below)
            return
        self._note(rows, logits.shape[0])
        if logits.device.type == "cpu":
            with np.errstate(all="ignore"):
                self._update_numpy(logits, rows)
            return
        log_p = torch.log_softmax(logits.to(torch.float64), dim=-1)
        p = log_p.exp()
        s = float(logits.shape[0])
        chunk_mean = p.mean(0)
        if not self._started and _all_rows(rows, self.n_rows):
            # The first chunk of every row: the merge below into zeros, without the zeros (the
            # same values bit for bit: 0 + δ·(s/s) = δ, 0 + M2 + δ²·0 = M2, 0 − h = h's negation
            # with +0 for 0).
            self.count = torch.full((self.n_rows,), s, dtype=torch.float64, device=p.device)
            self.mean_p = chunk_mean
            self.m2_p = (p - chunk_mean).square().sum(0)
            self.sum_h = torch.rsub((p * log_p).sum(-1).sum(0), 0.0)
            votes = torch.nn.functional.one_hot(logits.argmax(-1), p.shape[-1]).sum(0)
            self.votes = votes.to(torch.float64)
            self._started = True
            return
        self._start()
        n_a = self.count[rows][:, None]
        total = n_a + s
        delta = chunk_mean - self.mean_p[rows]
        self.mean_p[rows] += delta * (s / total)
        self.m2_p[rows] += (p - chunk_mean).square().sum(0) + delta.square() * (n_a * s / total)
        self.count[rows] = total[:, 0]
        self.sum_h[rows] -= (p * log_p).sum(-1).sum(0)
        self.votes[rows] += torch.nn.functional.one_hot(logits.argmax(-1), p.shape[-1]).sum(0)

    def _update_numpy(self, logits: Tensor, rows: slice | Tensor) -> None:
        """:meth:`update` of CPU logits: the same float64 arithmetic in NumPy, whose operations
        cost ~1 µs against torch's ~4 on the small arrays of one request (a one-row call's
        update and result took ~110 µs in torch, as much as a small model's sampling). The
        sums stay torch tensors, sharing NumPy's memory. (``exp`` is NumPy's, so the last bit
        may differ from the torch path's on other devices; both CPU branches share it, so the
        first chunk still equals its merge into zeros bit for bit.)"""
        x = logits.detach().to(torch.float64)
        log_p = torch.log_softmax(x, dim=-1).numpy()  # (s, n, K)
        p = np.exp(log_p)
        s = float(log_p.shape[0])
        chunk_mean = np.add.reduce(p, 0) / s  # p.mean(0), without its Python wrapper
        chunk_m2 = np.square(p - chunk_mean).sum(0)
        h = (p * log_p).sum(-1).sum(0)  # (n,) minus the rows' summed entropies
        # each sample's vote: the argmax of its logits (float64 holds any float's order),
        # counted per row and class
        n, k = log_p.shape[1], self.k
        cells = x.numpy().argmax(-1) + np.arange(0, n * k, k)  # (s, n) row·K + class
        votes = np.bincount(cells.reshape(-1), minlength=n * k).reshape(n, k).astype(np.float64)
        if not self._started and _all_rows(rows, self.n_rows):
            # as update's first chunk of every row
            self.count = torch.full((self.n_rows,), s, dtype=torch.float64)
            self.mean_p = torch.from_numpy(chunk_mean)
            self.m2_p = torch.from_numpy(chunk_m2)
            self.sum_h = torch.from_numpy(0.0 - h)
            self.votes = torch.from_numpy(votes)
            self._started = True
            return
        self._start()
        at = rows if isinstance(rows, slice) else rows.numpy()
        count, mean_p, m2_p = self.count.numpy(), self.mean_p.numpy(), self.m2_p.numpy()
        n_a = count[at][:, None]
        total = n_a + s
        delta = chunk_mean - mean_p[at]
        mean_p[at] += delta * (s / total)
        m2_p[at] += chunk_m2 + np.square(delta) * (n_a * s / total)
        count[at] = total[:, 0]
        self.sum_h.numpy()[at] -= h
        self.votes.numpy()[at] += votes

    def standard_error(self) -> Tensor:
        """``(N,)`` float64: the Monte Carlo standard error of each row's mean probabilities, the
        largest over classes: ``max_k sqrt(s²_k / n)`` with ``s²_k`` the unbiased sample
        variance of class k's probability over the row's ``n`` samples (inf below 2 samples)."""
        self._start()
        count = self.count[:, None]
        se = (self.m2_p / (count * (count - 1))).sqrt().amax(-1)  # s² / n
        return torch.where(self.count >= 2, se, math.inf)

    def result(self) -> ClassificationSummary:
        self._start()
        if self.mean_p.device.type == "cpu":
            with np.errstate(all="ignore"):
                return self._result_numpy()
        probs = self.mean_p
        total = entropy(probs)
        aleatoric = self.sum_h / self.count
        return ClassificationSummary(
            probabilities=probs.float(),
            variance=(self.m2_p / self.count[:, None]).float(),
            label=probs.argmax(-1),
            entropy=total.float(),
            expected_entropy=aleatoric.float(),
            mutual_information=(total - aleatoric).clamp_min(0.0).float(),
            variation_ratio=(1.0 - self.votes.max(-1).values / self.count).float(),
            n_samples=self._most_samples(),
            row_n_samples=self.count.to(torch.int64),
        )

    def _result_numpy(self) -> ClassificationSummary:
        """:meth:`result` in NumPy, for sums on the CPU: the same float64 arithmetic and float32
        roundings (``log`` is NumPy's), at a fraction of torch's cost per call on the small
        arrays of one request. NaN propagates as in torch."""
        probs, count = self.mean_p.numpy(), self.count.numpy()
        xlogx = probs * np.log(probs)
        xlogx[probs == 0] = 0.0  # torch.special.xlogy's 0 log 0
        total = -xlogx.sum(-1)
        aleatoric = self.sum_h.numpy() / count
        f32 = np.float32
        return ClassificationSummary(
            probabilities=torch.from_numpy(probs.astype(f32)),
            variance=torch.from_numpy((self.m2_p.numpy() / count[:, None]).astype(f32)),
            label=torch.from_numpy(probs.argmax(-1).astype(np.int64)),
            entropy=torch.from_numpy(total.astype(f32)),
            expected_entropy=torch.from_numpy(aleatoric.astype(f32)),
            mutual_information=torch.from_numpy(np.maximum(total - aleatoric, 0.0).astype(f32)),
            variation_ratio=torch.from_numpy(
                (1.0 - self.votes.numpy().max(-1) / count).astype(f32)
            ),
            n_samples=self._most_samples(),
            row_n_samples=torch.from_numpy(count.astype(np.int64)),
        )


class RegressionAccumulator(_Counts):
    """Streams chunks of sampled outputs into a :class:`RegressionSummary` in ``O(N·K)`` memory.

    Args:
        n_rows: N.
        n_outputs: K.
        noise_variance: ``1/τ`` for a homoscedastic model; None when the network predicts its own
            variance, in which case chunks are ``(s, n, 2K)``: K means then K log-variances.
        targets: optional ``(N, K)`` targets, to accumulate the mixture log-likelihood.
        level: level of the central interval.
        device: where the sums live: the chunks' device (no copy per chunk).
        track_error: also keep the moments :meth:`standard_error` needs (the spread of each
            sample's contribution to the predictive variance: three more ``(N, K)`` sums and a
            shift); a caller that never asks for the error (a fixed sample count) leaves them
            out.
    """

    def __init__(
        self,
        n_rows: int,
        n_outputs: int,
        *,
        noise_variance: float | None,
        targets: Tensor | None = None,
        level: float = 0.95,
        device: torch.device | str | None = None,
        track_error: bool = True,
    ) -> None:
        _check_level(level)
        if noise_variance is not None and not noise_variance > 0:
            raise InvalidArgumentError(f"noise variance must be positive, got {noise_variance}")
        self.n_rows, self.k, self.device = n_rows, n_outputs, device
        self.noise_variance = noise_variance
        self.level = level
        self.targets = None if targets is None else targets.to(device, torch.float64)
        self.n_samples = 0  # of row 0
        self.track_error = track_error
        # As ClassificationAccumulator: the sums are made by the first update (or read).
        self._started = False

    def _start(self) -> None:
        """Zero sums for a first update of some rows only (or a read before any update)."""
        if self._started:
            return
        shape, device = (self.n_rows, self.k), self.device
        self.count = torch.zeros(self.n_rows, 1, dtype=torch.float64, device=device)
        self.mean = torch.zeros(shape, dtype=torch.float64, device=device)
        self.m2 = torch.zeros(shape, dtype=torch.float64, device=device)
        self.sum_noise = torch.zeros(shape, dtype=torch.float64, device=device)
        self.lse = torch.full(shape, -math.inf, dtype=torch.float64, device=device)
        if self.track_error:
            self.shift = torch.zeros(shape, dtype=torch.float64, device=device)
            self.mean_e = torch.zeros(shape, dtype=torch.float64, device=device)
            self.m2_e = torch.zeros(shape, dtype=torch.float64, device=device)
            self.co_e = torch.zeros(shape, dtype=torch.float64, device=device)
        self._started = True

    def _merge_error_moments(
        self,
        rows: slice | Tensor,
        mu: Tensor,
        noise: Tensor,
        chunk_mean: Tensor,
        n_a: Tensor | None,
        delta: Tensor | None,
    ) -> None:
        """Merge a chunk into the moments of ``e' = (μ_s - c)² + σ²_s`` (its mean, M2, and
        co-moment with ``μ_s``), ``c`` a per-row shift: the chunk's mean at the row's first
        update, so ``e'`` never cancels (a mean of 1e4 with a spread of 1e-3). Chan et al.'s
        merge, as for the mean. ``mu``, ``noise``: ``(s, n, K)`` float64; ``n_a``, ``delta``:
        the rows' counts ``(n, 1)`` and ``chunk_mean - mean`` before this chunk, None for the
        first chunk of every row."""
        s = float(mu.shape[0])
        # (a copy: the first chunk's mean becomes the mean's own sums, updated in place)
        shift = (
            chunk_mean.clone()
            if n_a is None
            else torch.where(n_a == 0, chunk_mean, self.shift[rows])
        )
        e = (mu - shift).square() + noise
        chunk_me = e.mean(0)
        de = e - chunk_me
        chunk_m2e = de.square().sum(0)
        chunk_co = ((mu - chunk_mean) * de).sum(0)
        if n_a is None or delta is None:
            self.shift, self.mean_e, self.m2_e, self.co_e = shift, chunk_me, chunk_m2e, chunk_co
            return
        total = n_a + s
        weight = n_a * s / total
        delta_e = chunk_me - self.mean_e[rows]
        self.shift[rows] = shift
        self.mean_e[rows] += delta_e * (s / total)
        self.m2_e[rows] += chunk_m2e + delta_e.square() * weight
        self.co_e[rows] += chunk_co + delta * delta_e * weight

    def split(self, values: Tensor) -> tuple[Tensor, Tensor]:
        """Sampled means and noise variances of a chunk, each ``(s, n, K)``."""
        values = values.to(torch.float64)
        if self.noise_variance is None:
            return values[..., : self.k], values[..., self.k :].exp()
        return values, torch.full_like(values, self.noise_variance)

    def update(self, values: Tensor, rows: slice | Tensor = slice(None)) -> None:
        """Add samples ``(s, n, K)`` (or ``(s, n, 2K)``) of the rows ``rows`` (a slice, or
        ``(n,)`` distinct row indices)."""
        if values.shape[0] == 0:  # nothing to merge (and 0/0 in the merge below)
            return
        if values.device.type == "cpu":
            with np.errstate(all="ignore"):
                self._update_numpy(values, rows)
            return
        mu, noise = self.split(values)
        s = float(mu.shape[0])
        # Chan et al.'s parallel merge of (count, mean, M2): stable for any chunking.
        chunk_mean = mu.mean(0)
        chunk_m2 = (mu - chunk_mean).square().sum(0)
        self._note(rows, mu.shape[0])
        if not self._started and self.targets is None and _all_rows(rows, self.n_rows):
            # The first chunk of every row: the merge below into zeros, without the zeros (the
            # same values bit for bit: 0 + δ·(s/s) = δ, 0 + M2 + δ²·0 = M2).
            self.count = torch.full((self.n_rows, 1), s, dtype=torch.float64, device=mu.device)
            self.mean = chunk_mean
            self.m2 = chunk_m2
            self.sum_noise = noise.sum(0)
            if self.track_error:
                self._merge_error_moments(rows, mu, noise, chunk_mean, None, None)
            self._started = True
            return
        self._start()
        n_a = self.count[rows]
        total = n_a + s
        delta = chunk_mean - self.mean[rows]
        if self.track_error:
            self._merge_error_moments(rows, mu, noise, chunk_mean, n_a, delta)
        self.mean[rows] += delta * (s / total)
        self.m2[rows] += chunk_m2 + delta.square() * (n_a * s / total)
        self.count[rows] = total
        self.sum_noise[rows] += noise.sum(0)
        if self.targets is not None:
            y = self.targets[rows]
            log_density = -0.5 * (torch.log(2 * math.pi * noise) + (y - mu).square() / noise)
            self.lse[rows] = torch.logaddexp(self.lse[rows], torch.logsumexp(log_density, 0))

    def _update_numpy(self, values: Tensor, rows: slice | Tensor) -> None:
        """:meth:`update` of CPU samples: the same float64 arithmetic in NumPy, as
        :meth:`ClassificationAccumulator._update_numpy` (a one-row call's update took ~20 µs
        in torch, ~8 here). The sums stay torch tensors, sharing NumPy's memory; the
        log-likelihood of ``targets`` is torch's. (A homoscedastic chunk's noise sums to
        ``s · noise_variance``; the torch path of other devices adds ``s`` copies, so its last
        bit may differ. Both CPU branches share this one, so the first chunk still equals its
        merge into zeros bit for bit.)"""
        if values.dtype in (torch.float32, torch.float64):  # NumPy's conversion: no torch op
            v = values.detach().resolve_neg().numpy().astype(np.float64, copy=False)
        else:  # (bfloat16, float16: a network of its own dtype)
            v = values.detach().to(torch.float64).resolve_neg().numpy()  # (s, n, K) or (s, n, 2K)
        k = self.k
        s = float(v.shape[0])
        if self.noise_variance is None:
            mu, noise = v[..., :k], np.exp(v[..., k:])
            noise_sum = np.add.reduce(noise, 0)
        else:
            mu, noise = v, None
            noise_sum = np.full(v.shape[1:], s * self.noise_variance)
        chunk_mean = np.add.reduce(mu, 0) / s  # mu.mean(0), without its Python wrapper
        chunk_m2 = np.square(mu - chunk_mean).sum(0)
        self._note(rows, v.shape[0])

        def merge_error_moments(n_a: np.ndarray | None, delta: np.ndarray | None) -> None:
            # (in torch on NumPy's memory: only adaptive requests keep these moments)
            mu_t = torch.from_numpy(mu)
            noise_t = (
                torch.from_numpy(noise)
                if noise is not None
                else torch.full_like(mu_t, cast(float, self.noise_variance))
            )
            self._merge_error_moments(
                rows,
                mu_t,
                noise_t,
                torch.from_numpy(chunk_mean),
                None if n_a is None else torch.from_numpy(n_a),
                None if delta is None else torch.from_numpy(delta),
            )

        if not self._started and self.targets is None and _all_rows(rows, self.n_rows):
            # as update's first chunk of every row
            self.count = torch.full((self.n_rows, 1), s, dtype=torch.float64)
            self.mean = torch.from_numpy(chunk_mean)
            self.m2 = torch.from_numpy(chunk_m2)
            self.sum_noise = torch.from_numpy(noise_sum)
            if self.track_error:
                merge_error_moments(None, None)
            self._started = True
            return
        self._start()
        at = rows if isinstance(rows, slice) else rows.numpy()
        count, mean, m2 = self.count.numpy(), self.mean.numpy(), self.m2.numpy()
        n_a = count[at]  # (n, 1)
        total = n_a + s
        delta = chunk_mean - mean[at]
        if self.track_error:
            merge_error_moments(n_a, delta)
        mean[at] += delta * (s / total)
        m2[at] += chunk_m2 + np.square(delta) * (n_a * s / total)
        count[at] = total
        self.sum_noise.numpy()[at] += noise_sum
        if self.targets is not None:
            y = self.targets[rows]
            mu_t = torch.from_numpy(mu)
            noise_t = (
                torch.from_numpy(noise)
                if noise is not None
                else torch.full_like(mu_t, cast(float, self.noise_variance))
            )
            log_density = -0.5 * (torch.log(2 * math.pi * noise_t) + (y - mu_t).square() / noise_t)
            self.lse[rows] = torch.logaddexp(self.lse[rows], torch.logsumexp(log_density, 0))

    def standard_error(self) -> Tensor:
        """``(N,)`` float64: the Monte Carlo standard error of each row's predictive mean and of
        its predictive standard deviation, the larger, in units of that standard deviation, the
        largest over outputs (inf below 2 samples; 0 for a row whose predictive variance is 0)::

            max_k max(SE(μ̂_k), SE(σ̂_k)) / σ̂_k,   SE(μ̂_k) = sqrt(s²_k / n),
            SE(σ̂_k) = SE(σ̂²_k) / (2 σ̂_k),         SE(σ̂²_k) = sqrt(s²(e_k) / n),

        with ``s²_k`` the unbiased sample variance of output k's sampled means ``μ_s``, ``σ̂²_k``
        the predictive variance (epistemic + aleatoric, divisor n) and ``e_k = (μ_s - μ̂_k)² +
        σ²_s`` each sample's term of it (``σ²_s`` its noise variance): ``σ̂²`` is their mean, so
        its error is theirs over sqrt(n) (the delta method: the centring on the estimated mean
        costs only higher order). The std's term is the larger one when the sampled means have
        heavy tails (low dropout rates: most masks agree, a few differ a lot) or the noise
        variance itself varies between samples (a heteroscedastic network).

        Raises:
            InvalidArgumentError: the accumulator was made with ``track_error=False``.
        """
        if not self.track_error:
            raise InvalidArgumentError("standard_error needs an accumulator with track_error")
        self._start()
        n = self.count  # (N, 1)
        std = ((self.m2 + self.sum_noise) / n).sqrt()
        se_mean = (self.m2 / (n * (n - 1))).sqrt()
        # Σ(e - ē)² from the shifted moments: e = e' - 2δ(μ_s - c) + δ², δ = μ̂ - c.
        d = self.mean - self.shift
        m2_e = (self.m2_e - 4 * d * self.co_e + 4 * d.square() * self.m2).clamp_min(0.0)
        se_std = (m2_e / (n * (n - 1))).sqrt() / (2 * std)
        ratio = torch.where(std > 0, torch.maximum(se_mean, se_std) / std, 0.0).amax(-1)
        return torch.where(n[:, 0] >= 2, ratio, math.inf)

    def result(self) -> RegressionSummary:
        self._start()
        if self.mean.device.type == "cpu" and self.targets is None:
            return self._result_numpy()
        epistemic = self.m2 / self.count
        aleatoric = self.sum_noise / self.count
        variance = epistemic + aleatoric
        lower, upper = gaussian_interval(self.mean, variance, self.level)
        ll = None if self.targets is None else (self.lse - self.count.log()).float()
        return RegressionSummary(
            mean=self.mean.float(),
            variance=variance.float(),
            std=variance.sqrt().float(),
            epistemic_variance=epistemic.float(),
            aleatoric_variance=aleatoric.float(),
            lower=lower.float(),
            upper=upper.float(),
            level=self.level,
            n_samples=self._most_samples(),
            row_n_samples=self.count[:, 0].to(torch.int64),
            log_likelihood=ll,
        )

    def _result_numpy(self) -> RegressionSummary:
        """:meth:`result` in NumPy, for sums on the CPU: the same elementwise float64 arithmetic
        and float32 roundings (IEEE, so the same bits), at a fifth of torch's cost per call on
        the small arrays of one request (~1 µs against ~4 per operation). Overflow goes to inf
        silently, as in torch (:func:`mcdrop.predictor.check_finite` finds it)."""
        with np.errstate(all="ignore"):
            return self._result_numpy_quiet()

    def _result_numpy_quiet(self) -> RegressionSummary:
        count = self.count.detach().numpy()  # (N, 1)
        mean = self.mean.detach().numpy()
        epistemic = self.m2.detach().numpy() / count
        aleatoric = self.sum_noise.detach().numpy() / count
        variance = epistemic + aleatoric
        std = np.sqrt(variance)
        half = _z(self.level) * np.sqrt(np.maximum(variance, 0.0))  # as gaussian_interval
        f32 = np.float32

        def out(a: np.ndarray) -> Tensor:
            return torch.from_numpy(a.astype(f32))

        return RegressionSummary(
            mean=out(mean),
            variance=out(variance),
            std=out(std),
            epistemic_variance=out(epistemic),
            aleatoric_variance=out(aleatoric),
            lower=out(mean - half),
            upper=out(mean + half),
            level=self.level,
            n_samples=self._most_samples(),
            row_n_samples=torch.from_numpy(count[:, 0].astype(np.int64)),
        )
