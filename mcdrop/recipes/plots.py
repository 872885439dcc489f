"""The PNG plots of an evaluation report: reliability diagrams, rejection and coverage curves,
uncertainty histograms and example images.

matplotlib is imported only when a plot is drawn (``pip install 'mcdrop[plots]'``), with its
Agg backend: files only, no display. Each ``plot_*`` returns a figure; :func:`write_plots` saves
and closes them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from mcdrop.exceptions import InvalidArgumentError
from mcdrop.metrics import CalibrationBins, spearman


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
