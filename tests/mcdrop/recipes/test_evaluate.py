"""mcdrop.recipes.evaluate: the written report, its plots, and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mcdrop import checkpoint, metrics
from mcdrop.checkpoint import ModelSpec, Normalization
from mcdrop.exceptions import InvalidArgumentError
from mcdrop.nets import MLP
from mcdrop.recipes import evaluate
from service.cli import main

PNG = b"\x89PNG\r\n\x1a\n"


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


# The two plotting tests are slow: matplotlib's import and first figures take over a second (the
# report without plots runs in the fast loop: test_held_out_classes_..., test_cli_evaluate).
@pytest.mark.slow
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


@pytest.mark.slow
def test_regressor_report_and_plots_are_written(tmp_path: Path) -> None:
    model = _diabetes_model(tmp_path / "model")
    report = evaluate.evaluate_model(model, out=tmp_path / "report", n_samples=3)
    assert report["task"] == "regression"
    assert len(report["coverage"]["mc"]) == len(metrics.COVERAGE_LEVELS)
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


def test_a_model_of_no_builtin_dataset_is_told_why(tmp_path: Path) -> None:
    # A model saved with mcdrop.save, named "blobs": it was "unknown dataset 'blobs'".
    model = _digits_model(tmp_path / "blobs")
    manifest = model / checkpoint.MANIFEST
    spec = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**spec, "name": "blobs", "training": {}}))
    with pytest.raises(InvalidArgumentError) as info:
        evaluate.evaluate_model(model, plots=False)
    assert str(info.value).startswith(
        "model 'blobs' records no built-in dataset it was trained on (its manifest's "
        "training.dataset), and evaluate scores a model on one of ['diabetes', 'digits', "
        "'fashion']: give --dataset"
    )
    # Told which, it runs.
    assert evaluate.evaluate_model(model, "digits", plots=False, limit=5)["n_test"] == 5


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


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"ood_classes": [99]}, r"ood_classes \[99\] are not classes of this dataset: .* 0 to 9"),
        ({"ood_classes": [3, -1]}, r"ood_classes \[-1\] are not classes"),
        ({"ood_classes": list(range(10))}, "hold out every class: leave at least one"),
        ({"limit": -5}, "limit must be a positive number of rows, got -5"),
        ({"limit": 0}, "limit must be a positive number of rows, got 0"),
    ],
)
def test_ood_classes_and_limit_are_checked(
    tmp_path: Path, options: dict[str, object], message: str
) -> None:
    """Before any scoring: not an IndexError, a negative tensor size or an empty test set."""
    model = _digits_model(tmp_path / "model")
    with pytest.raises(InvalidArgumentError, match=message):
        evaluate.evaluate_model(model, n_samples=2, plots=False, **options)  # type: ignore[arg-type]
