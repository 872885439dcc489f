"""Routed passes (mcdrop.routing): a model's own forward with its dropout modules, and where it
calls them torch.nn.functional's dropout functions, handed to the sampling context and no
torch-function mode gives the mode's samples, bit for bit; a model whose calls routing cannot
reach is never routed; a call that routing missed runs again under the mode; the modules and
functions are left as they were, and other threads see torch's own dropout."""

from __future__ import annotations

import copy
import inspect
import io
import os
import pickle
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.functional import dropout as imported_dropout

from mcdrop import LockedDropout, is_sampling, plan, predict, sample, sample_chunks
from mcdrop.exceptions import UnsampledDropoutWarning, UnsupportedModelError
from mcdrop.nets import ReducedPrecision
from mcdrop.planning import SamplingPlan


class TwoLayer(nn.Module):
    """An MLP with a forward of its own, one dropout module called twice."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(6, 16), nn.Linear(16, 16), nn.Linear(16, 3)
        self.drop = nn.Dropout(0.2)

    def forward(self, x: Tensor) -> Tensor:
        x = self.drop(F.relu(self.fc1(x)))
        return self.fc3(self.drop(torch.tanh(self.fc2(x))))


class Residual(nn.Module):
    """Residual blocks with dropout inside, an in-place dropout, BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8), nn.GELU(), nn.Dropout(0.3))
            for _ in range(2)
        )
        self.norm = nn.BatchNorm1d(8)
        self.last = nn.Dropout(0.1, inplace=True)
        self.out = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h)
        return self.out(self.last(self.norm(h)))


class Kinds(nn.Module):
    """Channel, alpha and element-wise dropout modules in a small CNN of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.channels = nn.Dropout2d(0.25)
        self.alpha = nn.AlphaDropout(0.2)
        self.head = nn.Linear(4 * 4 * 4, 3)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: Tensor) -> Tensor:
        h = self.channels(F.selu(self.conv(x)))
        return self.head(self.drop(self.alpha(h.flatten(1))))


class Functional(TwoLayer):
    """A dropout module and a dropout function in its forward: the function is routed too."""

    def forward(self, x: Tensor) -> Tensor:
        x = self.drop(F.relu(self.fc1(x)))
        return self.fc3(F.dropout(torch.tanh(self.fc2(x)), 0.3, self.training))


class Functions(nn.Module):
    """Every dropout function of torch.nn.functional in a CNN of its own, called as MC-dropout
    code calls them (dropout on whatever the mode: training=True; by keyword; in place, its
    answer unused)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.head = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = F.dropout2d(F.selu(self.conv(x)), 0.25, True)
        h = F.dropout3d(h.unsqueeze(2), 0.1, training=True).squeeze(2)
        h = F.feature_alpha_dropout(h, 0.1, True)
        h = F.dropout1d(h.flatten(2), p=0.2, training=True)
        h = F.alpha_dropout(h.flatten(1), 0.2, True)
        F.dropout(input=h, p=0.3, training=True, inplace=True)  # (its answer is h itself)
        return self.head(h)


class Channels(nn.Module):
    """A small CNN of its own with channel dropout (in place) and element-wise dropout, as
    modules or as functions, its convolutions channels-last or not: every call's multipliers
    made before a fast pass."""

    def __init__(self, functions: bool = False, channels_last: bool = False) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 3, padding=1)
        if not functions:
            self.channels, self.drop = nn.Dropout2d(0.25, inplace=True), nn.Dropout(0.4)
        self.head = nn.Linear(4 * 4 * 4, 3)
        self.functions = functions
        if channels_last:
            self.to(memory_format=torch.channels_last)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.conv1(x))
        if self.functions:
            F.dropout2d(h, 0.25, True, True)  # in place, its answer unused
            h = F.dropout1d(self.conv2(h).flatten(2), p=0.1, training=self.training)
            return self.head(F.dropout(h.flatten(1), 0.4, True))
        h = self.conv2(self.channels(h))
        return self.head(self.drop(h.flatten(1)))


