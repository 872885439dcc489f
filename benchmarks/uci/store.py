"""The results folder: each run's rows merged into ``uci.csv`` and its details into
``uci.json`` (under a file lock, since runs of different datasets may share the folder), then
``uci.md`` regenerated from both."""

from __future__ import annotations

import csv
import fcntl
import json
import os
import platform
from collections.abc import Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

import torch

from benchmarks.uci.data import DATASETS
from benchmarks.uci.protocol import METHODS, Options
from benchmarks.uci.report import render_markdown
from benchmarks.uci.results import COLUMNS, DatasetResult, SplitResult, row_key, summarise


def machine() -> dict[str, object]:
    """Where the numbers were measured: usable cores and the CPU model."""
    model = platform.processor() or "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": model,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def _order(key: tuple[str, str, str]) -> tuple[object, ...]:
    dataset, budget, method = key
    rank = DATASETS.index(dataset) if dataset in DATASETS else len(DATASETS)
    return budget, rank, dataset, METHODS.index(method) if method in METHODS else 99, method


def write_results(results: Sequence[DatasetResult], opts: Options, command: str) -> None:
    """Merge rows into ``uci.csv`` and run details into ``uci.json``; regenerate ``uci.md``."""
    opts.out.mkdir(parents=True, exist_ok=True)
    # Runs of different datasets may share the folder: merge under an exclusive lock.
    with (opts.out / "uci.csv").open("a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _merge(results, opts, command)


#: Run settings that must agree before two runs' splits may be pooled into one row.
PROTOCOL_KEYS = ("epochs", "n_samples", "val_samples", "seed", "quick")


def _merge(results: Sequence[DatasetResult], opts: Options, command: str) -> None:
    csv_path, json_path = opts.out / "uci.csv", opts.out / "uci.json"
    rows: dict[tuple[str, str, str], dict[str, object]] = {}
    if csv_path.stat().st_size > 0:
        with csv_path.open(newline="") as f:
            rows = {row_key(r): dict(r) for r in csv.DictReader(f)}
    details = json.loads(json_path.read_text()) if json_path.is_file() else {}
    info = machine()
    date = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    for res in results:
        for method, splits in res.splits.items():
            row = {"dataset": res.name, "budget": opts.budget, "method": method}
            protocol = {
                "epochs": res.epochs,
                "n_samples": opts.n_samples,
                "val_samples": opts.val_samples,
                "seed": opts.seed,
                "quick": opts.quick,
            }
            run = {
                "command": command,
                "seconds": round(res.seconds, 1),
                "date": date,
                "machine": info,
                "splits": [s.split for s in splits],
            }
            merged, runs = _pool(details.get("|".join(row_key(row))), protocol, splits, run)
            row.update(summarise(merged))
            rows[row_key(row)] = row
            details["|".join(row_key(row))] = {
                **protocol,
                "command": runs[0]["command"],
                "crps_samples": sorted({s.crps_samples for s in merged}),
                "seconds": round(sum(r["seconds"] for r in runs), 1),
                "date": max(r["date"] for r in runs),
                "machine": info,
                "runs": runs,
                "splits": [asdict(s) for s in merged],
            }
    ordered = [rows[k] for k in sorted(rows, key=_order)]
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        for row in ordered:
            writer.writerow({k: _fmt(row[k]) for k in COLUMNS})
    json_path.write_text(json.dumps(dict(sorted(details.items())), indent=1) + "\n")
    (opts.out / "uci.md").write_text(render_markdown(ordered, details))


def _pool(
    old: dict | None, protocol: dict[str, object], splits: Sequence[SplitResult], run: dict
) -> tuple[list[SplitResult], list[dict]]:
    """This run's splits pooled with an earlier run's under the same protocol.

    Splits are independent experiments, so a dataset's 20 splits may come from several runs
    (``--splits 0,1,2,3,4`` today, ``--splits 5,...`` tomorrow). A split run again replaces its
    earlier result; a run under another protocol (epochs, T, seed) replaces the whole row.

    Returns:
        (the pooled splits sorted by index, the runs that produced them).
    """
    if old is None or any(old.get(k) != v for k, v in protocol.items()):
        return sorted(splits, key=lambda s: s.split), [run]
    fresh = {s.split for s in splits}
    kept = [SplitResult(**s) for s in old["splits"] if s["split"] not in fresh]
    earlier = old.get("runs") or [
        {k: old[k] for k in ("command", "seconds", "date", "machine")}
        | {"splits": [s["split"] for s in old["splits"]]}
    ]
    runs = []
    for r in earlier:
        left = [i for i in r["splits"] if i not in fresh]
        if left:
            runs.append({**r, "splits": left})
    return sorted([*kept, *splits], key=lambda s: s.split), [*runs, run]


def _fmt(value: object) -> object:
    return f"{value:.6g}" if isinstance(value, float) else value
