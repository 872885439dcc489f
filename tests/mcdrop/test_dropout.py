"""Every dropout kind is sampled; only dropout is switched on; modes are never left changed."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mcdrop import (
    DropConnectLinear,
    LockedDropout,
    attention,
    dropout_modules,
    is_sampling,
    plan,
    predict,
    sample,
)
from mcdrop.exceptions import NoDropoutError, UnsupportedModelError
from mcdrop.sampling_context import SamplingContext


class FunctionalDropout(nn.Module):
    """Dropout written the common way inside a custom forward."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 8)

    def forward(self, x: Tensor) -> Tensor:
        return F.dropout(self.fc(x), p=0.3, training=self.training)


class TorchDropout(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return torch.dropout(x, 0.3, self.training)


class Attention(nn.Module):
    def __init__(self, need_weights: bool) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2, dropout=0.3, batch_first=True)
        self.need_weights = need_weights

    def forward(self, x: Tensor) -> Tensor:
        return self.mha(x, x, x, need_weights=self.need_weights)[0]


class SeqFirstAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2, dropout=0.3)

    def forward(self, x: Tensor) -> Tensor:  # x: (N, L, E), the module wants (L, N, E)
        q = x.transpose(0, 1)
        return self.mha(q, q, q, need_weights=False)[0].transpose(0, 1)


