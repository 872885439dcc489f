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

Regressors (:func:`regression_table`), the same layout: the bundled ``diabetes`` (homoscedastic)
and, when the UCI data is on this machine (``benchmarks.uci.data.data_root``), a heteroscedastic
MC-dropout net of UCI concrete trained for the run (split 0, ~30 s). Each on its test rows
("data"), on the same rows moved 4× as far from the training mean ("far": the rows that should
need more samples), and on the test rows with one far row in ten added (a mix of easy and
hard). Errors in units of the reference's predictive std, per row: of the mean, of the std, and
of the interval (the larger endpoint error).

Run: ``python -m benchmarks.adaptive [--quick] [--rows N] [--regressors]`` (one torch thread;
the full run takes a few minutes on a 2-core machine, the quick one seconds; ``--regressors``:
only the regressors' table, which needs no image data).
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
from mcdrop.stats import ClassificationSummary, RegressionSummary

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
#: Regressors' tolerances (in units of the predictive std; the default is 0.05).
REGRESSION_TOLERANCES = (0.1, 0.05, 0.02)
#: How much farther from the training mean the "far" rows are than the test rows.
FAR = 4.0


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


def _auto_against_fixed(
    predictor: Predictor, x: Tensor, tolerance: float, sizes: Sizes
) -> tuple[tuple[tuple[Summary, Tensor | None], ...], int, dict[str, float]]:
    """``n_samples="auto"`` at ``tolerance`` and a fixed ``n_samples`` of its mean samples per
    row (the same cost), both seeded alike: their results, that fixed count, and their seconds
    per call, interleaved (a busy moment hits both), median of the rounds."""

    def run_auto() -> tuple[Summary, Tensor | None]:
        return predictor.uncertainty(
            x, "auto", tolerance=tolerance, max_n_samples=sizes.max_n, seed=SEED
        )

    auto = run_auto()
    n_fixed = max(1, round(float(auto[0].row_n_samples.double().mean())))

    def run_fixed() -> tuple[Summary, Tensor | None]:
        return predictor.uncertainty(x, n_fixed, seed=SEED)

    fixed = run_fixed()
    seconds = compare(
        {"auto": run_auto, "fixed": run_fixed}, rounds=sizes.rounds, warmup=0, budget_s=20.0
    )
    return (auto, fixed), n_fixed, seconds


def _samples_used(used: Tensor) -> list[str]:
    """The cells of the samples rows used ``(N,)``: their mean, and ``fewest (share of rows at
    the fewest) – most``."""
    at_first = float((used == used.min()).double().mean())
    return [
        f"{float(used.double().mean()):.1f}",
        f"{int(used.min())} ({at_first:.0%}) – {int(used.max())}",
    ]


def run_dataset(name: str, sizes: Sizes) -> str:
    predictor = Predictor(checkpoint.load(ROOT / "models" / name))
    x = DATASETS[name]().x_test[: sizes.rows]
    predictor.warm_up(x[:2])
    reference, _ = predictor.uncertainty(x, sizes.reference_n, seed=REFERENCE_SEED)
    assert isinstance(reference, ClassificationSummary)
    rows = []
    for tolerance in sizes.tolerances:
        found, n_fixed, seconds = _auto_against_fixed(predictor, x, tolerance, sizes)
        auto, fixed = _summary(found[0]), _summary(found[1])
        rows.append(
            [
                tolerance,
                "auto",
                *_samples_used(auto.row_n_samples),
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


def regression_agreement(summary: RegressionSummary, reference: RegressionSummary) -> list[str]:
    """The table cells comparing ``summary`` with ``reference`` row by row, in units of the
    reference's predictive std (largest over outputs): mean, std, interval endpoints."""
    std = reference.std.double()

    def err(a: Tensor, b: Tensor) -> Tensor:
        return ((a.double() - b.double()).abs() / std).amax(-1)

    interval = torch.maximum(
        err(summary.lower, reference.lower), err(summary.upper, reference.upper)
    )
    return [
        _quantiles(err(summary.mean, reference.mean)),
        _quantiles(err(summary.std, reference.std)),
        _quantiles(interval),
    ]


def _regression(result: tuple[Summary, Tensor | None]) -> RegressionSummary:
    summary, _ = result
    assert isinstance(summary, RegressionSummary)
    return summary


def _far(predictor: Predictor, x: Tensor) -> Tensor:
    """Rows ``x`` moved :data:`FAR` × as far from the model's training input mean."""
    norm = predictor.spec.input_normalization
    centre = x.mean(0) if norm is None else torch.tensor(norm.mean)
    return centre + (x - centre) * FAR


def regression_rows(
    name: str, predictor: Predictor, x: Tensor, sizes: Sizes, tolerances: Sequence[float]
) -> tuple[list[list[object]], str]:
    """Table rows (auto and fixed of equal cost per tolerance) of one regressor on rows ``x``,
    and the reference's own MC error of its mean (mean / p99 / worst, in units of its std)."""
    predictor.warm_up(x[:2])
    reference = _regression(predictor.uncertainty(x, sizes.reference_n, seed=REFERENCE_SEED))
    rows: list[list[object]] = []
    for tolerance in tolerances:
        found, n_fixed, seconds = _auto_against_fixed(predictor, x, tolerance, sizes)
        auto, fixed = _regression(found[0]), _regression(found[1])
        rows.append(
            [
                name,
                tolerance,
                "auto",
                *_samples_used(auto.row_n_samples),
                *regression_agreement(auto, reference),
                f"{seconds['auto'] / seconds['fixed']:.2f}",
            ]
        )
        fixed_cells = regression_agreement(fixed, reference)
        rows.append([name, tolerance, "fixed", n_fixed, n_fixed, *fixed_cells, "1.00"])
    return rows, _quantiles(_own_error(predictor, x, sizes.reference_n))


def _own_error(predictor: Predictor, x: Tensor, n: int) -> Tensor:
    """``(N,)`` the reference's own MC error, as the rule measures it (of the mean and of the
    std, the larger, in units of the std): the same samples, streamed into an accumulator."""
    from mcdrop import sampling, stats

    spec = predictor.spec
    het = spec.likelihood == "heteroscedastic"
    noise = None if het or spec.tau is None else 1.0 / spec.tau
    acc = stats.RegressionAccumulator(x.shape[0], spec.n_outputs, noise_variance=noise)
    for chunk in sampling.sample_chunks(predictor.model.module, x, n, seed=REFERENCE_SEED):
        acc.update(chunk.values, chunk.rows)
    return acc.standard_error()


def _concrete(root: Path) -> tuple[Predictor, Tensor] | None:
    """A heteroscedastic MC-dropout net of UCI concrete (split 0) trained into ``root`` by
    ``benchmarks.uci``, and its test rows; None when the UCI data is not on this machine."""
    import subprocess

    from benchmarks.uci import data as uci_data

    folder = uci_data.data_root()
    if not (folder / "concrete" / "data.txt").is_file():
        return None
    command = [sys.executable, "-m", "benchmarks.uci", "--method", "het_mc_dropout"]
    command += ["--datasets", "concrete", "--splits", "0", "--data", str(folder)]
    command += ["--save-models", str(root / "models"), "--out", str(root / "out")]
    subprocess.run([*command, "--no-progress", "--threads", "1"], check=True, cwd=ROOT)
    (model_dir,) = (root / "models").iterdir()
    split = uci_data.read_split(folder, "concrete", 0)
    return Predictor(checkpoint.load(model_dir)), torch.tensor(split.x_test, dtype=torch.float32)


def regression_table(sizes: Sizes, with_uci: bool = True) -> str:
    """Adaptive against fixed counts of equal cost on regressors (see the module docstring)."""
    import tempfile

    tolerances = sizes.tolerances if sizes is QUICK else REGRESSION_TOLERANCES
    cases: list[tuple[str, Predictor, Tensor]] = []
    diabetes = Predictor(checkpoint.load(ROOT / "models" / "diabetes"))
    data = datasets.diabetes()
    x = torch.cat([data.x_test, data.x_val])[: sizes.rows]
    cases.append(("diabetes", diabetes, x))
    with tempfile.TemporaryDirectory() as tmp:
        concrete = _concrete(Path(tmp)) if with_uci else None
        if concrete is not None:
            cases.append(("concrete (het.)", concrete[0], concrete[1][: sizes.rows]))
        rows: list[list[object]] = []
        notes = []
        for name, predictor, x in cases:
            far = _far(predictor, x)
            # Most rows easy, a few hard: one far row in ten, as a request might mix them.
            mixed = torch.cat([x, far[: max(1, x.shape[0] // 10)]])
            sets = (("data", x), (f"far ×{FAR:g}", far), ("data + 10 % far", mixed))
            for label, xs in sets:
                part, own = regression_rows(f"{name}, {label}", predictor, xs, sizes, tolerances)
                rows += part
                notes.append(f"{name}, {label} ({xs.shape[0]} rows): {own}")
    header = [
        "rows",
        "tolerance",
        "n_samples",
        "mean samples",
        "samples per row (share at the fewest)",
        "mean error",
        "std error",
        "interval error",
        "time / fixed",
    ]
    return (
        f"#### Regressors: max_n_samples {sizes.max_n}\n\n{table(header, rows)}\n\n"
        f"Errors are mean / p99 / worst row, in units of the {sizes.reference_n}-sample "
        "reference's predictive std, whose own MC standard error (of the mean and the std, the "
        "larger, in the same units; mean / p99 / worst) is " + "; ".join(notes) + ".\n"
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


def run(quick: bool = False, rows: int | None = None, regressors_only: bool = False) -> str:
    sizes = QUICK if quick else FULL
    if rows is not None:
        sizes = replace(sizes, rows=rows)
    parts = [f"### Adaptive sample counts ({machine()})\n"]
    if regressors_only:
        return "\n".join([*parts, regression_table(sizes, with_uci=not quick)])
    parts += [run_dataset(name, sizes) for name in DATASETS]
    parts.append(regression_table(sizes, with_uci=not quick))
    parts.append(decisions_table(quick))
    return "\n".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for the test suite")
    parser.add_argument("--rows", type=int, default=None, help=f"test rows (default {ROWS})")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument(
        "--regressors", action="store_true", help="only the regressors' table (no image data)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(run(args.quick, args.rows, regressors_only=args.regressors), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
