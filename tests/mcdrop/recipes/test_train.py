"""Training: the documented commands reproduce the bundled models' recorded metrics."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import torch

from mcdrop.recipes.train import TrainConfig, select_tau, train
from service.cli import main
from tests.conftest import MODELS, ROOT


def _documented_command(name: str) -> list[str]:
    """The `mcdrop train <name> ...` line of the Makefile's models target."""
    text = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    match = re.search(rf"\$\(BIN\)/mcdrop (train {name} [^\n]*)", text)
    assert match, f"no documented training command for {name}"
    return shlex.split(match.group(1))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["digits", "diabetes"])
def test_documented_command_reproduces_metrics(name: str, tmp_path: Path, capsys) -> None:
    argv = _documented_command(name)
    argv[argv.index("--out") + 1] = str(tmp_path / name)
    assert main([*argv, "--quiet"]) == 0
    recorded = json.loads((MODELS / name / "model.json").read_text())["metrics"]
    rerun = json.loads((tmp_path / name / "model.json").read_text())["metrics"]
    assert rerun.keys() == recorded.keys()
    for key, value in recorded.items():
        assert rerun[key] == pytest.approx(value, rel=0.02, abs=0.005), key


def test_select_tau_recovers_the_noise_precision() -> None:
    g = torch.Generator().manual_seed(0)
    y = torch.randn(5000, 1, generator=g) * 0.5  # noise variance 0.25 around a zero prediction
    tau = select_tau(torch.zeros(1, 5000, 1), y)
    assert tau == pytest.approx(4.0, rel=0.08)


def test_training_leaves_global_rng_alone(tmp_path: Path) -> None:
    state = torch.get_rng_state()
    train(
        TrainConfig(
            dataset="diabetes",
            out=tmp_path / "m",
            hidden=[4],
            epochs=1,
            n_samples=4,
            progress=False,
        )
    )
    assert torch.equal(torch.get_rng_state(), state)


def test_bad_config() -> None:
    with pytest.raises(ValueError, match="dropout"):
        TrainConfig(dataset="digits", out=Path("x"), dropout=1.0)


def test_training_calibrates_on_the_validation_split(tmp_path: Path) -> None:
    import mcdrop

    config = TrainConfig(
        dataset="digits", out=tmp_path / "m", hidden=[8], epochs=1, n_samples=6, progress=False
    )
    train(config)
    calibration = mcdrop.load(tmp_path / "m").calibration  # the weights' digest matches
    assert calibration is not None
    assert (calibration.data, calibration.n_rows) == ("digits validation split", 270)
    assert (calibration.n_samples, calibration.seed) == (6, config.seed)
