"""Held-out evaluation of a model directory: calibration, out-of-distribution detection, plots.

``mcdrop evaluate`` runs :func:`evaluate_model`. A classifier is scored deterministically
(dropout off) and by MC dropout on its test set: accuracy, NLL, Brier score, expected calibration
error; then MC predictive entropy and mutual information are used to tell the test set apart
from out-of-distribution (OOD) inputs, scored by AUROC. A regressor gets RMSE, log-likelihood and
the coverage of its predictive intervals against their nominal level.

Shape legend: ``N`` rows, ``K`` classes or regression targets. The metrics are
:mod:`mcdrop.metrics`'s pure functions; the OOD sets come from :mod:`mcdrop.recipes.ood`, the
markdown from :mod:`mcdrop.recipes.report`, the PNG plots (matplotlib) from
:mod:`mcdrop.recipes.plots`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mcdrop import checkpoint
from mcdrop.exceptions import InvalidArgumentError
from mcdrop.metrics import (
    COVERAGE_LEVELS,
    REJECT_FRACTIONS,
    calibration_bins,
    classification_metrics,
    interval_coverage,
    rejection_curve,
    spearman,
)
from mcdrop.predictor import Predictor, RegressionPrediction
from mcdrop.recipes import datasets
from mcdrop.recipes.ood import ood_sets
from mcdrop.recipes.plots import write_plots
from mcdrop.recipes.report import markdown_report, rounded
from mcdrop.recipes.scores import ClassifierScores, ood_aurocs, score_classifier
from mcdrop.stats import RegressionSummary

#: Images per row of the examples plot.
EXAMPLES = 8


def evaluate_classifier(
    predictor: Predictor,
    data: datasets.Dataset,
    *,
    n_samples: int,
    seed: int = 0,
    ood_classes: list[int] | None = None,
    limit: int | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Metrics, OOD AUROCs and the data behind the plots of a classifier.

    Args:
        ood_classes: classes the model was trained without: their test rows are the
            "held-out classes" OOD set, and the metrics use the other rows.
        limit: score only the first ``limit`` rows of each set (quick runs).

    Returns:
        the JSON report, and the raw arrays the plots need.
    """
    x, y = data.x_test, data.y_test
    sets, notes = ood_sets(data, seed=seed, limit=limit)
    if ood_classes:
        held_out = torch.isin(y, torch.tensor(ood_classes))
        names = ", ".join(data.labels[c] for c in ood_classes)
        sets = {f"held-out classes ({names})": x[held_out], **sets}
        x, y = x[~held_out], y[~held_out]
    if limit is not None:
        x, y = x[:limit], y[:limit]
    inside = score_classifier(predictor, x, n_samples=n_samples, seed=seed)
    correct_mc = inside.mc.argmax(-1) == y
    bins = {
        "deterministic": calibration_bins(inside.deterministic, y),
        "mc": calibration_bins(inside.mc, y),
    }
    ood: dict[str, Any] = {}
    mi_out: dict[str, Tensor] = {}
    examples_out: dict[str, tuple[Tensor, Tensor, Tensor]] = {}
    for name, x_out in sets.items():
        outside = score_classifier(predictor, x_out, n_samples=n_samples, seed=seed)
        ood[name] = {
            "n": len(x_out),
            **rounded(
                {
                    **ood_aurocs(inside, outside),
                    "mean_entropy": float(outside.entropy.mean()),
                    "mean_mutual_information": float(outside.mutual_information.mean()),
                }
            ),
        }
        mi_out[name] = outside.mutual_information
        examples_out[name] = (x_out[:EXAMPLES], outside.mc[:EXAMPLES], mi_out[name][:EXAMPLES])
    rejection = {
        name: rounded(rejection_curve(correct_mc, getattr(inside, name)).tolist())
        for name in ClassifierScores.SCORES
    }
    # The deterministic baseline rejects by its own confidence and is scored on its own labels.
    correct_det = inside.deterministic.argmax(-1) == y
    rejection["deterministic_entropy"] = rounded(
        rejection_curve(correct_det, inside.deterministic_entropy).tolist()
    )
    report = {
        "n_test": len(x),
        "metrics": {
            "deterministic": rounded(classification_metrics(inside.deterministic, y)),
            "mc": rounded(classification_metrics(inside.mc, y)),
        },
        "in_distribution": rounded(
            {
                "mean_entropy": float(inside.entropy.mean()),
                "mean_mutual_information": float(inside.mutual_information.mean()),
            }
        ),
        "ood": ood,
        "rejection": {"fractions": list(REJECT_FRACTIONS), **rejection},
        "reliability": {k: v.to_dict() for k, v in bins.items()},
        "notes": notes,
    }
    # The least and the most uncertain test inputs (by mutual information), for pictures.
    order = torch.argsort(inside.mutual_information, stable=True)
    picks = {"most certain test inputs": order[:EXAMPLES], "most uncertain": order[-EXAMPLES:]}
    # (inputs, probabilities, MI, labels); out-of-distribution rows have no labels.
    examples: dict[str, tuple[Tensor, Tensor, Tensor, Tensor | None]] = {
        name: (x[idx], inside.mc[idx], inside.mutual_information[idx], y[idx])
        for name, idx in picks.items()
    }
    examples |= {name: (*v, None) for name, v in examples_out.items()}
    raw = {
        "bins": bins,
        "mi_in": inside.mutual_information,
        "mi_out": mi_out,
        "examples": examples,
        "labels": data.labels,
    }
    return report, raw


