"""Held-out evaluation of a model directory: calibration, out-of-distribution detection, plots.

``mcdrop evaluate`` runs :func:`evaluate_model`. A classifier is scored deterministically
(dropout off) and by MC dropout on its test set: accuracy, NLL, Brier score, expected calibration
error; then MC predictive entropy and mutual information are used to tell the test set apart
from out-of-distribution (OOD) inputs, scored by AUROC. A regressor gets RMSE, log-likelihood and
the coverage of its predictive intervals against their nominal level.

Shape legend: ``N`` rows, ``K`` classes or regression targets. The metrics are
:mod:`mcdrop.metrics`'s pure functions.
Plots need matplotlib (``pip install 'mcdrop[plots]'``) and use its Agg backend.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mcdrop import checkpoint, sampling
from mcdrop.exceptions import InvalidArgumentError
from mcdrop.metrics import (
    COVERAGE_LEVELS,
    REJECT_FRACTIONS,
    CalibrationBins,
    auroc,
    calibration_bins,
    classification_metrics,
    interval_coverage,
    rejection_curve,
    spearman,
)
from mcdrop.predictor import Predictor
from mcdrop.recipes import datasets
from mcdrop.recipes.report import rounded
from mcdrop.stats import ClassificationSummary, RegressionSummary, entropy

#: Rows of uniform noise in the OOD sets.
NOISE_ROWS = 1000
#: Images per row of the examples plot.
EXAMPLES = 8


# -- evaluation -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClassifierScores:
    """Deterministic and MC outputs of a classifier on one input set.

    Attributes:
        deterministic: ``(N, K)`` probabilities with dropout off.
        mc: ``(N, K)`` MC predictive probabilities.
        entropy: ``(N,)`` MC predictive entropy (nats).
        mutual_information: ``(N,)`` MC mutual information (nats).
        deterministic_entropy: ``(N,)`` entropy of ``deterministic`` (the no-MC baseline).
    """

    deterministic: Tensor
    mc: Tensor
    entropy: Tensor
    mutual_information: Tensor
    deterministic_entropy: Tensor

    #: the uncertainty scores, by report name
    SCORES = ("entropy", "mutual_information", "deterministic_entropy")


def score_classifier(
    predictor: Predictor, x: Tensor, *, n_samples: int, seed: int = 0
) -> ClassifierScores:
    """Run ``predictor`` on ``x (N, *input_shape)`` deterministically and with S MC samples."""
    det = predictor.predict(x).probabilities  # type: ignore[union-attr]
    summary, _ = predictor.uncertainty(x, n_samples, seed=seed)
    assert isinstance(summary, ClassificationSummary)
    return ClassifierScores(
        deterministic=det.double(),
        mc=summary.probabilities.double(),
        entropy=summary.entropy.double(),
        mutual_information=summary.mutual_information.double(),
        deterministic_entropy=entropy(det.double()),
    )


def ood_aurocs(inside: ClassifierScores, outside: ClassifierScores) -> dict[str, float]:
    """AUROC of each uncertainty score at telling ``outside`` rows from ``inside`` rows."""
    return {
        f"auroc_{name}": auroc(getattr(inside, name), getattr(outside, name))
        for name in ClassifierScores.SCORES
    }


def upscale_digits(images: Tensor, size: int = 28, digit_size: int = 20) -> Tensor:
    """scikit-learn digits ``(N, 64)`` in [0, 16] as MNIST-like ``(N, size, size)`` in [0, 255]:
    bilinear upscaling to ``digit_size`` and centred padding, as MNIST centres 20×20 digits."""
    x = images.reshape(-1, 1, 8, 8).float() * (255.0 / 16.0)
    x = F.interpolate(x, size=(digit_size, digit_size), mode="bilinear", align_corners=False)
    pad = (size - digit_size) // 2
    x = F.pad(x, (pad, size - digit_size - pad, pad, size - digit_size - pad))
    return x[:, 0].clamp(0, 255)


def downscale_images(images: Tensor) -> Tensor:
    """28×28 images ``(N, 28, 28)`` in [0, 255] as 8×8 digits-like rows ``(N, 64)`` in [0, 16]."""
    x = F.adaptive_avg_pool2d(images[:, None].float(), 8)
    return (x.flatten(1) * (16.0 / 255.0)).clamp(0, 16)


def ood_sets(
    data: datasets.Dataset, *, seed: int = 0, limit: int | None = None
) -> tuple[dict[str, Tensor], list[str]]:
    """Out-of-distribution input sets for a classifier trained on ``data``.

    Uniform noise over the training inputs' range for every dataset; for ``fashion``, the
    scikit-learn digits upscaled to 28×28; for ``digits``, Fashion-MNIST shrunk to 8×8 (when
    installed). Returns the sets ``{name: (M, *input_shape)}`` and notes on sets left out.
    """
    generator = torch.Generator().manual_seed(seed)
    lo, hi = float(data.x_train.min()), float(data.x_train.max())
    n_noise = NOISE_ROWS if limit is None else min(NOISE_ROWS, limit)
    sets = {
        "uniform noise": lo
        + (hi - lo) * torch.rand(n_noise, *data.input_shape, generator=generator)
    }
    notes: list[str] = []
    if data.name == "fashion":
        from sklearn.datasets import load_digits

        sets["digits 28x28"] = upscale_digits(torch.from_numpy(load_digits().data))
    elif data.name == "digits":
        try:
            test = datasets.fashion_mnist_arrays()["x_test"]
        except datasets.DatasetNotFoundError as exc:
            notes.append(f"Fashion-MNIST 8x8 left out: {exc}")
        else:
            sets["fashion 8x8"] = downscale_images(torch.from_numpy(test[:2000].astype(np.float32)))
    if limit is not None:
        sets = {k: v[:limit] for k, v in sets.items()}
    return sets, notes


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
    examples = {
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
    det_mean = det.mean.double()  # type: ignore[union-attr]
    det_std = det.noise_variance.double().sqrt()  # type: ignore[union-attr]
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
                    "mean_epistemic_std": float(summary.epistemic.double().sqrt().mean()),
                    "error_std_spearman": spearman(error.flatten(), mc_std.flatten()),
                    "error_epistemic_spearman": spearman(
                        error.flatten(), summary.epistemic.double().sqrt().flatten()
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
        "epistemic": summary.epistemic.double().sqrt().flatten(),
        "coverage": coverage,
    }
    return report, raw


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
    max_rows: int | None = None,
    command: str | None = None,
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
        max_rows: most replicated rows per forward pass (sampling also cuts passes to its
            activation budget).
        command: the command line that ran this, recorded in the report.

    Returns:
        the report (as written to ``report.json``).
    """
    loaded = checkpoint.load(model_dir)
    spec = loaded.spec
    name = dataset or spec.training.get("dataset") or spec.name
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
    n_samples = spec.default_n_samples if n_samples is None else n_samples
    predictor = Predictor(loaded, max_rows=max_rows or sampling.DEFAULT_MAX_ROWS)
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


