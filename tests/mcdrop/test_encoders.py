"""Encoder layers run directly under MC sampling (mcdrop.encoders): the same samples as the
torch-function mode's path, bit for bit, and the model left as it was."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from mcdrop import masks, plan, sample
from mcdrop.exceptions import UnsupportedModelError
from mcdrop.planning import SamplingPlan


class Classifier(nn.Module):
    """A custom ``forward`` around an ``nn.TransformerEncoder``: ``(N, 6, 16) -> (N, 3)``."""

    def __init__(self, **options: Any) -> None:
        super().__init__()
        options = {"dropout": 0.2, **options}
        layer = nn.TransformerEncoderLayer(16, 4, 32, batch_first=True, **options)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(x).mean(1))


class Padded(nn.Module):
    """An encoder called with a key-padding mask (the last position is padding)."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.2, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)

    def forward(self, x: Tensor) -> Tensor:
        padding = torch.zeros(x.shape[:2], dtype=torch.bool)
        padding[:, -1] = True
        return self.encoder(x, src_key_padding_mask=padding)[:, 0]


class SeqFirst(nn.Module):
    """A sequence-first layer (its attention is not batch first): run by the mode's path."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.2)

    def forward(self, x: Tensor) -> Tensor:  # (N, T, F)
        return self.layer(x.transpose(0, 1)).transpose(0, 1)


class Strided(nn.Module):
    """A batch-first layer given a non-contiguous input: run by the mode's path."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.2, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:  # (N, T, F)
        return self.layer(x.transpose(1, 2).contiguous().transpose(1, 2))


MODELS: dict[str, Callable[[], nn.Module]] = {
    "classifier": Classifier,
    "norm_first": lambda: Classifier(norm_first=True),
    "gelu": lambda: Classifier(activation="gelu"),
    "gelu_module": lambda: Classifier(activation=nn.GELU(approximate="tanh")),
    "relu_module": lambda: Classifier(activation=nn.ReLU()),
    "attention_rate_zero": lambda: _without_attention_dropout(Classifier()),
    "rates_zero_but_attention": lambda: _without_attention_dropout(
        Classifier(dropout=0.0), attention=0.3
    ),
    "encoder": lambda: nn.TransformerEncoder(
        nn.TransformerEncoderLayer(16, 4, 32, dropout=0.2, batch_first=True),
        2,
        norm=nn.LayerNorm(16),
        enable_nested_tensor=False,
    ),
    "layer": lambda: nn.TransformerEncoderLayer(16, 4, 32, dropout=0.2, batch_first=True),
    "sequential": lambda: nn.Sequential(
        nn.TransformerEncoderLayer(16, 2, 32, dropout=0.3, batch_first=True),
        nn.TransformerEncoderLayer(16, 2, 32, dropout=0.1, batch_first=True),
        nn.Flatten(1),
        nn.Linear(6 * 16, 2),
    ),
    "padded": Padded,
    "seq_first": SeqFirst,
    "strided": Strided,
}


def _without_attention_dropout(model: Classifier, attention: float = 0.0) -> Classifier:
    for layer in model.encoder.layers:
        layer.self_attn.dropout = attention
    return model


def _mode_path(model: nn.Module) -> Callable[[], None]:
    """Make passes take the mode's path (a module with a hook is never run directly); returns
    the hook's removal."""
    first = next(m for m in model.modules() if isinstance(m, nn.TransformerEncoderLayer))
    handle = first.linear1.register_forward_hook(lambda module, args, out: None)
    return handle.remove


def _both_paths(
    model: nn.Module, x: Tensor, kept: SamplingPlan | None = None
) -> tuple[Tensor, Tensor]:
    """Samples of ``model`` under one seed and plan (``kept``, else a fresh one): its layers run
    directly, then through the mode (a hook on a layer sends them there)."""
    kept = plan(model, x) if kept is None else kept
    direct = sample(model, x, 8, seed=3, plan=kept)
    remove = _mode_path(model)
    try:
        through_mode = sample(model, x, 8, seed=3, plan=kept)
    finally:
        remove()
    return direct, through_mode


@pytest.mark.parametrize("name", sorted(MODELS))
def test_direct_layers_give_the_mode_paths_samples(name: str) -> None:
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    x = torch.randn(3, 6, 16)
    direct, through_mode = _both_paths(model, x)
    assert torch.equal(direct, through_mode)
    assert direct.var(0).mean() > 1e-4
    # ...and without a kept plan (the probe's own passes run the twin too)
    assert torch.equal(sample(model, x, 8, seed=3), direct)


