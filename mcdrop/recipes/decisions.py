"""Calibrating a model directory (``mcdrop calibrate``) and the evidence that its decisions work.

:func:`calibrate_dir` computes a model's :class:`~mcdrop.calibration.Calibration` on held-out
rows: a user's own ``.npz`` file (arrays ``x`` and ``y``), or for a model trained by
``mcdrop train`` the validation split of its recorded dataset and seed. :func:`report` checks
the decisions on the test split, which calibration never saw: the accuracy of the rows kept at
each rejection rate against all rows, the share of out-of-distribution rows
(:mod:`mcdrop.recipes.ood`) flagged at the same thresholds, and the empirical coverage of the
conformal sets or intervals against their target, with its sampling error.

Sampling error of a coverage: the test estimate's binomial standard error
``sqrt(c (1 - c) / n_test)``, and the calibration's own: split conformal coverage, given ``n``
calibration rows, is Beta-distributed with variance about ``c (1 - c) / (n + 2)`` (Angelopoulos
& Bates 2021, §C). A coverage is *within sampling error* when it is within two combined standard
errors of the target.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mcdrop import calibration as cal
from mcdrop import checkpoint
from mcdrop.exceptions import InvalidArgumentError
from mcdrop.predictor import Predictor
from mcdrop.recipes import datasets, ood
from mcdrop.stats import ClassificationSummary

#: Rejection rates and coverages the report checks.
REPORT_RATES = (0.05, 0.1, 0.2, 0.3)
REPORT_COVERAGES = (0.9, 0.95, 0.99)


def read_npz(path: str | Path) -> tuple[Tensor, Tensor]:
    """Held-out rows ``x`` and targets ``y`` from an ``.npz`` file (no pickles are loaded)."""
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in ("x", "y") if k not in f.files]
            if missing:
                raise InvalidArgumentError(
                    f"{path}: needs arrays 'x' (rows) and 'y' (targets), has {sorted(f.files)}"
                )
            x, y = f["x"], f["y"]
    except (OSError, ValueError) as exc:
        raise InvalidArgumentError(f"{path}: not a readable .npz file: {exc}") from exc
    return torch.from_numpy(np.asarray(x, dtype=np.float32)), torch.from_numpy(np.asarray(y))


def recorded_dataset(spec: checkpoint.ModelSpec) -> datasets.Dataset:
    """The built-in dataset a model was trained on, split with its recorded seed."""
    name = spec.training.get("dataset")
    if name not in datasets.BUILTIN:
        raise InvalidArgumentError(
            f"model {spec.name!r} records no built-in training dataset; pass held-out rows "
            "with --data FILE.npz (arrays x and y)"
        )
    return datasets.load(name, seed=int(spec.training.get("seed", 0)))


def calibrate_dir(
    model_dir: str | Path,
    *,
    data: str | Path | None = None,
    n_samples: int | None = None,
    seed: int = 0,
    command: str = "",
    **load_options: Any,
) -> cal.Calibration:
    """Calibrate ``model_dir`` and write its ``calibration.json``: on ``data`` (an ``.npz``
    with ``x (N, *input_shape)`` and ``y``: class indices ``(N,)`` or targets ``(N, K)``), or
    the validation split of the model's recorded built-in dataset."""
    loaded = checkpoint.load(model_dir, read_calibration=False, **load_options)
    if data is not None:
        x, y = read_npz(data)
        where, split = Path(data).name, "all rows of the file"
    else:
        dataset = recorded_dataset(loaded.spec)
        x, y = dataset.x_val, dataset.y_val
        split_seed = int(loaded.spec.training.get("seed", 0))
        where = f"{dataset.name} validation split"
        split = f"{dataset.split} (seed {split_seed})"
    y = y.long() if loaded.spec.task == "classification" else y.float()
    return cal.calibrate(
        loaded,
        x,
        y,
        n_samples=n_samples,
        seed=seed,
        data=where,
        split=split,
        command=command,
        save=True,
    )