# -- report -----------------------------------------------------------------------------------


def _table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def markdown_report(report: dict[str, Any]) -> str:
    """The report as markdown: metric tables and links to the plots."""
    parts = [
        f"# Evaluation of `{report['model']}` on {report['dataset']}",
        "",
        f"{report['n_test']} test rows (split seed {report['split_seed']}), "
        f"{report['n_samples']} MC samples (seed {report['seed']}).",
        "",
    ]
    if report.get("command"):
        parts += [f"Produced by `{report['command']}`.", ""]
    det, mc = report["metrics"]["deterministic"], report["metrics"]["mc"]
    names = [k for k in mc if k in det]
    parts += [
        "## Test metrics",
        "",
        _table(["metric", "deterministic", "MC dropout"], [[k, det[k], mc[k]] for k in names]),
        "",
    ]
    extra = [k for k in mc if k not in det]
    if extra:
        parts += [_table(["MC only", "value"], [[k, mc[k]] for k in extra]), ""]
    if report["task"] == "classification":
        inside = report["in_distribution"]
        rows = [["test set (in)", report["n_test"], "", "", "", inside["mean_mutual_information"]]]
        rows += [
            [
                name,
                o["n"],
                o["auroc_entropy"],
                o["auroc_mutual_information"],
                o["auroc_deterministic_entropy"],
                o["mean_mutual_information"],
            ]
            for name, o in report["ood"].items()
        ]
        parts += [
            "## Out-of-distribution detection (AUROC, 0.5 = chance)",
            "",
            _table(
                [
                    "inputs",
                    "n",
                    "MC entropy",
                    "mutual information",
                    "deterministic entropy",
                    "mean MI",
                ],
                rows,
            ),
            "",
        ]
        rej = report["rejection"]
        picks = [i for i, f in enumerate(rej["fractions"]) if f in (0.0, 0.1, 0.2, 0.5)]
        parts += [
            "## Accuracy after rejecting the most uncertain test inputs",
            "",
            _table(
                ["rejected", "by MC entropy", "by mutual information", "deterministic"],
                [
                    [
                        f"{rej['fractions'][i]:.0%}",
                        rej["entropy"][i],
                        rej["mutual_information"][i],
                        rej["deterministic_entropy"][i],
                    ]
                    for i in picks
                ],
            ),
            "",
        ]
    else:
        cov = report["coverage"]
        parts += [
            "## Interval coverage (central Gaussian intervals)",
            "",
            _table(
                ["nominal", "deterministic (noise only)", "MC dropout"],
                [
                    [f"{lv:.0%}", cov["deterministic"][i], cov["mc"][i]]
                    for i, lv in enumerate(cov["levels"])
                ],
            ),
            "",
        ]
    for note in report.get("notes", []):
        parts += [f"Note: {note}", ""]
    if report["plots"]:
        parts += ["## Plots", ""] + [f"![{p}]({p})" for p in report["plots"]] + [""]
    return "\n".join(parts)