class Sequence(nn.Module):
    """Channel dropout of a transposed activation (features as channels over time steps): a
    first call whose input is no contiguous tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.head = nn.Linear(3, 8), nn.Linear(8 * 5, 2)
        self.channels, self.drop = nn.Dropout1d(0.3), nn.Dropout(0.2)

    def forward(self, x: Tensor) -> Tensor:  # (N, 5, 3)
        h = self.channels(torch.tanh(self.embed(x)).transpose(1, 2))  # (N, 8, 5), a view
        return self.head(self.drop(h.flatten(1)))


class Ranks(nn.Module):
    """Channel dropout at ranks other than the one torch takes as batched (nn.Dropout1d on
    (N, C) and nn.Dropout3d on (N, C, H, W): one unbatched sample, kept or dropped per row;
    nn.Dropout2d on (N, C, L)) beside mcdrop's LockedDropout, which hands its call to the
    sampling context itself."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.head = nn.Linear(6, 24), nn.Linear(24, 3)
        self.rows, self.channels = nn.Dropout1d(0.3), nn.Dropout2d(0.25)
        self.locked, self.volumes = LockedDropout(0.3), nn.Dropout3d(0.2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.rows(torch.tanh(self.inp(x)))  # (N, 24)
        h = self.locked(self.channels(h.view(-1, 4, 6)))  # (N, 4, 6)
        return self.head(self.volumes(h.view(-1, 4, 2, 3)).flatten(1))


class TorchNamespace(TwoLayer):
    """Dropout called as torch's own function (``torch.dropout``): routing leaves it alone."""

    def forward(self, x: Tensor) -> Tensor:
        x = self.drop(F.relu(self.fc1(x)))
        return self.fc3(torch.dropout(torch.tanh(self.fc2(x)), 0.3, self.training))


class Recurrent(nn.Module):
    """A recurrent network with dropout between its layers (torch's kernel drops there in
    training only), its own initial state or none, batch or time first, then a dropout module."""

    def __init__(self, kind: str = "GRU", layers: int = 2, **options: Any) -> None:
        super().__init__()
        cell = {"GRU": nn.GRU, "LSTM": nn.LSTM, "RNN": nn.RNN}[kind]
        self.time_first = not options.pop("batch_first", True)
        self.own_state = options.pop("own_state", False)
        self.rnn = cell(6, 8, num_layers=layers, dropout=0.3, batch_first=not self.time_first,
                        **options)  # fmt: skip
        self.drop, self.head = nn.Dropout(0.2), nn.Linear(self.rnn.proj_size or 8, 2)
        directions = 2 if self.rnn.bidirectional else 1
        self.h0 = nn.Parameter(torch.randn(layers * directions, 1, self.rnn.proj_size or 8))
        self.head = nn.Linear(directions * (self.rnn.proj_size or 8), 2)

    def forward(self, x: Tensor) -> Tensor:
        seq = x.transpose(0, 1) if self.time_first else x  # (T, N, F) or (N, T, F)
        state: Any = None
        if self.own_state:
            state = self.h0.expand(-1, x.shape[0], -1).contiguous()
            if isinstance(self.rnn, nn.LSTM):
                state = (state, torch.zeros(state.shape[0], x.shape[0], 8))
        out = self.rnn(seq, state)[0]
        last = out[-1] if self.time_first else out[:, -1]
        return self.head(self.drop(last))


class Attention(nn.Module):
    """An nn.MultiheadAttention that drops its weights (torch's fast path in eval mode drops
    nothing), self or cross, batch or time first, masked, its weights used or not."""

    def __init__(self, cross: bool = False, masks: bool = False, **options: Any) -> None:
        super().__init__()
        self.cross, self.masks = cross, masks
        options.setdefault("batch_first", True)
        self.time_first = not options["batch_first"]
        self.embed, self.drop = nn.Linear(6, 4 * 16), nn.Dropout(0.1)
        self.attention = nn.MultiheadAttention(16, 4, dropout=0.3, **options)
        keys = 4 + options.get("add_bias_kv", False) + options.get("add_zero_attn", False)
        self.out = nn.Linear(16 + keys, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.drop(self.embed(x)).view(x.shape[0], 4, 16)
        memory = torch.tanh(h[..., : self.attention.kdim]) if self.cross else h
        values = (-h[..., : self.attention.vdim]) if self.cross else memory
        if self.time_first:
            h, memory, values = h.transpose(0, 1), memory.transpose(0, 1), values.transpose(0, 1)
        padding = causal = None
        if self.masks:
            padding = (x[:, :4] > 1.5).logical_and(torch.arange(4) > 0)  # (N, S): never row 0
            causal = torch.ones(4, 4, dtype=torch.bool).triu(1)
        y, weights = self.attention(
            h, memory, values, key_padding_mask=padding, attn_mask=causal, need_weights=True
        )
        y = y.transpose(0, 1) if self.time_first else y  # (N, L, E)
        return self.out(torch.cat([y.mean(1), weights.mean(1)], dim=1))


# models whose passes route an LSTM's, GRU's or RNN's kernel: with the dropout functions
RECURRENT = {
    "GRU": (Recurrent, (5, 6)),
    "LSTM, 3 layers, bidirectional, time first, its own state": (
        lambda: Recurrent("LSTM", 3, bidirectional=True, batch_first=False, own_state=True),
        (5, 6),
    ),
    "RNN of ReLUs, its own state": (
        lambda: Recurrent("RNN", nonlinearity="relu", own_state=True),
        (5, 6),
    ),
}

MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "two layers": (TwoLayer, (6,)),
    "residual": (Residual, (6,)),
    "channel and alpha dropout": (Kinds, (1, 6, 6)),
    # a network of its own dtype: the multipliers are made in it
    "bfloat16 network": (lambda: ReducedPrecision(TwoLayer(), torch.bfloat16), (6,)),
    # dropout functions in the forward: routed too
    "functional": (Functional, (6,)),
    "functions of every kind": (Functions, (1, 6, 6)),
    "channel dropout": (Channels, (1, 6, 6)),
    "channel dropout, channels-last": (lambda: Channels(channels_last=True), (1, 6, 6)),
    "channel dropout of a transposed activation": (Sequence, (5, 3)),
    "channel dropout at other ranks, LockedDropout beside": (Ranks, (6,)),
    "bfloat16 channel dropout": (lambda: ReducedPrecision(Channels(), torch.bfloat16), (1, 6, 6)),
    "functions of channel dropout": (lambda: Channels(functions=True), (1, 6, 6)),
    "functions of channel dropout, channels-last": (
        lambda: Channels(functions=True, channels_last=True),
        (1, 6, 6),
    ),
    # torch's attention, run as under the mode
    "attention": (Attention, (6,)),
    "attention, time first, masked": (
        lambda: Attention(masks=True, batch_first=False),
        (6,),
    ),
    "attention across, keys and values of their own sizes": (
        lambda: Attention(cross=True, kdim=8, vdim=12),
        (6,),
    ),
    "attention with key and value biases and a zero row": (
        lambda: Attention(add_bias_kv=True, add_zero_attn=True),
        (6,),
    ),
    **RECURRENT,
}

# torch's own dropout functions, as this module found them (no pass routed them then)
TORCH_FUNCTIONS = {
    name: getattr(F, name)
    for name in (
        "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout"
    )
}  # fmt: skip


KERNELS = ("lstm", "gru", "rnn_tanh", "rnn_relu")
TORCH_NAMESPACE = (
    "dropout",
    "dropout_",
    "feature_dropout",
    "alpha_dropout",
    "feature_alpha_dropout_",
)


def _torchs_own_functions() -> bool:
    """torch.nn.functional's dropout functions and attention torch's own, torch's namespace's
    dropout functions (which routing leaves alone), and torch._VF's kernels."""
    return (
        all(getattr(F, name) is func for name, func in TORCH_FUNCTIONS.items())
        and F.scaled_dot_product_attention is torch._C._nn.scaled_dot_product_attention
        and all(
            getattr(torch, name) is getattr(torch._C._VariableFunctions, name)
            for name in TORCH_NAMESPACE
        )
        and all(
            name not in vars(torch._VF) and getattr(torch._VF, name) is getattr(torch, name)
            for name in KERNELS
        )
    )


def _model(name: str) -> tuple[nn.Module, Tensor]:
    torch.manual_seed(0)
    factory, shape = {
        **MODELS,
        "torch.dropout": (TorchNamespace, (6,)),
        "imported by name": (ImportedByName, (6,)),
    }[name]
    model = factory().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    return model, torch.randn(3, *shape, generator=torch.Generator().manual_seed(1))


def _dropout_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]


def _run_together(*targets: Callable[[], object]) -> None:
    """Each target on a thread of its own (the targets wait on a barrier to start together)."""
    threads = [threading.Thread(target=target) for target in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)


def _under_the_mode(kept: SamplingPlan) -> SamplingPlan:
    """The same plan with routing off: its passes run under the mode."""
    from dataclasses import replace

    return replace(kept, routes=None)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize(("n", "n_samples"), [(1, 1), (3, 4), (2, 30)])
