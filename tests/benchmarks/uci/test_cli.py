"""python -m benchmarks.uci: a quick end-to-end run on the real data."""

from __future__ import annotations

import csv
import math

import pytest

from benchmarks.uci import cli, data, protocol, results

needs_data = pytest.mark.skipif(
    not (data.data_root() / "yacht" / "data.txt").is_file(),
    reason=f"UCI data not found at {data.data_root()} (../shared/data/uci or ${data.DATA_ENV})",
)


@pytest.mark.slow
@needs_data
def test_quick_run_writes_finite_results(tmp_path):
    cli.main(["--quick", "--datasets", "yacht", "--out", str(tmp_path), "--no-progress"])

    with (tmp_path / "uci.csv").open(newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == results.COLUMNS
    assert [(r["dataset"], r["budget"], r["method"]) for r in rows] == [
        ("yacht", "2016", m) for m in protocol.METHODS[:2]
    ]
    for row in rows:
        assert row["n_splits"] == "1"
        for column in results.COLUMNS[4:]:
            assert math.isfinite(float(row[column])), column
        assert 0.0 <= float(row["picp95_mean"]) <= 1.0
        assert float(row["rmse_mean"]) > 0
        assert float(row["crps_mean"]) > 0
    report = (tmp_path / "uci.md").read_text()
    assert "--quick --datasets yacht" in report
    assert "1.11 ± 0.09" in report


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--lr", "0.1"], "--lr applies to --method deep_ensembles"),
        (["--adversarial"], "--adversarial applies to --method deep_ensembles"),
        (["--fine-lr"], "--fine-lr applies to --method deep_ensembles without --lr"),
        (
            ["--method", "deep_ensembles", "--fine-lr", "--lr", "0.01"],
            "--fine-lr applies to --method deep_ensembles without --lr",
        ),
        (["--val-epochs", "1,2"], "--val-epochs applies to --method deep_ensembles"),
        (["--method", "deep_ensembles", "--val-epochs", "0,1"], "as multiples >= 1"),
    ],
)
def test_baseline_switches_refuse_other_methods(argv, message, capsys):
    with pytest.raises(SystemExit):
        cli.parse_args(argv)
    assert message in capsys.readouterr().err


def test_fixed_learning_rate_names_the_rows():
    opts = cli.parse_args(["--method", "deep_ensembles", "--budget", "2017", "--lr", "0.1"])
    assert opts.lr == 0.1
    assert opts.row_method("deep_ensembles") == "deep_ensembles+lr0.1"
    assert cli.parse_args(["--method", "deep_ensembles"]).lr is None  # chosen on validation


def test_fine_learning_rate_grid_names_the_rows():
    opts = cli.parse_args(["--method", "deep_ensembles", "--budget", "2017", "--fine-lr"])
    assert opts.fine_lr
    assert opts.lr is None
    assert opts.row_method("deep_ensembles") == "deep_ensembles+fine_lr"


def test_epochs_chosen_on_validation_name_the_rows():
    opts = cli.parse_args(
        ["--method", "deep_ensembles", "--budget", "2017", "--val-epochs", "3,1,2"]
    )
    assert opts.val_epochs == (1, 2, 3)
    assert opts.row_method("deep_ensembles") == "deep_ensembles+val_epochs1x2x3"
    assert cli.parse_args(["--method", "deep_ensembles"]).val_epochs == ()
