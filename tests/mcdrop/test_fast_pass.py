"""The fast pass (mcdrop.fast_pass): the same samples as the general path, bit for bit, and the
general path wherever anything it depends on changed since the plan."""

from __future__ import annotations

import copy
import io
import math
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import cast

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.nn.functional import dropout as imported_dropout
from torch.nn.utils import parametrize

from mcdrop import fast_pass, masks, plan, sample, sample_chunks
from mcdrop.exceptions import InvalidArgumentError, InvalidInputError, UnsupportedModelError
from mcdrop.nets import CNN, MLP, Standardized
from mcdrop.planning import SamplingPlan
from mcdrop.sampling import DEFAULT_MAX_PASS_ROWS


def _sequential() -> nn.Module:
    net = nn.Sequential(
        nn.Linear(6, 16),
        nn.ReLU(),
        nn.Dropout(0.2),
        nn.Linear(16, 16),
        nn.ReLU(inplace=True),
        nn.Dropout(0.3, inplace=True),
        nn.Linear(16, 3),
        nn.BatchNorm1d(3),
    )
    # Running statistics far from a batch's: a pass in training mode would show.
    net[7].running_mean.uniform_(-1, 1)
    net[7].running_var.uniform_(0.5, 2)
    return net


def _inplace_first() -> nn.Module:
    # The first step writes into its input: the caller's rows must be copied first.
    return nn.Sequential(nn.ReLU(inplace=True), nn.Dropout(0.25), nn.Linear(6, 4), nn.Tanh())


def _dropout_last() -> nn.Module:
    # The output is the last multipliers' buffer: a fresh one on every call.
    return nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Dropout(0.4))


def _standardized_mlp() -> nn.Module:
    net = MLP(6, [12, 12], 2, dropout=0.2, input_dropout=0.1)
    return Standardized(net, torch.randn(6), torch.rand(6) + 0.5, torch.randn(2), torch.rand(2) + 1)


def _cnn() -> nn.Module:
    return CNN(channels=(4, 8), pool=(True, True), spatial_dropout=0.0, hidden=16, image_size=12)


def _channels_last_convolutions() -> nn.Module:
    # Weights in channels-last order: the last convolution's output is not contiguous.
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Dropout(0.3), nn.Conv2d(4, 2, 3, padding=1)
    )
    return net.to(memory_format=torch.channels_last)


class _Functional(nn.Module):
    """Dropout called as functions in a forward of its own, BatchNorm beside: routed, the
    functions too (mcdrop.routing)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.norm, self.fc2 = nn.Linear(6, 16), nn.BatchNorm1d(16), nn.Linear(16, 3)
        self.norm.running_mean.uniform_(-1, 1)
        self.norm.running_var.uniform_(0.5, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = F.dropout(torch.relu(self.norm(self.fc1(x))), 0.3, self.training)
        return self.fc2(F.dropout(h, 0.1, self.training, inplace=True))


class _TorchNamespace(_Functional):
    """Dropout called as torch's own functions (``torch.dropout``, which routing leaves alone),
    BatchNorm beside: under the mode."""

    def forward(self, x: Tensor) -> Tensor:
        h = torch.dropout(torch.relu(self.norm(self.fc1(x))), 0.3, self.training)
        return self.fc2(torch.dropout_(h, 0.1, self.training))


class _ImportedByName(_Functional):
    """A dropout function imported by name (bound at import, which routing cannot see): under
    the mode."""

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(imported_dropout(torch.relu(self.norm(self.fc1(x))), 0.3, self.training))


class _Channels(nn.Module):
    """Channel dropout as a module (in place) and as functions, then element-wise dropout, in a
    CNN of its own: routed, every call's multipliers made before the pass."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(2, 4, 3), nn.Conv2d(4, 4, 3, padding=1)
        self.channels = nn.Dropout2d(0.25, inplace=True)
        self.head = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv2(self.channels(F.relu(self.conv1(x))))
        h = F.dropout1d(h.flatten(2), 0.1, self.training)
        return self.head(F.dropout(h.flatten(1), 0.3, self.training))


#: A feed-forward width whose dropout calls a pass under the mode makes in place, not before it:
#: 5 positions of it per row are more than fast_pass._MADE_IN_MODE multipliers.
WIDE = 2048


class EncoderClassifier(nn.Module):
    """A transformer encoder classifier: its layers run by the encoders' twin, under the mode.
    With a wide feed-forward block (:data:`WIDE`), those calls are too large to be made before
    the pass: they hash as they multiply, with the pass's sample keys (ModePass._into_of)."""

    def __init__(self, feedforward: int = 16) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(8, 2, feedforward, dropout=0.2, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(x).mean(1))


#: A sequence length whose attention weights (2 heads, L × L per row) a pass under the mode
#: multiplies in place, not before it: past fast_pass._MADE_IN_MODE multipliers in one row.
LONG = 65


class _WideTwice(nn.Module):
    """One wide encoder layer (:data:`WIDE`) called twice in a forward of its own: the same
    dropout modules' calls at two places of the pass, each multiplied in place as it hashes,
    and the first call's output kept on the model (``self.seen``)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(8, 2, WIDE, dropout=0.2, batch_first=True)
        self.head = nn.Linear(8, 3)
        self.seen: list[Tensor] = []

    def forward(self, x: Tensor) -> Tensor:
        h = self.layer(x)
        self.seen.append(h)
        return self.head(self.layer(h).mean(1))


class _Recurrent(nn.Module):
    """An LSTM with dropout between its layers, then a dropout module: routed, its kernel's
    calls with the functions' (mcdrop.routing)."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(6, 8, num_layers=2, dropout=0.25, batch_first=True)
        self.drop, self.head = nn.Dropout(0.1), nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.drop(self.lstm(x)[0][:, -1]))


class _Attending(nn.Module):
    """A dropout module, then an nn.MultiheadAttention that drops its weights."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.drop = nn.Linear(6, 4 * 8), nn.Dropout(0.2)
        self.attention = nn.MultiheadAttention(8, 2, dropout=0.3, batch_first=True)
        self.head = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.drop(self.embed(x)).view(x.shape[0], 4, 8)
        return self.head(self.attention(h, h, h, need_weights=False)[0].mean(1))


class _KeepsProducts(nn.Module):
    """A forward of its own that returns one dropout's product as it is and keeps another's
    (``self.seen``), each shaped as a premade call's multipliers: a routed pass that keeps its
    buffer of multipliers must never hand their memory on."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.drop = nn.Dropout(0.4)
        self.seen: list[Tensor] = []

    def forward(self, x: Tensor) -> Tensor:
        h = self.drop(self.fc(x).abs() + 1.0)  # (no zeros: every multiplier shows)
        self.seen.append(h)
        return F.dropout(h, 0.3, self.training) + F.dropout(x, 0.5, self.training)


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "sequential": (_sequential, (6,)),
    "in-place first": (_inplace_first, (6,)),
    "dropout last": (_dropout_last, (6,)),
    "standardized MLP": (_standardized_mlp, (6,)),
    "CNN": (_cnn, (1, 12, 12)),
    "channels-last convolutions": (_channels_last_convolutions, (3, 6, 6)),
    # routed, F.dropout's calls too (RoutedPass)
    "functional dropout": (_Functional, (6,)),
    "channel dropout": (_Channels, (2, 6, 6)),
    "keeps products": (_KeepsProducts, (6,)),
    # routed, an LSTM's kernel and a multi-head attention too (RoutedPass), whose calls the
    # sampling context makes in the pass
    "LSTM": (_Recurrent, (4, 6)),
    "attention": (_Attending, (6,)),
    # no layer chain and no routes: their forward under the torch-function mode (ModePass)
    "torch.dropout": (_TorchNamespace, (6,)),
    "dropout imported by name": (_ImportedByName, (6,)),
    "transformer encoder": (EncoderClassifier, (5, 8)),
    # its feed-forward calls multiplied in place as they hash (ModeContext's `into`)
    "wide transformer encoder": (lambda: EncoderClassifier(WIDE), (5, 8)),
    # its attention weights' calls multiplied in place as they hash
    "long-sequence encoder": (EncoderClassifier, (LONG, 8)),
    "one wide layer twice": (_WideTwice, (5, 8)),
}


def _model(name: str) -> tuple[nn.Module, tuple[int, ...]]:
    torch.manual_seed(0)
    factory, shape = MODELS[name]
    return factory().eval(), shape


def _rows(n: int, shape: tuple[int, ...], seed: int = 1) -> Tensor:
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))


def _fast(model: nn.Module, x: Tensor, n_samples: int, kept: SamplingPlan, **kw: object) -> Tensor:
    """The fast pass's samples (asserting it took the call)."""
    got = fast_pass.run(
        kept, model, x, n_samples, kw.get("seed", 3), DEFAULT_MAX_PASS_ROWS,
        kw.get("prefix", "auto"), kw.get("first_sample", 0),  # type: ignore[arg-type]
    )  # fmt: skip
    assert got is not None, "the fast pass did not take the call"
    return got


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize(("n", "n_samples"), [(1, 1), (1, 7), (3, 1), (3, 5)])
@pytest.mark.parametrize("prefix", ["auto", "off"])
def test_the_same_samples_as_the_general_path(
    name: str, n: int, n_samples: int, prefix: str
) -> None:
    model, shape = _model(name)
    x = _rows(n, shape)
    before = x.clone()
    kept = plan(model, x)
    general = _general(model, x, n_samples, 3, prefix=prefix)
    fast = _fast(model, x, n_samples, kept, prefix=prefix)
    assert torch.equal(fast, general)
    again = sample(model, x, n_samples, seed=3, plan=kept, prefix=prefix)  # type: ignore[arg-type]
    assert torch.equal(again, general)
    assert torch.equal(x, before), "the call wrote into the caller's rows"
    assert fast.is_contiguous()
    assert again.is_contiguous()  # as sample returns a single pass's
    assert fast.shape[:2] == (n_samples, n)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize(("n", "n_samples"), [(1, 1), (3, 1), (3, 5)])