def test_routed_passes_give_the_modes_samples(name: str, n: int, n_samples: int) -> None:
    model, x = _model(name)
    kept = plan(model, x[:n])
    assert kept.routes is not None
    assert kept.layers is None
    routed = sample(model, x[:n], n_samples, seed=5, plan=kept)
    mode = sample(model, x[:n], n_samples, seed=5, plan=_under_the_mode(kept))
    assert torch.equal(routed, mode)
    # passes of one sample each (float rounding depends on a pass's size: the same sizes)
    chunked, chunked_mode = (
        torch.cat([c.values for c in sample_chunks(model, x[:n], n_samples, seed=5, plan=p,
                                                   max_pass_rows=n)])
        for p in (kept, _under_the_mode(kept))
    )  # fmt: skip
    assert torch.equal(chunked, chunked_mode)
    assert all("forward" not in vars(m) for m in _dropout_modules(model))
    assert _torchs_own_functions()
    # the functions are routed only where the forward calls them, or a recurrent kernel
    assert kept.routes.functions == (name.startswith("function") or name in RECURRENT)


def test_a_model_calling_torchs_namespace_dropout_is_not_routed() -> None:
    model, x = _model("torch.dropout")
    kept = plan(model, x)
    assert kept.routes is None
    assert len(kept.calls) == 2
    assert sample(model, x, 4, seed=1, plan=kept).var(0).gt(0).all()


class ImportedByName(TwoLayer):
    """A dropout function imported by name (torch's own, bound when its module was imported):
    routing cannot reach it, the mode can."""

    def forward(self, x: Tensor) -> Tensor:
        x = self.drop(F.relu(self.fc1(x)))
        return self.fc3(imported_dropout(torch.tanh(self.fc2(x)), 0.3, True))


def test_a_model_calling_a_dropout_function_imported_by_name_is_not_routed() -> None:
    torch.manual_seed(0)
    model, x = ImportedByName().eval(), torch.randn(3, 6)
    kept = plan(model, x)
    assert kept.routes is None
    assert len(kept.calls) == 2
    got = sample(model, x, 4, seed=1, plan=kept)
    assert torch.equal(got, sample(model, x, 4, seed=1, plan=kept))
    assert got.var(0).gt(0).all()
    assert _torchs_own_functions()


def test_a_call_that_routing_misses_runs_under_the_mode() -> None:
    """A dropout function imported by name called in the forward after the plan: the routed
    pass makes its call unseen, one fewer than the plan has, and the pass runs under the mode,
    which sees every call."""
    model, x = _model("two layers")
    kept = plan(model, x)
    before = sample(model, x, 4, seed=1, plan=kept)
    # (it writes into its input, too: the pass under the mode gets its rows afresh)
    model.forward = lambda h: ImportedByName.forward(model, h.mul_(2))  # type: ignore[method-assign]
    got = sample(model, x, 4, seed=1, plan=kept)
    fresh = plan(model, x)
    assert fresh.routes is None
    assert torch.equal(got, sample(model, x, 4, seed=1, plan=fresh))
    assert torch.equal(x, _model("two layers")[1]), "the call wrote into the caller's rows"
    assert not torch.equal(got, before)
    del model.forward
    assert torch.equal(sample(model, x, 4, seed=1, plan=kept), before)


def test_a_rate_set_to_zero_gets_the_modes_answer() -> None:
    model, x = _model("residual")
    kept = plan(model, x)
    model.blocks[0][3].p = 0.0
    with pytest.raises(UnsupportedModelError) as routed:
        sample(model, x, 4, seed=1, plan=kept)
    with pytest.raises(UnsupportedModelError) as mode:
        sample(model, x, 4, seed=1, plan=_under_the_mode(kept))
    assert str(routed.value) == str(mode.value)


def test_modules_are_left_as_they_were_after_an_error() -> None:
    model, x = _model("two layers")
    kept = plan(model, x)

    def broken(h: Tensor) -> Tensor:
        raise RuntimeError("boom")

    model.fc3.forward = broken  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="boom"):
        sample(model, x, 4, seed=1, plan=kept)
    assert all("forward" not in vars(m) for m in _dropout_modules(model))


def test_other_threads_see_torchs_own_dropout_meanwhile() -> None:
    """While one thread samples (its dropout modules routed), deterministic predictions on
    another thread see a plain eval model, and both threads' answers stay the same."""
    model, x = _model("residual")
    kept = plan(model, x)
    expected_samples = sample(model, x, 8, seed=2, plan=kept)
    expected = predict(model, x)
    failures: list[str] = []
    start = threading.Barrier(3)

    def sampler() -> None:
        start.wait()
        for _ in range(40):
            if not torch.equal(sample(model, x, 8, seed=2, plan=kept), expected_samples):
                failures.append("samples")

    def predictor() -> None:
        start.wait()
        for _ in range(40):
            if not torch.equal(predict(model, x), expected):
                failures.append("prediction")

    _run_together(sampler, sampler, predictor)
    assert failures == []
    assert all("forward" not in vars(m) for m in _dropout_modules(model))


def test_a_forward_set_on_a_dropout_module_is_honoured() -> None:
    model, x = _model("two layers")
    kept = plan(model, x)
    model.drop.forward = lambda h: h * 0.5  # type: ignore[method-assign]
    # no stochastic call at all now: the mode path's error
    with pytest.raises(UnsupportedModelError):
        sample(model, x, 4, seed=1, plan=kept)
    assert model.drop.forward(torch.ones(1)).item() == 0.5


def test_a_forward_set_during_a_pass_and_removed_after_leaves_no_route() -> None:
    """A forward of one's own set on a dropout module while a routed pass runs (here from
    within it, as another thread may) stays after the pass; once removed, the later passes
    are routed as before, and leave the module with torch's own forward."""
    model, x = _model("two layers")
    kept = plan(model, x)
    assert kept.routes is not None
    expected = sample(model, x, 4, seed=1, plan=_under_the_mode(kept))

    def own(h: Tensor) -> Tensor:
        return h * 0.5

    def set_within(module: nn.Module, *_: object) -> None:
        if module is model.fc3:  # after the pass's last dropout call
            model.drop.forward = own  # type: ignore[method-assign]

    handle = nn.modules.module.register_module_forward_hook(set_within)
    try:
        assert torch.equal(sample(model, x, 4, seed=1, plan=kept), expected)
    finally:
        handle.remove()
    assert vars(model.drop)["forward"] is own
    del model.drop.forward
    for _ in range(2):
        assert torch.equal(sample(model, x, 4, seed=1, plan=kept), expected)
        assert all("forward" not in vars(m) for m in _dropout_modules(model))


class ModeAware(TwoLayer):
    """A forward that drops differently under a torch-function mode: the same calls, other
    samples. Routing must find that out when the plan is made."""

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.fc1(x))
        if torch._C._is_torch_function_mode_enabled():
            h = F.dropout(h, 0.4, self.training)
        else:
            h = self.drop(h)
        return self.fc3(h)