# -- plots ------------------------------------------------------------------------------------


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as exc:
        raise InvalidArgumentError(
            "plots need matplotlib: pip install 'mcdrop[plots]' (or pass plots=False / --no-plots)"
        ) from exc
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def write_plots(report: dict[str, Any], raw: dict[str, Any], out: Path) -> list[str]:
    """Write the report's PNG plots into ``out``; returns their file names."""
    plt = _pyplot()
    title = f"{report['model_name']} on {report['dataset']}"
    if report["task"] == "classification":
        figures = {
            "reliability.png": plot_reliability(plt, raw["bins"], report["metrics"], title),
            "rejection.png": plot_rejection(plt, report["rejection"], title),
            "mutual_information.png": plot_mutual_information(
                plt, raw["mi_in"], raw["mi_out"], title
            ),
        }
        if len(next(iter(raw["examples"].values()))[0].shape) == 3:  # (n, H, W): images
            figures["examples.png"] = plot_examples(plt, raw["examples"], raw["labels"], title)
    else:
        figures = {
            "coverage.png": plot_coverage(plt, raw["coverage"], title),
            "error_vs_std.png": plot_error_vs_std(
                plt, raw["error"], raw["std"], raw["epistemic"], title
            ),
        }
    for name, fig in figures.items():
        fig.savefig(out / name, dpi=110, bbox_inches="tight")
        plt.close(fig)
    return list(figures)


def plot_reliability(
    plt: Any, bins: dict[str, CalibrationBins], metrics: dict[str, Any], title: str
) -> Any:
    """Reliability diagrams, deterministic and MC side by side: accuracy per confidence bin."""
    fig, axes = plt.subplots(1, len(bins), figsize=(5 * len(bins), 4.6), sharey=True)
    labels = {"deterministic": "deterministic (dropout off)", "mc": "MC dropout"}
    for ax, (key, b) in zip(np.atleast_1d(axes), bins.items(), strict=True):
        centres = ((b.edges[:-1] + b.edges[1:]) / 2).numpy()
        width = float(b.edges[1] - b.edges[0])
        full = (b.count > 0).numpy()
        acc, conf = b.accuracy.numpy(), b.confidence.numpy()
        ax.bar(centres[full], acc[full], width=width * 0.95, color="#4c72b0", label="accuracy")
        # A tick at each bin's mean confidence: the gap to the bar top is the miscalibration.
        left = b.edges[:-1].numpy()[full]
        ax.hlines(conf[full], left, left + width, color="#c44e52", lw=2.5, label="mean confidence")
        ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
        share = b.count.numpy() / b.count.sum().item()
        ax.plot(centres, share, "o-", color="grey", ms=3, lw=1, label="share of inputs")
        m = metrics[key]
        ax.set_title(f"{labels[key]}\nacc {m['accuracy']:.3f}  ECE {m['ece']:.3f}")
        ax.set_xlabel("confidence (top-class probability)")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
    np.atleast_1d(axes)[0].set_ylabel("accuracy")
    np.atleast_1d(axes)[0].legend(loc="upper left", fontsize=8)
    fig.suptitle(f"Reliability: {title}")
    fig.tight_layout()
    return fig


