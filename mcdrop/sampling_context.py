"""Making every dropout call of a forward pass stochastic, for MC sampling only.

Sampling never changes a module's ``training`` flag. Instead, a forward pass runs inside a
:class:`SamplingContext`, which pushes a thread-local ``TorchFunctionMode``: every dropout call
of the forward (``nn.Dropout*``, ``AlphaDropout``, ``FeatureAlphaDropout``, ``F.dropout(...,
training=self.training)`` in a custom ``forward``, and the attention dropout inside
``nn.MultiheadAttention``, see :mod:`mcdrop.attention`) is intercepted and made stochastic with a
seeded mask from :mod:`mcdrop.masks`, while everything else (BatchNorm included) runs in eval
mode. Because the mode lives on the calling thread, a deterministic prediction on another thread
at the same moment sees a plain eval model. An active torch-function mode also switches off
PyTorch's transformer fast path, which would otherwise skip dropout entirely.

The context also counts stochastic calls, so a model without dropout is reported instead of
returning a silent zero variance.
"""

from __future__ import annotations

import contextvars
import math
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from mcdrop import attention, masks
from mcdrop.attention import arg
from mcdrop.exceptions import UnsupportedModelError

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

    def rows(self, x: Tensor) -> tuple[Tensor, int, int]:
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

    def next_call(self) -> int:
        """The index of the next stochastic call (masks are keyed by it)."""
        call = self.calls
        self.calls += 1
        return call

    def keep(self, per_row: int, p: float) -> Tensor:
        """``(B, per_row)`` boolean keep-mask for the next stochastic call."""
        return masks.keep_mask(self.keys, self.next_call(), per_row, p)

    def scale(self, per_row: int, p: float, dtype: torch.dtype) -> Tensor:
        """``(B, per_row)`` inverted-dropout multipliers (0 or ``1/(1 − p)``) for the next call."""
        return masks.keep_scale(self.keys, self.next_call(), per_row, p, dtype)

    # -- torch's dropout kinds ---------------------------------------------------------------------

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
        check_p(p)
        if p == 0.0:
            return x
        x, dim, group = self.rows(x)
        if p == 1.0:
            self.next_call()
            return x.mul_(0) if inplace else torch.zeros_like(x)
        if alpha:
            return self._alpha_dropout(x, p, dim, group, feature=feature, inplace=inplace)
        if feature:
            if dim != 0 or group != 1 or x.dim() < 2:
                raise UnsupportedModelError(
                    f"channel dropout needs a batched (N, C, ...) input, got shape {tuple(x.shape)}"
                )
            scale = self.scale(x.shape[1], p, x.dtype).view(*x.shape[:2], *([1] * (x.dim() - 2)))
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
        return self.scale(per_row, p, x.dtype).reshape(moved_shape).movedim(0, dim)

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
            keep = self.keep(x.shape[1], p).view(*x.shape[:2], *([1] * (x.dim() - 2)))
        else:
            moved = x.movedim(dim, 0)
            keep = self.keep(moved[0].numel() * group, p)
            keep = keep.reshape(moved.shape).movedim(0, dim)
        a = 1.0 / math.sqrt((_ALPHA * _ALPHA * p_eff + 1.0) * (1.0 - p_eff))
        kept = x * a + _ALPHA * a * p_eff
        out = torch.where(keep, kept, _ALPHA * a * (p_eff - 1.0))
        return x.copy_(out) if inplace else out


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


def check_p(p: float) -> None:
    """A dropout rate in [0, 1], or the ValueError torch raises for one outside."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")


Handler = Callable[[SamplingContext, tuple[Any, ...], dict[str, Any]], Any]


def _functional(
    *, feature: bool = False, alpha: bool = False, always_inplace: bool = False
) -> Handler:
    """Handler for a dropout function with signature ``(input, p, training[, inplace])``."""

    def handle(ctx: SamplingContext, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
        x = arg(args, kwargs, 0, "input", None)
        p = float(arg(args, kwargs, 1, "p", 0.5))
        inplace = always_inplace or bool(arg(args, kwargs, 3, "inplace", False))
        return ctx.dropout(x, p, feature=feature, alpha=alpha, inplace=inplace)

    return handle


_HANDLERS: dict[Callable[..., Any], Handler] = {
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
    F.multi_head_attention_forward: attention.multi_head_attention,
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