def test_a_model_that_drops_otherwise_without_the_mode_is_not_routed() -> None:
    torch.manual_seed(0)
    model = ModeAware().eval()
    x = torch.randn(2, 6)
    with pytest.warns(UnsampledDropoutWarning):  # the mode's pass never calls self.drop
        kept = plan(model, x)
    assert kept.routes is None
    with pytest.warns(UnsampledDropoutWarning):
        general = sample(model, x, 4, seed=1)  # a fresh plan's, under the mode
    assert torch.equal(sample(model, x, 4, seed=1, plan=kept), general)


def test_a_dropout_module_with_a_forward_of_its_own_is_not_routed() -> None:
    model, x = _model("two layers")
    model.drop.forward = lambda h: F.dropout(h, 0.2, model.training)  # type: ignore[method-assign]
    kept = plan(model, x)
    assert kept.routes is None
    assert "forward" in vars(model.drop)


@pytest.mark.parametrize(("n", "n_samples"), [(1, 1), (2, 6)])
def test_a_rate_changed_since_the_plan_is_sampled_at_the_new_rate(n: int, n_samples: int) -> None:
    model, x = _model("two layers")
    kept = plan(model, x[:n])
    sample(model, x[:n], n_samples, seed=3, plan=kept)  # the fast pass is made and used
    model.drop.p = 0.45
    got = sample(model, x[:n], n_samples, seed=3, plan=kept)
    assert torch.equal(got, sample(model, x[:n], n_samples, seed=3, plan=_under_the_mode(kept)))
    assert torch.equal(got, sample(model, x[:n], n_samples, seed=3))  # a fresh plan's


class Strided(nn.Module):
    """Channel dropout first, of an activation that is no contiguous tensor (a transposed
    sequence, a channels-last convolution's output), as a module or a function at a rate the
    model holds; its output the dropped activation itself (whole channels zero)."""

    def __init__(self, kind: str, rate: float) -> None:
        super().__init__()
        self.kind, self.rate = kind, rate
        if kind.startswith("transposed"):
            self.layer: nn.Module = nn.Linear(3, 8)
        else:
            self.layer = nn.Conv2d(3, 4, 1).to(memory_format=torch.channels_last)
        if not kind.endswith("function"):
            self.channels = nn.Dropout1d(rate) if kind == "transposed" else nn.Dropout2d(rate)

    def forward(self, x: Tensor) -> Tensor:  # (N, 5, 3), or (N, 3, 4, 4)
        h = torch.tanh(self.layer(x))
        if self.kind.startswith("transposed"):
            h = h.transpose(1, 2)  # (N, 8, 5), a view
        if self.kind.endswith("function"):
            return F.dropout1d(h, self.rate, self.training).flatten(2)
        return self.channels(h).flatten(2)


@pytest.mark.parametrize("kind", ["transposed", "transposed function", "channels-last"])
@pytest.mark.parametrize(("n", "n_samples"), [(1, 1), (3, 4)])
def test_channel_dropout_of_a_strided_activation_drops_whole_channels(
    kind: str, n: int, n_samples: int
) -> None:
    """Planned at a rate so small that the plan shares the prefix (no multiplier drops), then
    sampled at a rate that drops: each channel is kept or dropped whole, on the first call that
    replicates the rows too, routed or under the mode, the same samples."""
    torch.manual_seed(0)
    model = Strided(kind, 1e-6).eval()
    x = torch.randn(n, *((5, 3) if kind.startswith("transposed") else (3, 4, 4)))
    kept = plan(model, x)
    assert kept.routes is not None
    model.rate = 0.5
    if not kind.endswith("function"):
        model.channels.p = 0.5
    got = sample(model, x, n_samples, seed=2, plan=kept)
    assert torch.equal(got, sample(model, x, n_samples, seed=2, plan=_under_the_mode(kept)))
    assert torch.equal(got, sample(model, x, n_samples, seed=2))  # a fresh plan's
    dropped = got == 0
    assert torch.equal(dropped.all(-1), dropped.any(-1)), "a channel dropped in part"
    assert dropped.any()
    assert not dropped.all()


class Keyword(TwoLayer):
    """A dropout module called with its argument by name, as torch's forward allows."""

    def forward(self, x: Tensor) -> Tensor:
        x = self.drop(input=F.relu(self.fc1(x)))
        return self.fc3(self.drop(input=torch.tanh(self.fc2(x))))


def test_a_dropout_module_called_by_keyword_is_routed_and_predicts_meanwhile() -> None:
    torch.manual_seed(0)
    model = Keyword().eval()
    x = torch.randn(3, 6)
    kept = plan(model, x)
    assert kept.routes is not None
    got = sample(model, x, 4, seed=1, plan=kept)
    assert torch.equal(got, sample(model, x, 4, seed=1, plan=_under_the_mode(kept)))
    # another thread's deterministic prediction while this one's routes are in place
    expected = predict(model, x)
    failures: list[BaseException] = []
    stop = threading.Event()

    def predictor() -> None:
        while not stop.is_set():
            try:
                assert torch.equal(predict(model, x), expected)
            except BaseException as e:  # reported below
                failures.append(e)
                return

    thread = threading.Thread(target=predictor)
    thread.start()
    try:
        for _ in range(200):
            sample(model, x, 4, seed=1, plan=kept)
    finally:
        stop.set()
        thread.join(timeout=60)
    assert failures == []


class Extra(TwoLayer):
    """TwoLayer with a slot for a module after its last dropout (an identity when planned)."""

    def __init__(self) -> None:
        super().__init__()
        self.extra: nn.Module = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.extra(super().forward(x))


@pytest.mark.parametrize(("n", "n_samples"), [(1, 1), (3, 4)])
def test_a_dropout_module_added_after_the_plan_is_never_left_unsampled(
    n: int, n_samples: int
) -> None:
    """A dropout module put in the model after its plan makes a call the plan does not have:
    the mode refuses the pass, and so must a routed one (never samples with it silently
    deterministic)."""
    torch.manual_seed(0)
    model = Extra().eval()
    x = torch.randn(3, 6)
    kept = plan(model, x[:n])
    assert kept.routes is not None
    sample(model, x[:n], n_samples, seed=1, plan=kept)  # the fast pass is made and used
    planned = model.extra
    model.extra = nn.Dropout(0.5)
    with pytest.raises(UnsupportedModelError) as mode:
        sample(model, x[:n], n_samples, seed=1, plan=_under_the_mode(kept))
    with pytest.raises(UnsupportedModelError) as routed:
        sample(model, x[:n], n_samples, seed=1, plan=kept)
    assert str(routed.value) == str(mode.value)
    model.extra = planned  # as planned again: routed, the mode's samples
    assert torch.equal(
        sample(model, x[:n], n_samples, seed=1, plan=kept),
        sample(model, x[:n], n_samples, seed=1, plan=_under_the_mode(kept)),
    )


