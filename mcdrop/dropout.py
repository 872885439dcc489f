"""Which layers are stochastic, and switching them on for MC sampling only.

Sampling never changes a module's ``training`` flag. Instead, a forward pass runs inside a
:class:`SamplingContext`, which pushes a thread-local ``TorchFunctionMode``: every dropout call
of the forward (``nn.Dropout*``, ``AlphaDropout``, ``FeatureAlphaDropout``, ``F.dropout(...,
training=self.training)`` in a custom ``forward``, and the attention dropout inside
``nn.MultiheadAttention``) is intercepted and made stochastic with a seeded mask from
:mod:`mcdrop.masks`, while everything else (BatchNorm included) runs in eval mode. Because the
mode lives on the calling thread, a deterministic prediction on another thread at the same moment
sees a plain eval model. An active torch-function mode also switches off PyTorch's transformer
fast path, which would otherwise skip dropout entirely.

The context also counts stochastic calls, so a model without dropout is reported instead of
returning a silent zero variance.

This module also defines the dropout kinds torch lacks: :class:`DropConnectLinear` and
:class:`LockedDropout` (variational dropout for sequences).
"""

from __future__ import annotations

import contextvars
import inspect
import math
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from mcdrop import masks
from mcdrop.exceptions import UnsupportedModelError

#: Most DropConnect weight-mask elements held at once (float32: 64 MiB).
DROPCONNECT_BUDGET = 1 << 24

# SELU's constants, as torch's alpha_dropout uses them.
_ALPHA = 1.7580993408473766

_active: contextvars.ContextVar[SamplingContext | None] = contextvars.ContextVar(
    "mcdrop_sampling_context", default=None
)


def active_context() -> SamplingContext | None:
    """The sampling context of the current thread, or None outside MC sampling."""
    return _active.get()


