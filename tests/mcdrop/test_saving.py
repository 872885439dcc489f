"""``mcdrop.save``: one call from a trained module to a model directory that always loads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import mcdrop
from mcdrop.exceptions import InvalidArgumentError
from mcdrop.nets import MLP
from tests.factories import AlwaysDrops, Noisy, build


@pytest.fixture
def net() -> nn.Module:
    torch.manual_seed(0)
    return build(in_features=3, width=5)


REGRESSOR: dict[str, Any] = {
    "task": "regression",
    "input_shape": [3],
    "labels": ["y"],
    "tau": 4.0,
}


def test_a_factory_model_saves_and_loads_with_the_opt_in(tmp_path: Path, net: nn.Module) -> None:
    loaded = mcdrop.save(
        net,
        tmp_path / "tiny",
        factory="tests.factories:build",
        params={"in_features": 3, "width": 5},
        description="three features, one target",
        **REGRESSOR,
    )
    assert sorted(p.name for p in (tmp_path / "tiny").iterdir()) == [
        "model.json",
        "weights.safetensors",
    ]
    manifest = json.loads((tmp_path / "tiny" / "model.json").read_text())
    assert manifest["name"] == "tiny"
    assert manifest["architecture"] == {
        "factory": "tests.factories:build",
        "params": {"in_features": 3, "width": 5},
    }
    assert manifest["tau"] == 4.0
    x = torch.randn(4, 3)
    again = mcdrop.load(tmp_path / "tiny", allowed_factories=["tests.factories"])
    for model in (loaded, again):
        assert torch.equal(mcdrop.predict(model.module, x), mcdrop.predict(net, x))
    with pytest.raises(mcdrop.UntrustedCodeError):
        mcdrop.load(tmp_path / "tiny")


def test_a_builtin_architecture_with_normalisation(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = MLP(2, (8, 8), 2, dropout=0.2)  # trained on standardised data: 2 means, 2 log-vars
    mean, std = torch.tensor([10.0, -3.0]), torch.tensor([2.0, 0.5])
    loaded = mcdrop.save(
        net,
        tmp_path / "hetero",
        architecture="mlp",
        params={"in_features": 2, "hidden": (8, 8), "out_features": 2, "dropout": 0.2},
        task="regression",
        likelihood="heteroscedastic",
        input_shape=(2,),
        labels=["y"],
        input_normalization={"mean": mean, "std": std},
        target_normalization={"mean": [100.0], "std": [5.0]},
    )
    assert loaded.spec.architecture["params"]["hidden"] == [8, 8]
    x = torch.tensor([[10.0, -3.0], [12.0, -2.5]])
    out = mcdrop.predict(loaded.module, x)
    raw = mcdrop.predict(net, (x - mean) / std)
    assert torch.allclose(out[:, 0], raw[:, 0] * 5 + 100)
    assert torch.allclose(out[:, 1], raw[:, 1] + 2 * torch.log(torch.tensor(5.0)))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"params": {"in_features": 3, "width": 4}}, r"0.weight: \[5, 3\] in the model, \[4, 3\]"),
        ({"params": {"in_features": 3, "width": 5, "depth": 2}}, "do not fit"),
        ({"params": {"in_features": 3, "width": 5, "f": open}}, "JSON values only"),
        ({"factory": "__main__:build"}, "__main__"),
        ({"factory": None}, "exactly one of them"),
        ({"architecture": "mlp"}, "exactly one of them"),
        ({"tau": None}, "needs 'tau'"),
        ({"labels": ["a", "b"]}, r"returns \(2, 1\) for 2 rows, but a homoscedastic regression"),
        ({"likelihood": "heteroscedastic"}, r"returns \(2, 2\) \(K means, then K log-variances"),
        ({"input_shape": [4]}, "is input_shape the shape of one input row"),
        ({"input_normalization": {"mean": [0, 0, 0], "std": [1, 0, 1]}}, "positive stds"),
    ],
)
def test_mistakes_are_refused_before_anything_is_written(
    tmp_path: Path, net: nn.Module, kwargs: dict[str, Any], message: str
) -> None:
    options = {
        **REGRESSOR,
        "factory": "tests.factories:build",
        "params": {"in_features": 3, "width": 5},
        **kwargs,
    }
    with pytest.raises(InvalidArgumentError, match=message):
        mcdrop.save(net, tmp_path / "bad", **options)
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"dropout": 0.5}, r"other dropout rates \(layers.2.p: 0.2 in the model, 0.5 rebuilt"),
        ({"kind": "alpha"}, "gives other outputs"),  # SELU instead of ReLU, same weights
    ],
)
def test_a_factory_that_builds_another_network_is_refused(
    tmp_path: Path, params: dict[str, Any], message: str
) -> None:
    torch.manual_seed(0)
    net = MLP(4, (6,), 3, dropout=0.2)
    base = {"in_features": 4, "hidden": [6], "out_features": 3, "dropout": 0.2}
    with pytest.raises(InvalidArgumentError, match=message):
        mcdrop.save(
            net,
            tmp_path / "m",
            architecture="mlp",
            params={**base, **params},
            task="classification",
            input_shape=[4],
            labels=["a", "b", "c"],
        )


CLASSIFIER: dict[str, Any] = {"task": "classification", "input_shape": [3], "labels": ["a", "b"]}


@pytest.mark.parametrize("drop", ["F.dropout", "torch.dropout", "F.dropout2d"])
def test_a_model_that_drops_in_eval_saves_and_loads(tmp_path: Path, drop: str) -> None:
    """MC-dropout style, ``F.dropout(h, p, training=True)``: its eval pass drops, and the check
    that the factory rebuilds it compares deterministic predictions, which turn that off."""
    torch.manual_seed(0)
    net = AlwaysDrops(drop=drop)
    torch.manual_seed(0)
    twin = AlwaysDrops(drop=drop, always=False).eval()
    loaded = mcdrop.save(
        net, tmp_path / "mc", factory="tests.factories:AlwaysDrops", params={"drop": drop},
        **CLASSIFIER,
    )  # fmt: skip
    again = mcdrop.load(tmp_path / "mc", allowed_factories=["tests.factories"])
    x = torch.randn(4, 3)
    for model in (net, loaded.module, again.module):
        assert torch.equal(mcdrop.predict(model, x), twin(x))
    samples = mcdrop.sample(again.module, x, 8, seed=0)
    assert torch.equal(samples, mcdrop.sample(net, x, 8, seed=0))
    assert bool((samples.var(0) > 0).any())


def test_a_model_whose_eval_pass_is_not_deterministic_is_refused_as_such(tmp_path: Path) -> None:
    torch.manual_seed(0)
    with pytest.raises(InvalidArgumentError, match="eval pass is not deterministic") as caught:
        mcdrop.save(Noisy(), tmp_path / "noisy", factory="tests.factories:Noisy", **REGRESSOR)
    assert "two passes of the same 2 rows" in str(caught.value)
    assert "params" not in str(caught.value)  # not the factory's fault
    assert not (tmp_path / "noisy").exists()