def _saved_and_loaded(model: nn.Module) -> nn.Module:
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize(
    "copier",
    [copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m)), _saved_and_loaded],
    ids=["deepcopy", "pickle", "torch.save"],
)
def test_a_copy_made_while_a_pass_is_routed_has_no_route(copier: Callable[[Any], Any]) -> None:
    """A copy of the model taken while a routed pass runs (here from within it, as another
    thread's copy may be) has torch's own dropout modules: no ``forward`` of their own."""
    model, x = _model("two layers")
    kept = plan(model, x)
    assert kept.routes is not None
    copies: list[nn.Module] = []

    def copy_within(module: nn.Module, *_: object) -> None:
        if module is model.fc3:
            copies.append(copier(model))

    # (a global hook: the model's own would be copied, and a local function is no pickle)
    handle = nn.modules.module.register_module_forward_hook(copy_within)
    try:
        sample(model, x, 4, seed=1, plan=kept)
    finally:
        handle.remove()
    assert copies
    for twin in copies:
        assert all("forward" not in vars(m) for m in _dropout_modules(twin))
    twin = copies[0]
    assert torch.equal(predict(twin, x), predict(model, x))
    assert torch.equal(
        sample(twin, x, 4, seed=1, plan=plan(twin, x)), sample(model, x, 4, seed=1, plan=kept)
    )
    assert all("forward" not in vars(m) for m in _dropout_modules(model))


class Attending(nn.Module):
    """Dropout modules beside an nn.MultiheadAttention of rate 0 (no dropout call of its own),
    whose fast path torch takes in eval mode where no torch-function mode runs: other
    arithmetic than the mode's, though equal on some inputs (rows of zeros)."""

    def __init__(self, attention: type[nn.MultiheadAttention] = nn.MultiheadAttention) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 4 * 16)
        self.drop = nn.Dropout(0.2)
        self.attention = attention(16, 2, batch_first=True)
        self.out = nn.Linear(16, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.drop(self.embed(x)).view(x.shape[0], 4, 16)
        return self.out(self.attention(h, h, h, need_weights=False)[0].mean(1))


class _OwnAttention(nn.MultiheadAttention):
    """torch's attention under a class of one's own, which routing leaves alone."""


@pytest.mark.parametrize(
    ("attention", "routed"), [(nn.MultiheadAttention, True), (_OwnAttention, False)]
)
def test_a_model_whose_layers_run_otherwise_under_the_mode_samples_as_under_the_mode(
    attention: type[nn.MultiheadAttention], routed: bool
) -> None:
    """Planned on a row of zeros (as the service warms a model up), the routed probe pass gives
    the mode's samples bit for bit whatever path the attention takes; other rows' samples would
    differ. torch's nn.MultiheadAttention is routed to the path it takes under the mode; a class
    derived from it, which routing leaves alone, is never routed."""
    torch.manual_seed(0)
    model = Attending(attention).eval()
    kept = plan(model, torch.zeros(1, 6))
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(1))
    got = sample(model, x, 16, seed=1, plan=kept)
    assert torch.equal(got, sample(model, x, 16, seed=1, plan=_under_the_mode(kept)))
    assert (kept.routes is not None) is routed
    if routed:
        assert kept.routes is not None
        assert not kept.routes.missed


class Locked(nn.Module):
    """A sequence model of its own with an nn.Dropout and mcdrop's LockedDropout, which hands
    its calls to the sampling context itself (with or without the mode)."""

    def __init__(self, locked: float) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 3 * 8)
        self.drop = nn.Dropout(0.2)
        self.locked = LockedDropout(locked)
        self.out = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.drop(self.embed(x)).view(x.shape[0], 3, 8)
        return self.out(self.locked(h).mean(1))


@pytest.mark.parametrize(("n", "n_samples"), [(1, 1), (3, 4)])
def test_a_call_of_the_context_itself_in_a_fast_routed_pass_gets_the_modes_answer(
    n: int, n_samples: int
) -> None:
    """A LockedDropout's rate set above 0 after the plan: its call is not in the plan, and
    the mode's pass refuses it; so does a routed one, fast (no sample keys) or not."""
    torch.manual_seed(0)
    model = Locked(0.0).eval()
    x = torch.randn(3, 6)
    kept = plan(model, x[:n])
    assert kept.routes is not None
    sample(model, x[:n], n_samples, seed=1, plan=kept)  # the fast pass is made and used
    model.locked.p = 0.3
    with pytest.raises(UnsupportedModelError) as mode:
        sample(model, x[:n], n_samples, seed=1, plan=_under_the_mode(kept))
    with pytest.raises(UnsupportedModelError) as routed:
        sample(model, x[:n], n_samples, seed=1, plan=kept)
    assert str(routed.value) == str(mode.value)
    # a model planned with it: routed, the mode's samples
    fresh = plan(model, x[:n])
    assert fresh.routes is not None
    assert torch.equal(
        sample(model, x[:n], n_samples, seed=1, plan=fresh),
        sample(model, x[:n], n_samples, seed=1, plan=_under_the_mode(fresh)),
    )


class Gated(TwoLayer):
    """A functional dropout on some inputs only, with the idiom mcdrop.is_sampling documents."""

    def forward(self, x: Tensor) -> Tensor:
        h = self.drop(F.relu(self.fc1(x)))
        if x.abs().max() > 5:
            h = F.dropout(h, 0.5, self.training or is_sampling())
        return self.fc3(h)


def test_a_forward_that_asks_whether_it_samples_gets_the_modes_answer() -> None:
    """Planned on rows that skip its functional dropout, then given a row that takes it: the
    mode refuses the call the plan does not have; a routed pass would not see it, and torch's
    own (unseeded) dropout would run."""
    torch.manual_seed(0)
    model = Gated().eval()
    small = torch.randn(2, 6, generator=torch.Generator().manual_seed(1))
    kept = plan(model, small)
    assert kept.routes is not None
    assert torch.equal(
        sample(model, small, 8, seed=1, plan=kept),
        sample(model, small, 8, seed=1, plan=_under_the_mode(kept)),
    )
    large = torch.full((1, 6), 9.0)
    with pytest.raises(UnsupportedModelError) as mode:
        sample(model, large, 8, seed=1, plan=_under_the_mode(kept))
    with pytest.raises(UnsupportedModelError) as routed:
        sample(model, large, 8, seed=1, plan=kept)
    assert str(routed.value) == str(mode.value)