def test_per_row_seeds_take_the_fast_pass_with_the_general_paths_samples(
    name: str, n: int, n_samples: int
) -> None:
    """Seeds of their own per row (requests merged in a batch) take the fast pass, with the
    samples of the general path (which takes the same seeds as int32: the fast pass leaves
    them to it), and of one int seed where every row has it."""
    model, shape = _model(name)
    x = _rows(n, shape)
    kept = plan(model, x)
    seeds = torch.tensor([2**31 - 1, 0, 7][:n])  # (int32's range)
    assert (
        fast_pass.run(kept, model, x, n_samples, seeds.int(), DEFAULT_MAX_PASS_ROWS, "auto") is None
    )
    general = sample(model, x, n_samples, seed=seeds.int(), plan=kept)
    for _ in range(2):  # (a pass under the mode notes its rates, then makes them before it)
        fast = _fast(model, x, n_samples, kept, seed=seeds)
        assert torch.equal(fast, general)
    same = _fast(model, x, n_samples, kept, seed=torch.full((n,), 2**63 - 1))
    assert torch.equal(same, _fast(model, x, n_samples, kept, seed=2**63 - 1))


SEED_LAYOUTS: dict[str, Callable[[], Tensor]] = {
    "a view with a step": lambda: torch.tensor([5, 0, 2**31 - 1, 0, 7, 0])[::2],
    "past an offset": lambda: torch.tensor([0, 5, 2**31 - 1, 7])[1:],
    "expanded": lambda: torch.tensor([2**31 - 1]).expand(3),
}


@pytest.mark.parametrize("layout", SEED_LAYOUTS)
@pytest.mark.parametrize("name", ["sequential", "torch.dropout", "transformer encoder"])
def test_per_row_seeds_in_any_layout_sample_as_their_values(layout: str, name: str) -> None:
    model, shape = _model(name)
    x = _rows(3, shape)
    kept = plan(model, x)
    seeds = SEED_LAYOUTS[layout]()
    general = sample(model, x, 2, seed=seeds.int(), plan=kept)  # (int32: the general path)
    for _ in range(2):
        assert torch.equal(_fast(model, x, 2, kept, seed=seeds), general)


@pytest.mark.parametrize("name", ["sequential", "functional dropout", "wide transformer encoder"])
def test_per_row_seeds_negated_lazily_sample_as_their_values(name: str) -> None:
    """Per-row seeds with torch's negative bit set (a lazy negation, whose values the general
    path reads as they are): NumPy refuses their memory, so the fast pass leaves the call to
    the general path, never raising NumPy's error."""
    model, shape = _model(name)
    x = _rows(3, shape)
    kept = plan(model, x)
    seeds = torch._neg_view(torch.tensor([-5, 0, -(2**31 - 1)]))
    assert seeds.is_neg()
    assert fast_pass.run(kept, model, x, 2, seeds, DEFAULT_MAX_PASS_ROWS, "auto") is None
    expected = _general(model, x, 2, seeds.resolve_neg())
    assert torch.equal(sample(model, x, 2, seed=seeds, plan=kept), expected)


def test_per_row_seeds_on_another_device_are_the_general_paths() -> None:
    model, shape = _model("torch.dropout")
    x = _rows(3, shape)
    kept = plan(model, x)
    seeds = torch.tensor([1, 2, 3], device="meta")
    assert fast_pass.run(kept, model, x, 2, seeds, DEFAULT_MAX_PASS_ROWS, "auto") is None


@pytest.mark.parametrize(
    "seeds",
    [torch.tensor([1, -1, 2]), torch.tensor([1, 2]), torch.tensor([1.0, 2.0, 3.0])],
    ids=["negative", "too few", "floats"],
)
def test_per_row_seeds_the_general_path_refuses_are_its_error(seeds: Tensor) -> None:
    model, shape = _model("sequential")
    x = _rows(3, shape)
    kept = plan(model, x)
    assert fast_pass.run(kept, model, x, 2, seeds, DEFAULT_MAX_PASS_ROWS, "auto") is None
    with pytest.raises(InvalidArgumentError, match="per-row seeds"):
        sample(model, x, 2, seed=seeds, plan=kept)


_DROPOUTS: dict[str, tuple[type[nn.Module], Callable[..., Tensor], tuple[int, ...]]] = {
    # (module, function, the dimensions a row may have: torch's ranks but the batch's)
    "element-wise": (nn.Dropout, F.dropout, (1, 2, 3, 4)),
    "1d": (nn.Dropout1d, F.dropout1d, (1, 2)),  # (N, L): unbatched, each row a channel
    "2d": (nn.Dropout2d, F.dropout2d, (1, 2, 3)),
    "3d": (nn.Dropout3d, F.dropout3d, (3, 4)),  # (N, C, D, H): unbatched
}


class _Shaped(nn.Module):
    """A linear layer viewed as rows of ``shape``, a dropout module or function of ``kind`` on
    them, then element-wise dropout and a head: routed, each call's multipliers made in its
    activation's shape (channels: ``(B, C, 1, ...)``)."""

    def __init__(self, kind: str, shape: tuple[int, ...], p: float, function: bool) -> None:
        super().__init__()
        size = math.prod(shape)
        self.shape, self.p, self.function = shape, p, function
        module, self.func, _ = _DROPOUTS[kind]
        self.fc, self.head = nn.Linear(size, size), nn.Linear(size, 2)
        self.drop = nn.Identity() if function else module(p)  # (a module that never runs warns)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc(x).view(x.shape[0], *self.shape)
        h = self.func(h, self.p, self.training) if self.function else self.drop(h)
        return self.head(F.dropout(h.flatten(1), 0.2, self.training))


# torch's deprecation of the ranks it will refuse (dropout2d of a 2-D or 3-D input)
@pytest.mark.filterwarnings("ignore:dropout[123]d. Received a:UserWarning")
@settings(max_examples=60, deadline=None)
@given(
    kind=st.sampled_from(list(_DROPOUTS)),
    dims=st.lists(st.sampled_from([1, 1, 2, 3]), min_size=1, max_size=4),
    p=st.sampled_from([0.0, 0.3, 0.9, 1.0]),
    function=st.booleans(),
    n=st.integers(1, 3),
    n_samples=st.integers(1, 4),
    first_sample=st.sampled_from([0, 5]),
    prefix=st.sampled_from(["auto", "off"]),
)
def test_channel_and_element_dropout_of_any_shape_give_the_general_paths_samples(
    kind: str,
    dims: list[int],
    p: float,
    function: bool,
    n: int,
    n_samples: int,
    first_sample: int,
    prefix: str,
) -> None:
    """Shapes where a channel's multipliers and an element's coincide ((N, C), (N, C, 1, 1)),
    the unbatched ranks of dropout1d and dropout3d (whose rows are channels), rates 0 and 1."""
    assume(len(dims) in _DROPOUTS[kind][2])
    torch.manual_seed(0)
    model = _Shaped(kind, tuple(dims), p, function).eval()
    x = _rows(n, (math.prod(dims),))
    kept = plan(model, x)
    fast = _fast(model, x, n_samples, kept, prefix=prefix, first_sample=first_sample)
    (general,) = sample_chunks(
        model, x, n_samples, seed=torch.full((n,), 3), plan=kept, prefix=prefix,  # type: ignore[arg-type]
        first_sample=first_sample,
    )  # fmt: skip
    assert torch.equal(fast, general.values)


class _UnderTheMode(nn.Module):
    """Dropout functions routing cannot see (torch's own, one imported by name), called in a
    forward of its own in the ways ``style`` names: under the mode (ModePass), the inverted
    ones per element made before the pass at the rates a pass noted."""

    def __init__(self, style: str) -> None:
        super().__init__()
        self.style = style
        self.fc, self.head = nn.Linear(6, 32), nn.Linear(32, 3)
        self.rates = [0.3, 0.6]  # (rates read on every call: a test may change them)
        self.function: Callable[..., Tensor] = imported_dropout

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.fc(x))
        n = x.shape[0]
        if self.style == "one function, two rates":
            for p in self.rates:
                h = self.function(h, p, True)
        elif self.style == "training off, then on":
            h = imported_dropout(h, self.rates[0], training=False)
            h = torch.dropout(h, self.rates[1], True)
        elif self.style == "transposed and in place on a view":
            t = imported_dropout(h.view(n, 4, 8).transpose(1, 2), self.rates[0], True)
            h = t.transpose(1, 2).reshape(n, 32)
            imported_dropout(h[:, :16], self.rates[1], True, inplace=True)
            h = torch.dropout_(h, 0.2, True)
        elif self.style == "alpha and channels between":
            h = F.alpha_dropout(torch.selu(h), 0.2, True)
            h = imported_dropout(h, self.rates[0], True)
            h = torch.feature_dropout(h.view(n, 8, 4), 0.3, True).view(n, 32)
            h = imported_dropout(h, self.rates[1], True)
            h = torch.feature_alpha_dropout(h.view(n, 4, 8), 0.1, True).view(n, 32)
        elif self.style == "3-D and 4-D":
            h3 = imported_dropout(h.view(n, 4, 8), self.rates[0], True)
            h = torch.dropout(h3.unsqueeze(1).expand(n, 2, 4, 8) * 1.0, self.rates[1], True)
            h = h.mean(1).reshape(n, 32)
        elif self.style == "rates 0 and 1 among them":
            h = imported_dropout(h, 0.0, True)
            h = imported_dropout(h, self.rates[0], True)
            h = imported_dropout(h, 1.0, True) + h
            h = imported_dropout(h, self.rates[1], True)
        return self.head(h)


UNDER_THE_MODE = [
    "one function, two rates",
    "training off, then on",
    "transposed and in place on a view",
    "alpha and channels between",
    "3-D and 4-D",
    "rates 0 and 1 among them",
]


