"""mcdrop.metrics: against closed forms, naive loops and scikit-learn."""

from __future__ import annotations

import json
import math

import pytest
import torch
from sklearn.metrics import roc_auc_score

from mcdrop import metrics
from mcdrop.exceptions import InvalidArgumentError


def naive_ece(probs: list[list[float]], labels: list[int], n_bins: int) -> float:
    """ECE by looping over bins ``(lo, hi]`` (bin 0 also takes 0)."""
    total = 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        members = [
            (max(p), p.index(max(p)) == y)
            for p, y in zip(probs, labels, strict=True)
            if (lo < max(p) <= hi) or (b == 0 and max(p) == 0)
        ]
        if members:
            conf = sum(c for c, _ in members) / len(members)
            acc = sum(ok for _, ok in members) / len(members)
            total += len(members) / len(probs) * abs(acc - conf)
    return total


def naive_auroc(inside: list[float], outside: list[float]) -> float:
    wins = sum((o > i) + 0.5 * (o == i) for o in outside for i in inside)
    return wins / (len(inside) * len(outside))


# Confidences on bin edges (0.5, 0.6, 0.7, 0.9 = b/B in float) test upper-inclusive binning.
PROBS = [
    [0.9, 0.05, 0.05],
    [0.7, 0.2, 0.1],
    [0.5, 0.3, 0.2],
    [0.2, 0.7, 0.1],
    [0.34, 0.33, 0.33],
    [0.1, 0.1, 0.8],
    [0.6, 0.4, 0.0],
    [0.05, 0.9, 0.05],
]
LABELS = [0, 0, 1, 1, 2, 2, 0, 0]


@pytest.mark.parametrize("n_bins", [1, 2, 5, 10, 15])
def test_ece_matches_naive_loop(n_bins: int) -> None:
    got = metrics.expected_calibration_error(
        torch.tensor(PROBS, dtype=torch.float64), torch.tensor(LABELS), n_bins
    )
    assert got == pytest.approx(naive_ece(PROBS, LABELS, n_bins), abs=1e-12)


def test_ece_closed_forms() -> None:
    # 10 rows at confidence 0.8, 8 of them right: perfectly calibrated.
    probs = torch.tensor([[0.8, 0.2]] * 10, dtype=torch.float64)
    labels = torch.tensor([0] * 8 + [1] * 2)
    assert metrics.expected_calibration_error(probs, labels) == pytest.approx(0.0, abs=1e-12)
    # Certain and always wrong: the worst case.
    wrong = torch.tensor([[1.0, 0.0]] * 4, dtype=torch.float64)
    assert metrics.expected_calibration_error(wrong, torch.ones(4, dtype=torch.long)) == 1.0


def test_calibration_bins_are_upper_inclusive() -> None:
    probs = torch.tensor([[0.5, 0.5], [0.75, 0.25]], dtype=torch.float64)
    bins = metrics.calibration_bins(probs, torch.tensor([0, 1]), n_bins=2)
    assert bins.count.tolist() == [1.0, 1.0]  # 0.5 falls in (0, 0.5]
    assert bins.accuracy.tolist() == [1.0, 0.0]
    assert bins.confidence.tolist() == [0.5, 0.75]
    json.dumps(metrics.calibration_bins(probs, torch.tensor([0, 1]), 4).to_dict())  # NaN-free


def test_brier_and_nll_closed_forms() -> None:
    k = 4
    uniform = torch.full((3, k), 1 / k, dtype=torch.float64)
    labels = torch.tensor([0, 1, 3])
    assert metrics.brier_score(uniform, labels) == pytest.approx(1 - 1 / k)
    assert metrics.nll(uniform, labels) == pytest.approx(math.log(k))
    one_hot = torch.eye(k, dtype=torch.float64)[labels]
    assert metrics.brier_score(one_hot, labels) == 0.0
    assert metrics.accuracy(one_hot, labels) == 1.0
    # Wrong and certain: Brier 2, NLL finite (probabilities are clamped before the log).
    assert metrics.brier_score(one_hot, torch.tensor([1, 2, 0])) == 2.0
    assert math.isfinite(metrics.nll(one_hot, torch.tensor([1, 2, 0])))