@pytest.mark.parametrize("name", ["residual", "functional"])
def test_other_threads_sample_under_the_mode_and_plan_meanwhile(name: str) -> None:
    """While threads sample with their dropout modules (and functions) routed, another thread's
    sampling under the mode and another's plan of the same model see torch's own dropout."""
    model, x = _model(name)
    kept = plan(model, x)
    mode = _under_the_mode(kept)
    expected = {p: sample(model, x, 8, seed=2, plan=p) for p in (kept, mode)}
    failures: list[str] = []
    start = threading.Barrier(4)

    def sampler(p: SamplingPlan) -> None:
        start.wait()
        for _ in range(30):
            if not torch.equal(sample(model, x, 8, seed=2, plan=p), expected[p]):
                failures.append("samples")

    def planner() -> None:
        start.wait()
        for _ in range(6):
            again = plan(model, x)
            if again.calls != kept.calls or again.routes is None:
                failures.append("plan")

    _run_together(*(partial(sampler, p) for p in (kept, kept, mode)), planner)
    assert failures == []
    assert torch.equal(expected[kept], expected[mode])
    assert all("forward" not in vars(m) for m in _dropout_modules(model))


def test_after_a_missed_call_passes_run_once_under_the_mode() -> None:
    """A forward that routing cannot follow since the plan (a functional dropout added): the
    pass that finds out runs again under the mode, and later passes run under it at once,
    not twice each (a forward's side effects and hooks run once a pass)."""
    model, x = _model("two layers")
    kept = plan(model, x)
    runs: list[int] = []
    model.fc1.register_forward_hook(lambda *_: runs.append(1))
    model.forward = lambda h: Functional.forward(model, h)  # type: ignore[method-assign]
    sample(model, x, 4, seed=1, plan=kept)
    assert len(runs) == 2  # routed, then under the mode
    runs.clear()
    for _ in range(3):
        sample(model, x, 4, seed=1, plan=kept)
    assert len(runs) == 3


def test_other_threads_see_torchs_own_dropout_functions_meanwhile() -> None:
    """While threads sample a model whose dropout functions are routed, another thread's
    F.dropout is torch's own: seeded by torch's generator in training, the identity out of it,
    and the functions are torch's own once the passes end."""
    model, x = _model("functional")
    kept = plan(model, x)
    assert kept.routes is not None
    assert kept.routes.functions
    expected_samples = sample(model, x, 8, seed=2, plan=kept)
    ones = torch.ones(4096)
    torch.manual_seed(7)
    expected = F.dropout(ones, 0.5, True)
    failures: list[str] = []
    start = threading.Barrier(3)
    seen: set[object] = set()

    def sampler() -> None:
        start.wait()
        # (until the trainer has met a routed pass, bounded: passes are short beside a switch)
        for i in range(5000):
            if i >= 60 and len(seen) == 2:
                break
            if not torch.equal(sample(model, x, 8, seed=2, plan=kept), expected_samples):
                failures.append("samples")

    def trainer() -> None:  # the only thread that draws from torch's generator
        start.wait()
        for i in range(20000):
            if i >= 300 and len(seen) == 2:
                break
            seen.add(F.dropout)
            torch.manual_seed(7)
            if not torch.equal(F.dropout(ones, 0.5, True), expected):
                failures.append("training")
            if F.dropout(ones, 0.5, False) is not ones:
                failures.append("eval")

    _run_together(sampler, sampler, trainer)
    assert failures == []
    assert len(seen) == 2, "the trainer never ran while a pass was routed"
    assert _torchs_own_functions()


class AlwaysDropping(TwoLayer):
    """A dropout module, and F.dropout on whatever the mode (training=True), as MC-dropout code
    writes it: torch's own would draw from torch's generator."""

    def forward(self, x: Tensor) -> Tensor:
        x = self.drop(F.relu(self.fc1(x)))
        return self.fc3(F.dropout(torch.tanh(self.fc2(x)), 0.3, True))


def test_planning_a_model_that_drops_on_whatever_the_mode_leaves_torchs_generator() -> None:
    """Its plan (the modules alone tried first) runs no dropout of torch's own: torch's
    generator is as it was, and the plan routes the functions, with the mode's samples."""
    torch.manual_seed(0)
    model, x = AlwaysDropping().eval(), torch.randn(3, 6)
    state = torch.get_rng_state()
    kept = plan(model, x)
    got = sample(model, x, 4, seed=1, plan=kept)
    assert torch.equal(torch.get_rng_state(), state)
    assert kept.routes is not None
    assert kept.routes.functions
    assert torch.equal(got, sample(model, x, 4, seed=1, plan=_under_the_mode(kept)))
    assert _torchs_own_functions()


class Holding(nn.Module):
    """A model whose forward waits, while a pass routes the functions (where ``holds``), until
    let go (``go``), having told so (``entered``): the model classes after it in a class's
    bases give the forward."""

    def __init__(self) -> None:
        super().__init__()
        self.entered, self.go = threading.Event(), threading.Event()
        self.holds = False

    def forward(self, x: Tensor) -> Tensor:
        y: Tensor = super().forward(x)
        if self.holds and not _torchs_own_functions():
            self.entered.set()
            self.go.wait(60)
        return y


class Held(Holding, Functional):
    """Functional, whose forward waits, while a pass routes the functions, until let go."""


@contextmanager
def _another_threads_pass_held(held: Holding, x: Tensor, kept: SamplingPlan) -> Iterator[None]:
    """Another thread's routed pass of ``held``, held while the body runs; then torch's own
    functions are back, and the pass gave the mode's samples."""
    expected = sample(held, x, 4, seed=1, plan=_under_the_mode(kept))
    got: list[Tensor] = []
    held.holds = True
    thread = threading.Thread(target=lambda: got.append(sample(held, x, 4, seed=1, plan=kept)))
    thread.start()
    try:
        assert held.entered.wait(60)
        assert not _torchs_own_functions()
        yield
    finally:
        held.go.set()
        thread.join(timeout=120)
    assert _torchs_own_functions()
    assert len(got) == 1
    assert torch.equal(got[0], expected)


class Traced(nn.Module):
    """Another thread's model: a dropout module and a dropout function, as torch writes them."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.drop = nn.Linear(6, 6), nn.Dropout(0.3)

    def forward(self, x: Tensor) -> Tensor:
        return F.dropout(self.drop(self.fc(x)), 0.2, self.training)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_other_threads_trace_script_compile_and_pickle_meanwhile() -> None:
    """While a pass routes the functions, another thread's torch.fx trace, TorchScript and
    torch.compile (whole graph) of a model with dropout work as with torch's own functions, and
    a pickle of F.dropout taken then is torch's function."""
    torch.manual_seed(0)
    held, x = Held().eval(), torch.randn(3, 6)
    kept = plan(held, x)
    assert kept.routes is not None
    assert kept.routes.functions
    with _another_threads_pass_held(held, x, kept):
        other = Traced().eval()
        traced = torch.fx.symbolic_trace(other)
        assert "torch.nn.functional.dropout(" in traced.code
        scripted = torch.jit.script(other)
        compiled = torch.compile(other, backend="eager", fullgraph=True)
        assert torch.equal(compiled(x), other(x))
        assert inspect.signature(F.dropout) == inspect.signature(TORCH_FUNCTIONS["dropout"])
        assert pickle.loads(pickle.dumps(F.dropout)) is TORCH_FUNCTIONS["dropout"]
    for twin in (traced, scripted, compiled):
        assert torch.equal(twin(x), other(x))
    compiled.train()  # torch's generator draws the same masks
    torch.manual_seed(2)
    drawn = compiled(x)
    torch.manual_seed(2)
    assert torch.equal(drawn, other(x))