class ScaledDotProduct(nn.Module):
    """Attention written with ``F.scaled_dot_product_attention``, its rate given in training and
    under MC sampling (the form :func:`mcdrop.is_sampling` documents)."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 24)
        self.p = 0.3

    def forward(self, x: Tensor) -> Tensor:  # (N, L, 8) -> (N, L, 8)
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, 4)).permute(2, 0, 3, 1, 4)  # (N, 2, L, 4) each
        p = self.p if self.training or is_sampling() else 0.0
        return F.scaled_dot_product_attention(q, k, v, dropout_p=p).transpose(1, 2).flatten(2)


class Recurrent(nn.Module):
    """A recurrent layer's output sequence, batch first whatever the layer's own layout."""

    def __init__(self, rnn: nn.RNNBase) -> None:
        super().__init__()
        self.rnn = rnn

    def forward(self, x: Tensor) -> Tensor:  # (N, T, F) -> (N, T, H)
        if self.rnn.batch_first:
            return self.rnn(x)[0]
        return self.rnn(x.transpose(0, 1))[0].transpose(0, 1)


def _encoder(layers: int) -> nn.Module:
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.2, batch_first=True)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)


CASES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "dropout": (lambda: nn.Dropout(0.3), (3, 4, 5)),
    "dropout1d": (lambda: nn.Dropout1d(0.3), (3, 4, 5)),
    "dropout2d": (lambda: nn.Dropout2d(0.3), (3, 4, 5, 5)),
    "dropout3d": (lambda: nn.Dropout3d(0.3), (3, 4, 2, 5, 5)),
    "alpha": (lambda: nn.AlphaDropout(0.3), (3, 10)),
    "feature_alpha": (lambda: nn.FeatureAlphaDropout(0.3), (3, 4, 5, 5)),
    "functional": (FunctionalDropout, (3, 4)),
    "torch.dropout": (TorchDropout, (3, 4)),
    "mha": (lambda: Attention(need_weights=False), (3, 5, 8)),
    "mha_weights": (lambda: Attention(need_weights=True), (3, 5, 8)),
    "mha_seq_first": (SeqFirstAttention, (3, 5, 8)),
    "transformer_layer": (
        lambda: nn.TransformerEncoderLayer(8, 2, 16, dropout=0.2, batch_first=True),
        (3, 5, 8),
    ),
    "transformer_encoder": (lambda: _encoder(2), (3, 5, 8)),
    "scaled_dot_product": (ScaledDotProduct, (3, 5, 8)),
    "lstm_between_layers": (lambda: Recurrent(nn.LSTM(4, 6, 2, dropout=0.3)), (3, 5, 4)),
    "gru_between_layers": (
        lambda: Recurrent(nn.GRU(4, 6, 3, dropout=0.3, batch_first=True)),
        (3, 5, 4),
    ),
    "dropconnect": (lambda: DropConnectLinear(4, 3, p=0.3), (3, 4)),
    "locked": (lambda: LockedDropout(0.3), (3, 6, 4)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_kind_gives_nonzero_variance(name: str) -> None:
    factory, shape = CASES[name]
    torch.manual_seed(0)
    model = factory().eval()
    x = torch.randn(*shape)
    samples = sample(model, x, 32, seed=0)
    assert samples.shape == (32, *model(x).shape)
    assert samples.var(0).mean() > 1e-4
    # ...and the model's own deterministic output is unchanged: dropout is off outside sampling.
    assert torch.allclose(predict(model, x), model(x), atol=1e-6)


@pytest.mark.parametrize("name", ["mha", "transformer_layer", "transformer_encoder"])
def test_transformer_variance_under_inference_mode(name: str) -> None:
    """The fast path of nn.Transformer* under no_grad/inference_mode skips dropout; not here."""
    factory, shape = CASES[name]
    model = factory().eval()
    with torch.inference_mode():
        samples = sample(model, torch.randn(*shape), 16, seed=1)
    assert samples.var(0).mean() > 1e-4


class MaskedAttention(nn.Module):
    """Self- or cross-attention with attention and key-padding masks, bool or float."""

    def __init__(self, cross: bool, bool_masks: bool) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2, dropout=0.3, batch_first=True)
        self.cross, self.bool_masks = cross, bool_masks

    def forward(self, x: Tensor) -> Tensor:
        length = x.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool).triu(1)  # True: masked out
        padding = torch.zeros(x.shape[0], length, dtype=torch.bool)
        padding[:, -1] = True
        if not self.bool_masks:
            causal = torch.zeros(causal.shape).masked_fill(causal, float("-inf"))
            padding = torch.zeros(padding.shape).masked_fill(padding, float("-inf"))
        kv = x.flip(1) if self.cross else x
        out, _ = self.mha(x, kv, kv, attn_mask=causal, key_padding_mask=padding, need_weights=False)
        return out


@pytest.mark.parametrize(
    "factory",
    [
        lambda: Attention(need_weights=False),
        SeqFirstAttention,
        lambda: MaskedAttention(cross=False, bool_masks=True),
        lambda: MaskedAttention(cross=True, bool_masks=False),
        lambda: _encoder(2),
    ],
    ids=["self", "seq_first", "masked_bool", "cross_float_masks", "encoder"],
)
def test_fast_attention_equals_the_general_path(factory, monkeypatch: pytest.MonkeyPatch) -> None:
    # The plain-torch attention must draw the same masks and compute the same outputs as the
    # general path through torch's own multi_head_attention_forward.
    torch.manual_seed(0)
    model = factory().eval()
    x = torch.randn(3, 5, 8)
    fast = sample(model, x, 16, seed=4)
    monkeypatch.setattr(attention, "self_attention_fast", lambda ctx, args, kwargs: None)
    general = sample(model, x, 16, seed=4)
    assert torch.allclose(fast, general, atol=1e-5)
    assert fast.var(0).mean() > 1e-4


@pytest.mark.parametrize(
    ("module", "shape", "unit_shape"),
    [
        (nn.Dropout2d(0.5), (4, 6, 3, 3), (4, 6, 1, 1)),
        (nn.Dropout1d(0.5), (4, 6, 7), (4, 6, 1)),
        (LockedDropout(0.5), (4, 7, 6), (4, 1, 6)),
    ],
)
def test_structured_masks(module: nn.Module, shape: tuple[int, ...], unit_shape: tuple[int, ...]):
    """Channel dropout drops whole channels; locked dropout reuses one mask over time."""
    x = torch.ones(shape)
    out = sample(nn.Sequential(module).eval(), x, 8, seed=3)
    reduce_dims = [d + 1 for d, n in enumerate(unit_shape) if n == 1]
    lo = out.amin(dim=reduce_dims, keepdim=True)
    hi = out.amax(dim=reduce_dims, keepdim=True)
    assert torch.equal(lo, hi)
    assert set(out.unique().tolist()) == {0.0, 2.0}


class ChannelDropout(nn.Module):
    """``F.dropout1d`` called in a custom ``forward``, on a 2-d ``(N, F)`` activation."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x: Tensor) -> Tensor:
        return F.dropout1d(self.fc(x), 0.5, self.training)