def _label_single(
    fig: Any, ax: Any, xlabel: str, ylabel: str, title: str, *, grid: bool = True
) -> Any:
    """Axis labels, title, legend (and grid) of a one-panel figure; returns the figure."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    if grid:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_rejection(plt: Any, rejection: dict[str, list[float]], title: str) -> Any:
    """Accuracy on the kept inputs against the fraction of most uncertain inputs rejected."""
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    fractions = rejection["fractions"]
    styles = {
        "entropy": ("MC predictive entropy", "-"),
        "mutual_information": ("MC mutual information", "--"),
        "deterministic_entropy": ("deterministic entropy", ":"),
    }
    for key, (label, ls) in styles.items():
        ax.plot(fractions, rejection[key], ls, marker="o", ms=3, label=label)
    ax.axhline(rejection["entropy"][0], color="grey", lw=0.8, label="no rejection (MC)")
    return _label_single(
        fig,
        ax,
        "fraction of most uncertain test inputs rejected",
        "accuracy on the rest",
        f"Rejection: {title}",
    )


def plot_mutual_information(plt: Any, mi_in: Tensor, mi_out: dict[str, Tensor], title: str) -> Any:
    """Histograms of mutual information on the test set and on each OOD set."""
    fig, ax = plt.subplots(figsize=(6, 4.2))
    upper = max([float(mi_in.max())] + [float(v.max()) for v in mi_out.values()] + [1e-6])
    edges = np.linspace(0, upper, 41)
    ax.hist(mi_in.numpy(), bins=edges, density=True, alpha=0.5, label="test set (in)")
    for name, values in mi_out.items():
        ax.hist(values.numpy(), bins=edges, density=True, histtype="step", lw=1.8, label=name)
    ax.set_yscale("log")
    return _label_single(
        fig,
        ax,
        "mutual information (nats)",
        "density (log scale)",
        f"Epistemic uncertainty in vs out: {title}",
        grid=False,
    )


def plot_coverage(plt: Any, coverage: dict[str, Any], title: str) -> Any:
    """Observed against nominal coverage of the central predictive intervals."""
    fig, ax = plt.subplots(figsize=(4.8, 4.6))
    levels = coverage["levels"]
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="calibrated")
    ax.plot(levels, coverage["mc"], "o-", label="MC dropout (epistemic + noise)")
    ax.plot(levels, coverage["deterministic"], "s:", label="deterministic (noise 1/τ only)")
    return _label_single(
        fig, ax, "nominal level", "fraction of test targets inside", f"Coverage: {title}"
    )


def plot_error_vs_std(plt: Any, error: Tensor, std: Tensor, epistemic: Tensor, title: str) -> Any:
    """Absolute error of the MC mean against the predicted standard deviation (left) and its
    epistemic part, the spread of the MC samples (right). All ``(N·K,)``."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.5, 4.2), sharey=True)
    left.scatter(std.numpy(), error.numpy(), s=10, alpha=0.6)
    lo, hi = float(std.min()) * 0.95, float(std.max()) * 1.05
    grid = np.linspace(lo, hi, 2)
    left.plot(grid, grid, "k--", lw=1, label="|error| = std")
    left.plot(grid, 1.96 * grid, ":", color="grey", lw=1, label="|error| = 1.96 std")
    left.set_xlabel("predicted std (epistemic + noise)")
    left.set_ylabel("|error| of the MC mean")
    left.legend(fontsize=8)
    right.scatter(epistemic.numpy(), error.numpy(), s=10, alpha=0.6, color="#dd8452")
    rho = spearman(error, epistemic)
    right.set_xlabel(f"epistemic std (MC spread); Spearman ρ with |error| = {rho:.2f}")
    for ax in (left, right):
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    fig.suptitle(f"Error vs uncertainty: {title}")
    fig.tight_layout()
    return fig


def plot_examples(
    plt: Any,
    examples: dict[str, tuple[Tensor, Tensor, Tensor, Tensor | None]],
    labels: list[str],
    title: str,
) -> Any:
    """Images next to their uncertainty: one row per set, each image titled with the MC
    prediction, its probability and the mutual information (MI).

    Args:
        examples: ``{row name: (images (n, H, W), probabilities (n, K), MI (n,), labels (n,)
            or None)}``; a wrong prediction is titled in red.
    """
    n_cols = max(len(v[0]) for v in examples.values())
    fig, axes = plt.subplots(
        len(examples), n_cols, figsize=(1.45 * n_cols, 1.9 * len(examples)), squeeze=False
    )
    for r, (name, (images, probs, mi, truth)) in enumerate(examples.items()):
        for c in range(n_cols):
            ax = axes[r, c]
            ax.axis("off")
            if c >= len(images):
                continue
            ax.imshow(images[c].numpy(), cmap="gray_r")
            k = int(probs[c].argmax())
            wrong = truth is not None and int(truth[c]) != k
            ax.set_title(
                f"{labels[k][:11]} {float(probs[c, k]):.2f}\nMI {float(mi[c]):.3f}",
                fontsize=7.5,
                color="#c44e52" if wrong else "black",
            )
        axes[r, 0].text(
            -0.15, 0.5, name, transform=axes[r, 0].transAxes, ha="right", va="center", fontsize=9
        )
    fig.suptitle(f"MC prediction, its probability and mutual information: {title}", fontsize=10)
    fig.tight_layout()
    return fig
