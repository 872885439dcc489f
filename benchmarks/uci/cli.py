"""Gal & Ghahramani (2016)'s UCI regression benchmark for MC dropout, on the published splits.

    python -m benchmarks.uci --budget 2016 --datasets bostonHousing,yacht --splits 0,1
    python -m benchmarks.uci --quick --datasets yacht          # seconds: a smoke run
    python -m benchmarks.uci --method deep_ensembles --budget 2017 --datasets yacht
    python -m benchmarks.uci --init glorot --datasets yacht    # an ablation: its own rows

Methods (``--method``; the ``method`` column of uci.csv): ``mc_dropout`` (the paper's protocol,
rows ``mc_dropout`` and ``mc_dropout_tau_refit``), ``het_mc_dropout``, ``concrete_dropout``,
``deep_ensembles`` (:mod:`benchmarks.uci.baselines`). A setting that differs from the protocol
(``--batch-size``, ``--init``, ``--no-input-dropout``, ``--lengthscale``, ``--tau-search bo``,
``--adversarial``, ``--lr``, ``--fine-lr``, ``--val-epochs``) appends ``+tag`` to the method
name, so ablations get rows of their own.

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
from benchmarks.uci.protocol import (
    BUDGET_MULTIPLIER,
    DEFAULT_OUT,
    FIXED_EPOCHS,
    LENGTHSCALE,
    TRAINED_METHODS,
    Options,
    run_dataset,
)
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
    parser.add_argument(
        "--method", choices=TRAINED_METHODS, default="mc_dropout", help="see the list above"
    )
    parser.add_argument(
        "--budget",
        choices=sorted([*BUDGET_MULTIPLIER, *FIXED_EPOCHS]),
        default="2016",
        help="2016: 10 × n_epochs.txt, 2018: 100 ×, 2017: 40 epochs (Deep Ensembles' paper), "
        "2017x2: 80 epochs",
    )
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
    ablation = parser.add_argument_group("ablations (each names its rows with a +tag)")
    ablation.add_argument(
        "--batch-size",
        type=int,
        default=128,
        help="the protocol's 128 (the authors' code); 32 trained the ICML table (their logs)",
    )
    ablation.add_argument(
        "--init",
        choices=["torch", "glorot"],
        default="torch",
        help="glorot: Keras' default, Glorot-uniform weights and zero biases",
    )
    ablation.add_argument(
        "--no-input-dropout",
        dest="input_dropout",
        action="store_false",
        help="no dropout on the inputs (MC dropout; hidden layer only)",
    )
    ablation.add_argument(
        "--lengthscale",
        default=str(LENGTHSCALE),
        help="prior length-scale l of the weight decay, or '2016': the ICML code's per-dataset "
        "values (1e-1 yacht, 1 naval, else 1e-2)",
    )
    ablation.add_argument(
        "--tau-search",
        choices=["grid", "bo"],
        default="grid",
        help="bo: p fixed per dataset as in the ICML code, τ by GP-EI on each split's validation",
    )
    ablation.add_argument("--bo-evals", type=int, default=30, help="evaluations per BO search")
    baselines = parser.add_argument_group("baselines")
    baselines.add_argument("--n-networks", type=int, default=5, help="Deep Ensembles' M")
    baselines.add_argument(
        "--adversarial", action="store_true", help="Deep Ensembles: FGSM adversarial training"
    )
    baselines.add_argument(
        "--lr",
        type=float,
        default=None,
        help="Deep Ensembles' Adam learning rate (default: chosen per split by validation LL "
        "from 0.1, 0.01, 0.001; the paper states 0.1)",
    )
    baselines.add_argument(
        "--fine-lr",
        action="store_true",
        help="Deep Ensembles: choose the learning rate on validation from 0.1, 0.03, 0.01, "
        "0.003, 0.001 (rows +fine_lr)",
    )
    baselines.add_argument(
        "--val-epochs",
        type=_csv_list,
        default=(),
        help="Deep Ensembles: choose the epochs per split on validation too, from these "
        "multiples of the budget's, e.g. 1,2,3 (rows +val_epochs1x2x3)",
    )
    baselines.add_argument(
        "--save-models",
        type=Path,
        default=None,
        help="write each split's het_mc_dropout / concrete_dropout network as a model directory",
    )
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
        method=args.method,
        batch_size=args.batch_size,
        init=args.init,
        input_dropout=args.input_dropout,
        lengthscale=None if args.lengthscale == "2016" else float(args.lengthscale),
        tau_search=args.tau_search,
        bo_evals=args.bo_evals,
        n_networks=args.n_networks,
        adversarial=args.adversarial,
        lr=args.lr,
        fine_lr=args.fine_lr,
        val_epochs=tuple(sorted({int(k) for k in args.val_epochs})),
        save_models=args.save_models,
    )
    if opts.adversarial and opts.method != "deep_ensembles":
        parser.error("--adversarial applies to --method deep_ensembles")
    if opts.lr is not None and opts.method != "deep_ensembles":
        parser.error("--lr applies to --method deep_ensembles")
    if opts.fine_lr and (opts.method != "deep_ensembles" or opts.lr is not None):
        parser.error("--fine-lr applies to --method deep_ensembles without --lr")
    if opts.val_epochs and (opts.method != "deep_ensembles" or min(opts.val_epochs) < 1):
        parser.error("--val-epochs applies to --method deep_ensembles, as multiples >= 1")
    if opts.tau_search == "bo" and opts.method != "mc_dropout":
        parser.error("--tau-search bo applies to --method mc_dropout")
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
