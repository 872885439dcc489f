"""Decisions on the bundled models: rejection and conformal prediction, checked on test splits.

For each bundled model (``models/digits``, ``models/fashion``, ``models/diabetes``): calibrate
on its dataset's validation split (``mcdrop calibrate``, seed 0, the model's default samples;
written to the model directory unless ``--no-write``), then check on the test split with other
MC samples (seed 1), and on the out-of-distribution sets of :mod:`mcdrop.recipes.ood`: the
accuracy (RMSE) of the kept rows at each rejection rate, the share of OOD rows flagged at the
same thresholds, and the conformal coverage against its target with its sampling error (see
:mod:`mcdrop.recipes.decisions`). Writes ``benchmarks/results/decisions.{json,md}``; the
numbers in docs/decisions.md come from here.

Run: ``python -m benchmarks.decisions [--models digits diabetes] [--limit N]`` (one torch
thread; fashion takes a few minutes on a 2-core machine).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from mcdrop.recipes import decisions

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("digits", "fashion", "diabetes")


def run(
    models: Sequence[str] = MODELS,
    *,
    write: bool = True,
    limit: int | None = None,
    out: Path | None = ROOT / "benchmarks" / "results",
) -> tuple[list[dict], str]:
    """Calibrate and report each model; returns the reports and their markdown."""
    reports = []
    for name in models:
        source = ROOT / "models" / name
        with tempfile.TemporaryDirectory() as tmp:
            directory = source if write else Path(shutil.copytree(source, Path(tmp) / name))
            decisions.calibrate_dir(
                directory, command=f"python -m benchmarks.decisions --models {name}"
            )
            reports.append(decisions.report(directory, limit=limit))
    text = "\n".join(decisions.markdown(r) for r in reports)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "decisions.json").write_text(json.dumps(reports, indent=2) + "\n")
        (out / "decisions.md").write_text(text)
    return reports, text


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.decisions", description=__doc__)
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--limit", type=int, default=None, help="test and OOD rows per set")
    parser.add_argument(
        "--no-write", action="store_true", help="calibrate copies; leave models/ and results/"
    )
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    _, text = run(
        args.models,
        write=not args.no_write,
        limit=args.limit,
        out=None if args.no_write else ROOT / "benchmarks" / "results",
    )
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