class SamplingContext:
    """Makes every dropout in a forward pass stochastic, with masks keyed per replicated row.

    Args:
        keys: ``(B,)`` int64 keys, one per row of the replicated batch ``B = S * N``
            (sample-major, see :func:`mcdrop.masks.sample_keys`).
        replicate: when > 1, the forward receives the ``N = B / replicate`` original rows and the
            context replicates the activations ``replicate`` times at the first dropout call, so
            the deterministic layers before it run once per row instead of once per sample.
    """

    def __init__(self, keys: Tensor, *, replicate: int = 1) -> None:
        self.keys = keys
        self.replicate = replicate
        self.batch = keys.shape[0] // replicate
        self.calls = 0
        self.row_bytes = 0  # bytes per replicated row of the largest dropout input seen
        self.first_call_at: float | None = None  # perf_counter() at the first dropout call
        self._modes: list[Any] = []
        self._token: contextvars.Token[SamplingContext | None] | None = None

    def __enter__(self) -> SamplingContext:
        self._token = _active.set(self)
        mode = _DropoutMode(self)
        mode.__enter__()
        self._modes.append(mode)
        return self

    def __exit__(self, *exc: object) -> None:
        self._modes.pop().__exit__(*exc)
        if self._token is not None:
            _active.reset(self._token)
            self._token = None

    # -- locating rows ---------------------------------------------------------------------------

    def _locate(self, x: Tensor) -> tuple[int, int]:
        """The dimension of ``x`` that runs over the batch, and how many entries each row owns.

        The batch is the first dimension of exactly ``B`` entries, else the first whose size is a
        multiple of ``B`` (row-major blocks, as in attention's ``(B * heads, L, L)``).
        """
        for dim, size in enumerate(x.shape):
            if size == self.batch:
                return dim, 1
        for dim, size in enumerate(x.shape):
            if size > 0 and size % self.batch == 0:
                return dim, size // self.batch
        raise UnsupportedModelError(
            f"a dropout layer received a tensor of shape {tuple(x.shape)} with no dimension "
            f"matching the batch of {self.batch} rows; mcdrop needs every dropout input to keep "
            "a batch dimension"
        )

    def _rows(self, x: Tensor) -> tuple[Tensor, int, int]:
        """``x`` (replicated on the first call if the context defers replication), its batch
        dimension and entries per row."""
        dim, group = self._locate(x)
        if self.first_call_at is None:
            self.first_call_at = time.perf_counter()
        if self.replicate > 1:
            x = replicate(x, self.replicate, dim)
            self.batch *= self.replicate
            self.replicate = 1
        self.row_bytes = max(self.row_bytes, x.numel() * x.element_size() // self.batch)
        return x, dim, group

    def _next_call(self) -> int:
        call = self.calls
        self.calls += 1
        return call

    def _keep(self, per_row: int, p: float) -> Tensor:
        """``(B, per_row)`` boolean keep-mask for the next stochastic call."""
        return masks.keep_mask(self.keys, self._next_call(), per_row, p)

    def _scale(self, per_row: int, p: float, dtype: torch.dtype) -> Tensor:
        """``(B, per_row)`` inverted-dropout multipliers (0 or ``1/(1 − p)``) for the next call."""
        return masks.keep_scale(self.keys, self._next_call(), per_row, p, dtype)

    # -- the stochastic layers ---------------------------------------------------------------------

    def dropout(
        self,
        x: Tensor,
        p: float,
        *,
        feature: bool = False,
        alpha: bool = False,
        inplace: bool = False,
    ) -> Tensor:
        """Inverted (or alpha) dropout of ``x`` with one mask entry per element, or per channel
        when ``feature`` (masks broadcast over the dimensions after the channel)."""
        _check_p(p)
        if p == 0.0:
            return x
        x, dim, group = self._rows(x)
        if p == 1.0:
            self._next_call()
            return x.mul_(0) if inplace else torch.zeros_like(x)
        if alpha:
            return self._alpha_dropout(x, p, dim, group, feature=feature, inplace=inplace)
        if feature:
            if dim != 0 or group != 1 or x.dim() < 2:
                raise UnsupportedModelError(
                    f"channel dropout needs a batched (N, C, ...) input, got shape {tuple(x.shape)}"
                )
            scale = self._scale(x.shape[1], p, x.dtype).view(*x.shape[:2], *([1] * (x.dim() - 2)))
            return x.mul_(scale) if inplace else x * scale
        scale = self._scale_like(x, p, dim, group)
        if inplace:
            return x.mul_(scale)
        if dim == 0 and x.is_contiguous():
            # The multipliers are a fresh contiguous tensor of x's shape and layout: multiply
            # into it, saving an allocation the size of the activation.
            return scale.mul_(x)
        return x * scale  # the output keeps x's layout (a later .view() may rely on it)

    def _scale_like(self, x: Tensor, p: float, dim: int, group: int) -> Tensor:
        """Multipliers shaped like ``x`` (one per element), its batch along ``dim``."""
        moved_shape = (x.shape[dim], *x.shape[:dim], *x.shape[dim + 1 :])
        per_row = math.prod(moved_shape[1:]) * group  # entries owned by each of the B rows
        return self._scale(per_row, p, x.dtype).reshape(moved_shape).movedim(0, dim)

    def _alpha_dropout(
        self, x: Tensor, p: float, dim: int, group: int, *, feature: bool, inplace: bool
    ) -> Tensor:
        """Alpha dropout (SELU networks): dropped units go to SELU's negative saturation value,
        then an affine map keeps mean and variance."""
        p_eff = round(p * masks.P_RESOLUTION) / masks.P_RESOLUTION
        if feature:
            if dim != 0 or group != 1 or x.dim() < 2:
                raise UnsupportedModelError(
                    f"channel dropout needs a batched (N, C, ...) input, got shape {tuple(x.shape)}"
                )
            keep = self._keep(x.shape[1], p).view(*x.shape[:2], *([1] * (x.dim() - 2)))
        else:
            moved = x.movedim(dim, 0)
            keep = self._keep(moved[0].numel() * group, p)
            keep = keep.reshape(moved.shape).movedim(0, dim)
        a = 1.0 / math.sqrt((_ALPHA * _ALPHA * p_eff + 1.0) * (1.0 - p_eff))
        kept = x * a + _ALPHA * a * p_eff
        out = torch.where(keep, kept, _ALPHA * a * (p_eff - 1.0))
        return x.copy_(out) if inplace else out

    def dropconnect_linear(
        self, x: Tensor, weight: Tensor, bias: Tensor | None, p: float
    ) -> Tensor:
        """A linear layer whose weights are dropped, independently for every replicated row.

        Args:
            x: ``(B, ..., in)`` inputs, batch first.
            weight: ``(out, in)``; bias: ``(out,)``.

        Returns:
            ``(B, ..., out)``.
        """
        _check_p(p)
        x, dim, group = self._rows(x)
        if dim != 0 or group != 1:
            raise UnsupportedModelError(
                f"DropConnectLinear needs a batch-first input, got shape {tuple(x.shape)}"
            )
        out_f, in_f = weight.shape
        call = self._next_call()
        flat = x.reshape(self.batch, -1, in_f)  # (B, L, in)
        y = flat.new_empty(self.batch, flat.shape[1], out_f)
        # Every row has its own (out, in) weight mask: build them a block of rows at a time so
        # the masks never exceed DROPCONNECT_BUDGET elements, whatever the chunk size.
        step = max(1, DROPCONNECT_BUDGET // (out_f * in_f))
        for start in range(0, self.batch, step):
            rows = slice(start, min(start + step, self.batch))
            scale = masks.keep_scale(self.keys[rows], call, out_f * in_f, p, weight.dtype)
            w = scale.view(-1, out_f, in_f).mul_(weight)  # (b, out, in)
            torch.bmm(flat[rows], w.transpose(1, 2), out=y[rows])  # (b, L, out)
        if bias is not None:
            y += bias
        return y.reshape(*x.shape[:-1], out_f)

    def locked_dropout(self, x: Tensor, p: float, *, batch_first: bool) -> Tensor:
        """Variational dropout: one mask per row over the last (feature) dimension, reused at
        every time step.

        Args:
            x: ``(B, T, F)`` if ``batch_first`` else ``(T, B, F)``.
        """
        _check_p(p)
        if p == 0.0:
            return x
        x, _, _ = self._rows(x)
        batch_dim = 0 if batch_first else 1
        if x.dim() != 3 or x.shape[batch_dim] != self.batch:
            raise UnsupportedModelError(
                f"LockedDropout(batch_first={batch_first}) expects a 3-d sequence batch of "
                f"{self.batch} rows, got shape {tuple(x.shape)}"
            )
        return x * self._scale(x.shape[-1], p, x.dtype).unsqueeze(1 - batch_dim)

    def attention(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        attn_mask: Tensor | None,
        dropout_p: float,
        is_causal: bool,
        scale: float | None,
        enable_gqa: bool,
    ) -> Tensor:
        """``scaled_dot_product_attention`` with dropout on the attention weights from our masks.

        Args:
            q: ``(B, H, L, E)``; k, v: ``(B, H_kv, S, E)``.
        """
        if enable_gqa and k.shape[-3] != q.shape[-3]:
            k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
            v = v.repeat_interleave(q.shape[-3] // v.shape[-3], dim=-3)
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        scores = (q @ k.transpose(-2, -1)) * scale
        if is_causal:
            causal = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()
            scores = scores.masked_fill(~causal, float("-inf"))
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                scores = scores.masked_fill(~attn_mask, float("-inf"))
            else:
                scores = scores + attn_mask
        weights = self.dropout(torch.softmax(scores, dim=-1), dropout_p)
        return weights @ v


def replicate(x: Tensor, times: int, dim: int = 0) -> Tensor:
    """``x`` repeated ``times`` times along ``dim``, sample-major (index ``s · size + i``), the
    layout of the keys: a new tensor equal to ``x.repeat``'s, which is several times slower on
    the small activations of one request."""
    shape = list(x.shape)
    shape[dim] *= times
    out = x.unsqueeze(dim).expand(*x.shape[:dim], times, *x.shape[dim:]).reshape(shape)
    if out.data_ptr() == x.data_ptr():
        # reshape kept a view (one copy, or a single row broadcast): copy, as repeat does, so an
        # in-place dropout never writes into the caller's tensor or into aliased rows.
        out = out.clone(memory_format=torch.contiguous_format)
    return out


def _check_p(p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")


def _arg(args: tuple[Any, ...], kwargs: dict[str, Any], index: int, name: str, default: Any) -> Any:
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


def _functional(
    *, feature: bool = False, alpha: bool = False, always_inplace: bool = False
) -> Callable[[SamplingContext, tuple[Any, ...], dict[str, Any]], Tensor]:
    """Handler for a dropout function with signature ``(input, p, training[, inplace])``."""

    def handle(ctx: SamplingContext, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
        x = _arg(args, kwargs, 0, "input", None)
        p = float(_arg(args, kwargs, 1, "p", 0.5))
        inplace = always_inplace or bool(_arg(args, kwargs, 3, "inplace", False))
        return ctx.dropout(x, p, feature=feature, alpha=alpha, inplace=inplace)

    return handle


def _multi_head_attention(
    ctx: SamplingContext, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    if float(_arg(args, kwargs, 10, "dropout_p", 0.0)) == 0.0:
        return F.multi_head_attention_forward(*args, **kwargs)
    fast = _self_attention_fast(ctx, args, kwargs)
    if fast is not None:
        return fast
    # MultiheadAttention passes training=self.training and zeroes dropout_p in eval. Force
    # training on and intercept the dropout that the function's body then applies at the aten
    # level (the torch-function mode is suspended inside its own handler).
    training_index = 13
    if len(args) > training_index:
        args = (*args[:training_index], True, *args[training_index + 1 :])
    else:
        kwargs = {**kwargs, "training": True}
    with _AttentionDropoutMode(ctx):
        return F.multi_head_attention_forward(*args, **kwargs)


_MHA_PARAMS = tuple(inspect.signature(F.multi_head_attention_forward).parameters)


def _self_attention_fast(
    ctx: SamplingContext, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[Tensor, None] | None:
    """``multi_head_attention_forward`` for the common case, in plain torch calls: a packed
    input projection, no extra key/value biases or static keys, no attention weights returned.

    The general path routes every aten op of the function through a Python dispatch mode, which
    costs several times the attention itself for small sequences. Returns None where the case is
    not covered (the caller then takes the general path). Shapes: ``query (L, N, E)``, ``key``
    and ``value (S, N, E)``; returns ``((L, N, E), None)``.
    """
    a = dict(zip(_MHA_PARAMS, args, strict=False)) | kwargs
    if (
        a.get("use_separate_proj_weight", False)
        or a.get("bias_k") is not None
        or a.get("bias_v") is not None
        or a.get("add_zero_attn", False)
        or a.get("static_k") is not None
        or a.get("static_v") is not None
        or a.get("need_weights", True)
        or (a.get("is_causal", False) and a.get("attn_mask") is None)
        or a["query"].dim() != 3
    ):
        return None
    query, key, value = a["query"], a["key"], a["value"]
    heads = int(a["num_heads"])
    length, batch, embed = query.shape
    w, b = a["in_proj_weight"], a["in_proj_bias"]
    if query is key and key is value:
        q, k, v = F.linear(query, w, b).chunk(3, dim=-1)
    else:
        w_q, w_k, w_v = w.chunk(3)
        b_q, b_k, b_v = (None, None, None) if b is None else b.chunk(3)
        q, k, v = F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)

    def split_heads(t: Tensor) -> Tensor:  # (T, N, E) -> (N, H, T, E / H)
        return t.reshape(t.shape[0], batch, heads, embed // heads).permute(1, 2, 0, 3)

    mask = _additive_mask(a.get("attn_mask"), q.dtype)
    if mask is not None and mask.dim() == 3:  # (N·H, L, S) -> (N, H, L, S)
        mask = mask.reshape(batch, heads, *mask.shape[1:])
    padding = _additive_mask(a.get("key_padding_mask"), q.dtype)
    if padding is not None:  # (N, S) -> (N, 1, 1, S)
        padding = padding.reshape(batch, 1, 1, -1)
        mask = padding if mask is None else mask + padding
    out = ctx.attention(
        split_heads(q),
        split_heads(k),
        split_heads(v),
        mask,
        float(a["dropout_p"]),
        False,
        None,
        False,
    )  # (N, H, L, E / H)
    out = out.permute(2, 0, 1, 3).reshape(length, batch, embed)
    return F.linear(out, a["out_proj_weight"], a["out_proj_bias"]), None


def _additive_mask(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """An attention mask as an additive float mask (bool ``True`` means masked out, as in
    ``multi_head_attention_forward``)."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype).masked_fill_(mask, float("-inf"))


_HANDLERS: dict[
    Callable[..., Any], Callable[[SamplingContext, tuple[Any, ...], dict[str, Any]], Any]
]
_HANDLERS = {
    F.dropout: _functional(),
    F.dropout1d: _functional(feature=True),
    F.dropout2d: _functional(feature=True),
    F.dropout3d: _functional(feature=True),
    F.alpha_dropout: _functional(alpha=True),
    F.feature_alpha_dropout: _functional(feature=True, alpha=True),
    torch.dropout: _functional(),
    torch.dropout_: _functional(always_inplace=True),
    torch.feature_dropout: _functional(feature=True),
    torch.feature_dropout_: _functional(feature=True, always_inplace=True),
    torch.alpha_dropout: _functional(alpha=True),
    torch.alpha_dropout_: _functional(alpha=True, always_inplace=True),
    torch.feature_alpha_dropout: _functional(feature=True, alpha=True),
    torch.feature_alpha_dropout_: _functional(feature=True, alpha=True, always_inplace=True),
    F.multi_head_attention_forward: _multi_head_attention,
}


class _DropoutMode(TorchFunctionMode):
    """Routes dropout calls of the current thread to a :class:`SamplingContext`."""

    def __init__(self, ctx: SamplingContext) -> None:
        super().__init__()
        self.ctx = ctx

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        handler = _HANDLERS.get(func)
        if handler is None:
            return func(*args, **(kwargs or {}))
        return handler(self.ctx, args, kwargs or {})


class _AttentionDropoutMode(TorchDispatchMode):
    """Inside ``multi_head_attention_forward`` only: seeded masks for its attention dropout."""

    def __init__(self, ctx: SamplingContext) -> None:
        super().__init__()
        self.ctx = ctx

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func is torch.ops.aten.dropout.default:
            x, p, train = args
            return self.ctx.dropout(x, float(p)) if train else x
        if func is torch.ops.aten.scaled_dot_product_attention.default:
            q, k, v = args[:3]
            mask = _arg(args, kwargs, 3, "attn_mask", None)
            p = float(_arg(args, kwargs, 4, "dropout_p", 0.0))
            if p > 0.0:
                return self.ctx.attention(
                    q,
                    k,
                    v,
                    mask,
                    p,
                    bool(_arg(args, kwargs, 5, "is_causal", False)),
                    kwargs.get("scale"),
                    bool(kwargs.get("enable_gqa", False)),
                )
        return func(*args, **kwargs)


# -- dropout kinds torch does not ship ---------------------------------------------------------


class DropConnectLinear(nn.Linear):
    """A linear layer with DropConnect (Wan et al. 2013): weights, not activations, are dropped.

    In training one weight mask is drawn per forward pass (inverted scaling, so eval needs no
    rescaling); under MC sampling every replicated row gets its own weight mask.

    Shapes: ``(N, ..., in_features) -> (N, ..., out_features)``.
    """

    def __init__(self, in_features: int, out_features: int, p: float = 0.5, bias: bool = True):
        super().__init__(in_features, out_features, bias=bias)
        _check_p(p)
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        ctx = active_context()
        if ctx is not None and self.p > 0.0:
            return ctx.dropconnect_linear(x, self.weight, self.bias, self.p)
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
        _check_p(p)
        self.p = p
        self.batch_first = batch_first

    def forward(self, x: Tensor) -> Tensor:
        ctx = active_context()
        if ctx is not None:
            return ctx.locked_dropout(x, self.p, batch_first=self.batch_first)
        if not self.training or self.p == 0.0:
            return x
        batch_dim = 0 if self.batch_first else 1
        shape = [1, 1, x.shape[-1]]
        shape[batch_dim] = x.shape[batch_dim]
        keep = (torch.rand(shape, device=x.device) >= self.p).to(x.dtype) / (1.0 - self.p)
        return x * keep

    def extra_repr(self) -> str:
        return f"p={self.p}, batch_first={self.batch_first}"


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
