"""benchmarks.uci.store: runs merged into uci.csv / uci.json, uci.md regenerated."""

from __future__ import annotations

import csv
import dataclasses
import json

from benchmarks.uci.protocol import Options
from benchmarks.uci.results import DatasetResult, SplitResult
from benchmarks.uci.store import write_results


def test_results_merge_replaces_same_dataset_budget_method(tmp_path):
    opts = Options(out=tmp_path)
    split = SplitResult(0, 0.05, 0.5, 1.0, 1.1, -1.5, 0.9, 4.0, 0.6, -1.4, 500)

    def result(name: str, rmse: float) -> DatasetResult:
        row = dataclasses.replace(split, rmse=rmse)
        return DatasetResult(name, 400, {"mc_dropout": [row]}, seconds=1.0)

    write_results([result("yacht", 1.0), result("energy", 2.0)], opts, "first")
    write_results([result("yacht", 3.0)], opts, "second")

    with (tmp_path / "uci.csv").open(newline="") as f:
        rows = {r["dataset"]: r for r in csv.DictReader(f)}
    assert sorted(rows) == ["energy", "yacht"]
    assert float(rows["yacht"]["rmse_mean"]) == 3.0
    assert float(rows["energy"]["rmse_mean"]) == 2.0


def test_results_pool_splits_of_runs_under_the_same_protocol(tmp_path):
    opts = Options(out=tmp_path)
    base = SplitResult(0, 0.05, 0.5, 1.0, 1.1, -1.5, 0.9, 4.0, 0.6, -1.4, 500)

    def result(rmse_by_split: dict[int, float], epochs: int = 400) -> DatasetResult:
        rows = [dataclasses.replace(base, split=k, rmse=v) for k, v in rmse_by_split.items()]
        return DatasetResult("yacht", epochs, {"mc_dropout": rows}, seconds=10.0)

    def rmse_mean() -> tuple[float, int]:
        with (tmp_path / "uci.csv").open(newline="") as f:
            (row,) = list(csv.DictReader(f))
        return float(row["rmse_mean"]), int(row["n_splits"])

    write_results([result({0: 1.0, 1: 2.0})], opts, "first")
    write_results([result({2: 6.0})], opts, "second")
    assert rmse_mean() == (3.0, 3)
    # A split run again replaces its earlier result; the others are kept.
    write_results([result({1: 5.0})], opts, "third")
    assert rmse_mean() == (4.0, 3)
    details = json.loads((tmp_path / "uci.json").read_text())["yacht|2016|mc_dropout"]
    assert [(r["command"], r["splits"]) for r in details["runs"]] == [
        ("first", [0]),
        ("second", [2]),
        ("third", [1]),
    ]
    assert details["seconds"] == 30.0
    report = (tmp_path / "uci.md").read_text()
    assert "`first`" in report
    assert "yacht 10 s for split 2" in report
    # Another protocol (here: epochs) starts the row afresh.
    write_results([result({7: 9.0}, epochs=4000)], opts, "other")
    assert rmse_mean() == (9.0, 1)