def summary(calibration: cal.Calibration, written: Path) -> str:
    """Three lines for people: what was calibrated, thresholds of the default score at a few
    rates, and conformal quantiles at a few coverages."""
    score = cal.DEFAULT_SCORE[calibration.task]
    rates = ", ".join(
        f"{rate:.0%} above {calibration.threshold(rate, score):.3g}" for rate in (0.05, 0.1, 0.2)
    )
    coverages = ", ".join(
        f"{c} at q {calibration.quantile(c):.3g}"
        for c in (0.9, 0.95)
        if c <= calibration.max_coverage
    )
    return (
        f"calibrated {calibration.model} on {calibration.n_rows} rows of {calibration.data} "
        f"({calibration.n_samples} samples, seed {calibration.seed}): {written}\n"
        f"reject on {score} (default): {rates}\n"
        f"conformal ({calibration.conformal_method}): coverage {coverages or 'none'}"
    )


def _binomial_se(p: float, n: int) -> float:
    return math.sqrt(max(p * (1.0 - p), 0.0) / n)


def report(
    model_dir: str | Path,
    *,
    n_samples: int | None = None,
    seed: int = 1,
    limit: int | None = None,
    **load_options: Any,
) -> dict[str, Any]:
    """The decisions of a calibrated model directory on its dataset's test split (and, for a
    classifier, its OOD sets). ``seed``: the test rows' MC samples (not the calibration's)."""
    loaded = checkpoint.load(model_dir, **load_options)
    calibration = loaded.calibration
    if calibration is None:
        raise InvalidArgumentError(f"{model_dir} has no {cal.CALIBRATION}; run mcdrop calibrate")
    spec = loaded.spec
    data = recorded_dataset(spec)
    n_samples = calibration.n_samples if n_samples is None else n_samples
    predictor = Predictor(loaded, results_device="cpu")
    x, y = data.x_test, data.y_test
    if limit is not None:
        x, y = x[:limit], y[:limit]
    summary, _ = predictor.uncertainty(x, n_samples, seed=seed)
    scores = cal.row_scores(summary)
    out: dict[str, Any] = {
        "model": spec.name,
        "task": spec.task,
        "calibration": {k: v for k, v in cal.describe(calibration).items()},
        "n_test": int(x.shape[0]),
        "n_samples": n_samples,
        "seed": seed,
    }
    ood_scores: dict[str, dict[str, Tensor]] = {}
    sets, notes = ood.ood_sets(data, seed=seed, limit=limit)
    for name, rows in sets.items():
        ood_summary, _ = predictor.uncertainty(rows, n_samples, seed=seed)
        ood_scores[name] = cal.row_scores(ood_summary)
    out["ood_notes"] = notes
    if isinstance(summary, ClassificationSummary):
        correct = summary.label == y
        out["accuracy_all"] = float(correct.double().mean())
        rejection = []
        for score in cal.SCORES[spec.task]:
            for rate in REPORT_RATES:
                t = calibration.threshold(rate, score)
                flagged = scores[score] > t
                kept = ~flagged
                rejection.append(
                    {
                        "score": score,
                        "rate": rate,
                        "threshold": t,
                        "rejected_test": float(flagged.double().mean()),
                        "accuracy_kept": float(correct[kept].double().mean())
                        if bool(kept.any())
                        else math.nan,
                        "errors_flagged": float(flagged[~correct].double().mean())
                        if bool((~correct).any())
                        else math.nan,
                        "ood_flagged": {
                            name: float((s[score] > t).double().mean())
                            for name, s in ood_scores.items()
                        },
                    }
                )
        out["rejection"] = rejection
    else:
        y = y.float()
        err = (summary.mean.double() - y.double()).abs().amax(-1)
        out["rmse_all"] = float((summary.mean.double() - y.double()).pow(2).mean().sqrt())
        rejection = []
        for score in cal.SCORES[spec.task]:
            for rate in REPORT_RATES:
                t = calibration.threshold(rate, score)
                kept = ~(scores[score] > t)
                rejection.append(
                    {
                        "score": score,
                        "rate": rate,
                        "threshold": t,
                        "rejected_test": float((~kept).double().mean()),
                        "rmse_kept": float(err[kept].pow(2).mean().sqrt()),
                        "ood_flagged": {
                            name: float((s[score] > t).double().mean())
                            for name, s in ood_scores.items()
                        },
                    }
                )
        out["rejection"] = rejection
    conformal = []
    n_test, n_cal = int(x.shape[0]), calibration.n_rows
    for coverage in REPORT_COVERAGES:
        if coverage > calibration.max_coverage:
            continue
        request = cal.resolve(spec.task, calibration, coverage=coverage)
        covered = cal.coverage_of(request, summary, y)
        decisions = cal.decide(request, summary)
        empirical = float(covered.double().mean())
        se_test = _binomial_se(coverage, n_test)
        se_cal = math.sqrt(coverage * (1 - coverage) / (n_cal + 2))
        se = math.sqrt(se_test**2 + se_cal**2)
        row: dict[str, Any] = {
            "coverage": coverage,
            "quantile": request.quantile,
            "empirical": empirical,
            "se_test": se_test,
            "se": se,
            "within_error": abs(empirical - coverage) <= 2 * se,
        }
        if decisions.prediction_set is not None:
            sizes = decisions.prediction_set.sum(-1).double()
            row["mean_set_size"] = float(sizes.mean())
            row["empty_sets"] = float((sizes == 0).double().mean())
        else:
            assert decisions.lower is not None
            assert decisions.upper is not None
            row["mean_width"] = float((decisions.upper - decisions.lower).mean())
        conformal.append(row)
    out["conformal"] = conformal
    return out