@pytest.mark.parametrize("style", UNDER_THE_MODE)
@pytest.mark.parametrize(("n", "n_samples"), [(1, 1), (1, 6), (3, 4)])
def test_a_pass_under_the_mode_gives_the_general_paths_samples(
    style: str, n: int, n_samples: int
) -> None:
    """The first pass notes its calls' rates, the next make their multipliers before the pass;
    with the prefix shared or not, from a first sample of 0 or later (a chunk), and with the
    rates changed between passes (a call at another rate than noted makes its own)."""
    torch.manual_seed(0)
    model = _UnderTheMode(style).eval()
    x = _rows(n, (6,))
    kept = plan(model, x)
    for prefix in ("auto", "off"):
        for first_sample in (0, 5):
            for k, rates in enumerate([[0.3, 0.6], [0.3, 0.6], [0.6, 0.3], [0.6, 0.3], [0.3, 1]]):
                model.rates = rates
                fast = _fast(model, x, n_samples, kept, prefix=prefix, first_sample=first_sample)
                (general,) = sample_chunks(
                    model, x, n_samples, seed=torch.full((n,), 3, dtype=torch.int32), plan=kept,
                    prefix=prefix, first_sample=first_sample,  # type: ignore[arg-type]
                )  # fmt: skip
                assert torch.equal(fast, general.values), (prefix, first_sample, rates)
                if k == 1:  # the multipliers of some calls made before the pass
                    made = kept.fast_passes[
                        n, n_samples, first_sample, DEFAULT_MAX_PASS_ROWS, prefix
                    ]
                    assert isinstance(made, fast_pass.ModePass)
                    assert made.noted is not None
                    assert made.noted[0][1]  # (the maker's calls)


class _DropsLast(nn.Module):
    """A forward whose output is a dropout call's (under the mode, not in place; a call before
    it: the first call of a pass that shares the prefix replicates its rows, never made)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 32)

    def forward(self, x: Tensor) -> Tensor:
        h = imported_dropout(torch.relu(self.fc(x)), 0.2, True)
        return imported_dropout(h, 0.3, True)


def _noted_mode_pass(
    model: nn.Module, x: Tensor, n_samples: int, kept: SamplingPlan
) -> fast_pass.ModePass:
    """The model's pass under the mode after two calls: the rates noted, then the multipliers
    made before the pass, in the buffer it keeps from pass to pass."""
    for _ in range(2):
        sample(model, x, n_samples, seed=1, plan=kept)
    (made,) = kept.fast_passes.values()
    assert isinstance(made, fast_pass.ModePass)
    assert made.noted is not None
    assert made.noted[1] is not None  # (its buffer)
    return made


@pytest.mark.parametrize(("n", "n_samples"), [(1, 1), (3, 4)])
def test_a_pass_under_the_mode_returns_none_of_the_multipliers_it_keeps(
    n: int, n_samples: int
) -> None:
    """A pass under the mode keeps its multipliers' buffer for the next pass, which rewrites
    it: a call that is not in place returns a product of its own, so the samples of one call
    stay as they were after the next."""
    torch.manual_seed(0)
    model = _DropsLast().eval()
    x = _rows(n, (6,))
    kept = plan(model, x)
    _noted_mode_pass(model, x, n_samples, kept)
    first = sample(model, x, n_samples, seed=1, plan=kept)
    copy_of_first = first.clone()
    second = sample(model, x, n_samples, seed=2, plan=kept)
    assert not torch.equal(second, first)
    assert torch.equal(first, copy_of_first)
    assert torch.equal(first, _general(model, x, n_samples, 1))


def _wider(model: nn.Module) -> None:
    # the layers' weights of another width (the same modules: their children as planned)
    model.fc.weight, model.fc.bias = nn.Parameter(torch.randn(64, 6)), nn.Parameter(torch.ones(64))
    model.head.weight = nn.Parameter(torch.randn(3, 64))


OTHER_CALLS: dict[str, Callable[[nn.Module], object]] = {
    "another width": _wider,
    "another function": lambda m: setattr(m, "function", torch.dropout_),
}


@pytest.mark.parametrize("change", OTHER_CALLS)
def test_a_call_other_than_planned_where_multipliers_were_made_is_the_plans_error(
    change: str,
) -> None:
    """A call of another shape or kind than the plan's, at a call's place whose multipliers
    were made before the pass: the error the general path gives (the context's), not the
    multipliers applied (or torch's error of their shape)."""
    torch.manual_seed(0)
    model = _UnderTheMode("one function, two rates").eval()
    x = _rows(2, (6,))
    kept = plan(model, x)
    for _ in range(2):  # the rates noted, then the multipliers made before the pass
        _fast(model, x, 3, kept, prefix="off")  # (shared, the first call's are not made)
    OTHER_CALLS[change](model)
    for seed in (3, torch.full((2,), 3, dtype=torch.int32)):  # the fast pass, the general path
        with pytest.raises(UnsupportedModelError, match="dropout call 1"):
            sample(model, x, 3, seed=seed, plan=kept, prefix="off")  # type: ignore[arg-type]


_PASS_KINDS = {
    "functional dropout": fast_pass.RoutedPass,
    "channel dropout": fast_pass.RoutedPass,
    "keeps products": fast_pass.RoutedPass,
    "torch.dropout": fast_pass.ModePass,
    "dropout imported by name": fast_pass.ModePass,
    "transformer encoder": fast_pass.ModePass,
    "wide transformer encoder": fast_pass.ModePass,
    "long-sequence encoder": fast_pass.ModePass,
    "one wide layer twice": fast_pass.ModePass,
    "LSTM": fast_pass.RoutedPass,
    "attention": fast_pass.RoutedPass,
}
# the calls of an LSTM's kernel and of an attention: made by the sampling context in the pass
_CONTEXT_CALLS = {"LSTM": [0], "attention": [1]}


@pytest.mark.parametrize("name", MODELS)
def test_each_model_takes_its_kind_of_fast_pass(name: str) -> None:
    model, shape = _model(name)
    x = _rows(2, shape)
    kept = plan(model, x)
    _fast(model, x, 3, kept)
    (made,) = kept.fast_passes.values()
    assert type(made) is _PASS_KINDS.get(name, fast_pass.ChainPass)
    if isinstance(made, fast_pass.RoutedPass):  # every call's multipliers made before the pass
        others = _CONTEXT_CALLS.get(name, [])
        expected = [i for i in range(len(kept.calls)) if i not in others]
        assert [index for index, _, _ in made.made_calls] == expected


def test_each_call_returns_its_own_tensor() -> None:
    model, shape = _model("dropout last")
    x = _rows(2, shape)
    kept = plan(model, x)
    first = sample(model, x, 3, seed=1, plan=kept)
    kept_copy = first.clone()
    second = sample(model, x, 3, seed=2, plan=kept)
    assert first.data_ptr() != second.data_ptr()
    assert torch.equal(first, kept_copy)


def _identity_after_dropout() -> nn.Module:
    # The product of the multipliers passes through a layer that returns its input.
    return nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.4), nn.Identity(), nn.Linear(8, 3))


@pytest.mark.parametrize(
    ("name", "keeps"),
    [
        ("sequential", True),
        ("CNN", True),
        ("standardized MLP", True),
        ("dropout last", False),  # its samples are the last multipliers' memory
        ("channels-last convolutions", False),  # a convolution after the dropout
        ("identity after dropout", False),
        # routed: the routes write each product into a tensor of its own
        ("keeps products", True),  # its forward returns one product and keeps another
        ("channel dropout", True),
        ("functional dropout", True),
    ],
)
@pytest.mark.parametrize(("n", "n_samples"), [(1, 1), (2, 3)])
def test_a_kept_buffer_of_multipliers_leaves_earlier_samples_as_they_were(
    name: str, keeps: bool, n: int, n_samples: int
) -> None:
    """A chain whose every product of multipliers goes into a linear layer, or a routed pass
    of a request's few rows, keeps its buffer of multipliers for the next call: the samples
    (and anything else, as the products a forward keeps) of a call stay as they were after
    the calls after it."""
    if name == "identity after dropout":
        torch.manual_seed(0)
        model, shape = _identity_after_dropout().eval(), (6,)
    else:
        model, shape = _model(name)
    x = _rows(n, shape)
    kept = plan(model, x)
    first = sample(model, x, n_samples, seed=1, plan=kept)
    copies = [first.clone(), *[h.clone() for h in getattr(model, "seen", [])[-1:]]]
    (made,) = kept.fast_passes.values()
    assert isinstance(made, fast_pass.ChainPass | fast_pass.RoutedPass)
    assert made.keeps is keeps
    buffers = [id(b) for b in made.buffers]  # (each kept buffer, the same object reused)
    second = sample(model, x, n_samples, seed=2, plan=kept)
    assert [id(b) for b in made.buffers] == buffers or not keeps
    assert bool(made.buffers) is keeps
    assert torch.equal(first, copies[0])
    if isinstance(model, _KeepsProducts):
        assert torch.equal(model.seen[-2], copies[1])
    assert not torch.equal(second, first)
    assert torch.equal(sample(model, x, n_samples, seed=1, plan=kept), first)
    assert torch.equal(second, _general(model, x, n_samples, 2))


def _long_rows_mlp() -> nn.Module:
    """An MLP on rows longer than cpu_masks.FEW_VALUES (one row's key is hashlib's)."""
    return nn.Sequential(nn.Linear(3000, 8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 2))


@pytest.mark.parametrize(
    ("n", "shape", "at_once"),
    [(1, (1, 28, 28), True), (3, (1, 28, 28), True), (1, (3000,), False), (2, (3000,), True)],
)
def test_a_requests_rows_are_keyed_with_their_multipliers_in_one_call(
    n: int, shape: tuple[int, ...], at_once: bool
) -> None:
    """The benchmark's 28×28 CNN: one row's key (up to cpu_masks.FEW_VALUES values) and several
    rows' (up to SHORT_ROW values each) are made by numba with the multipliers, one longer
    row's by hashlib; the general path's samples either way, and NaN
    rows the general path's error."""
    from mcdrop import cpu_masks

    torch.manual_seed(0)
    model = (CNN(channels=(4, 8, 8), hidden=16) if len(shape) == 3 else _long_rows_mlp()).eval()
    x = _rows(n, shape)
    x.view(n, -1)[0, 3] = -0.0
    width = math.prod(shape)
    short = n > 1 and width <= cpu_masks.SHORT_ROW
    assert (n * width <= cpu_masks.FEW_VALUES or short) is at_once
    kept = plan(model, x)
    for n_samples in (1, 4):
        assert torch.equal(_fast(model, x, n_samples, kept), _general(model, x, n_samples, 3))
    made = list(kept.fast_passes.values())
    assert len(made) == 2
    assert all(isinstance(f, fast_pass.ChainPass) and f.at_once is at_once for f in made)
    x.view(n, -1)[-1, 5] = math.nan
    with pytest.raises(InvalidInputError):
        sample(model, x, 1, seed=3, plan=kept)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("n", [1, 3])
