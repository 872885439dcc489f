"""Dropout between the layers of nn.LSTM / nn.GRU / nn.RNN: sampled layer by layer, exactly
the fused kernel where nothing is dropped."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence

from mcdrop import plan, predict, sample
from mcdrop.exceptions import UnsupportedModelError
from mcdrop.rnn import layered

# torch's CPU build says so once for LSTMs with projections (a fact about its backend, not ours).
pytestmark = pytest.mark.filterwarnings("ignore:LSTM with projections:UserWarning")

KERNELS: dict[str, tuple[type[nn.RNNBase], Callable[..., object], dict[str, object]]] = {
    "lstm": (nn.LSTM, torch.lstm, {}),
    "lstm_proj": (nn.LSTM, torch.lstm, {"proj_size": 3}),
    "gru": (nn.GRU, torch.gru, {}),
    "rnn_tanh": (nn.RNN, torch.rnn_tanh, {}),
    "rnn_relu": (nn.RNN, torch.rnn_relu, {"nonlinearity": "relu"}),
}


class Last(nn.Module):
    """``(N, T, F) -> (N, K)``: a recurrent network's last output through a linear head."""

    def __init__(self, rnn: nn.RNNBase, out: int = 2) -> None:
        super().__init__()
        self.rnn = rnn
        width = (rnn.proj_size or rnn.hidden_size) * (2 if rnn.bidirectional else 1)
        self.head = nn.Linear(width, out)

    def forward(self, x: Tensor) -> Tensor:
        seq = x if self.rnn.batch_first else x.transpose(0, 1)
        out = self.rnn(seq)[0]
        return self.head(out[:, -1] if self.rnn.batch_first else out[-1])


def _state(rnn: nn.RNNBase, rows: int) -> Tensor | tuple[Tensor, Tensor]:
    """A non-zero initial state for ``rows`` rows."""
    layers = rnn.num_layers * (2 if rnn.bidirectional else 1)
    g = torch.Generator().manual_seed(3)
    h = torch.randn(layers, rows, rnn.proj_size or rnn.hidden_size, generator=g)
    if isinstance(rnn, nn.LSTM):
        return h, torch.randn(layers, rows, rnn.hidden_size, generator=g)
    return h


@pytest.mark.parametrize("name", sorted(KERNELS))
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
def test_layered_equals_the_fused_kernel(name: str, bidirectional: bool, batch_first: bool) -> None:
    cls, kernel, options = KERNELS[name]
    torch.manual_seed(0)
    rnn = cls(
        4, 5, num_layers=3, bidirectional=bidirectional, batch_first=batch_first, **options
    ).eval()
    x = torch.randn(6, 7, 4)  # (N, T, F) or (T, N, F)
    rows = x.shape[0] if batch_first else x.shape[1]
    hx = _state(rnn, rows)
    fused = rnn(x, hx)
    out = layered(
        kernel,
        x,
        hx,
        rnn._flat_weights,
        rnn.bias,
        rnn.num_layers,
        bidirectional,
        batch_first,
        lambda t: t,
    )
    states = fused[1] if isinstance(fused[1], tuple) else (fused[1],)
    assert len(out) == 1 + len(states)
    for got, want in zip(out, (fused[0], *states), strict=True):
        assert torch.allclose(got, want, atol=1e-6)


def test_sampling_drops_between_layers_only() -> None:
    """At rate 1 every inter-layer activation is dropped: the samples are the layered network
    with zeros between its layers, and nothing else changes."""
    torch.manual_seed(0)
    model = Last(nn.LSTM(4, 5, num_layers=2, dropout=1.0, batch_first=True)).eval()
    x = torch.randn(3, 6, 4)
    rnn = model.rnn
    zeros = layered(
        torch.lstm,
        x,
        (torch.zeros(2, 3, 5), torch.zeros(2, 3, 5)),
        rnn._flat_weights,
        True,
        2,
        False,
        True,
        torch.zeros_like,
    )[0]
    expected = model.head(zeros[:, -1])
    samples = sample(model, x, 4, seed=0)
    assert torch.allclose(samples, expected.expand(4, -1, -1), atol=1e-6)


@pytest.mark.parametrize("name", sorted(KERNELS))
@pytest.mark.parametrize("batch_first", [False, True])
def test_dropout_between_layers_is_sampled(name: str, batch_first: bool) -> None:
    cls, _, options = KERNELS[name]
    torch.manual_seed(0)
    rnn = cls(4, 5, num_layers=3, dropout=0.3, batch_first=batch_first, **options)
    model = Last(rnn).eval()
    x = torch.randn(4, 6, 4)
    made = plan(model, x)
    assert [c.kind for c in made.calls] == [f"{type(rnn).__name__} dropout between layers"] * 2
    assert made.calls[0].dim == (0 if batch_first else 1)
    assert not made.unsampled
    samples = sample(model, x, 16, seed=1)
    assert samples.var(0).min() > 0
    # Seeded per row: a row's samples do not depend on the other rows, the pass sizes or
    # whether the first layer ran once per row.
    alone = sample(model, x[2:3], 16, seed=1)
    assert torch.allclose(alone[:, 0], samples[:, 2], atol=1e-5)
    assert made.prefix
    cut = sample(model, x, 16, seed=1, max_pass_rows=12, prefix="off")
    assert torch.allclose(cut, samples, atol=1e-5)
    # Dropout stays off outside sampling, and the fused kernel's eval output is unchanged (as
    # predict runs it, outside autograd: with autograd on, some CPUs take another LSTM kernel,
    # which rounds otherwise)
    with torch.inference_mode():
        plain = model(x)
    assert torch.equal(predict(model, x), plain)


def test_mean_of_samples_approaches_the_training_mode_distribution() -> None:
    """The masks are torch's training-mode inter-layer dropout: the mean and spread of the
    sampled outputs match those of training-mode passes (which use the global RNG)."""
    torch.manual_seed(0)
    model = Last(nn.GRU(3, 8, num_layers=2, dropout=0.5, batch_first=True), out=1)
    x = torch.randn(1, 5, 3)
    mc = sample(model.eval(), x, 4000, seed=2)[:, 0, 0]
    model.train()
    with torch.no_grad():
        trained = torch.cat([model(x.expand(1000, -1, -1))[:, 0] for _ in range(4)])
    model.eval()
    assert abs(float(mc.mean() - trained.mean())) < 4 * float(trained.std()) * (2 / 4000) ** 0.5
    assert abs(float(mc.std() / trained.std()) - 1) < 0.1


@pytest.mark.parametrize(
    "rnn",
    [nn.LSTM(4, 5, num_layers=1, batch_first=True), nn.GRU(4, 5, num_layers=2, batch_first=True)],
    ids=["one_layer", "no_dropout"],
)
def test_no_dropout_between_layers_keeps_the_fused_kernel(rnn: nn.RNNBase) -> None:
    model = Last(rnn).eval()
    model.head = nn.Sequential(nn.Dropout(0.2), model.head)
    made = plan(model, torch.randn(2, 3, 4))
    assert [c.kind for c in made.calls] == ["dropout"]
    assert not made.unsampled


class Packed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(4, 5, num_layers=2, dropout=0.3, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        lengths = torch.full((x.shape[0],), x.shape[1])
        return self.rnn(pack_padded_sequence(x, lengths, batch_first=True))[1][0][-1]


def test_packed_sequences_with_dropout_between_layers_are_refused() -> None:
    with pytest.raises(UnsupportedModelError, match="PackedSequence"):
        sample(Packed().eval(), torch.randn(2, 3, 4), 4, seed=0)