@pytest.mark.parametrize("name", ["classifier", "norm_first", "gelu", "attention_rate_zero"])
def test_under_autocast_direct_layers_give_the_mode_paths_samples(name: str) -> None:
    # Under autocast the residual sums add a bfloat16 block output to a float32 norm output:
    # the sum is float32, as the layer's own forward makes it, never rounded to bfloat16.
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    x = torch.randn(3, 6, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        direct, through_mode = _both_paths(model, x)
    assert direct.dtype == through_mode.dtype
    assert torch.equal(direct, through_mode)


@pytest.mark.parametrize("name", ["classifier", "norm_first", "sequential"])
def test_the_numpy_masks_give_the_same_samples(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """numba multiplies the activations in place (no multipliers); NumPy's multipliers, made a
    block at a time and multiplied, give the same samples bit for bit."""
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    x = torch.randn(3, 6, 16)
    kept = plan(model, x)
    expected = sample(model, x, 8, seed=3, plan=kept)
    monkeypatch.setattr(masks, "CPU_BACKEND", "numpy")
    assert torch.equal(sample(model, x, 8, seed=3, plan=kept), expected)


def test_encoder_layers_are_found() -> None:
    model = Classifier().eval()
    kept = plan(model, torch.randn(2, 6, 16))
    found = kept.encoders
    assert found is not None
    assert found.runnable(model)
    assert "encoder layers: 2 nn.TransformerEncoderLayer, run directly" in repr(kept)
    mlp = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.1), nn.Linear(8, 1)).eval()
    assert plan(mlp, torch.randn(2, 4)).encoders is None


@pytest.mark.parametrize("name", ["classifier", "encoder", "norm_first"])
def test_an_encoder_runs_its_layers_in_one_call_or_layer_by_layer(name: str) -> None:
    """An ``nn.TransformerEncoder`` whose layers all run directly runs them in one call; once
    a layer may not (changed after planning), layer by layer: the mode's samples either way."""
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    x = torch.randn(3, 6, 16)
    kept = plan(model, x)
    assert kept.encoders is not None
    assert len(kept.encoders.stacks) == 1
    for change in (False, True):
        if change:  # no input bias: the direct run does not take the layer
            encoder = model if isinstance(model, nn.TransformerEncoder) else model.encoder
            encoder.layers[1].self_attn.in_proj_bias = None
        direct = sample(model, x, 8, seed=3, plan=kept)
        remove = _mode_path(model)
        try:
            through_mode = sample(model, x, 8, seed=3, plan=kept)
        finally:
            remove()
        assert torch.equal(direct, through_mode), change


def test_the_model_is_left_as_it_was() -> None:
    model = Classifier().eval()
    x = torch.randn(2, 6, 16)
    before = {name: (m, dict(vars(m))) for name, m in model.named_modules()}
    sample(model, x, 4, seed=0)
    after = dict(model.named_modules())
    assert after.keys() == before.keys()
    for name, (m, attributes) in before.items():
        assert after[name] is m
        assert "forward" not in vars(m)
        # the one entry sampling adds: the model's kept plans (mcdrop.plan_cache)
        added = {"_mcdrop_plans"} if m is model else set()
        assert vars(m).keys() == attributes.keys() | added
        assert m._modules == attributes["_modules"]