def test_rows_not_finite_or_a_negative_seed_are_the_general_paths_error(name: str, n: int) -> None:
    """Whichever way a pass keys its rows (in its one compiled call with the multipliers, where
    every call's are made before it: at_once), a value not finite or a negative per-row seed
    leaves the call to the general path, which says what is wrong; finite rows after them get
    the general path's samples."""
    model, shape = _model(name)
    x = _rows(n, shape)
    kept = plan(model, x)
    assert torch.equal(_fast(model, x, 2, kept), sample(model, x, 2, seed=3))
    (made,) = kept.fast_passes.values()
    if isinstance(made, fast_pass.RoutedPass):  # every call made before the pass: at once
        assert made.at_once is (len(made.made_calls) == len(kept.calls))
    seeds = torch.arange(n) - 1  # (the first row's seed negative)
    assert fast_pass.run(kept, model, x, 2, seeds, DEFAULT_MAX_PASS_ROWS, "auto") is None
    with pytest.raises(InvalidArgumentError, match="per-row seeds"):
        sample(model, x, 2, seed=seeds, plan=kept)
    bad = x.clone()
    bad.view(n, -1)[-1, -1] = math.inf
    assert fast_pass.run(kept, model, bad, 2, 3, DEFAULT_MAX_PASS_ROWS, "auto") is None
    with pytest.raises(InvalidInputError):
        sample(model, bad, 2, seed=3, plan=kept)
    assert torch.equal(
        _fast(model, x, 2, kept, seed=seeds + 1), sample(model, x, 2, seed=seeds + 1)
    )


def test_chunks_continue_from_their_first_sample() -> None:
    model, shape = _model("sequential")
    x = _rows(2, shape)
    kept = plan(model, x)
    whole = sample(model, x, 12, seed=4)
    tail = _fast(model, x, 5, kept, seed=4, first_sample=7)
    # the same masks; a pass of 10 rows and one of 24 may round their matrix products otherwise
    # (on some CPUs a linear layer's row depends on the rows beside it, in the last bit)
    assert torch.allclose(tail, whole[7:], rtol=1e-5, atol=1e-6)
    (general,) = sample_chunks(model, x, 5, seed=4, first_sample=7)  # the same pass, no plan
    assert torch.equal(tail, general.values)
    (chunk,) = sample_chunks(model, x, 5, seed=4, plan=kept, first_sample=7)
    assert torch.equal(chunk.values, tail)


def test_a_chunk_loop_runs_in_inference_mode_on_both_paths() -> None:
    """The general path yields its chunks inside inference mode; the fast pass does the same,
    so a loop body that updates tensors made from earlier chunks works on either."""
    model, shape = _model("sequential")
    x = _rows(2, shape)
    kept = plan(model, x)
    for keep in (None, kept):
        chunks = sample_chunks(model, x, 4, seed=1, plan=keep)
        seen = [torch.is_inference_mode_enabled() for _ in chunks]
        assert seen == [True]
    assert not torch.is_inference_mode_enabled()


@pytest.mark.parametrize("name", MODELS)
def test_samples_are_inference_tensors_as_the_general_paths(name: str) -> None:
    """Both paths return inference tensors (the general path makes its samples in inference
    mode); a chain whose last step is a dropout returned its multipliers' buffer, made outside
    it, until they were made as inference tensors too."""
    model, shape = _model(name)
    x = _rows(2, shape)
    kept = plan(model, x)
    fast = _fast(model, x, 3, kept)
    general = sample(model, x, 3, seed=torch.tensor([3, 3]), plan=kept)  # a per-row seed
    assert torch.equal(fast, general)
    assert fast.is_inference()
    assert general.is_inference()


def _doubled(calls: list[int]) -> Callable[..., Tensor | None]:
    """A forward hook that counts its calls and doubles a linear layer's output."""

    def hook(module: nn.Module, args: object, output: Tensor) -> Tensor | None:
        calls.append(1)
        return 2 * output if isinstance(module, nn.Linear) else None

    return hook


def _hooked(model: nn.Module) -> list[int]:
    calls: list[int] = []
    model[0].register_forward_hook(_doubled(calls))
    return calls


def _global_hook(model: nn.Module) -> list[int]:
    calls: list[int] = []
    _handles.append(nn.modules.module.register_module_forward_hook(_doubled(calls)))
    return calls


_handles: list[torch.utils.hooks.RemovableHandle] = []


@pytest.fixture(autouse=True)
def _no_global_hooks_left() -> object:
    yield
    while _handles:
        _handles.pop().remove()


class _Double(nn.Module):
    def forward(self, w: Tensor) -> Tensor:
        return 2 * w


class _Tripled(nn.Sequential):
    def forward(self, x: Tensor) -> Tensor:
        return 3 * super().forward(x)


def _hooks_in_a_new_dict(model: nn.Module) -> list[int]:
    # the idiom that drops every hook of a module: a new dict, which later hooks go into
    model[0]._forward_hooks = OrderedDict()
    return _hooked(model)


def _weight_not_a_parameter(model: nn.Module, buffer: bool) -> None:
    # as torch.func.functional_call swaps in a plain tensor: the layer's weight is no parameter
    weight = 2 * model[3].weight.detach()
    del model[3].weight
    if buffer:
        model[3].register_buffer("weight", weight)
    else:
        model[3].weight = weight


CHANGES: dict[str, Callable[[nn.Module], object]] = {
    "a forward hook": _hooked,
    "a global forward hook": _global_hook,
    "training mode": lambda m: m.train(),
    "a dropout rate": lambda m: setattr(m[2], "p", 0.6),
    "a replaced layer": lambda m: m.__setitem__(3, nn.Linear(16, 16)),
    "a parametrized weight": lambda m: parametrize.register_parametrization(
        m[0], "weight", _Double()
    ),
    "a forward set on the instance": lambda m: setattr(m[1], "forward", lambda h: h.clamp(0, 0.5)),
    "a new weight": lambda m: setattr(m[3], "weight", nn.Parameter(torch.ones(16, 16))),
    "a weight that is a plain tensor": lambda m: _weight_not_a_parameter(m, buffer=False),
    "a weight that is a buffer": lambda m: _weight_not_a_parameter(m, buffer=True),
    "a deleted bias": lambda m: (delattr(m[0], "bias"), setattr(m[0], "bias", None)),
    "hooks in a new dict": _hooks_in_a_new_dict,
    "a forward set on the model": lambda m: setattr(
        m, "forward", lambda h: 3 * nn.Sequential.forward(m, h)
    ),
    "a subclass with its own forward": lambda m: setattr(m, "__class__", _Tripled),
    "a forward set on a dropout layer": lambda m: setattr(
        m[2], "forward", lambda h: 2 * nn.Dropout.forward(m[2], h)
    ),
}  # fmt: skip