def markdown(result: dict[str, Any]) -> str:
    """One model's report as markdown tables."""
    c = result["calibration"]
    lines = [
        f"### {result['model']} ({result['task']})",
        "",
        f"Calibrated on {c['n_rows']} rows ({c['data']}), {c['n_samples']} samples, seed "
        f"{c['seed']}; checked on {result['n_test']} test rows, {result['n_samples']} samples, "
        f"seed {result['seed']}.",
        "",
    ]
    ood_names = list(result["rejection"][0]["ood_flagged"])
    ood_head = "".join(f" OOD flagged: {n} |" for n in ood_names)
    ood_rule = "---|" * len(ood_names)

    def ood_cells(r: dict[str, Any]) -> str:
        return "".join(f" {r['ood_flagged'][n]:.3f} |" for n in ood_names)

    if result["task"] == "classification":
        lines += [
            f"Accuracy of all test rows: {result['accuracy_all']:.4f}.",
            "",
            "| score | reject rate | rejected (test) | accuracy kept | errors flagged |" + ood_head,
            "|---|---|---|---|---|" + ood_rule,
        ]
        for r in result["rejection"]:
            lines.append(
                f"| {r['score']} | {r['rate']:.2f} | {r['rejected_test']:.3f} | "
                f"{r['accuracy_kept']:.4f} | {r['errors_flagged']:.3f} |" + ood_cells(r)
            )
    else:
        lines += [
            f"RMSE of all test rows: {result['rmse_all']:.2f}.",
            "",
            "| score | reject rate | rejected (test) | RMSE kept |" + ood_head,
            "|---|---|---|---|" + ood_rule,
        ]
        for r in result["rejection"]:
            lines.append(
                f"| {r['score']} | {r['rate']:.2f} | {r['rejected_test']:.3f} | "
                f"{r['rmse_kept']:.2f} |" + ood_cells(r)
            )
    for note in result.get("ood_notes", []):
        lines += ["", f"Note: {note}"]
    size = "mean set size" if result["task"] == "classification" else "mean interval width"
    key = "mean_set_size" if result["task"] == "classification" else "mean_width"
    lines += [
        "",
        f"| target coverage | empirical (test) | ± 1 s.e. (test; with calibration) | "
        f"within error | {size} |",
        "|---|---|---|---|---|",
    ]
    for r in result["conformal"]:
        lines.append(
            f"| {r['coverage']:.2f} | {r['empirical']:.4f} | ± {r['se_test']:.4f}; ± {r['se']:.4f}"
            f" | {'yes' if r['within_error'] else 'NO'} | {r[key]:.3g} |"
        )
    return "\n".join(lines) + "\n"