class HeldRecurrent(Holding, Recurrent):
    """Recurrent (a GRU), whose forward waits, while a pass routes its kernel, until let go."""


def test_other_threads_run_torchs_own_recurrent_kernels_meanwhile() -> None:
    """While a pass routes the recurrent kernels, another thread's nn.GRU runs torch's own: no
    dropout in eval mode, torch's seeded dropout between its layers in training; a pickle of
    the kernel taken then is torch's, and its torch.compile works; torch._VF is torch's once
    the pass ends."""
    torch.manual_seed(0)
    held, x = HeldRecurrent().eval(), torch.randn(3, 5, 6)
    kept = plan(held, x)
    assert kept.routes is not None
    assert kept.routes.functions
    other, seq = nn.GRU(6, 8, num_layers=2, dropout=0.5, batch_first=True), torch.randn(2, 5, 6)
    torch.manual_seed(3)
    trained = other(seq)[0]
    evaluated = other.eval()(seq)[0]
    with _another_threads_pass_held(held, x, kept):
        assert torch.equal(other(seq)[0], evaluated)
        torch.manual_seed(3)
        assert torch.equal(other.train()(seq)[0], trained)
        assert pickle.loads(pickle.dumps(torch._VF.gru)) is torch.gru
        # torch.compile of a GRU works meanwhile (it goes through the route to torch's kernel)
        compiled = torch.compile(other.eval(), backend="eager")
        assert torch.equal(compiled(seq)[0], evaluated)


@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")
def test_an_lstm_with_projections_is_routed_with_the_modes_samples() -> None:
    torch.manual_seed(0)
    model = Recurrent("LSTM", 3, proj_size=4, own_state=False).eval()
    x = torch.randn(3, 5, 6, generator=torch.Generator().manual_seed(1))
    kept = plan(model, x)
    assert kept.routes is not None
    assert kept.routes.functions
    got = sample(model, x, 7, seed=2, plan=kept)
    assert torch.equal(got, sample(model, x, 7, seed=2, plan=_under_the_mode(kept)))
    assert not kept.routes.missed
    assert _torchs_own_functions()


def test_a_plan_made_while_another_thread_routes_the_functions_is_the_same() -> None:
    """Another thread's pass routes the functions while a model that calls F.dropout is
    planned: the plan routes the functions too (its passes after that one find torch's own
    function otherwise), and its passes run the forward once each, with the mode's samples."""
    torch.manual_seed(0)
    held, x = Held().eval(), torch.randn(3, 6)
    kept = plan(held, x)
    model = _model("functional")[0]
    held.holds = True
    thread = threading.Thread(target=lambda: sample(held, x, 4, seed=1, plan=kept))
    thread.start()
    try:
        assert held.entered.wait(60)
        planned = plan(model, x)
    finally:
        held.go.set()
        thread.join(timeout=120)
    assert _torchs_own_functions()
    assert planned.routes is not None
    assert planned.routes.functions
    runs: list[int] = []
    model.fc1.register_forward_hook(lambda *_: runs.append(1))
    for seed in range(3):
        runs.clear()
        got = sample(model, x, 4, seed=seed, plan=planned)
        assert len(runs) == 1
        assert torch.equal(got, sample(model, x, 4, seed=seed, plan=_under_the_mode(planned)))


