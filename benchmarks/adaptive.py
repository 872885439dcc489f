"""Adaptive sample counts (``n_samples="auto"``) against fixed ones of equal cost.

On the bundled ``digits`` and ``fashion`` classifiers and their test sets, for each tolerance:
one adaptive run (seed 0), then a fixed run (seed 0) with ``n_samples`` = the adaptive run's
mean samples per row, rounded: the same number of samples in all. Both are compared row by row
with a fixed 1,000-sample reference drawn with another seed (1), so neither shares a sample with
it: the largest error over classes of the mean probabilities, the errors of the predictive
entropy and the mutual information (mean, 99th percentile and worst over rows), and the share of
rows whose label is the reference's. The reference has its own MC error, reported under each
table: no method can agree with it better than that. ``time / fixed``: the adaptive call's wall
time over the fixed one's, the two interleaved round by round (medians): more, smaller passes
against the same samples.

Run: ``python -m benchmarks.adaptive [--quick] [--rows N]`` (one torch thread; the full run
takes a few minutes on a 2-core machine, the quick one seconds).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor

from benchmarks.timing import compare, machine, table
from mcdrop import calibration as cal
from mcdrop import checkpoint
from mcdrop.predictor import Predictor, Summary
from mcdrop.recipes import datasets
from mcdrop.stats import ClassificationSummary

ROOT = Path(__file__).resolve().parents[1]
DATASETS: dict[str, Callable[[], datasets.Dataset]] = {
    "digits": datasets.digits,
    "fashion": datasets.fashion_mnist,
}
TOLERANCES = (0.02, 0.01, 0.005)
REFERENCE_N = 1000
MAX_N = 1000
ROWS = 300
SEED, REFERENCE_SEED = 0, 1


@dataclass(frozen=True)
class Sizes:
    rows: int
    reference_n: int
    max_n: int
    tolerances: tuple[float, ...]
    rounds: int  # timing rounds (at least 3 are run unless rounds is smaller)


FULL = Sizes(ROWS, REFERENCE_N, MAX_N, TOLERANCES, rounds=5)
QUICK = Sizes(16, 100, 100, (0.02,), rounds=1)


def _quantiles(errors: Tensor) -> str:
    """``mean / p99 / max`` of per-row errors ``(N,)``."""
    e = errors.double()
    return f"{e.mean():.4f} / {e.quantile(0.99):.4f} / {e.max():.4f}"


def agreement(summary: ClassificationSummary, reference: ClassificationSummary) -> list[str]:
    """The table cells comparing ``summary`` with ``reference`` row by row."""
    p_err = (summary.probabilities - reference.probabilities).abs().amax(-1)
    h_err = (summary.entropy - reference.entropy).abs()
    mi_err = (summary.mutual_information - reference.mutual_information).abs()
    labels = (summary.label == reference.label).double().mean()
    return [_quantiles(p_err), _quantiles(h_err), _quantiles(mi_err), f"{labels:.4f}"]


def reference_error(reference: ClassificationSummary) -> Tensor:
    """``(N,)`` the reference's own MC standard error of its mean probabilities (largest over
    classes), from its per-class variance (divisor n)."""
    n = reference.n_samples
    return (reference.variance.double() / (n - 1)).sqrt().amax(-1)


def _summary(result: tuple[Summary, Tensor | None]) -> ClassificationSummary:
    summary, _ = result
    assert isinstance(summary, ClassificationSummary)
    return summary


def run_dataset(name: str, sizes: Sizes) -> str:
    predictor = Predictor(checkpoint.load(ROOT / "models" / name))
    x = DATASETS[name]().x_test[: sizes.rows]
    predictor.warm_up(x[:2])
    reference, _ = predictor.uncertainty(x, sizes.reference_n, seed=REFERENCE_SEED)
    assert isinstance(reference, ClassificationSummary)
    rows = []
    for tolerance in sizes.tolerances:

        def run_auto(tol: float = tolerance) -> tuple[Summary, Tensor | None]:
            return predictor.uncertainty(
                x, "auto", tolerance=tol, max_n_samples=sizes.max_n, seed=SEED
            )

        auto = _summary(run_auto())
        used = auto.row_n_samples
        n_fixed = max(1, round(float(used.double().mean())))

        def run_fixed(n: int = n_fixed) -> tuple[Summary, Tensor | None]:
            return predictor.uncertainty(x, n, seed=SEED)

        fixed = _summary(run_fixed())
        # Seconds per call, the two interleaved (a busy moment hits both), median of the rounds.
        seconds = compare(
            {"auto": run_auto, "fixed": run_fixed},
            rounds=sizes.rounds,
            warmup=0,
            budget_s=20.0,
        )
        at_first = float((used == used.min()).double().mean())
        rows.append(
            [
                tolerance,
                "auto",
                f"{float(used.double().mean()):.1f}",
                f"{int(used.min())} ({at_first:.0%}) – {int(used.max())}",
                *agreement(auto, reference),
                f"{seconds['auto'] / seconds['fixed']:.2f}",
            ]
        )
        rows.append([tolerance, "fixed", n_fixed, n_fixed, *agreement(fixed, reference), "1.00"])
    header = [
        "tolerance",
        "n_samples",
        "mean samples",
        "samples per row (share at the fewest)",
        "probabilities error",
        "entropy error",
        "MI error",
        "label agreement",
        "time / fixed",
    ]
    ref_se = reference_error(reference)
    return (
        f"#### {name}: {x.shape[0]} test rows, max_n_samples {sizes.max_n}\n\n"
        f"{table(header, rows)}\n\n"
        f"Errors are mean / p99 / worst row against the {sizes.reference_n}-sample reference, "
        f"whose own MC standard error (largest over classes) is {_quantiles(ref_se)}.\n"
    )


#: Test rows of the decisions table (digits has 269).
DECISION_ROWS = 2000


def decisions_table(quick: bool = False) -> str:
    """Decisions made from adaptive summaries against those of the fixed sample count the model
    was calibrated with: on each model's test rows (other samples than the calibration's), the
    conformal sets' coverage and size at 0.9 and 0.95, and the share of rows rejected at a
    calibrated rate of 0.1 (entropy and mutual information) with the accuracy of those kept.
    Adaptive rows stop at the default tolerance: the thresholds and quantiles come from scores
    of the calibration's fixed count, which an easy row that stops at 16 samples did not have."""
    rows_out = []
    for name, load in DATASETS.items():
        model = checkpoint.load(ROOT / "models" / name)
        calibration = model.calibration
        assert calibration is not None, f"models/{name} has no calibration.json"
        predictor = Predictor(model)
        data = load()
        x, y = (
            data.x_test[: 16 if quick else DECISION_ROWS],
            data.y_test[: 16 if quick else DECISION_ROWS],
        )
        predictor.warm_up(x[:2])
        runs = {
            "auto": _summary(
                predictor.uncertainty(x, "auto", seed=SEED, max_n_samples=100 if quick else None)
            ),
            str(calibration.n_samples): _summary(
                predictor.uncertainty(x, calibration.n_samples, seed=SEED)
            ),
        }
        for label, summary in runs.items():
            cells = [name, label, f"{float(summary.row_n_samples.double().mean()):.1f}"]
            for coverage in (0.9, 0.95):
                request = cal.resolve("classification", calibration, coverage=coverage)
                covered = cal.coverage_of(request, summary, y).double().mean()
                sets = cal.decide(request, summary).prediction_set
                assert sets is not None
                cells += [f"{float(covered):.3f}", f"{float(sets.sum(-1).double().mean()):.2f}"]
            scores = cal.row_scores(summary)
            correct = summary.label == y
            for score in ("entropy", "mutual_information"):
                rejected = scores[score] > calibration.threshold(0.1, score)
                kept = (
                    correct[~rejected].double().mean() if bool((~rejected).any()) else float("nan")
                )
                cells += [f"{float(rejected.double().mean()):.3f}", f"{float(kept):.3f}"]
            rows_out.append(cells)
    header = [
        "model",
        "n_samples",
        "mean samples",
        "coverage at 0.9",
        "set size",
        "coverage at 0.95",
        "set size",
        "rejected at rate 0.1 (entropy)",
        "accuracy kept",
        "rejected at rate 0.1 (MI)",
        "accuracy kept",
    ]
    return f"#### Decisions from adaptive summaries\n\n{table(header, rows_out)}\n"


def run(quick: bool = False, rows: int | None = None) -> str:
    sizes = QUICK if quick else FULL
    if rows is not None:
        sizes = replace(sizes, rows=rows)
    parts = [f"### Adaptive sample counts ({machine()})\n"]
    parts += [run_dataset(name, sizes) for name in DATASETS]
    parts.append(decisions_table(quick))
    return "\n".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for the test suite")
    parser.add_argument("--rows", type=int, default=None, help=f"test rows (default {ROWS})")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(run(args.quick, args.rows), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
