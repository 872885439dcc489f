"""Seeded dropout on the attention weights of ``nn.MultiheadAttention`` (and the transformer
layers built on it).

``multi_head_attention_forward`` applies its dropout only in training mode, and inside C++ when
it calls ``scaled_dot_product_attention``. Under MC sampling its handler either computes the
common case in plain torch calls (:func:`self_attention_fast`) or runs torch's own function with
training forced on and a dispatch mode that replaces its dropout with the context's masks.

Shape legend: ``N`` rows (replicated), ``H`` heads, ``L`` query length, ``S`` key length,
``E`` embedding size.
"""

from __future__ import annotations

import inspect
import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

if TYPE_CHECKING:
    from mcdrop.sampling_context import SamplingContext


def arg(args: tuple[Any, ...], kwargs: dict[str, Any], index: int, name: str, default: Any) -> Any:
    """Argument ``name`` of an intercepted call, given at position ``index`` or by keyword."""
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


def multi_head_attention(
    ctx: SamplingContext, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """Handler for ``F.multi_head_attention_forward`` under MC sampling."""
    if float(arg(args, kwargs, 10, "dropout_p", 0.0)) == 0.0:
        return F.multi_head_attention_forward(*args, **kwargs)
    fast = self_attention_fast(ctx, args, kwargs)
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


def scaled_dot_product_attention(
    ctx: SamplingContext, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Tensor:
    """Handler for ``F.scaled_dot_product_attention`` called in a model's own ``forward``
    under MC sampling: its ``dropout_p`` (torch applies it whatever the mode) becomes seeded
    per-row dropout on the attention weights. Shapes: ``q (N, ..., L, E)``, ``k``, ``v
    (N, ..., S, E)``, batch first."""
    p = float(arg(args, kwargs, 4, "dropout_p", 0.0))
    if p == 0.0:
        # A rate of 0 in a module that declares one is the training-only idiom: tell the
        # counters looking for dropout that sampling cannot reach (imported here: coverage
        # imports the sampling context, which imports this module).
        from mcdrop.coverage import note_zero_rate_call

        note_zero_rate_call()
        return F.scaled_dot_product_attention(*args, **kwargs)
    return attention(
        ctx,
        arg(args, kwargs, 0, "query", None),
        arg(args, kwargs, 1, "key", None),
        arg(args, kwargs, 2, "value", None),
        arg(args, kwargs, 3, "attn_mask", None),
        p,
        bool(arg(args, kwargs, 5, "is_causal", False)),
        kwargs.get("scale"),
        bool(kwargs.get("enable_gqa", False)),
    )


_MHA_PARAMS = tuple(inspect.signature(F.multi_head_attention_forward).parameters)


def self_attention_fast(
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
    # nn.MultiheadAttention(batch_first=True) passes (L, N, E) views of (N, L, E) tensors and
    # transposes the result back: work in the callers' own layout, so that no projection reads
    # a strided input and the layer's output reaches the residual sum and the norm contiguous
    # (in (L, N, E) the transformer's elementwise ops ran 3× slower than its fused floor).
    batch_first = query.transpose(0, 1).is_contiguous()
    if batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))  # (N, T, E)
    w, b = a["in_proj_weight"], a["in_proj_bias"]
    same = a["query"] is a["key"] and a["key"] is a["value"]
    mask = _additive_mask(a.get("attn_mask"), query.dtype)
    if mask is not None and mask.dim() == 3:  # (N·H, L, S) -> (N, H, L, S)
        mask = mask.reshape(batch, heads, *mask.shape[1:])
    padding = _additive_mask(a.get("key_padding_mask"), query.dtype)
    if padding is not None:  # (N, S) -> (N, 1, 1, S)
        padding = padding.reshape(batch, 1, 1, -1)
        mask = padding if mask is None else mask + padding
    if same and batch_first and b is not None and query.device.type == "cpu":
        out = packed_self_attention(
            ctx,
            query,
            heads,
            (w, b, a["out_proj_weight"], a["out_proj_bias"]),
            float(a["dropout_p"]),
            mask,
        )
        return out.transpose(0, 1), None
    if same and batch_first:
        # One copy puts q, k and v in (N, H, T, E / H) blocks that the products read as they
        # are, instead of one copy of each inside the products.
        qkv = F.linear(query, w, b).view(batch, length, 3, heads, embed // heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).contiguous()  # 3 × (N, H, L, E / H)
    elif same:
        q, k, v = F.linear(query, w, b).chunk(3, dim=-1)
    else:
        w_q, w_k, w_v = w.chunk(3)
        b_q, b_k, b_v = (None, None, None) if b is None else b.chunk(3)
        q, k, v = F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)

    def split_heads(t: Tensor) -> Tensor:  # (T, N, E) or (N, T, E) -> (N, H, T, E / H)
        if t.dim() == 4:  # already split
            return t
        if batch_first:
            return t.reshape(batch, t.shape[1], heads, embed // heads).transpose(1, 2)
        return t.reshape(t.shape[0], batch, heads, embed // heads).permute(1, 2, 0, 3)

    out = attention(
        ctx,
        split_heads(q),
        split_heads(k),
        split_heads(v),
        mask,
        float(a["dropout_p"]),
        False,
        None,
        False,
    )  # (N, H, L, E / H)
    if batch_first:
        out = out.transpose(1, 2).reshape(batch, length, embed)
        return F.linear(out, a["out_proj_weight"], a["out_proj_bias"]).transpose(0, 1), None
    out = out.permute(2, 0, 1, 3).reshape(length, batch, embed)
    return F.linear(out, a["out_proj_weight"], a["out_proj_bias"]), None


def packed_self_attention(
    ctx: SamplingContext,
    x: Tensor,
    heads: int,
    weights: tuple[Tensor, Tensor, Tensor, Tensor | None],
    dropout_p: float,
    mask: Tensor | None = None,
) -> Tensor:
    """Batch-first self-attention with a packed, biased input projection on the CPU, the
    attention weights dropped with ``ctx``'s masks: what :func:`self_attention_fast` computes
    for ``nn.MultiheadAttention(batch_first=True)``, without its transposes.

    As torch's own fast path: the bias, the scaling of the queries by ``1 / sqrt(E / H)`` and
    the split into ``(N, H, L, E / H)`` blocks that the products read as they are, in one pass
    over the projection (``torch._transform_bias_rescale_qkv``), instead of a bias pass, a copy
    and a scaling pass over the ``(N, H, L, L)`` scores.

    Args:
        x: ``(N, L, E)``.
        weights: ``in_proj_weight (3E, E)``, ``in_proj_bias (3E,)``, ``out_proj.weight (E,
            E)``, ``out_proj.bias (E,)`` or None.
        mask: additive, broadcast to ``(N, H, L, L)``; None for none.

    Returns:
        ``(N, L, E)``, contiguous.
    """
    in_weight, in_bias, out_weight, out_bias = weights
    batch, length, embed = x.shape
    q, k, v = torch._transform_bias_rescale_qkv(F.linear(x, in_weight), in_bias, heads)
    out = attention(ctx, q, k, v, mask, dropout_p, False, 1.0, False)  # (N, H, L, E / H)
    return F.linear(out.transpose(1, 2).reshape(batch, length, embed), out_weight, out_bias)


def attention(
    ctx: SamplingContext,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None,
    dropout_p: float,
    is_causal: bool,
    scale: float | None,
    enable_gqa: bool,
) -> Tensor:
    """``scaled_dot_product_attention`` with dropout on the attention weights from ``ctx``'s
    masks.

    Args:
        q: ``(N, H, L, E)``; k, v: ``(N, H_kv, S, E)``.

    Returns:
        ``(N, H, L, E)``.
    """
    if enable_gqa and k.shape[-3] != q.shape[-3]:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
        v = v.repeat_interleave(q.shape[-3] // v.shape[-3], dim=-3)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = q @ k.transpose(-2, -1)
    if scale != 1.0:  # 1: the queries came scaled (or a scale of 1 was asked for)
        scores *= scale  # in place: one pass over the weights fewer
    if is_causal:
        causal = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    weights = torch.softmax(scores, dim=-1)  # (N, H, L, S), a fresh tensor: dropped in place
    weights = ctx.dropout_into(weights, dropout_p, kind="attention dropout", batch_dim=0)
    return weights @ v


def _additive_mask(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """An attention mask as an additive float mask (bool ``True`` means masked out, as in
    ``multi_head_attention_forward``)."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
        mask, float("-inf")
    )


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
            # (N·H, L, S) attention weights: the plan knows the heads per row.
            return self.ctx.dropout(x, float(p), kind="attention dropout") if train else x
        if func is torch.ops.aten.scaled_dot_product_attention.default:
            q, k, v = args[:3]
            mask = arg(args, kwargs, 3, "attn_mask", None)
            p = float(arg(args, kwargs, 4, "dropout_p", 0.0))
            if p > 0.0:
                return attention(
                    self.ctx,
                    q,
                    k,
                    v,
                    mask,
                    p,
                    bool(arg(args, kwargs, 5, "is_causal", False)),
                    kwargs.get("scale"),
                    bool(kwargs.get("enable_gqa", False)),
                )
        return func(*args, **kwargs)