def test_brier_matches_naive_loop() -> None:
    naive = sum(
        sum((p - (k == y)) ** 2 for k, p in enumerate(row))
        for row, y in zip(PROBS, LABELS, strict=True)
    ) / len(PROBS)
    got = metrics.brier_score(torch.tensor(PROBS, dtype=torch.float64), torch.tensor(LABELS))
    assert got == pytest.approx(naive)


@pytest.mark.parametrize(
    ("inside", "outside", "expected"),
    [
        ([0.1, 0.2, 0.3], [0.4, 0.5], 1.0),
        ([0.4, 0.5], [0.1, 0.2, 0.3], 0.0),
        ([0.5, 0.5], [0.5, 0.5, 0.5], 0.5),
        ([0.1, 0.4, 0.35, 0.8], [0.9, 0.4, 0.3], 7.5 / 12),
    ],
)
def test_auroc_hand_cases(inside: list[float], outside: list[float], expected: float) -> None:
    got = metrics.auroc(torch.tensor(inside), torch.tensor(outside))
    assert got == pytest.approx(expected)
    assert got == pytest.approx(naive_auroc(inside, outside))


def test_auroc_matches_naive_and_sklearn_with_ties() -> None:
    generator = torch.Generator().manual_seed(0)
    # Rounded scores: many ties, the case rank statistics get wrong without average ranks.
    inside = (torch.randn(60, generator=generator) * 2).round() / 2
    outside = (torch.randn(40, generator=generator) * 2 + 1).round() / 2
    got = metrics.auroc(inside, outside)
    assert got == pytest.approx(naive_auroc(inside.tolist(), outside.tolist()), abs=1e-12)
    labels = [0] * len(inside) + [1] * len(outside)
    assert got == pytest.approx(roc_auc_score(labels, torch.cat([inside, outside]).numpy()))


def test_auroc_rejects_empty_and_nan() -> None:
    with pytest.raises(InvalidArgumentError):
        metrics.auroc(torch.tensor([]), torch.tensor([1.0]))
    with pytest.raises(InvalidArgumentError):
        metrics.auroc(torch.tensor([float("nan")]), torch.tensor([1.0]))


def test_rejection_curve_hand_case() -> None:
    correct = torch.tensor([True, False, True, True, False])
    uncertainty = torch.tensor([0.1, 0.9, 0.2, 0.3, 0.8])
    curve = metrics.rejection_curve(correct, uncertainty, (0.0, 0.2, 0.4, 0.6))
    # Rejecting the 1 and 2 most uncertain rows removes exactly the two mistakes.
    assert curve.tolist() == pytest.approx([0.6, 0.75, 1.0, 1.0])


def test_interval_coverage_closed_form() -> None:
    # Errors at |z| = 0.5, 1.5, 2.5 standard deviations.
    mean = torch.zeros(3, 1)
    std = torch.full((3, 1), 2.0)
    targets = torch.tensor([[1.0], [-3.0], [5.0]])
    levels = (0.2, 0.5, 0.9, 0.95, 0.99)  # z = 0.25, 0.67, 1.64, 1.96, 2.58
    coverage = metrics.interval_coverage(mean, std, targets, levels)
    assert coverage.tolist() == pytest.approx([0.0, 1 / 3, 2 / 3, 2 / 3, 1.0])


def naive_ranks(values: list[float]) -> list[float]:
    """1 + the values below, + half of the other values equal to it."""
    return [1 + sum(w < v for w in values) + (sum(w == v for w in values) - 1) / 2 for v in values]


def test_average_ranks_match_naive_with_ties() -> None:
    values = [3.0, 1.0, 3.0, 2.0, 3.0, 0.5, 1.0]
    assert metrics.average_ranks(torch.tensor(values)).tolist() == naive_ranks(values)


def test_spearman_matches_pearson_of_naive_ranks() -> None:
    generator = torch.Generator().manual_seed(0)
    a = (torch.randn(50, generator=generator) * 2).round()  # ties
    b = a + torch.randn(50, generator=generator)
    ra, rb = (torch.tensor(naive_ranks(v.tolist()), dtype=torch.float64) for v in (a, b))
    pearson = float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])
    assert metrics.spearman(a, b) == pytest.approx(pearson, abs=1e-12)
    assert metrics.spearman(a, a.exp()) == pytest.approx(1.0)  # any increasing map
    assert metrics.spearman(a, -a) == pytest.approx(-1.0)
    assert metrics.spearman(a, torch.ones(50)) == 0.0  # no spread: no correlation