@pytest.mark.parametrize("change", CHANGES)
def test_a_change_after_the_plan_gives_the_changed_models_samples(change: str) -> None:
    """Whatever changed since the fast pass was made, the call samples the model as it is now:
    the same samples as a call with a fresh plan."""
    model, shape = _model("sequential")
    x = _rows(2, shape)
    kept = plan(model, x)
    sample(model, x, 4, seed=1, plan=kept)  # the fast pass is made and used
    assert len(kept.fast_passes) == 1
    calls = CHANGES[change](model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    got = sample(model, x, 4, seed=1, plan=kept)
    if isinstance(calls, list):  # the hook ran on the kept plan's call
        assert calls
    expected = _general(model, x, 4, 1)
    assert torch.equal(got, expected)
    if change == "training mode":
        assert all(m.training for m in model.modules())
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


class _Tempered(EncoderClassifier):
    """An encoder classifier whose forward reads attributes of its own: a temperature, and
    whether to mask the positions whose first value is above 0.5 (but the first)."""

    def __init__(self, feedforward: int = 16) -> None:
        super().__init__(feedforward)
        self.temperature = 1.0
        self.padded = False
        self.encoder.layers[0].extra = 1

    def forward(self, x: Tensor) -> Tensor:
        if not self.padded:
            return super().forward(x) / self.temperature
        mask = x[..., 0] > 0.5
        mask[:, 0] = False
        return self.head(self.encoder(x, src_key_padding_mask=mask).mean(1)) / self.temperature


def _hook_on(module: nn.Module) -> list[int]:
    calls: list[int] = []
    module.register_forward_hook(_doubled(calls))
    return calls


def _extra_attribute_deleted(model: nn.Module) -> None:
    del model.encoder.layers[0].extra


def _layer_replaced(model: nn.Module) -> None:
    torch.manual_seed(1)
    width = model.encoder.layers[1].linear1.out_features  # (the plan's shapes: the same width)
    model.encoder.layers[1] = nn.TransformerEncoderLayer(8, 2, width, 0.3, batch_first=True).eval()


class _TripledTempered(_Tempered):
    def forward(self, x: Tensor) -> Tensor:
        return 3 * super().forward(x)


def _head_replaced(model: nn.Module) -> None:
    # (not on the way to the layers: the model's twin holds the model's head itself)
    torch.manual_seed(1)
    model.head = nn.Linear(8, 3)


ENCODER_CHANGES: dict[str, Callable[[nn.Module], object]] = {
    "a dropout layer's rate": lambda m: setattr(m.encoder.layers[1].dropout1, "p", 0.6),
    "the feed-forward dropout's rate": lambda m: setattr(m.encoder.layers[0].dropout, "p", 0.6),
    "an attention's dropout rate": lambda m: setattr(m.encoder.layers[0].self_attn, "dropout", 0.4),
    "a layer's norm first": lambda m: setattr(m.encoder.layers[0], "norm_first", True),
    "a layer's activation": lambda m: setattr(m.encoder.layers[1], "activation", F.gelu),
    "a layer's attribute deleted": _extra_attribute_deleted,
    "the model's attribute": lambda m: setattr(m, "temperature", 2.0),
    "a hook on a layer's linear": lambda m: _hook_on(m.encoder.layers[0].linear1),
    "a hook on the attention": lambda m: _hook_on(m.encoder.layers[1].self_attn),
    "a global forward hook": _global_hook,
    "a layer replaced": _layer_replaced,
    "the head replaced": _head_replaced,
    "the model's class": lambda m: setattr(m, "__class__", _TripledTempered),
    "a padding mask": lambda m: setattr(m, "padded", True),
}  # fmt: skip


@pytest.mark.parametrize("change", ENCODER_CHANGES)
@pytest.mark.parametrize(("n", "n_samples"), [(1, 1), (2, 3)])
@pytest.mark.parametrize("feedforward", [16, WIDE])
def test_an_encoders_pass_samples_the_model_as_it_is_now(
    change: str, n: int, n_samples: int, feedforward: int
) -> None:
    """A pass under the mode makes its calls' multipliers before it (or, where wide, hashes
    them in place with the pass's sample keys), at the rates an earlier pass noted, and keeps
    the encoders' twin: whatever changed since, its samples are a fresh plan's, on that call
    and the next."""
    torch.manual_seed(0)
    model = _Tempered(feedforward).eval()
    x = _rows(n, MODELS["transformer encoder"][1])
    kept = plan(model, x)
    made = _noted_mode_pass(model, x, n_samples, kept)
    assert made.noted is not None
    assert made.noted[0][0] is not None  # (the compiled maker)
    # the feed-forward block's inner call (one of each layer's four) in place where wide
    into = made.noted[2]
    assert (into is not None and sum(e is not None for e in into) == 2) == (feedforward == WIDE)
    calls = ENCODER_CHANGES[change](model)
    for _ in range(2):
        got = sample(model, x, n_samples, seed=1, plan=kept)
        expected = _general(model, x, n_samples, 1)
        assert torch.equal(got, expected)
    if change.startswith("a hook"):  # the hook ran on the kept plan's calls
        assert calls
    if change == "a layer's attribute deleted":
        twin = made.twin.now(model) if made.twin is not None else None
        assert twin is not None
        assert not hasattr(twin.encoder.layers[0], "extra")


def _general_chunk(
    model: nn.Module, x: Tensor, n_samples: int, seed: int | Tensor, prefix: str, first: int
) -> Tensor:
    """:func:`_general`'s samples ``first .. first + n_samples - 1`` (one chunk)."""
    rows = x.detach().clone().requires_grad_(True)
    (chunk,) = sample_chunks(
        model,
        rows,
        n_samples,
        seed=seed,
        prefix=prefix,  # type: ignore[arg-type]
        first_sample=first,
    )
    return chunk.values


#: Rates of an encoder layer's calls, changed between passes: 16-bit lanes, then 1, 2, 4 and
#: 8 bits a lane (multiples of 1/256), a rate of 1 and back, each twice (noted, then made).
_RATES = [0.2, 0.2, 0.5, 0.5, 0.25, 1 / 16, 3 / 256, 3 / 256, 1.0, 1.0, 0.2, 0.2]


@pytest.mark.parametrize(
    "name", ["wide transformer encoder", "long-sequence encoder", "one wide layer twice"]
)
@pytest.mark.parametrize(("n", "n_samples"), [(1, 1), (2, 3)])
def test_calls_hashed_in_place_at_rates_changed_between_passes_give_the_general_paths_samples(
    name: str, n: int, n_samples: int
) -> None:
    """A pass under the mode multiplies its large calls (a wide feed-forward's, a long
    sequence's attention weights) in place with the sample keys made with its other
    multipliers, at the rates a pass noted (ModeContext's ``into``): at every lane width, a
    rate of 1 and back, the prefix shared or not, from a first sample of 0 or later, under an
    int seed or one per row, each pass's samples are the general path's, and those of earlier
    passes (and the outputs a forward keeps) stay as they were."""
    model, shape = _model(name)
    x = _rows(n, shape)
    kept = plan(model, x)
    layer = next(m for m in model.modules() if isinstance(m, nn.TransformerEncoderLayer))
    got: list[tuple[Tensor, Tensor]] = []
    for p in _RATES:
        layer.dropout.p = p  # the feed-forward call's rate (in place where wide)
        layer.self_attn.dropout = p  # the attention weights' (in place where long)
        for prefix, first, seed in [("auto", 0, 3), ("off", 5, torch.arange(n) + 7)]:
            fast = _fast(model, x, n_samples, kept, prefix=prefix, first_sample=first, seed=seed)
            got += [(t, t.clone()) for t in [fast, *getattr(model, "seen", [])[-1:]]]
            assert torch.equal(fast, _general_chunk(model, x, n_samples, seed, prefix, first))
    # (and the outputs the forward kept)
    assert all(torch.equal(tensor, copy) for tensor, copy in got)
    made = kept.fast_passes[n, n_samples, 5, DEFAULT_MAX_PASS_ROWS, "off"]
    assert isinstance(made, fast_pass.ModePass)
    assert made.noted is not None
    assert made.noted[2] is not None  # (calls hashed in place)


@pytest.mark.parametrize(
    ("call", "rate"),
    [("the feed-forward call (in place)", "p"), ("the attention weights' (made)", "dropout")],
)
def test_a_call_noted_at_a_rate_of_one_is_made_again_once_its_rate_is_back(
    call: str, rate: str
) -> None:
    """A call that a pass noted at a rate of 1 (nothing to make: the context zeroes it) is
    sampled by the context while it stays at 1; once its rate is back in (0, 1), the pass
    misses it and the next pass notes it again, so that its multipliers are made before the
    pass or hashed in place again, not left to the context's own keys and checks for good."""
    model, shape = _model("wide transformer encoder")
    layer = model.encoder.layers[0]
    module = layer.dropout if rate == "p" else layer.self_attn
    index = 2 if rate == "p" else 0  # (the layer's feed-forward call, its attention weights')
    x = _rows(2, shape)
    kept = plan(model, x)
    for p in (1.0, 1.0, 0.2, 0.2, 0.2):
        setattr(module, rate, p)
        assert torch.equal(_fast(model, x, 3, kept), _general(model, x, 3, 3))
    (made,) = kept.fast_passes.values()
    assert isinstance(made, fast_pass.ModePass)
    assert made.noted is not None
    _, table, _ = made.noted[0]
    in_place = made.noted[2] or []
    taken = {i for i, _, _, _ in table} | {i for i, e in enumerate(in_place) if e is not None}
    assert index in taken, call


class _NoAttentionDropout(nn.Module):
    """An encoder whose attention does not drop: its layers run torch's own attention, whose
    output, transposed back to batch-first, is not contiguous, into the layer's dropout1 (of
    64 × 130 values a row: hashed in place, not made before the pass)."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(64, 2, 16, dropout=0.2, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        for each in self.encoder.layers:
            cast(nn.TransformerEncoderLayer, each).self_attn.dropout = 0.0
        self.head = nn.Linear(64, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(x).mean(1))


@pytest.mark.parametrize(("n", "n_samples"), [(1, 1), (2, 3)])
def test_a_call_in_place_on_an_activation_not_contiguous_gives_the_general_paths_samples(
    n: int, n_samples: int
) -> None:
    """A call hashed in place whose activation is not contiguous (a strided view NumPy would
    read in another order) is left to the context, which multiplies it as the general path
    does."""
    torch.manual_seed(0)
    model = _NoAttentionDropout().eval()
    x = _rows(n, (130, 64))
    kept = plan(model, x)
    for prefix in ("auto", "off"):
        for _ in range(3):  # the rates noted, then the calls in place
            fast = _fast(model, x, n_samples, kept, prefix=prefix)
            assert torch.equal(fast, _general(model, x, n_samples, 3, prefix=prefix))
        made = kept.fast_passes[n, n_samples, 0, DEFAULT_MAX_PASS_ROWS, prefix]
        assert isinstance(made, fast_pass.ModePass)
        assert made.noted is not None
        assert made.noted[2] is not None
        assert made.noted[2][2] is not None  # (the second layer's dropout1: in place)


class _Float64Encoder(EncoderClassifier):
    """A wide encoder of float64 in a model of float32 rows: its calls are of another dtype than
    the plan's, so none is made before the pass; each is multiplied in place in float64."""

    def __init__(self) -> None:
        super().__init__(WIDE)
        self.encoder.double()

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(x.double()).mean(1).float())


@pytest.mark.parametrize(("n", "n_samples"), [(1, 1), (2, 3)])
def test_an_encoder_of_float64_hashes_its_calls_in_place_in_float64(n: int, n_samples: int) -> None:
    """Float64 calls in a plan of float32 rows: multiplied in place in float64 with the pass's
    sample keys, the general path's samples; a plan of float64 rows has no fast pass."""
    torch.manual_seed(0)
    model = _Float64Encoder().eval()
    x = _rows(n, MODELS["transformer encoder"][1])
    kept = plan(model, x)
    for prefix in ("auto", "off"):
        for _ in range(2):  # the rates noted, then the calls hashed in place
            fast = _fast(model, x, n_samples, kept, prefix=prefix)
            assert torch.equal(fast, _general(model, x, n_samples, 3, prefix=prefix))
    (made, *_) = kept.fast_passes.values()
    assert isinstance(made, fast_pass.ModePass)
    assert made.noted is not None
    into = made.noted[2]
    assert into is not None
    assert {e[2] for e in into if e is not None} == {torch.float64}
    double = EncoderClassifier(WIDE).double().eval()
    rows = x.double()
    kept_double = plan(double, rows)
    assert fast_pass.run(kept_double, double, rows, 2, 3, DEFAULT_MAX_PASS_ROWS, "auto") is None
    assert torch.equal(
        sample(double, rows, 2, seed=3, plan=kept_double), sample(double, rows, 2, seed=3)
    )


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("caller", ["no_grad", "inference_mode"])
def test_callers_in_no_grad_or_inference_mode_get_the_same_samples(name: str, caller: str) -> None:
    """A caller's grad mode (no_grad, inference mode, rows that are inference tensors) changes
    nothing of the fast pass's samples: the general path's, inference tensors."""
    model, shape = _model(name)
    x = _rows(2, shape)
    kept = plan(model, x)
    expected = _general(model, x, 3, 3)
    mode = torch.no_grad if caller == "no_grad" else torch.inference_mode
    for _ in range(2):  # (a pass under the mode notes its rates, then makes them before it)
        with mode():
            rows = x.clone()
            fast = _fast(model, rows, 3, kept)
            again = sample(model, rows, 3, seed=3, plan=kept)
        assert torch.equal(fast, expected)
        assert torch.equal(again, expected)
        assert fast.is_inference()


