"""Which layers are stochastic under MC sampling, and the dropout kinds torch does not ship.

:data:`DROPOUT_TYPES` and :func:`dropout_modules` say which modules of a model sample;
:class:`DropConnectLinear` (weights dropped) and :class:`LockedDropout` (variational dropout for
sequences) behave like torch's layers in training and under MC sampling draw their masks from the
thread's :class:`~mcdrop.sampling_context.SamplingContext`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mcdrop import masks
from mcdrop.exceptions import UnsupportedModelError
from mcdrop.sampling_context import SamplingContext, active_context, check_p

#: Most DropConnect weight-mask elements held at once (float32: 64 MiB).
DROPCONNECT_BUDGET = 1 << 24


class DropConnectLinear(nn.Linear):
    """A linear layer with DropConnect (Wan et al. 2013): weights, not activations, are dropped.

    In training one weight mask is drawn per forward pass (inverted scaling, so eval needs no
    rescaling); under MC sampling every replicated row gets its own weight mask.

    Shapes: ``(N, ..., in_features) -> (N, ..., out_features)``.
    """

    def __init__(self, in_features: int, out_features: int, p: float = 0.5, bias: bool = True):
        super().__init__(in_features, out_features, bias=bias)
        check_p(p)
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        ctx = active_context()
        if ctx is not None and self.p > 0.0:
            return _sampled_dropconnect(ctx, x, self.weight, self.bias, self.p)
        if self.training and self.p > 0.0:
            keep = torch.rand_like(self.weight) >= self.p
            return F.linear(x, self.weight * keep / (1.0 - self.p), self.bias)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, p={self.p}"


class LockedDropout(nn.Module):
    """Variational ("locked") dropout for sequences (Gal & Ghahramani 2016b; Merity et al. 2018):
    one mask per sequence over the feature dimension, reused at every time step.

    Shapes: ``(N, T, F)`` if ``batch_first`` else ``(T, N, F)``; output has the same shape.
    """

    def __init__(self, p: float = 0.5, batch_first: bool = True) -> None:
        super().__init__()
        check_p(p)
        self.p = p
        self.batch_first = batch_first

    def forward(self, x: Tensor) -> Tensor:
        ctx = active_context()
        if ctx is not None:
            return _sampled_locked_dropout(ctx, x, self.p, batch_first=self.batch_first)
        if not self.training or self.p == 0.0:
            return x
        batch_dim = 0 if self.batch_first else 1
        shape = [1, 1, x.shape[-1]]
        shape[batch_dim] = x.shape[batch_dim]
        keep = (torch.rand(shape, device=x.device) >= self.p).to(x.dtype) / (1.0 - self.p)
        return x * keep

    def extra_repr(self) -> str:
        return f"p={self.p}, batch_first={self.batch_first}"


def _sampled_dropconnect(
    ctx: SamplingContext, x: Tensor, weight: Tensor, bias: Tensor | None, p: float
) -> Tensor:
    """A linear layer whose weights are dropped, independently for every replicated row.

    Args:
        x: ``(B, ..., in)`` inputs, batch first.
        weight: ``(out, in)``; bias: ``(out,)``.

    Returns:
        ``(B, ..., out)``.
    """
    ctx.check_rate(p)
    found = ctx.rows(x, "DropConnectLinear", batch_dim=0)
    if found is None:
        return F.linear(x, weight, bias)
    x, call = found
    out_f, in_f = weight.shape
    flat = x.reshape(ctx.batch, -1, in_f)  # (B, L, in)
    y = flat.new_empty(ctx.batch, flat.shape[1], out_f)
    # Every row has its own (out, in) weight mask: build them a block of rows at a time so
    # the masks never exceed DROPCONNECT_BUDGET elements, whatever the chunk size.
    step = max(1, DROPCONNECT_BUDGET // (out_f * in_f))
    for start in range(0, ctx.batch, step):
        rows = slice(start, min(start + step, ctx.batch))
        scale = masks.keep_scale(ctx.keys[rows], call.index, out_f * in_f, p, weight.dtype)
        w = scale.view(-1, out_f, in_f).mul_(weight)  # (b, out, in)
        torch.bmm(flat[rows], w.transpose(1, 2), out=y[rows])  # (b, L, out)
    if bias is not None:
        y += bias
    return y.reshape(*x.shape[:-1], out_f)


def _sampled_locked_dropout(
    ctx: SamplingContext, x: Tensor, p: float, *, batch_first: bool
) -> Tensor:
    """Variational dropout: one mask per row over the last (feature) dimension, reused at
    every time step.

    Args:
        x: ``(B, T, F)`` if ``batch_first`` else ``(T, B, F)``.
    """
    ctx.check_rate(p)
    if p == 0.0:
        return x
    kind = f"LockedDropout(batch_first={batch_first})"
    if x.dim() != 3:
        raise UnsupportedModelError(
            f"{kind} expects a 3-d sequence batch, got shape {tuple(x.shape)}"
        )
    batch_dim = 0 if batch_first else 1
    found = ctx.rows(x, kind, batch_dim)
    if found is None:
        return x
    x, call = found
    return x * ctx.scale(call, x.shape[-1], p, x.dtype).unsqueeze(1 - batch_dim)


#: Module types whose forward is stochastic under MC sampling (when their rate is above zero).
DROPOUT_TYPES: tuple[type[nn.Module], ...] = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
    DropConnectLinear,
    LockedDropout,
)


def dropout_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The named submodules that dropout under MC sampling (rate above zero).

    Covers torch's dropout layers, mcdrop's own kinds and ``nn.MultiheadAttention`` with
    attention dropout. Dropout written as ``F.dropout`` inside a custom ``forward`` is invisible
    here but still sampled; :func:`mcdrop.sampling.sample` counts the calls at run time.
    """
    found = []
    for name, module in model.named_modules():
        rate = getattr(module, "p", None) if isinstance(module, DROPOUT_TYPES) else None
        if isinstance(module, nn.MultiheadAttention):
            rate = module.dropout
        if rate:
            found.append((name, module))
    return found
