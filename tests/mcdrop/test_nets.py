"""Reference networks: shapes, dropout placement, normalisation wrapper."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mcdrop import dropout_modules, sample
from mcdrop.dropout import DropConnectLinear
from mcdrop.exceptions import CheckpointError, InvalidArgumentError
from mcdrop.nets import CNN, MLP, RowLSTM, Standardized, build, factory_allowed


@pytest.mark.parametrize(
    ("kind", "module_type"),
    [("standard", nn.Dropout), ("alpha", nn.AlphaDropout), ("dropconnect", DropConnectLinear)],
)
def test_mlp_kinds(kind: str, module_type: type) -> None:
    net = MLP(5, [7, 7], 3, dropout=0.2, input_dropout=0.1, kind=kind).eval()  # type: ignore[arg-type]
    assert net(torch.randn(2, 5)).shape == (2, 3)
    assert any(isinstance(m, module_type) for _, m in dropout_modules(net))
    assert sample(net, torch.randn(2, 5), 8, seed=0).var(0).mean() > 0


def test_reference_cnn_shape_and_width() -> None:
    """The benchmark's reference CNN: 64 channels × 7 × 7 = 3136 into the head."""
    net = CNN().eval()
    assert net.head[2].in_features == 3136
    assert net(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert net(torch.randn(2, 28, 28)).shape == (2, 10)


def test_cnn_spatial_dropout() -> None:
    net = CNN(channels=(4, 4), pool=(True, True), spatial_dropout=0.2, hidden=8).eval()
    assert sum(isinstance(m, nn.Dropout2d) for m in net.modules()) == 2


def test_row_lstm() -> None:
    net = RowLSTM(28, 16).eval()
    x = torch.randn(3, 28, 28)
    assert net(x).shape == (3, 10)
    assert sample(net, x, 4, seed=0).var(0).mean() > 0


def test_standardized_heteroscedastic_units() -> None:
    class Fixed(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.tensor([[1.0, 0.0]]).expand(x.shape[0], 2)

    wrapped = Standardized(
        Fixed(),
        torch.zeros(1),
        torch.ones(1),
        torch.tensor([10.0]),
        torch.tensor([2.0]),
        heteroscedastic=True,
    )
    out = wrapped(torch.zeros(3, 1))
    assert torch.allclose(out[:, 0], torch.full((3,), 12.0))
    assert torch.allclose(out[:, 1].exp(), torch.full((3,), 4.0))  # variance scales by std²


@pytest.mark.parametrize("given", ["input_mean", "input_std", "target_mean", "target_std"])
def test_standardized_takes_a_mean_with_its_std(given: str) -> None:
    with pytest.raises(InvalidArgumentError, match=r"_mean and \w+_std are given together"):
        Standardized(nn.Identity(), **{given: torch.ones(1)})


def test_build_builtin() -> None:
    net = build({"name": "mlp", "params": {"in_features": 2, "hidden": [3], "out_features": 1}})
    assert isinstance(net, MLP)


@pytest.mark.parametrize(
    ("module", "allowed", "expected"),
    [
        ("mypkg", ["mypkg"], True),
        ("mypkg.nets", ["mypkg"], True),
        ("mypkg.nets", ["mypkg."], True),
        ("mypkg", ["mypkg."], True),
        ("mypkg_evil", ["mypkg"], False),
        ("mypkg_evil", ["mypkg."], False),
        ("mypkgnets", ["mypkg"], False),
        ("otherpkg.nets", ["otherpkg.nets"], True),
        ("otherpkg.nets.deep", ["otherpkg.nets"], True),
        ("otherpkg", ["otherpkg.nets"], False),
        ("otherpkg.netsx", ["otherpkg.nets"], False),
        ("otherpkg.other", ["mypkg.", "otherpkg.nets"], False),
        ("os", [], False),
    ],
)
def test_factory_allowed_matches_whole_components(
    module: str, allowed: list[str], expected: bool
) -> None:
    assert factory_allowed(module, allowed) is expected


@pytest.mark.parametrize("allowed", ["mypkg", ["my pkg"], [""], ["*"], ["mypkg:make"], [None]])
def test_a_malformed_allow_list_is_an_error(allowed: object) -> None:
    with pytest.raises(InvalidArgumentError, match="allowed_factories"):
        factory_allowed("mypkg", allowed)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "factory", ["os", ":system", "os:", "os:system:x", "../x:y", ".rel:make", "os:__call__"]
)
def test_malformed_factory(factory: str) -> None:
    with pytest.raises(CheckpointError, match="factory"):
        build({"factory": factory}, trust_model_code=True)


def test_a_factory_must_return_a_module() -> None:
    with pytest.raises(CheckpointError, match=r"not a torch\.nn\.Module"):
        build({"factory": "builtins:dict", "params": {"a": 1}}, trust_model_code=True)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: MLP(10, [0], 1), r"MLP hidden must be positive integers, got \[0\]"),
        (lambda: MLP(10, [8, -2], 1), r"MLP hidden must be positive integers, got \[8, -2\]"),
        (lambda: MLP(0, [8], 1), "MLP in_features must be a positive integer, got 0"),
        (lambda: MLP(10, [8], 0), "MLP out_features must be a positive integer, got 0"),
        (lambda: CNN(hidden=0), "CNN hidden must be a positive integer, got 0"),
        (lambda: CNN(channels=(8, 0), pool=(True, True)), r"CNN channels .* got \(8, 0\)"),
        (lambda: RowLSTM(hidden=0), "RowLSTM hidden must be a positive integer, got 0"),
    ],
)
def test_a_layer_size_below_1_is_refused_where_the_net_is_built(make, message: str) -> None:
    """torch builds a layer of width 0; the failure came later (an IndexError in the masks)."""
    with pytest.raises(InvalidArgumentError, match=message):
        make()


def test_an_mlp_without_hidden_layers_is_still_allowed() -> None:
    assert MLP(10, [], 1)(torch.zeros(2, 10)).shape == (2, 1)