def test_an_attention_no_longer_batch_first_is_the_kept_plans_error_on_both_paths() -> None:
    """An encoder layer's attention set sequence-first after the plan: the layer runs its own
    forward (the direct run is batch-first only), whose dropout inputs the plan does not know;
    set back, the samples before."""
    torch.manual_seed(0)
    model = EncoderClassifier().eval()
    x = _rows(2, MODELS["transformer encoder"][1])
    kept = plan(model, x)
    for _ in range(2):  # the rates noted, then the multipliers made before the pass
        want = _fast(model, x, 3, kept)
    attention = model.encoder.layers[1].self_attn
    attention.batch_first = False
    for seed in (1, torch.full((2,), 3, dtype=torch.int32)):  # the fast pass, the general path
        with pytest.raises(UnsupportedModelError, match="dropout call"):
            sample(model, x, 3, seed=seed, plan=kept)  # type: ignore[arg-type]
    attention.batch_first = True
    assert torch.equal(_fast(model, x, 3, kept), want)


@pytest.mark.parametrize("where", ["a layer's linear", "every module"])
def test_an_encoders_pass_made_under_a_hook_runs_the_twin_once_it_is_gone(where: str) -> None:
    """A hook keeps the twin from a pass while it is there (the pass runs the model under the
    mode, the hook called); made while one was, the fast pass runs the twin once it is gone,
    as the general path does."""
    torch.manual_seed(0)
    model = EncoderClassifier().eval()
    x = _rows(2, MODELS["transformer encoder"][1])
    kept = plan(model, x)
    calls: list[int] = []
    if where == "every module":
        _handles.append(nn.modules.module.register_module_forward_hook(_doubled(calls)))
        handle = _handles[-1]
    else:
        handle = model.encoder.layers[0].linear1.register_forward_hook(_doubled(calls))
    hooked = sample(model, x, 3, seed=1, plan=kept)  # the fast pass made
    assert calls
    (made,) = kept.fast_passes.values()
    assert isinstance(made, fast_pass.ModePass)
    handle.remove()
    for _ in range(2):
        got = sample(model, x, 3, seed=1, plan=kept)
        assert torch.equal(got, _general(model, x, 3, 1))
    assert not torch.equal(got, hooked)
    assert made.twin is not None


class _Stored(EncoderClassifier):
    """An encoder classifier whose forward keeps its encoder's output on itself and reads it
    back, with a barrier in between (where set) at which two threads' passes meet."""

    def __init__(self, feedforward: int = 16) -> None:
        super().__init__(feedforward)
        self.meet: threading.Barrier | None = None

    def forward(self, x: Tensor) -> Tensor:
        self.features = self.encoder(x)
        if self.meet is not None:
            self.meet.wait(timeout=30)
        return self.head(self.features.mean(1))


@pytest.mark.parametrize("feedforward", [16, WIDE])
def test_passes_on_two_threads_at_once_each_have_their_own_encoders_twin(feedforward: int) -> None:
    """The general path runs each pass on a twin of its own (EncoderLayers.twin): two threads'
    passes of one call shape at once, each writing an attribute in its forward and reading it
    back after the other has written it, get each their own samples on the fast pass too (the
    one that does not hold the kept buffer makes its multipliers and, where wide, the sample
    keys of its calls in place, of its own)."""
    torch.manual_seed(0)
    model = _Stored(feedforward).eval()
    shape = MODELS["transformer encoder"][1]
    rows = [_rows(2, shape, seed=1), _rows(2, shape, seed=2)]
    kept = plan(model, rows[0])
    for x in rows:  # the fast pass made, its rates noted
        _fast(model, x, 3, kept, seed=1)
    # the general path's samples (an int32 seed per row: the fast pass leaves it to it)
    seeds = torch.full((2,), 1, dtype=torch.int32)
    expected = [sample(model, x, 3, seed=seeds, plan=kept) for x in rows]
    model.meet = threading.Barrier(2)
    got: list[Tensor | None] = [None, None]
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            got[i] = _fast(model, rows[i], 3, kept, seed=1)
        except BaseException as e:  # (reported below, on the test's thread)
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for i in range(2):
        assert torch.equal(cast(Tensor, got[i]), expected[i]), f"thread {i}"


@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
def test_an_encoder_whose_fast_pass_keeps_a_twin_copies_as_it_is(how: str) -> None:
    """The kept twin's modules share the model's dicts; nothing of it is in the model's own:
    a copy holds the model's attributes alone, and samples as the model does."""
    torch.manual_seed(0)
    model = EncoderClassifier().eval()
    x = _rows(2, MODELS["transformer encoder"][1])
    for _ in range(2):  # (a kept plan, its fast pass and twin)
        want = sample(model, x, 3, seed=1)
    (kept,) = vars(model)["_mcdrop_plans"].plans.values()
    (made,) = kept.fast_passes.values()
    assert isinstance(made, fast_pass.ModePass)
    assert made.twin is not None
    if how == "deepcopy":
        other = copy.deepcopy(model)
    else:
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        other = torch.load(buffer, weights_only=False)
    for mine, its in zip(model.modules(), other.modules(), strict=True):
        assert type(mine) is type(its)
        assert set(vars(mine)) == set(vars(its))
    assert torch.equal(sample(other, x, 3, seed=1), want)
    assert torch.equal(sample(model, x, 3, seed=1), want)


@pytest.fixture
def _switching_often() -> object:
    """Threads switched every µs rather than every 5 ms: races show in fewer calls."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(before)


@pytest.mark.usefixtures("_switching_often")
@pytest.mark.parametrize(
    "name", ["transformer encoder", "wide transformer encoder", "one function, two rates"]
)
def test_threads_sampling_one_kept_plan_at_once_get_the_serial_samples(name: str) -> None:
    """Three threads sample one model through its kept plans (one and three rows, one and four
    samples, an int seed or one per row) while a fourth swaps the rates the forward reads
    (where wide, of a feed-forward call hashed in place): each call's samples are the general
    path's at one of the rates, called alone."""
    torch.manual_seed(0)
    encoder = name.endswith("transformer encoder")
    if encoder:
        model: nn.Module = MODELS[name][0]().eval()
        shape = MODELS[name][1]
        layers = [model.encoder.layers[0].dropout1, model.encoder.layers[1].dropout]
    else:
        model = _UnderTheMode(name).eval()
        shape = (6,)
    rates = ([0.3, 0.6], [0.6, 0.3])

    def set_rates(rates: list[float]) -> None:
        if encoder:
            for layer, p in zip(layers, rates, strict=True):
                layer.p = p
        else:
            model.rates = rates  # (read once a pass)

    xs = {n: _rows(n, shape, seed=n) for n in (1, 3)}
    kept = {n: plan(model, x) for n, x in xs.items()}
    calls = [(n, s, seed) for n in (1, 3) for s in (1, 4) for seed in ("one", "per row")]

    def seeds(n: int, seed: str, dtype: torch.dtype) -> Tensor:
        values = torch.full((n,), 5) if seed == "one" else torch.arange(n) * 7 + 11
        return values.to(dtype)

    # the general path's samples (an int32 seed per row) at every rate each call may see
    expected: dict[tuple[int, int, str], list[Tensor]] = {call: [] for call in calls}
    for a in rates[0]:
        for b in rates[1]:
            set_rates([a, b])
            for n, s, seed in calls:
                int32 = seeds(n, seed, torch.int32)
                expected[n, s, seed].append(sample(model, xs[n], s, seed=int32, plan=kept[n]))
    wrong: list[tuple[int, int, str]] = []
    done = threading.Event()

    def sampler(i: int) -> None:
        for k in range(40):
            n, s, seed = calls[(7 * k + i) % len(calls)]
            given = 5 if seed == "one" else seeds(n, seed, torch.int64)  # (the fast pass's)
            got = sample(model, xs[n], s, seed=given, plan=kept[n])
            if not any(torch.equal(got, e) for e in expected[n, s, seed]):
                wrong.append((n, s, seed))

    def swapper() -> None:
        k = 0
        while not done.is_set():
            set_rates(rates[k % 2])
            k += 1

    threads = [threading.Thread(target=sampler, args=(i,)) for i in range(3)]
    swapping = threading.Thread(target=swapper)
    swapping.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    done.set()
    swapping.join()
    assert not wrong
    assert all(type(f) is fast_pass.ModePass for k in kept.values() for f in k.fast_passes.values())


