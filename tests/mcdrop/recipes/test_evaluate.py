"""mcdrop.recipes.evaluate: metrics against closed forms and naive loops, and the written report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from sklearn.metrics import roc_auc_score

from mcdrop import checkpoint
from mcdrop.checkpoint import ModelSpec, Normalization
from mcdrop.exceptions import InvalidArgumentError
from mcdrop.nets import MLP
from mcdrop.recipes import evaluate
from service.cli import main

PNG = b"\x89PNG\r\n\x1a\n"


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
    got = evaluate.expected_calibration_error(
        torch.tensor(PROBS, dtype=torch.float64), torch.tensor(LABELS), n_bins
    )
    assert got == pytest.approx(naive_ece(PROBS, LABELS, n_bins), abs=1e-12)


def test_ece_closed_forms() -> None:
    # 10 rows at confidence 0.8, 8 of them right: perfectly calibrated.
    probs = torch.tensor([[0.8, 0.2]] * 10, dtype=torch.float64)
    labels = torch.tensor([0] * 8 + [1] * 2)
    assert evaluate.expected_calibration_error(probs, labels) == pytest.approx(0.0, abs=1e-12)
    # Certain and always wrong: the worst case.
    wrong = torch.tensor([[1.0, 0.0]] * 4, dtype=torch.float64)
    assert evaluate.expected_calibration_error(wrong, torch.ones(4, dtype=torch.long)) == 1.0


def test_calibration_bins_are_upper_inclusive() -> None:
    probs = torch.tensor([[0.5, 0.5], [0.75, 0.25]], dtype=torch.float64)
    bins = evaluate.calibration_bins(probs, torch.tensor([0, 1]), n_bins=2)
    assert bins.count.tolist() == [1.0, 1.0]  # 0.5 falls in (0, 0.5]
    assert bins.accuracy.tolist() == [1.0, 0.0]
    assert bins.confidence.tolist() == [0.5, 0.75]
    json.dumps(evaluate.calibration_bins(probs, torch.tensor([0, 1]), 4).to_dict())  # NaN-free


def test_brier_and_nll_closed_forms() -> None:
    k = 4
    uniform = torch.full((3, k), 1 / k, dtype=torch.float64)
    labels = torch.tensor([0, 1, 3])
    assert evaluate.brier_score(uniform, labels) == pytest.approx(1 - 1 / k)
    assert evaluate.nll(uniform, labels) == pytest.approx(math.log(k))
    one_hot = torch.eye(k, dtype=torch.float64)[labels]
    assert evaluate.brier_score(one_hot, labels) == 0.0
    assert evaluate.accuracy(one_hot, labels) == 1.0
    # Wrong and certain: Brier 2, NLL finite (probabilities are clamped before the log).
    assert evaluate.brier_score(one_hot, torch.tensor([1, 2, 0])) == 2.0
    assert math.isfinite(evaluate.nll(one_hot, torch.tensor([1, 2, 0])))


def test_brier_matches_naive_loop() -> None:
    naive = sum(
        sum((p - (k == y)) ** 2 for k, p in enumerate(row))
        for row, y in zip(PROBS, LABELS, strict=True)
    ) / len(PROBS)
    got = evaluate.brier_score(torch.tensor(PROBS, dtype=torch.float64), torch.tensor(LABELS))
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
    got = evaluate.auroc(torch.tensor(inside), torch.tensor(outside))
    assert got == pytest.approx(expected)
    assert got == pytest.approx(naive_auroc(inside, outside))


def test_auroc_matches_naive_and_sklearn_with_ties() -> None:
    generator = torch.Generator().manual_seed(0)
    # Rounded scores: many ties, the case rank statistics get wrong without average ranks.
    inside = (torch.randn(60, generator=generator) * 2).round() / 2
    outside = (torch.randn(40, generator=generator) * 2 + 1).round() / 2
    got = evaluate.auroc(inside, outside)
    assert got == pytest.approx(naive_auroc(inside.tolist(), outside.tolist()), abs=1e-12)
    labels = [0] * len(inside) + [1] * len(outside)
    assert got == pytest.approx(roc_auc_score(labels, torch.cat([inside, outside]).numpy()))


def test_auroc_rejects_empty_and_nan() -> None:
    with pytest.raises(InvalidArgumentError):
        evaluate.auroc(torch.tensor([]), torch.tensor([1.0]))
    with pytest.raises(InvalidArgumentError):
        evaluate.auroc(torch.tensor([float("nan")]), torch.tensor([1.0]))


def test_rejection_curve_hand_case() -> None:
    correct = torch.tensor([True, False, True, True, False])
    uncertainty = torch.tensor([0.1, 0.9, 0.2, 0.3, 0.8])
    curve = evaluate.rejection_curve(correct, uncertainty, (0.0, 0.2, 0.4, 0.6))
    # Rejecting the 1 and 2 most uncertain rows removes exactly the two mistakes.
    assert curve.tolist() == pytest.approx([0.6, 0.75, 1.0, 1.0])


def test_interval_coverage_closed_form() -> None:
    # Errors at |z| = 0.5, 1.5, 2.5 standard deviations.
    mean = torch.zeros(3, 1)
    std = torch.full((3, 1), 2.0)
    targets = torch.tensor([[1.0], [-3.0], [5.0]])
    levels = (0.2, 0.5, 0.9, 0.95, 0.99)  # z = 0.25, 0.67, 1.64, 1.96, 2.58
    coverage = evaluate.interval_coverage(mean, std, targets, levels)
    assert coverage.tolist() == pytest.approx([0.0, 1 / 3, 2 / 3, 2 / 3, 1.0])


def test_upscaled_digits_look_like_mnist() -> None:
    x = torch.zeros(2, 64)
    x[:, 27] = 16.0  # one bright pixel near the centre
    images = evaluate.upscale_digits(x)
    assert images.shape == (2, 28, 28)
    assert float(images.min()) == 0.0
    assert 0 < float(images.max()) <= 255.0
    assert float(images[:, :4].abs().sum()) == 0.0  # the 4-pixel MNIST margin stays empty
    assert evaluate.downscale_images(images).shape == (2, 64)


def _digits_model(directory: Path) -> Path:
    torch.manual_seed(0)
    net = MLP(64, [16], 10, dropout=0.2)
    spec = ModelSpec(
        name="tiny-digits",
        task="classification",
        input_shape=[64],
        labels=[str(i) for i in range(10)],
        architecture={
            "name": "mlp",
            "params": {"in_features": 64, "hidden": [16], "out_features": 10, "dropout": 0.2},
        },
        input_normalization=Normalization([8.0] * 64, [6.0] * 64),
        default_n_samples=4,
        training={"dataset": "digits", "seed": 0},
    )
    return checkpoint.save(directory, spec, net)


def _diabetes_model(directory: Path) -> Path:
    torch.manual_seed(0)
    net = MLP(10, [8], 1, dropout=0.1)
    spec = ModelSpec(
        name="tiny-diabetes",
        task="regression",
        input_shape=[10],
        labels=["disease_progression"],
        architecture={
            "name": "mlp",
            "params": {"in_features": 10, "hidden": [8], "out_features": 1, "dropout": 0.1},
        },
        tau=1.0,
        input_normalization=Normalization([50.0] * 10, [30.0] * 10),
        target_normalization=Normalization([150.0], [75.0]),
        default_n_samples=4,
        training={"dataset": "diabetes", "seed": 0},
    )
    return checkpoint.save(directory, spec, net)


def test_classifier_report_and_plots_are_written(tmp_path: Path) -> None:
    model = _digits_model(tmp_path / "model")
    report = evaluate.evaluate_model(model, out=tmp_path / "report", limit=40, n_samples=3)
    assert report["n_test"] == 40
    assert set(report["metrics"]) == {"deterministic", "mc"}
    assert set(report["metrics"]["mc"]) == {"accuracy", "nll", "brier", "ece"}
    assert "uniform noise" in report["ood"]
    for o in report["ood"].values():
        assert 0.0 <= o["auroc_mutual_information"] <= 1.0
    assert report["plots"] == ["reliability.png", "rejection.png", "mutual_information.png"]
    # (digits rows are flat: no examples picture; the Fashion-MNIST report has one)
    for name in report["plots"]:
        assert (tmp_path / "report" / name).read_bytes().startswith(PNG)
    assert json.loads((tmp_path / "report" / "report.json").read_text()) == report
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "## Out-of-distribution detection" in markdown
    assert "![reliability.png](reliability.png)" in markdown


def test_regressor_report_and_plots_are_written(tmp_path: Path) -> None:
    model = _diabetes_model(tmp_path / "model")
    report = evaluate.evaluate_model(model, out=tmp_path / "report", n_samples=3)
    assert report["task"] == "regression"
    assert len(report["coverage"]["mc"]) == len(evaluate.COVERAGE_LEVELS)
    assert report["plots"] == ["coverage.png", "error_vs_std.png"]
    for name in report["plots"]:
        assert (tmp_path / "report" / name).read_bytes().startswith(PNG)
    assert "## Interval coverage" in (tmp_path / "report" / "report.md").read_text()


def test_held_out_classes_become_an_ood_set(tmp_path: Path) -> None:
    model = _digits_model(tmp_path / "model")
    report = evaluate.evaluate_model(model, ood_classes=[3, 8], n_samples=2, plots=False)
    held = report["ood"]["held-out classes (3, 8)"]
    assert held["n"] > 0
    assert report["n_test"] + held["n"] == 269  # the digits test part, split between the two


def test_model_and_dataset_must_fit(tmp_path: Path) -> None:
    model = _digits_model(tmp_path / "model")
    with pytest.raises(InvalidArgumentError, match="does not fit dataset 'diabetes'"):
        evaluate.evaluate_model(model, "diabetes", plots=False)


def test_cli_evaluate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = _digits_model(tmp_path / "model")
    out = tmp_path / "cli"
    argv = ["evaluate", str(model), "--out", str(out), "--limit", "20", "--n-samples", "2"]
    assert main([*argv, "--no-plots"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["n_test"] == 20
    assert printed["written"] == str(out)
    assert (out / "report.md").is_file()
    assert not (out / "reliability.png").exists()
    written = json.loads((out / "report.json").read_text())
    assert written["command"] == "mcdrop " + " ".join([*argv, "--no-plots"])