@pytest.mark.parametrize(
    ("factory", "shape"),
    [
        (lambda: nn.Sequential(nn.Linear(6, 6), nn.Dropout1d(0.5)), (4, 6)),
        (lambda: nn.Sequential(nn.Dropout1d(0.5, inplace=True)), (4, 6)),
        (lambda: nn.Sequential(nn.Dropout3d(0.5)), (4, 3, 2, 2)),
        (ChannelDropout, (4, 6)),
    ],
)
def test_channel_dropout_of_an_unbatched_rank_drops_whole_rows(
    factory: Callable[[], nn.Module], shape: tuple[int, ...]
) -> None:
    """``F.dropout1d`` takes a 2-d input, and ``F.dropout3d`` a 4-d one, as one unbatched sample
    whose channels run over dimension 0 (here the rows): in training torch keeps or drops each
    row whole, and so must sampling."""
    torch.manual_seed(0)
    model = factory().eval()
    x = torch.rand(shape) + 1
    model.train()
    trained = model(x)
    model.eval()
    zero = trained.flatten(1) == 0
    assert torch.equal(zero.all(1), zero.any(1))
    out = sample(model, x, 32, seed=3).flatten(2)  # (S, N, F...)
    dropped = (out == 0).all(2)
    assert torch.equal(dropped, (out == 0).any(2))  # each row kept or dropped whole
    assert 0 < dropped.float().mean() < 1
    kept = ~dropped
    assert torch.allclose(out[kept], (2 * predict(model, x)).flatten(1).expand_as(out)[kept])


class ViewAfterDropout(nn.Module):
    """Dropout, then ``.view`` (which needs the activation's own layout), on a sequence batch."""

    def __init__(self, batch_first: bool, width: int) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(width, 2)

    def forward(self, x: Tensor) -> Tensor:  # x: (N, T, F)
        h = x if self.batch_first else x.transpose(0, 1).contiguous()
        h = self.drop(h)
        out = self.fc(h.view(-1, h.shape[-1])).view(*h.shape[:2], 2)
        return out.mean(1 if self.batch_first else 0)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("width", [64, 50])  # 50: not a whole number of mask words
def test_dropout_output_keeps_the_input_layout(batch_first: bool, width: int) -> None:
    model = ViewAfterDropout(batch_first, width).eval()
    x = torch.randn(3, 4, width)
    for prefix in ("auto", "off"):
        out = sample(model, x, 5, seed=1, prefix=prefix)
        assert out.shape == (5, 3, 2)


@pytest.mark.parametrize(("rows", "samples"), [(1, 1), (1, 6), (3, 1)])
def test_inplace_dropout_never_touches_the_callers_input(rows: int, samples: int) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Dropout(0.5, inplace=True), nn.Linear(5, 2)).eval()
    x = torch.randn(rows, 5)
    before = x.clone()
    out = sample(model, x, samples, seed=2)
    assert torch.equal(x, before)
    assert out.shape == (samples, rows, 2)
    # Each replicated row got its own mask (no aliasing through a broadcast row).
    if samples > 1:
        assert out.var(0).sum() > 0