@pytest.mark.usefixtures("_switching_often")
@pytest.mark.parametrize(
    ("name", "kind"),
    [("CNN", fast_pass.ChainPass), ("keeps products", fast_pass.RoutedPass)],
)
def test_threads_sampling_a_pass_with_a_kept_buffer_get_the_serial_samples(
    name: str, kind: type[fast_pass.FastPass]
) -> None:
    """Three threads sample one model (whose passes keep their buffers of multipliers) at once:
    each call takes a buffer no other call is using, so each gets its samples as if called
    alone."""
    model, shape = _model(name)
    xs = {n: _rows(n, shape, seed=n) for n in (1, 2)}
    kept = {n: plan(model, x) for n, x in xs.items()}
    calls = [(n, s, seed) for n in (1, 2) for s in (1, 3) for seed in range(4)]
    expected = {(n, s, seed): _general(model, xs[n], s, seed) for n, s, seed in calls}
    wrong: list[tuple[int, int, int]] = []

    def sampler(i: int) -> None:
        for k in range(60):
            n, s, seed = calls[(5 * k + i) % len(calls)]
            if not torch.equal(
                sample(model, xs[n], s, seed=seed, plan=kept[n]), expected[n, s, seed]
            ):
                wrong.append((n, s, seed))

    threads = [threading.Thread(target=sampler, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not wrong
    passes = [f for k in kept.values() for f in k.fast_passes.values()]
    keeping = [f for f in passes if type(f) is kind and cast(fast_pass.ChainPass, f).keeps]
    assert len(keeping) == len(passes) == 4  # (rows 1 and 2, samples 1 and 3)
    assert all(len(cast(fast_pass.ChainPass, f).buffers) <= fast_pass.KEPT_BUFFERS for f in keeping)


@pytest.mark.parametrize("n_samples", [1, 3])
@pytest.mark.parametrize("seed", [1, "per row"])
def test_a_layer_of_another_width_since_the_plan_is_the_plans_error(
    n_samples: int, seed: object
) -> None:
    """A linear layer's weight swapped for one of another width: the chain's dropout gets
    other inputs than its multipliers were made for; the kept plan's passes (fast and
    general) say so, as the sampling context would, not torch's view error."""
    model, shape = _model("sequential")
    x = _rows(2, shape)
    kept = plan(model, x)
    model[0].weight = nn.Parameter(torch.randn(24, 6))
    model[0].bias = nn.Parameter(torch.randn(24))
    model[3].weight = nn.Parameter(torch.randn(16, 24))
    rows_seed = torch.tensor([1, 1]) if seed == "per row" else seed
    with pytest.raises(UnsupportedModelError, match=r"dropout call 1 received shape \(\d+, 24\)"):
        sample(model, x, n_samples, seed=rows_seed, plan=kept)  # type: ignore[arg-type]
    assert sample(model, x, n_samples, seed=1).shape == (n_samples, 2, 3)  # a new plan


@pytest.mark.parametrize("method", ["standardize", "destandardize"])
def test_a_standardized_models_method_set_on_the_instance_is_called(method: str) -> None:
    """Standardized.forward looks its two methods up on every call: one set on the instance
    after the plan runs, as it does in the model's own forward."""
    model, shape = _model("standardized MLP")
    x = _rows(2, shape)
    kept = plan(model, x)
    sample(model, x, 4, seed=1, plan=kept)
    own = getattr(model, method)
    setattr(model, method, lambda h: own(h) + 1)
    assert torch.equal(sample(model, x, 4, seed=1, plan=kept), sample(model, x, 4, seed=1))


def test_autocast_takes_the_general_path() -> None:
    model, shape = _model("sequential")
    x = _rows(2, shape)
    kept = plan(model, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fast_pass.run(kept, model, x, 4, 1, DEFAULT_MAX_PASS_ROWS, "auto")
        assert got is None
        general = sample(model, x, 4, seed=1, plan=kept)
    assert general.dtype == torch.bfloat16


ROWS: dict[str, Callable[[Tensor], Tensor]] = {
    "requiring grad": lambda x: x.clone().requires_grad_(True),
    "not contiguous": lambda x: torch.stack([x, x], 2)[..., 0],
    "with a negative bit": lambda x: (-x).conj_physical().neg().resolve_conj(),
    "a subclass": lambda x: nn.Parameter(x.clone(), requires_grad=False),
    "float64": lambda x: x.double(),
}


def _rgb_cnn() -> nn.Module:
    torch.manual_seed(0)
    return CNN(in_channels=3, channels=(4, 8), pool=(True, True), hidden=16, image_size=12).eval()


def _off(x: Tensor) -> Tensor:
    """``x``'s values in a contiguous tensor whose data starts 4 bytes past an aligned address."""
    return torch.cat([x.new_zeros(1), x.flatten()])[1:].view(x.shape)


LAYOUTS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], Callable[[Tensor], Tensor]]] = {
    "transposed, sequential": (_sequential, (6,), lambda x: x.t().contiguous().t()),
    "transposed, in-place first": (_inplace_first, (6,), lambda x: x.t().contiguous().t()),
    "transposed, dropout last": (_dropout_last, (6,), lambda x: x.t().contiguous().t()),
    "transposed, standardized MLP": (_standardized_mlp, (6,), lambda x: x.t().contiguous().t()),
    "4 bytes off, sequential": (_sequential, (6,), lambda x: _off(x)),
    "4 bytes off, dropout last": (_dropout_last, (6,), lambda x: _off(x)),
    "4 bytes off, CNN": (_rgb_cnn, (3, 12, 12), lambda x: _off(x)),
    "channels last, CNN": (
        _rgb_cnn, (3, 12, 12), lambda x: x.contiguous(memory_format=torch.channels_last)
    ),
}  # fmt: skip


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("n", [1, 3, 64])
@pytest.mark.parametrize("n_samples", [1, 4])
def test_rows_in_any_memory_layout_give_the_contiguous_rows_samples(
    layout: str, n: int, n_samples: int
) -> None:
    """A row's samples depend on its values, not on the strides or the alignment of the tensor it
    comes in: a matrix product and a convolution round differently on another layout, so each
    path copies such rows before the first layer."""
    factory, shape, arrange = LAYOUTS[layout]
    torch.manual_seed(0)
    model = factory().eval()
    x = _rows(n, shape)
    rows = arrange(x)
    before = rows.clone()
    kept = plan(model, x)
    expected = _general(model, x, n_samples, 3)
    assert torch.equal(_fast(model, rows, n_samples, kept), expected)
    assert torch.equal(sample(model, rows, n_samples, seed=3, plan=kept), expected)
    assert torch.equal(sample(model, rows, n_samples, seed=3), expected)
    assert torch.equal(rows, before)
    assert rows.stride() == before.stride()


@pytest.mark.parametrize("kind", ROWS)
def test_rows_of_any_kind_give_the_general_paths_samples(kind: str) -> None:
    model, shape = _model("sequential")
    x = _rows(2, shape)
    kept = plan(model, x)
    rows = ROWS[kind](x)
    if kind == "float64":
        with pytest.raises(InvalidArgumentError, match="plan was made for rows"):
            sample(model, rows, 3, seed=1, plan=kept)
        return
    assert torch.equal(sample(model, rows, 3, seed=1, plan=kept), sample(model, x, 3, seed=1))


def test_negative_zero_rows_sample_as_zero() -> None:
    model, shape = _model("sequential")
    x = torch.zeros(1, *shape)
    kept = plan(model, x)
    assert torch.equal(_fast(model, -x, 3, kept), _fast(model, x, 3, kept))


@pytest.mark.parametrize("case", ["one -0.0", "-0.0 in the second row", "its bytes across two"])
def test_rows_keyed_as_the_general_path_keys_them(case: str) -> None:
    """The fast pass finds a -0.0 in the finiteness loop rather than in the rows' bytes: a row
    with one samples as with 0.0 there, and bytes 00 00 00 80 across two values (no -0.0) are
    hashed as they are, as the general path's keys do."""
    model, shape = _model("sequential")
    x = _rows(2, shape)
    if case == "one -0.0":
        x[0, 1] = -0.0
    elif case == "-0.0 in the second row":
        x[1, -1] = -0.0
    else:  # a denormal's bytes 00 40 00 00, then 1.0039's 00 80 80 3F (little-endian)
        x.view(torch.int32)[0, :2] = torch.tensor([0x0000_4000, 0x3F80_8000], dtype=torch.int32)
        assert b"\x00\x00\x00\x80" in x.numpy().tobytes()
        assert not torch.signbit(x).logical_and(x == 0).any()
    kept = plan(model, x)
    (general,) = sample_chunks(model, x, 3, seed=5)
    assert torch.equal(_fast(model, x, 3, kept, seed=5), general.values)
    assert torch.equal(_fast(model, x + 0.0, 3, kept, seed=5), general.values)


@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("case", ["a -0.0", "its bytes across two"])
def test_rows_keyed_as_the_general_path_keys_them_with_denormals_flushed(case: str, n: int) -> None:
    """torch.set_flush_denormal(True) (a caller's choice for speed) makes ``values + 0.0``
    flush a denormal: a -0.0 written as 0.0 by its bits, on both paths, keeps the denormal's."""
    model, shape = _model("sequential")
    x = _rows(n, shape)
    x[:, 3] = -1e-40  # a negative denormal
    if case == "a -0.0":
        x[0, 1] = -0.0
    else:  # a denormal's bytes 00 40 00 00, then 1.0039's 00 80 80 3F (little-endian)
        x.view(torch.int32)[0, :2] = torch.tensor([0x0000_4000, 0x3F80_8000], dtype=torch.int32)
    kept = plan(model, x)
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU does not flush denormals")
    try:
        fast = _fast(model, x, 3, kept, seed=5)
        # (a per-row seed: the general path, which keys the row under it as under an int)
        general = sample(model, x, 3, seed=torch.full((n,), 5), plan=kept)
        flushed_keys = masks.row_keys(x, 5)
    finally:
        torch.set_flush_denormal(False)
    assert torch.equal(flushed_keys, masks.row_keys(x, 5))
    assert torch.equal(fast, general)


BAD_CALLS: dict[str, tuple[dict[str, object], type[Exception], str]] = {
    "NaN rows": ({"x": "nan"}, InvalidInputError, "NaN"),
    "a bool n_samples": ({"n_samples": True}, InvalidArgumentError, "n_samples"),
    "a float n_samples": ({"n_samples": 2.0}, InvalidArgumentError, "n_samples"),
    "no samples": ({"n_samples": 0}, InvalidArgumentError, "n_samples"),
    "a bool seed": ({"seed": True}, InvalidArgumentError, "seed"),
    "a seed too large": ({"seed": 2**63}, InvalidArgumentError, "seed"),
    "a negative seed": ({"seed": -1}, InvalidArgumentError, "seed"),
    "a bool max_pass_rows": ({"max_pass_rows": True}, InvalidArgumentError, "max_pass_rows"),
    "an unknown prefix": ({"prefix": "on"}, InvalidArgumentError, "prefix"),
    "another model": ({"model": "other"}, InvalidArgumentError, "another model"),
}