class CountLinear(TorchFunctionMode):
    """A caller's own torch-function mode, entered outside sampling: counts ``F.linear``."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        if func is torch.nn.functional.linear:
            self.calls += 1
        return func(*args, **(kwargs or {}))


def test_a_callers_own_mode_still_sees_the_layers_calls() -> None:
    # The direct run steps over the sampling mode only: a mode outside it sees every projection
    # (4 per layer) and the head, as on the mode's path.
    model = Classifier().eval()
    x = torch.randn(2, 6, 16)
    kept = plan(model, x)
    with CountLinear() as direct:
        sample(model, x, 4, seed=0, plan=kept)
    remove = _mode_path(model)
    try:
        with CountLinear() as through_mode:
            sample(model, x, 4, seed=0, plan=kept)
    finally:
        remove()
    assert direct.calls == through_mode.calls == 2 * 4 + 1


def _replace_parameters(model: Classifier) -> None:
    """New weights for one layer's projections and norm (a caller's fine-tuning step)."""
    layer = model.encoder.layers[1]
    with torch.no_grad():
        layer.linear1.weight = nn.Parameter(layer.linear1.weight * 1.5)
        layer.norm2.bias = nn.Parameter(layer.norm2.bias + 0.25)
        layer.self_attn.in_proj_weight = nn.Parameter(layer.self_attn.in_proj_weight * 0.5)
        layer.self_attn.out_proj.bias = nn.Parameter(layer.self_attn.out_proj.bias - 0.1)


def _shadow_a_parameter(model: Classifier) -> None:
    """A bias that is no parameter any more: a plain tensor attribute of the module."""
    linear = model.encoder.layers[0].linear2
    bias = linear.bias.detach() + 0.5
    del linear.bias
    linear.bias = bias


@pytest.mark.parametrize("change", [_replace_parameters, _shadow_a_parameter])
def test_the_direct_run_reads_the_parameters_as_they_are_now(
    change: Callable[[Classifier], None],
) -> None:
    # The direct run reads parameters from the modules' dicts: one set since the plan, or one
    # that became a plain attribute, is read as the layer's own forward reads it.
    torch.manual_seed(0)
    model = Classifier().eval()
    x = torch.randn(3, 6, 16)
    kept = plan(model, x)
    before = sample(model, x, 8, seed=3, plan=kept)
    change(model)
    direct, through_mode = _both_paths(model, x, kept)
    assert torch.equal(direct, through_mode)
    assert not torch.equal(direct, before)


class InnerMode(Classifier):
    """A forward that enters a torch-function mode of its own around the encoder: inside the
    sampling mode."""

    def forward(self, x: Tensor) -> Tensor:
        with CountLinear():
            h = self.encoder(x)
        return self.head(h.mean(1))


def test_a_mode_entered_inside_the_forward_gives_the_mode_paths_samples() -> None:
    # The sampling mode is then not the innermost: the encoder's hand-over goes to the inner
    # mode first (torch's handle_torch_function), which hands it on to the sampling mode.
    torch.manual_seed(0)
    model = InnerMode().eval()
    x = torch.randn(2, 6, 16)
    direct, through_mode = _both_paths(model, x)
    assert torch.equal(direct, through_mode)
    assert direct.var(0).mean() > 1e-4


def _bits(x: Tensor) -> Tensor:
    """The values' bit patterns (NaN and -0.0 compared exactly)."""
    return x.view(torch.int64 if x.dtype == torch.float64 else torch.int32)


def _not_finite_into(layer: nn.TransformerEncoderLayer, name: str) -> None:
    """±inf and NaN in what the layer's dropout module ``name`` drops."""
    with torch.no_grad():
        if name == "dropout":  # the feed-forward units (through the activation)
            layer.linear1.bias[:3] = torch.tensor([math.inf, -math.inf, math.nan])
        elif name == "dropout1":  # the attention block's output
            layer.self_attn.out_proj.bias[:2] = torch.tensor([math.inf, math.nan])
        else:  # the feed-forward block's output
            layer.linear2.bias[:2] = torch.tensor([-math.inf, math.nan])


@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("name", ["dropout", "dropout1", "dropout2"])
@pytest.mark.parametrize("inplace", [False, True])
def test_a_dropout_at_a_rate_of_one_gives_the_mode_paths_samples_of_values_not_finite(
    activation: str, name: str, inplace: bool
) -> None:
    """At a rate of 1 the mode's dropout of a layer's module gives zeros (not in place), or
    ``x · 0`` (in place: NaN where ``x`` is ±inf or NaN): the direct run gives the same, bit
    for bit, where what it drops is not finite."""
    torch.manual_seed(0)
    model = Classifier(activation=activation).eval()
    layer = model.encoder.layers[0]
    _not_finite_into(layer, name)
    module = getattr(layer, name)
    module.p = 1.0
    module.inplace = inplace
    x = torch.randn(3, 6, 16)
    direct, through_mode = _both_paths(model, x)
    assert torch.equal(_bits(direct), _bits(through_mode))
    assert direct.isnan().all() == inplace  # (not in place: zeros, all finite after them)
    assert torch.equal(_bits(sample(model, x, 8, seed=3)), _bits(direct))


def _dropping_relu(x: Tensor) -> Tensor:
    """An activation that drops (a function set on a layer after its plan)."""
    return F.dropout(F.relu(x), 0.5)


@pytest.mark.parametrize("activation", [F.silu, _dropping_relu])
def test_an_activation_set_since_the_plan_runs_as_in_the_mode(
    activation: Callable[[Tensor], Tensor],
) -> None:
    """A layer's activation set to another function since its plan is called as the layer's
    own forward calls it, in the mode: its torch calls are the mode's, a dropout in it is the
    context's (here a call the plan does not have: the plan's error on both paths), never
    torch's own random dropout."""
    torch.manual_seed(0)
    model = Classifier().eval()
    x = torch.randn(3, 6, 16)
    kept = plan(model, x)
    for layer in model.encoder.layers:
        layer.activation = activation
    if activation is F.silu:
        direct, through_mode = _both_paths(model, x, kept)
        assert torch.equal(direct, through_mode)
        return
    for path in ("direct", "mode"):
        remove = _mode_path(model) if path == "mode" else (lambda: None)
        try:
            with pytest.raises(UnsupportedModelError, match=r"dropout call 4 .* received shape"):
                sample(model, x, 8, seed=3, plan=kept)
        finally:
            remove()
