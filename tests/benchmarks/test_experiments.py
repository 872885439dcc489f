"""``python -m benchmarks.experiments --quick``: a smoke run of the dropout experiments on a
tiny slice of Fashion-MNIST (the data must be installed: ``apt-get install
dataset-fashion-mnist``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks import experiments
from mcdrop.recipes import datasets


@pytest.fixture(autouse=True)
def _needs_fashion() -> None:
    try:
        datasets.fashion_mnist_arrays()
    except datasets.DatasetNotFoundError as exc:
        pytest.fail(
            f"Fashion-MNIST is not installed ({exc}); run `apt-get install dataset-fashion-mnist`"
        )


@pytest.mark.slow
def test_quick_run_writes_tables(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    threads = torch.get_num_threads()
    argv = ["--quick", "--only", "kinds", "holdout", "overfit", "--out", str(tmp_path)]
    assert experiments.main(argv) == 0
    assert torch.get_num_threads() == threads  # the global setting is restored
    printed = capsys.readouterr().out
    assert "# Dropout kinds" in printed
    for name, n_rows in (("kinds", 6), ("holdout", 2), ("overfit", 4)):
        table = (tmp_path / f"{name}.md").read_text()
        assert "python -m benchmarks.experiments --quick" in table
        assert table.count("\n| ") == n_rows + 1  # header + rows
        raw = json.loads((tmp_path / f"{name}.json").read_text())
        assert len(raw["results"]) == (2 if name == "overfit" else n_rows)
    kinds = json.loads((tmp_path / "kinds.json").read_text())["results"]
    for result in kinds:
        for aurocs in result["ood"].values():
            assert 0.0 <= aurocs["auroc_mutual_information"] <= 1.0
    holdout = json.loads((tmp_path / "holdout.json").read_text())["results"]
    assert "held-out classes" in holdout[0]["ood"]


def test_l1_penalty_adds_the_weight_norm() -> None:
    net = torch.nn.Linear(3, 2)
    loss = experiments.L1Penalized(net, 0.5)
    logits, labels = torch.zeros(4, 2), torch.zeros(4, dtype=torch.long)
    expected = torch.nn.functional.cross_entropy(logits, labels) + 0.5 * net.weight.abs().sum()
    torch.testing.assert_close(loss(logits, labels), expected)