def evaluate_regressor(
    predictor: Predictor,
    data: datasets.Dataset,
    *,
    n_samples: int,
    seed: int = 0,
    limit: int | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """RMSE, log-likelihood and interval coverage of a regressor, deterministic and MC."""
    x, y = data.x_test, data.y_test
    if limit is not None:
        x, y = x[:limit], y[:limit]
    y = y.double()
    det = predictor.predict(x)
    summary, _ = predictor.uncertainty(x, n_samples, seed=seed, targets=y.float())
    assert isinstance(summary, RegressionSummary)
    assert summary.log_likelihood is not None
    assert isinstance(det, RegressionPrediction)
    det_mean = det.mean.double()
    det_std = det.noise_variance.double().sqrt()
    mc_mean, mc_std = summary.mean.double(), summary.std.double()
    det_ll = -0.5 * (math.log(2 * math.pi) + 2 * det_std.log() + ((y - det_mean) / det_std) ** 2)
    error = (y - mc_mean).abs()
    coverage = {
        "levels": list(COVERAGE_LEVELS),
        "deterministic": interval_coverage(det_mean, det_std, y).tolist(),
        "mc": interval_coverage(mc_mean, mc_std, y).tolist(),
    }
    report = {
        "n_test": len(x),
        "metrics": {
            "deterministic": rounded(
                {
                    "rmse": float((y - det_mean).square().mean().sqrt()),
                    "log_likelihood": float(det_ll.mean()),
                }
            ),
            "mc": rounded(
                {
                    "rmse": float(error.square().mean().sqrt()),
                    "log_likelihood": float(summary.log_likelihood.double().mean()),
                    "mean_std": float(mc_std.mean()),
                    "mean_epistemic_std": float(summary.epistemic_variance.double().sqrt().mean()),
                    "error_std_spearman": spearman(error.flatten(), mc_std.flatten()),
                    "error_epistemic_spearman": spearman(
                        error.flatten(), summary.epistemic_variance.double().sqrt().flatten()
                    ),
                }
            ),
        },
        "coverage": rounded(coverage),
        "notes": [],
    }
    raw = {
        "error": error.flatten(),
        "std": mc_std.flatten(),
        "epistemic": summary.epistemic_variance.double().sqrt().flatten(),
        "coverage": coverage,
    }
    return report, raw


def _check_ood_classes(ood_classes: Sequence[int], labels: Sequence[str]) -> None:
    """Held-out classes must be class indices, and leave at least one class in distribution."""
    k = len(labels)
    wrong = [c for c in ood_classes if not (isinstance(c, int) and 0 <= c < k)]
    if wrong:
        raise InvalidArgumentError(
            f"ood_classes {wrong} are not classes of this dataset: give indices from 0 to {k - 1}"
        )
    if len(set(ood_classes)) >= k:
        raise InvalidArgumentError(
            f"ood_classes {sorted(set(ood_classes))} hold out every class: leave at least one "
            "in distribution"
        )


def evaluate_model(
    model_dir: str | Path,
    dataset: str | None = None,
    *,
    out: str | Path | None = None,
    n_samples: int | None = None,
    seed: int = 0,
    ood_classes: list[int] | None = None,
    limit: int | None = None,
    plots: bool = True,
    max_pass_rows: int | None = None,
    command: str | None = None,
    trust_model_code: bool = False,
    allowed_factories: Sequence[str] = (),
    device: str = "cpu",
    dtype: str = "float32",
) -> dict[str, Any]:
    """Evaluate a model directory on a built-in dataset and write its report.

    The data are split with the seed recorded in the manifest (``training.seed``), so the test
    rows are the ones the model never saw; classes the manifest lists as
    ``training.exclude_classes`` are scored as OOD unless ``ood_classes`` says otherwise.

    Args:
        model_dir: a model directory (``model.json`` + weights).
        dataset: ``digits``, ``diabetes`` or ``fashion``; the manifest's training dataset if
            None.
        out: folder for ``report.json``, ``report.md`` and the PNG plots (nothing written if
            None).
        n_samples: S; the manifest's ``default_n_samples`` if None.
        seed: seed of the MC samples and of the noise OOD set.
        limit: score only the first ``limit`` rows of each set.
        plots: write PNG plots (needs matplotlib).
        max_pass_rows: most replicated rows per forward pass (sampling also cuts passes to its
            activation budget).
        command: the command line that ran this, recorded in the report.
        trust_model_code, allowed_factories: which ``architecture.factory`` code loading may
            run, as for :func:`mcdrop.checkpoint.load` (none by default).
        device, dtype: where the model runs and its compute dtype, as for
            :func:`mcdrop.checkpoint.load`; the scores are computed on the CPU.

    Returns:
        the report (as written to ``report.json``).
    """
    if limit is not None and not (type(limit) is int and limit >= 1):
        raise InvalidArgumentError(f"limit must be a positive number of rows, got {limit!r}")
    loaded = checkpoint.load(
        model_dir,
        trust_model_code=trust_model_code,
        allowed_factories=allowed_factories,
        device=device,
        dtype=dtype,
    )
    spec = loaded.spec
    name = dataset or spec.training.get("dataset") or spec.name
    if name not in datasets.BUILTIN and dataset is None:  # a model of one's own: say why
        raise InvalidArgumentError(
            f"model {spec.name!r} records no built-in dataset it was trained on (its manifest's "
            f"training.dataset), and evaluate scores a model on one of {sorted(datasets.BUILTIN)}"
            ": give --dataset (dataset=) for a model of one of them; mcdrop calibrate --data "
            "checks a model on rows of your own"
        )
    split_seed = int(spec.training.get("seed", 0))
    data = datasets.load(name, seed=split_seed)
    if list(data.input_shape) != list(spec.input_shape) or len(data.labels) != spec.n_outputs:
        raise InvalidArgumentError(
            f"model {spec.name!r} (inputs {spec.input_shape}, {spec.n_outputs} outputs) does not "
            f"fit dataset {name!r} (inputs {data.input_shape}, {len(data.labels)} outputs)"
        )
    if data.task != spec.task:
        raise InvalidArgumentError(f"model {spec.name!r} is {spec.task}, dataset {name!r} isn't")
    if ood_classes is None:
        ood_classes = list(spec.training.get("exclude_classes", []))
    elif ood_classes and spec.task == "classification":
        _check_ood_classes(ood_classes, data.labels)
    n_samples = spec.default_n_samples if n_samples is None else n_samples
    predictor = Predictor(loaded, max_pass_rows=max_pass_rows, results_device="cpu")
    if spec.task == "classification":
        body, raw = evaluate_classifier(
            predictor, data, n_samples=n_samples, seed=seed, ood_classes=ood_classes, limit=limit
        )
    else:
        body, raw = evaluate_regressor(predictor, data, n_samples=n_samples, seed=seed, limit=limit)
    report: dict[str, Any] = {
        "command": command,
        "model": str(model_dir),
        "model_name": spec.name,
        "task": spec.task,
        "dataset": name,
        "split_seed": split_seed,
        "n_samples": n_samples,
        "seed": seed,
        **body,
        "plots": [],
    }
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        if plots:
            report["plots"] = write_plots(report, raw, out)
        (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        (out / "report.md").write_text(markdown_report(report))
    return report