def test_a_wrapper_of_a_dropout_function_is_never_skipped_nor_removed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A function of one's own in place of F.dropout (a library's wrapper): a pass routes no
    function over it (the mode's answer), and one set during a pass stays after it."""
    model, x = _model("functional")
    kept = plan(model, x)
    assert kept.routes is not None
    assert kept.routes.functions
    expected = sample(model, x, 4, seed=1, plan=kept)
    wrapped: list[int] = []

    def wrapper(*args: Any, **kwargs: Any) -> Tensor:
        wrapped.append(1)
        return TORCH_FUNCTIONS["dropout"](*args, **kwargs)

    # (the mode sees the wrapper, which it does not know, as the function called: its call is
    # torch's own, deterministic in eval, and the pass refuses the count)
    monkeypatch.setattr(F, "dropout", wrapper)
    with pytest.raises(UnsupportedModelError) as mode:
        sample(model, x, 4, seed=1, plan=_under_the_mode(kept))
    with pytest.raises(UnsupportedModelError) as routed:
        sample(model, x, 4, seed=1, plan=kept)
    assert str(routed.value) == str(mode.value)
    assert wrapped
    monkeypatch.undo()

    def set_within(module: nn.Module, *_: object) -> None:
        if module is model.fc3:  # after the pass's last dropout call
            F.dropout = wrapper  # type: ignore[assignment]

    handle = nn.modules.module.register_module_forward_hook(set_within)
    try:
        assert torch.equal(sample(model, x, 4, seed=1, plan=kept), expected)
        assert F.dropout is wrapper
    finally:
        handle.remove()
        F.dropout = TORCH_FUNCTIONS["dropout"]  # type: ignore[assignment]
    assert _torchs_own_functions()


class Rated(nn.Module):
    """F.dropout at a rate the model holds, which may change after the plan, and in place."""

    rate = 0.2

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(6, 16), nn.Linear(16, 16), nn.Linear(16, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = F.dropout(F.relu(self.fc1(x)), self.rate, self.training)
        h = torch.tanh(self.fc2(x))
        F.dropout(h, 0.1, self.training, True)  # in place, its answer unused
        return self.fc3(h)


@pytest.mark.parametrize(("n", "n_samples"), [(1, 1), (2, 6)])
def test_a_functions_rate_changed_since_the_plan_is_sampled_at_the_new_rate(
    n: int, n_samples: int
) -> None:
    torch.manual_seed(0)
    model = Rated().eval()
    x = torch.randn(n, 6)
    kept = plan(model, x)
    assert kept.routes is not None
    assert kept.routes.functions
    before = sample(model, x, n_samples, seed=1, plan=kept)  # the fast pass is made and used
    model.rate = 0.6
    got = sample(model, x, n_samples, seed=1, plan=kept)
    assert torch.equal(got, sample(model, x, n_samples, seed=1, plan=_under_the_mode(kept)))
    assert torch.equal(got, sample(model, x, n_samples, seed=1, plan=plan(model, x)))
    assert not torch.equal(got, before)


@pytest.mark.parametrize(("n", "n_samples"), [(1, 1), (2, 6)])
def test_after_a_functions_rate_changed_passes_stay_routed_and_run_once(
    n: int, n_samples: int
) -> None:
    """A function's rate changed since the plan (its fast pass made the multipliers at the
    plan's rate): each pass runs the forward once, routed, with the mode's samples."""
    torch.manual_seed(0)
    model = Rated().eval()
    x = torch.randn(n, 6)
    kept = plan(model, x)
    assert kept.routes is not None
    runs: list[int] = []
    model.fc1.register_forward_hook(lambda *_: runs.append(1))
    for step in range(5):
        model.rate = 0.6 if step in (2, 3) else 0.2
        runs.clear()
        got = sample(model, x, n_samples, seed=step, plan=kept)
        assert len(runs) == 1, step
        assert not kept.routes.missed
        assert torch.equal(got, sample(model, x, n_samples, seed=step, plan=_under_the_mode(kept)))


_FORK_BESIDE_A_PASS = """
import os, sys, threading, torch
import mcdrop
sys.path.insert(0, {tests!r})
from test_routing import TwoLayer, _dropout_modules, _under_the_mode
class Waiting(TwoLayer):
    entered, go, holds = threading.Event(), threading.Event(), False
    def forward(self, x):
        y = super().forward(x)
        if self.holds and "forward" in vars(self.drop):
            self.entered.set()
            self.go.wait(60)
        return y
torch.manual_seed(0)
model, x = Waiting().eval(), torch.randn(3, 6)
kept = mcdrop.plan(model, x)
expected = mcdrop.sample(model, x, 4, seed=1, plan=_under_the_mode(kept))
model.holds = True
thread = threading.Thread(target=mcdrop.sample, args=(model, x, 4), kwargs=dict(seed=1, plan=kept))
thread.start()
assert model.entered.wait(60)
pid = os.fork()
if pid == 0:  # the child: exit at once, with what it found
    model.holds, ok = False, False
    try:
        ok = all("forward" not in vars(m) for m in _dropout_modules(model))
        compiled = torch.compile(model, backend="eager", fullgraph=True)
        ok = ok and torch.equal(compiled(x), model(x)) and torch.equal(
            mcdrop.sample(model, x, 4, seed=1, plan=kept), expected
        )
    finally:
        os._exit(0 if ok else 1)
model.go.set()
thread.join(60)
print(os.waitpid(pid, 0)[1], all("forward" not in vars(m) for m in _dropout_modules(model)))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")
def test_a_process_forked_beside_a_routed_pass_has_torchs_own_dropout_modules() -> None:
    """A child forked while another thread's pass routes the model's dropout modules (a
    DataLoader's worker): no pass runs in it, so its modules have torch's own forward (a
    whole-graph torch.compile of the model works there), and it samples."""
    script = _FORK_BESIDE_A_PASS.format(tests=os.path.dirname(__file__))
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["0", "True"], done.stdout


_FORK_WITHIN_A_PASS = """
import os, sys, torch, torch.nn.functional as F
from torch import nn
import mcdrop
sys.path.insert(0, {tests!r})
from test_routing import _model, _torchs_own_functions
model, x = _model("functional")
kept = mcdrop.plan(model, x)
expected = mcdrop.sample(model, x, 4, seed=1, plan=kept)
statuses = []
def fork_within(module, *_):
    if module is model.fc3 and not statuses:
        statuses.append(-1)  # (the child's own passes fork no more)
        pid = os.fork()
        if pid == 0:  # the child: exit at once, with what it found
            ok = False
            try:
                ok = _torchs_own_functions() and torch.equal(
                    mcdrop.sample(model, x, 4, seed=1, plan=kept), expected
                )
            finally:
                os._exit(0 if ok and _torchs_own_functions() else 1)
        statuses[0] = os.waitpid(pid, 0)[1]
nn.modules.module.register_module_forward_hook(fork_within)
mcdrop.sample(model, x, 4, seed=1, plan=kept)
print(statuses, _torchs_own_functions())
"""


_FORK_AND_GO_ON = """
import os, sys, torch
from torch import nn
import mcdrop
sys.path.insert(0, {tests!r})
from test_routing import _model, _torchs_own_functions, _under_the_mode
model, x = _model("functional")
kept = mcdrop.plan(model, x)
forked = []
def fork_within(module, *_):
    if module is model.fc3 and not forked:
        forked.append(os.fork())  # both processes go on with the pass
handle = nn.modules.module.register_module_forward_hook(fork_within)
mcdrop.sample(model, x, 4, seed=1, plan=kept)
handle.remove()
runs = []
model.fc1.register_forward_hook(lambda *_: runs.append(1))
got = mcdrop.sample(model, x, 4, seed=2, plan=kept)
ok = (
    len(runs) == 1 and not kept.routes.missed and _torchs_own_functions()
    and torch.equal(got, mcdrop.sample(model, x, 4, seed=2, plan=_under_the_mode(kept)))
)
if forked[0] == 0:
    os._exit(0 if ok else 1)
print(os.waitpid(forked[0], 0)[1], ok)
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")
def test_a_process_forked_by_a_routed_pass_that_goes_on_routes_its_later_passes() -> None:
    """A forward that forks while its pass routes the functions, both processes going on
    with the pass: in the child, as in the parent, the later passes are routed, run once and
    give the mode's samples."""
    script = _FORK_AND_GO_ON.format(tests=os.path.dirname(__file__))
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["0", "True"], done.stdout


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")
def test_a_process_forked_during_a_routed_pass_has_torchs_own_functions() -> None:
    """A child forked while a pass routes the functions (a DataLoader's worker, forked by
    another thread): torch's own functions in it, and it samples. (In a process of its own: a
    fork beside the test runner's threads may deadlock on their locks.)"""
    script = _FORK_WITHIN_A_PASS.format(tests=os.path.dirname(__file__))
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["[0]", "True"], done.stdout


@pytest.mark.parametrize(
    ("name", "line"),
    [
        ("two layers", "its dropout modules routed"),
        ("functional", "its dropout modules and functions routed"),
        ("torch.dropout", "under the torch-function mode"),
        ("imported by name", "under the torch-function mode"),
    ],
)
def test_the_plan_says_how_its_forward_runs(name: str, line: str) -> None:
    model, x = _model(name)
    (said,) = [row for row in repr(plan(model, x)).splitlines() if "forward:" in row]
    assert line in said
