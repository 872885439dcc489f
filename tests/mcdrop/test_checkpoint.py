"""Model directories: round trip, no pickle, and errors that name the file and the problem."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from mcdrop import checkpoint
from mcdrop.checkpoint import ModelSpec, Normalization
from mcdrop.exceptions import CheckpointError
from mcdrop.nets import MLP
from tests.conftest import MODELS


def _spec(**changes: object) -> ModelSpec:
    base = {
        "name": "tiny",
        "task": "regression",
        "input_shape": [3],
        "labels": ["y"],
        "architecture": {
            "name": "mlp",
            "params": {"in_features": 3, "hidden": [8], "out_features": 1, "dropout": 0.2},
        },
        "tau": 4.0,
        "input_normalization": Normalization([1.0, 2.0, 3.0], [1.0, 2.0, 4.0]),
        "target_normalization": Normalization([10.0], [5.0]),
    }
    return ModelSpec(**{**base, **changes})  # type: ignore[arg-type]


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, MLP]:
    torch.manual_seed(0)
    net = MLP(3, [8], 1, dropout=0.2)
    checkpoint.save(tmp_path / "tiny", _spec(), net)
    return tmp_path / "tiny", net


def test_round_trip_applies_normalisation(saved: tuple[Path, MLP]) -> None:
    path, net = saved
    loaded = checkpoint.load(path)
    assert loaded.spec == _spec()
    assert not any(m.training for m in loaded.module.modules())
    x = torch.randn(4, 3)
    expected = net.eval()((x - torch.tensor([1.0, 2, 3])) / torch.tensor([1.0, 2, 4])) * 5 + 10
    assert torch.allclose(loaded.module(x), expected, atol=1e-6)


def test_weights_are_safetensors_not_pickle(saved: tuple[Path, MLP]) -> None:
    raw = (saved[0] / checkpoint.WEIGHTS).read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + header_len])
    assert "layers.0.weight" in header
    assert b"\x80\x04" not in raw[:2]  # no pickle protocol marker


@pytest.mark.parametrize("name", ["digits", "diabetes"])
def test_bundled_models_load(name: str) -> None:
    loaded = checkpoint.load(MODELS / name)
    assert loaded.spec.name == name
    assert loaded.spec.metrics


def _broken(tmp_path: Path, saved: tuple[Path, MLP], edit) -> Path:
    target = tmp_path / "broken"
    shutil.copytree(saved[0], target)
    edit(target)
    return target


def _edit_manifest(**changes: object):
    def edit(path: Path) -> None:
        data = json.loads((path / checkpoint.MANIFEST).read_text())
        for key, value in changes.items():
            if value is None:
                data.pop(key, None)
            else:
                data[key] = value
        (path / checkpoint.MANIFEST).write_text(json.dumps(data))

    return edit


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda p: (p / checkpoint.MANIFEST).write_text("{not json"), "not valid JSON"),
        (lambda p: (p / checkpoint.MANIFEST).unlink(), "no manifest"),
        (lambda p: (p / checkpoint.WEIGHTS).unlink(), "weights file is missing"),
        (lambda p: (p / checkpoint.WEIGHTS).write_bytes(b"\x00garbage" * 10), "safetensors"),
        (_edit_manifest(task="ranking"), "'task'"),
        (_edit_manifest(labels=None), "missing field"),
        (_edit_manifest(surprise=1), "unknown field"),
        (_edit_manifest(tau=-1), "'tau'"),
        (_edit_manifest(input_shape=[0]), "input_shape"),
        (_edit_manifest(architecture={"name": "resnet"}), "unknown architecture"),
        (
            _edit_manifest(
                architecture={
                    "name": "mlp",
                    "params": {"in_features": 3, "hidden": [9], "out_features": 1},
                }
            ),
            "does not match",
        ),
        (_edit_manifest(architecture={"name": "mlp", "params": {"width": 3}}), "do not fit"),
        (_edit_manifest(architecture={"factory": "nowhere.at.all:make"}), "cannot import"),
        (_edit_manifest(input_normalization={"mean": [1, 2], "std": [1, 2, 3]}), "differ"),
        (_edit_manifest(input_normalization={"mean": [1, 2, 3], "std": [1, 0, 3]}), "positive"),
    ],
)
def test_errors_name_file_and_problem(tmp_path: Path, saved, edit, message: str) -> None:
    target = _broken(tmp_path, saved, edit)
    with pytest.raises(CheckpointError, match=message) as info:
        checkpoint.load(target)
    assert str(target) in str(info.value)


FACTORY_MODULE = """
from torch import nn

def make(width: int) -> nn.Module:
    return nn.Sequential(nn.Linear(3, width), nn.Dropout(0.5), nn.Linear(width, 1))
"""


def test_user_factory_by_import_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_nets.py").write_text(FACTORY_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = _spec(architecture={"factory": "my_nets:make", "params": {"width": 5}})
    from my_nets import make  # type: ignore[import-not-found]

    checkpoint.save(tmp_path / "custom", spec, make(5))
    loaded = checkpoint.load(tmp_path / "custom")
    assert loaded.module(torch.randn(2, 3)).shape == (2, 1)
    sys.modules.pop("my_nets", None)


def test_homoscedastic_regressor_needs_tau() -> None:
    with pytest.raises(CheckpointError, match="tau"):
        ModelSpec.from_dict({**_spec().to_dict(), "tau": None})
