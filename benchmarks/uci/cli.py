"""Gal & Ghahramani (2016)'s UCI regression benchmark for MC dropout, on the published splits.

    python -m benchmarks.uci --budget 2016 --datasets bostonHousing,yacht --splits 0,1
    python -m benchmarks.uci --quick --datasets yacht          # seconds: a smoke run

The protocol is :mod:`benchmarks.uci.protocol`'s; results go to ``uci.csv``, ``uci.json`` and
``uci.md`` under ``--out`` (:mod:`benchmarks.uci.store`).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from benchmarks.uci.data import DATASETS, data_root
from benchmarks.uci.protocol import BUDGET_MULTIPLIER, DEFAULT_OUT, Options, run_dataset
from benchmarks.uci.results import DatasetResult, summarise
from benchmarks.uci.store import write_results


def _csv_list(text: str) -> tuple[str, ...]:
    return tuple(s.strip() for s in text.split(",") if s.strip())


def parse_args(argv: Sequence[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.uci", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--data",
        type=Path,
        default=data_root(),
        help="folder of the UCI datasets (env MCDROP_UCI_DATA; default ../shared/data/uci)",
    )
    parser.add_argument("--datasets", type=_csv_list, default=tuple(DATASETS), help="a,b,...")
    parser.add_argument("--splits", type=_csv_list, default=None, help="split indices 0,1,...")
    parser.add_argument("--budget", choices=sorted(BUDGET_MULTIPLIER), default="2016")
    parser.add_argument("--epochs", type=int, default=None, help="override the budget's epochs")
    parser.add_argument("--n-samples", type=int, default=10_000, help="T for the test metrics")
    parser.add_argument("--val-samples", type=int, default=1_000, help="T for the grid search")
    parser.add_argument("--crps-samples", type=int, default=500, help="samples used for CRPS")
    parser.add_argument("--split-batch", type=int, default=20, help="splits trained together")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for uci.csv/.md")
    parser.add_argument(
        "--quick", action="store_true", help="one split, 5 epochs, T = 100: a smoke run"
    )
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="only regenerate uci.md from the uci.csv/uci.json already under --out",
    )
    args = parser.parse_args(argv)
    unknown = [d for d in args.datasets if d not in DATASETS]
    if unknown:
        parser.error(f"unknown datasets {unknown}; choose from {DATASETS}")
    opts = Options(
        data=args.data,
        datasets=args.datasets,
        splits=None if args.splits is None else tuple(int(s) for s in args.splits),
        budget=args.budget,
        epochs=args.epochs,
        n_samples=args.n_samples,
        val_samples=args.val_samples,
        crps_samples=args.crps_samples,
        split_batch=args.split_batch,
        seed=args.seed,
        threads=args.threads,
        out=args.out,
        quick=args.quick,
        progress=args.progress,
        report_only=args.report_only,
    )
    if opts.quick:
        opts = Options(
            **{
                **asdict(opts),
                "epochs": opts.epochs or 5,
                "n_samples": min(opts.n_samples, 100),
                "val_samples": min(opts.val_samples, 50),
                "crps_samples": min(opts.crps_samples, 50),
            }
        )
    return opts


def main(argv: Sequence[str] | None = None) -> list[DatasetResult]:
    """Run the benchmark and write ``uci.csv`` / ``uci.json`` / ``uci.md`` under ``--out``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    opts = parse_args(argv)
    if opts.report_only:
        write_results([], opts, "")
        return []
    if not opts.data.is_dir():
        raise SystemExit(f"no UCI data at {opts.data}; pass --data or set MCDROP_UCI_DATA")
    threads = torch.get_num_threads()
    torch.set_num_threads(opts.threads)
    command = shlex.join(["python", "-m", "benchmarks.uci", *argv])
    results = []
    try:
        for name in opts.datasets:
            res = run_dataset(name, opts)
            results.append(res)
            # Written after every dataset, so a long run that is stopped keeps what finished.
            write_results([res], opts, command)
            for method, rows in res.splits.items():
                s = summarise(rows)
                print(
                    f"{name} {method}: RMSE {s['rmse_mean']:.4g} ± {s['rmse_se']:.2g}, "
                    f"LL {s['ll_mean']:.4g} ± {s['ll_se']:.2g}, PICP95 {s['picp95_mean']:.3f} "
                    f"({res.seconds:.0f} s)",
                    flush=True,
                )
    finally:
        torch.set_num_threads(threads)
    return results
