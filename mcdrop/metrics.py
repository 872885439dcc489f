"""Held-out metrics of a model's predictions: accuracy, NLL, Brier score, calibration, AUROC,
rejection and coverage curves, rank correlation.

Shape legend: ``N`` rows, ``K`` classes or regression targets, ``B`` bins, ``F`` fractions.
Pure functions: they take **probabilities** (not logits; :mod:`mcdrop.stats` turns logits into
them), compute in float64, and return Python floats or float64 tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mcdrop.exceptions import InvalidArgumentError

#: Equal-width confidence bins of the ECE and the reliability diagram.
DEFAULT_BINS = 15
#: Fractions of the most uncertain test inputs rejected in the rejection curve.
REJECT_FRACTIONS = tuple(round(0.05 * i, 2) for i in range(19))  # 0.0 … 0.9
#: Nominal levels of the regression coverage curve.
COVERAGE_LEVELS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
EPS = 1e-12


def _check(probabilities: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    if probabilities.dim() != 2 or labels.shape != probabilities.shape[:1]:
        raise InvalidArgumentError(
            f"need probabilities (N, K) and labels (N,), got {tuple(probabilities.shape)} and "
            f"{tuple(labels.shape)}"
        )
    return probabilities.double(), labels.long()


def accuracy(probabilities: Tensor, labels: Tensor) -> float:
    """Fraction of rows whose most probable class is the label: ``(N, K), (N,)``."""
    p, y = _check(probabilities, labels)
    return float((p.argmax(-1) == y).double().mean())


def nll(probabilities: Tensor, labels: Tensor) -> float:
    """Mean negative log-probability of the labels, in nats: ``(N, K), (N,)``."""
    p, y = _check(probabilities, labels)
    return float(-p.gather(1, y[:, None]).clamp_min(EPS).log().mean())


def brier_score(probabilities: Tensor, labels: Tensor) -> float:
    """Multi-class Brier score ``1/N Σ_n Σ_k (p_nk − 1[y_n = k])²`` (0 best, 2 worst)."""
    p, y = _check(probabilities, labels)
    return float((p - F.one_hot(y, p.shape[1]).double()).square().sum(1).mean())


@dataclass(frozen=True)
class CalibrationBins:
    """Equal-width bins of top-class confidence, each ``(B,)`` (``edges (B+1,)``).

    ``confidence`` and ``accuracy`` are the means over a bin's rows (NaN in empty bins);
    ``count`` is its number of rows. Bin ``b`` holds confidences in ``(edges[b], edges[b+1]]``.
    """

    edges: Tensor
    confidence: Tensor
    accuracy: Tensor
    count: Tensor

    def to_dict(self) -> dict[str, list[float]]:
        def clean(t: Tensor) -> list[Any]:
            return [None if math.isnan(v) else round(v, 6) for v in t.tolist()]

        return {
            "edges": clean(self.edges),
            "confidence": clean(self.confidence),
            "accuracy": clean(self.accuracy),
            "count": [int(c) for c in self.count.tolist()],
        }


def calibration_bins(
    probabilities: Tensor, labels: Tensor, n_bins: int = DEFAULT_BINS
) -> CalibrationBins:
    """Reliability-diagram bins of ``probabilities (N, K)`` against ``labels (N,)``."""
    p, y = _check(probabilities, labels)
    if n_bins < 1:
        raise InvalidArgumentError(f"n_bins must be at least 1, got {n_bins}")
    confidence, predicted = p.max(-1)
    correct = (predicted == y).double()
    # Edges b/B (exact, unlike ceil(c·B) where 0.7·10 rounds to 7.000000000000001), searched
    # for upper-inclusive bins; confidence 0 (impossible for K ≥ 1) goes to bin 0.
    edges = torch.arange(n_bins + 1, dtype=torch.float64) / n_bins
    index = (torch.searchsorted(edges, confidence.contiguous()) - 1).clamp(0, n_bins - 1)
    count = torch.bincount(index, minlength=n_bins).double()
    conf_sum = torch.bincount(index, weights=confidence, minlength=n_bins)
    acc_sum = torch.bincount(index, weights=correct, minlength=n_bins)
    return CalibrationBins(
        edges=edges,
        confidence=conf_sum / count,  # 0/0 = NaN marks empty bins
        accuracy=acc_sum / count,
        count=count,
    )


def expected_calibration_error(
    probabilities: Tensor, labels: Tensor, n_bins: int = DEFAULT_BINS
) -> float:
    """ECE (Guo et al. 2017): ``Σ_b n_b/N |accuracy_b − confidence_b|`` over equal-width bins of
    top-class confidence. ``(N, K), (N,)``."""
    bins = calibration_bins(probabilities, labels, n_bins)
    full = bins.count > 0
    gaps = (bins.accuracy[full] - bins.confidence[full]).abs()
    return float((bins.count[full] * gaps).sum() / bins.count.sum())


def average_ranks(values: Tensor) -> Tensor:
    """1-based ranks of ``values (N,)``, tied values sharing their mean rank: ``(N,)`` float64."""
    _, inverse, counts = torch.unique(values.double(), return_inverse=True, return_counts=True)
    last = counts.cumsum(0).double()  # rank of the last member of each group of equal values
    return (last - (counts.double() - 1) / 2)[inverse]


def auroc(in_scores: Tensor, out_scores: Tensor) -> float:
    """Area under the ROC curve of telling ``out_scores`` (positives) from ``in_scores``
    when a higher score means "more likely out": ``P(out > in) + ½ P(out = in)``.

    The Mann–Whitney U statistic from average ranks, ``O((N_in + N_out) log)``; 0.5 is chance.
    Shapes: ``(N_in,)``, ``(N_out,)``.
    """
    n_in, n_out = in_scores.numel(), out_scores.numel()
    if n_in == 0 or n_out == 0:
        raise InvalidArgumentError("auroc needs at least one in- and one out-of-distribution score")
    scores = torch.cat([in_scores.flatten(), out_scores.flatten()]).double()
    if not bool(torch.isfinite(scores).all()):
        raise InvalidArgumentError("auroc scores must be finite")
    u = average_ranks(scores)[n_in:].sum() - n_out * (n_out + 1) / 2
    return float(u / (n_in * n_out))


def rejection_curve(
    correct: Tensor, uncertainty: Tensor, fractions: tuple[float, ...] = REJECT_FRACTIONS
) -> Tensor:
    """Accuracy on the inputs kept after rejecting the most uncertain fraction ``f``.

    Ties in ``uncertainty`` are broken by row order (stable sort), so the curve is deterministic.
    Shapes: ``correct (N,)`` bool, ``uncertainty (N,)`` -> ``(F,)``.
    """
    n = correct.numel()
    order = torch.sort(uncertainty.double(), stable=True).indices  # most certain first
    hits = correct[order].double().cumsum(0)
    out = []
    for f in fractions:
        if not 0.0 <= f < 1.0:
            raise InvalidArgumentError(f"rejected fractions must be in [0, 1), got {f}")
        keep = max(1, n - math.floor(f * n + 1e-9))
        out.append(hits[keep - 1] / keep)
    return torch.stack(out)


def interval_coverage(
    mean: Tensor, std: Tensor, targets: Tensor, levels: tuple[float, ...] = COVERAGE_LEVELS
) -> Tensor:
    """Fraction of targets inside the central Gaussian interval ``mean ± z·std`` at each level.

    Shapes: ``mean, std, targets (N, K)`` -> ``(len(levels),)``; well calibrated means
    coverage ≈ level.
    """
    z = torch.special.ndtri(torch.tensor([(1 + lv) / 2 for lv in levels], dtype=torch.float64))
    err = (targets.double() - mean.double()).abs()[None]  # (1, N, K)
    inside = err <= z[:, None, None] * std.double()[None]
    return inside.flatten(1).double().mean(1)


def classification_metrics(probabilities: Tensor, labels: Tensor) -> dict[str, float]:
    """Accuracy, NLL, Brier score and ECE of ``probabilities (N, K)``."""
    return {
        "accuracy": accuracy(probabilities, labels),
        "nll": nll(probabilities, labels),
        "brier": brier_score(probabilities, labels),
        "ece": expected_calibration_error(probabilities, labels),
    }


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman rank correlation of two ``(N,)`` vectors (ties by average rank)."""
    ra, rb = average_ranks(a), average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = (ra.square().sum() * rb.square().sum()).sqrt()
    return float((ra * rb).sum() / denom) if denom > 0 else 0.0