@pytest.mark.parametrize("case", BAD_CALLS)
def test_a_wrong_call_gets_the_general_paths_error(case: str) -> None:
    model, shape = _model("sequential")
    x = _rows(1, shape)
    kept = plan(model, x)
    sample(model, x, 1, seed=1, plan=kept)  # the call shape's fast pass is made
    changes, error, match = BAD_CALLS[case]
    kw: dict[str, object] = {"seed": 1, "plan": kept}
    args: dict[str, object] = {"model": model, "x": x, "n_samples": 1}
    for key, value in changes.items():
        if key == "x":
            args["x"] = torch.full_like(x, float("nan"))
        elif key == "model":
            args["model"] = _model("sequential")[0]
        elif key in args:
            args[key] = value
        else:
            kw[key] = value
    with pytest.raises(error, match=match):
        sample(args["model"], args["x"], args["n_samples"], **kw)  # type: ignore[arg-type]


def test_kept_fast_passes_are_bounded() -> None:
    model, shape = _model("sequential")
    kept = plan(model, _rows(1, shape))
    for n in range(1, fast_pass.MAX_KEPT + 10):
        sample(model, _rows(n, shape), 1, seed=0, plan=kept)
    assert 0 < len(kept.fast_passes) <= fast_pass.MAX_KEPT


def test_a_call_of_several_passes_has_none() -> None:
    model, shape = _model("sequential")
    x = _rows(3, shape)
    kept = plan(model, x)
    assert fast_pass.run(kept, model, x, 8, 1, 6, "auto") is None
    assert list(kept.fast_passes.values()) == [None]
    # the general path's passes of 6 rows, as a call with no plan makes them
    assert torch.equal(
        sample(model, x, 8, seed=1, plan=kept, max_pass_rows=6),
        sample(model, x, 8, seed=1, max_pass_rows=6),
    )


@pytest.mark.parametrize("name", ["dropout imported by name", "transformer encoder"])
def test_a_model_under_the_mode_in_training_mode_or_changed_takes_the_general_path(
    name: str,
) -> None:
    """A model run under the mode: a module in training mode, or one put in since the fast
    pass was made, and the call samples the model as it is now, BatchNorm untouched."""
    model, shape = _model(name)
    x = _rows(2, shape)
    kept = plan(model, x)
    assert kept.layers is None
    assert kept.routes is None
    sample(model, x, 3, seed=1, plan=kept)  # the fast pass is made and used
    assert isinstance(next(iter(kept.fast_passes.values())), fast_pass.ModePass)
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert torch.equal(sample(model, x, 3, seed=1, plan=kept), sample(model, x, 3, seed=1))
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(m.training for m in model.modules())
    model.eval()
    model.extra = nn.BatchNorm1d(1).train()  # a module put in since (its forward never calls it)
    assert fast_pass.run(kept, model, x, 3, 1, DEFAULT_MAX_PASS_ROWS, "auto") is None


class _ContentDependent(_Functional):
    """One dropout call fewer on rows whose first value is positive: the plan cannot key it."""

    def forward(self, x: Tensor) -> Tensor:
        h = F.dropout(torch.relu(self.norm(self.fc1(x))), 0.3, self.training)
        if bool(x[0, 0] <= 0):
            h = F.dropout(h, 0.1, self.training)
        return self.fc2(h)


def test_a_call_the_plan_does_not_have_gets_the_general_paths_error() -> None:
    torch.manual_seed(0)
    model = _ContentDependent().eval()
    negative, positive = -torch.ones(1, 6), torch.ones(1, 6)
    kept = plan(model, negative)
    sample(model, negative, 2, seed=1, plan=kept)  # the fast pass is made and used
    with pytest.raises(UnsupportedModelError, match="dropout call"):
        sample(model, positive, 2, seed=1, plan=kept)


def _general(
    model: nn.Module, x: Tensor, n_samples: int, seed: int | Tensor, prefix: str = "auto"
) -> Tensor:
    """The general path's samples of ``x``: its rows as a tensor that requires grad, which no
    fast pass takes (``sample`` without a plan keeps one and runs its fast pass, so its
    samples are no reference for the fast pass's)."""
    rows = x.detach().clone().requires_grad_(True)
    kept = plan(model, x)
    assert fast_pass.run(kept, model, rows, n_samples, seed, DEFAULT_MAX_PASS_ROWS, prefix) is None
    return sample(model, rows, n_samples, seed=seed, prefix=prefix)  # type: ignore[arg-type]


class _RoutedMLP(nn.Module):
    """A dropout module and a dropout function in a forward of its own: routed, every call's
    multipliers made before the pass (RoutedPass)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1, self.drop, self.fc2 = nn.Linear(width, 9), nn.Dropout(0.3), nn.Linear(9, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.dropout(torch.relu(self.drop(self.fc1(x))), 0.1, self.training))


class _ModeMLP(nn.Module):
    """:class:`_RoutedMLP` with torch's own dropout functions (which routing leaves alone), the
    first on the rows themselves: under the mode (ModePass), its multipliers made before the
    pass where few, else sampled by the context."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, 9), nn.Linear(9, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.fc1(torch.dropout(x, 0.2, True)))
        return self.fc2(torch.dropout(imported_dropout(h, 0.3, True), 0.1, True))


_ROW_SEEDS: dict[str, Callable[[int], Tensor]] = {
    "one per row": lambda n: torch.arange(n) + 5,
    "the largest": lambda n: torch.full((n,), 2**63 - 1),
    "strided": lambda n: torch.arange(2 * n)[::2],
    "expanded": lambda n: torch.tensor([7]).expand(n),
}


@pytest.mark.parametrize("kind", ["chain", "routed", "mode"])
@pytest.mark.parametrize(
    ("n", "width"),
    # around cpu_masks.FEW_VALUES (keyed with the multipliers, or by hashlib) and SHORT_ROW
    [(1, 2048), (1, 2049), (2, 1024), (2, 1025), (2, 8192), (2, 8193), (1, 1), (3, 31)],
)
def test_a_requests_rows_of_any_size_and_seeds_sample_as_on_the_general_path(
    kind: str, n: int, width: int
) -> None:
    """Rows of every size about the bounds of the one compiled call (keys, finiteness check
    and multipliers), under int seeds and per-row seeds of every layout, called in turn on a
    pass whose buffer of multipliers is kept (under the mode: once its rates are noted): each
    call's samples are the general path's (rows requiring grad: no fast pass), and earlier
    samples stay as they were."""
    torch.manual_seed(0)
    model = (
        nn.Sequential(
            nn.Linear(width, 7), nn.ReLU(), nn.Dropout(0.3), nn.Linear(7, 5), nn.Dropout(0.5),
            nn.Linear(5, 3),
        )
        if kind == "chain"
        else _RoutedMLP(width) if kind == "routed" else _ModeMLP(width)
    ).eval()  # fmt: skip
    x = _rows(n, (width,))
    x[0, 0] = -0.0
    kept = plan(model, x)
    seeds: list[int | Tensor] = [1, 2**63 - 1, 0, *(make(n) for make in _ROW_SEEDS.values())]
    got = []
    for seed in seeds:
        fast = _fast(model, x, 3, kept, seed=seed)
        assert torch.equal(fast, _general(model, x, 3, seed))
        got.append((fast, fast.clone()))
    assert all(torch.equal(fast, copy) for fast, copy in got)


def _scripted_first_layer() -> nn.Module:
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 3))
    net[0] = torch.jit.script(net[0])  # the model's first parameter: a scripted module's
    return net


class _ScriptedEncoderLayer(EncoderClassifier):
    def __init__(self) -> None:
        super().__init__()
        self.encoder.layers[0] = torch.jit.script(self.encoder.layers[0])


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("factory", [_scripted_first_layer, _ScriptedEncoderLayer])
def test_a_scripted_submodule_samples_as_on_the_general_path(
    factory: Callable[[], nn.Module],
) -> None:
    """A scripted submodule's dict of parameters is a wrapper without ``get``: where the model's
    first parameter is there, the kept plan's fast pass read its device from it, and raised
    AttributeError."""
    torch.manual_seed(0)
    model = factory().eval()
    x = _rows(2, (6,) if factory is _scripted_first_layer else (5, 8))
    kept = plan(model, x)
    rows = x.clone().requires_grad_(True)  # (the general path's: no fast pass takes them)
    for seed in (1, 2):
        expected = sample(model, rows, 3, seed=seed, plan=kept)
        assert torch.equal(_fast(model, x, 3, kept, seed=seed), expected)


#: An encoder layer's feed-forward rate and activation function, changed between passes: a
#: ReLU's applied in its dropout's in-place pass (ModeContext.relu_dropout_into), a GELU's
#: before it, at every lane width and a rate of 1.
_ACTIVATIONS = [
    (0.2, F.relu), (0.2, F.relu), (0.2, F.gelu), (1 / 256, F.gelu), (1 / 256, torch.relu),
    (0.5, torch.relu), (1.0, F.relu), (0.25, F.relu), (1 / 16, F.gelu), (0.2, F.relu),
]  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_an_encoders_activation_changed_between_passes_gives_the_general_paths_samples(
    dtype: torch.dtype,
) -> None:
    """A wide encoder's layers' activation function set between passes of one kept plan (ReLU
    to GELU and back, with the feed-forward rate): each pass's samples are the general path's
    and the mode's (its layers' own forward), bit for bit, under an int seed or one per row."""
    torch.manual_seed(0)
    model = _Float64Encoder() if dtype == torch.float64 else EncoderClassifier(WIDE)
    model.eval()
    x = _rows(2, MODELS["transformer encoder"][1])
    kept = plan(model, x)
    layers = [cast(nn.TransformerEncoderLayer, m) for m in model.encoder.layers]
    for p, activation in _ACTIVATIONS:
        for layer in layers:
            layer.dropout.p = p
            layer.activation = activation
        for seed in (3, torch.arange(2) + 7):
            expected = _general(model, x, 3, seed)
            assert torch.equal(_fast(model, x, 3, kept, seed=seed), expected), (p, activation)
            hook = layers[0].linear1.register_forward_hook(lambda module, args, out: None)
            try:  # (a hook: the layers' own forward, in the mode)
                assert torch.equal(sample(model, x, 3, seed=seed, plan=kept), expected)
            finally:
                hook.remove()