def test_inverted_dropout_is_unbiased() -> None:
    """E[dropout(x)] = x, so the MC mean of a linear model converges to the eval output."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 20), nn.Dropout(0.5), nn.Linear(20, 2)).eval()
    x = torch.randn(3, 5)
    mc = sample(model, x, 20000, seed=0).mean(0)
    assert torch.allclose(mc, predict(model, x), atol=0.03)


def test_alpha_dropout_keeps_self_normalisation() -> None:
    x = torch.randn(1, 200_000)
    out = sample(nn.Sequential(nn.AlphaDropout(0.2)).eval(), x, 4, seed=0)
    assert out.mean().item() == pytest.approx(0.0, abs=0.01)
    assert out.var().item() == pytest.approx(1.0, abs=0.02)


def test_dropconnect_drops_weights_per_row() -> None:
    layer = DropConnectLinear(30, 1, p=0.5, bias=False).eval()
    with torch.no_grad():
        layer.weight.fill_(1.0)
    x = torch.ones(2, 30)
    x[1] = 2.0
    out = sample(layer, x, 200, seed=0)  # row 0: 2 × (number of kept weights)
    assert set(out[:, 0].unique().remainder(2).tolist()) == {0.0}
    assert out[:, 0].mean().item() == pytest.approx(30.0, rel=0.05)
    assert not torch.equal(2 * out[:, 0], out[:, 1])  # rows get their own weight masks
    # Identical rows are identical inputs: same seed, same samples.
    assert torch.equal(sample(layer, torch.ones(2, 30), 20, seed=0)[:, 0], out[:20, 0])


def test_dropconnect_and_locked_train_mode() -> None:
    torch.manual_seed(0)
    dc = DropConnectLinear(4, 3, p=0.5).train()
    assert not torch.equal(dc(torch.ones(1, 4)), dc(torch.ones(1, 4)))
    locked = LockedDropout(0.5).train()
    out = locked(torch.ones(2, 5, 8))
    assert torch.equal(out[:, :1].expand_as(out), out)


def test_no_dropout_is_an_error() -> None:
    with pytest.raises(NoDropoutError, match="no stochastic dropout"):
        sample(nn.Linear(3, 2).eval(), torch.randn(2, 3), 4, seed=0)


def test_zero_rate_is_an_error() -> None:
    model = nn.Sequential(nn.Linear(3, 2), nn.Dropout(0.0)).eval()
    with pytest.raises(NoDropoutError):
        sample(model, torch.randn(2, 3), 4, seed=0)


def test_batchnorm_stays_in_eval_and_is_not_updated(mlp: nn.Module, x: Tensor) -> None:
    bn = mlp[1]
    before = (bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked))
    samples = sample(mlp, x, 50, seed=0)
    assert torch.equal(bn.running_mean, before[0])
    assert torch.equal(bn.running_var, before[1])
    assert int(bn.num_batches_tracked) == before[2]
    # Eval BatchNorm is affine per row, so one row alone gives the same samples.
    assert torch.allclose(sample(mlp, x[:1], 50, seed=0)[:, 0], samples[:, 0], atol=1e-6)


def _modes(model: nn.Module) -> list[bool]:
    return [m.training for m in model.modules()]


@pytest.mark.parametrize("kept", [False, True])  # a kept plan: the layer chain's own path
def test_modes_restored_exactly(mlp: nn.Module, x: Tensor, kept: bool) -> None:
    made = plan(mlp, x) if kept else None
    mlp.train()
    mlp[1].eval()  # a mixed state must come back as it was
    before = _modes(mlp)
    bn_mean = mlp[1].running_mean.clone()
    sample(mlp, x, 10, seed=0, plan=made)
    predict(mlp, x)
    assert _modes(mlp) == before
    assert torch.equal(mlp[1].running_mean, bn_mean)


@pytest.mark.parametrize("kept", [False, True])
def test_train_mode_model_samples_with_eval_batchnorm(
    mlp: nn.Module, x: Tensor, kept: bool
) -> None:
    made = plan(mlp, x) if kept else None
    eval_samples = sample(mlp, x, 10, seed=0, plan=made)
    mlp.train()
    running = mlp[1].running_mean.clone()
    assert torch.equal(sample(mlp, x, 10, seed=0, plan=made), eval_samples)
    assert torch.equal(mlp[1].running_mean, running)


class Exploding(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.5)
        self.bn = nn.BatchNorm1d(3)

    def forward(self, x: Tensor) -> Tensor:
        self.drop(x)
        raise RuntimeError("boom")


def test_modes_restored_when_forward_raises() -> None:
    model = Exploding().train()
    with pytest.raises(RuntimeError, match="boom"):
        sample(model, torch.randn(2, 3), 4, seed=0)
    assert all(_modes(model))
    with pytest.raises(RuntimeError, match="boom"):
        predict(model, torch.randn(2, 3))
    assert all(_modes(model))
    # The thread is not left inside a sampling context either.
    assert torch.equal(nn.Dropout(0.5).eval()(torch.ones(3)), torch.ones(3))


def test_dropout_outside_sampling_is_untouched() -> None:
    with SamplingContext(torch.arange(2, dtype=torch.int64)):
        pass
    assert not torch._C._is_torch_function_mode_enabled()


def test_dropout_input_without_batch_dimension_is_refused() -> None:
    class Pooled(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return F.dropout(x.sum(0), 0.5, self.training)  # mixes the batch away

    with pytest.raises(UnsupportedModelError, match="batch"):
        sample(Pooled().eval(), torch.randn(3, 5), 4, seed=0, prefix="off")


def test_dropout_modules_lists_stochastic_layers() -> None:
    model = nn.Sequential(
        nn.Linear(2, 2), nn.Dropout(0.1), nn.Dropout(0.0), Attention(False), LockedDropout(0.2)
    )
    names = [name for name, _ in dropout_modules(model)]
    assert names == ["1", "3.mha", "4"]


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_rate_matches_p(p: float) -> None:
    x = torch.arange(1.0, 5.0)[:, None].expand(4, 5000)  # distinct rows: independent masks
    out = sample(nn.Sequential(nn.Dropout(p)).eval(), x, 20, seed=0)
    rate = (out == 0).double().mean().item()
    assert rate == pytest.approx(p, abs=4 * math.sqrt(p * (1 - p) / out.numel()) + 1e-4)
    scaled = out / x
    kept = scaled[out != 0]
    assert torch.allclose(kept, torch.full_like(kept, 1 / (1 - p)), rtol=1e-4)


def test_dropconnect_masks_are_built_in_bounded_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Per-row weight masks are generated a block of rows at a time, with the same result."""
    import mcdrop.dropout as dropout_module

    torch.manual_seed(0)
    layer = DropConnectLinear(12, 5, p=0.3).eval()
    x = torch.randn(7, 12)
    whole = sample(layer, x, 6, seed=1)
    monkeypatch.setattr(dropout_module, "DROPCONNECT_BUDGET", 12 * 5 * 4)  # 4 rows per block
    assert torch.allclose(sample(layer, x, 6, seed=1), whole, atol=1e-6)


@pytest.mark.parametrize("batch_first", [True, False])
def test_attention_samples_match_a_naive_reference(batch_first: bool) -> None:
    """nn.MultiheadAttention under sampling, by hand in float64 for every replicated row: the
    softmax weights times that row's multipliers (made from its key as :mod:`mcdrop.masks`
    documents), then the values and the output projection."""
    from mcdrop import masks

    torch.manual_seed(2)
    heads, length, embed, n_rows, n_samples, p = 2, 5, 8, 3, 6, 0.25
    mha = nn.MultiheadAttention(embed, heads, dropout=p, batch_first=batch_first).eval()

    class SelfAttention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mha = mha

        def forward(self, x: Tensor) -> Tensor:
            seq = x if batch_first else x.transpose(0, 1)
            out = self.mha(seq, seq, seq, need_weights=False)[0]
            return out if batch_first else out.transpose(0, 1)

    x = torch.randn(n_rows, length, embed)
    samples = sample(SelfAttention(), x, n_samples, seed=5)  # (S, N, L, E)
    keys = masks.sample_keys(masks.row_keys(x, 5), 0, n_samples)  # (S·N,), sample-major
    per_row = heads * length * length
    scale = masks.keep_scale(keys, 0, per_row, p, torch.float64)
    scale = scale.view(n_samples, n_rows, heads, length, length)
    w_in, b_in = mha.in_proj_weight.double(), mha.in_proj_bias.double()
    w_out, b_out = mha.out_proj.weight.double(), mha.out_proj.bias.double()
    with torch.no_grad():
        q, k, v = (x.double() @ w_in.T + b_in).chunk(3, dim=-1)  # (N, L, E) each
        q, k, v = (t.view(n_rows, length, heads, -1).transpose(1, 2) for t in (q, k, v))
        weights = torch.softmax(q @ k.transpose(-2, -1) / (embed // heads) ** 0.5, dim=-1)
        out = (weights * scale) @ v  # (S, N, H, L, E / H)
        out = out.transpose(2, 3).reshape(n_samples, n_rows, length, embed)
        reference = out @ w_out.T + b_out
    assert torch.allclose(samples.double(), reference, atol=1e-5)
