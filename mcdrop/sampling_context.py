"""Making every dropout call of a forward pass stochastic, for MC sampling only.

Sampling never changes a module's ``training`` flag. Instead, a forward pass runs inside a
:class:`SamplingContext`, which pushes a thread-local ``TorchFunctionMode``: every dropout call
of the forward (``nn.Dropout*``, ``AlphaDropout``, ``FeatureAlphaDropout``, ``F.dropout(...,
training=self.training)`` in a custom ``forward``, the attention dropout inside
``nn.MultiheadAttention`` and of ``F.scaled_dot_product_attention(dropout_p=...)``, see
:mod:`mcdrop.attention`, and the dropout between the layers of ``nn.LSTM``/``GRU``/``RNN``, see
:mod:`mcdrop.rnn`) is intercepted and made stochastic with a
seeded mask from :mod:`mcdrop.masks`, while everything else (BatchNorm included) runs in eval
mode. Because the mode lives on the calling thread, a deterministic prediction on another thread
at the same moment sees a plain eval model. (A model that is a plain chain of torch layers runs
without the mode: :class:`mcdrop.planning.LayerChain` hands its dropout layers' calls to the
context directly, with the same masks; so do the ``nn.TransformerEncoderLayer`` modules of any
model, see :mod:`mcdrop.encoders`.) An active torch-function mode also switches off
PyTorch's transformer fast path, which would otherwise skip dropout entirely.

Deterministic prediction of a model whose eval pass drops (a ``forward`` that calls
``F.dropout(h, p, training=True)``, MC-dropout style) runs under :class:`EvalDropoutMode`
instead: the same calls intercepted (:data:`DROPOUT_SWITCHES`), each run as torch's own with
its dropout off.

Each stochastic call finds its rows through the model's sampling plan (:mod:`mcdrop.planning`),
which knows the batch dimension of every call's input: masks are keyed per replicated row
without guessing which dimension runs over the rows.
"""

from __future__ import annotations

import contextvars
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from mcdrop import attention, encoders, masks, rnn
from mcdrop.attention import arg
from mcdrop.exceptions import UnsupportedModelError

if TYPE_CHECKING:
    from mcdrop.planning import CallLayout

# SELU's constants, as torch's alpha_dropout uses them.
_ALPHA = 1.7580993408473766

#: The multipliers :meth:`SamplingContext.dropout_into` makes at once: a block of rows that
#: stays in a core's cache (2 MiB of L2 here) beside the activation's rows it multiplies.
DROP_BLOCK_BYTES = 1 << 19

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
        calls: where the rows are in the input of every stochastic call, in call order (from
            the model's :class:`~mcdrop.planning.SamplingPlan`). A call that does not fit its
            layout is refused, never guessed.
        replicate: when > 1, the forward receives the ``N = B / replicate`` original rows and the
            context replicates the activations ``replicate`` times at the first dropout call, so
            the deterministic layers before it run once per row instead of once per sample.
    """

    #: The torch-function mode that routes this context's dropout calls.
    mode: ClassVar[type[DropoutMode]]
    #: Whether the pass runs without the mode, its dropout modules routed here
    #: (:mod:`mcdrop.routing`); callers: where a routed pass notes the module of each call
    #: and its input's dtype; routes_functions: whether torch.nn.functional's dropout functions
    #: hand its calls here too (where another thread's pass has routed them meanwhile, a pass
    #: that routes none finds torch's own); refuses_functions: whether a call they hand here
    #: fails the pass (a plan's probe of the dropout modules alone).
    routed = False
    routes_functions = False
    refuses_functions = False
    callers: list[Any] | None = None
    #: Whether the forward asked :func:`mcdrop.is_sampling` during the pass.
    asked = False
    #: A routed fast pass's multipliers per call, in call order: (module, rate, input shape,
    #: multipliers) or None (:mod:`mcdrop.routing`); None where it has none.
    made: list[tuple[Any, float, tuple[int, ...], Tensor] | None] | None = None
    #: Whether :attr:`made` is kept for the pass's next calls: its multipliers are read, never
    #: written into nor handed on (:func:`apply_multipliers`' ``keep``).
    kept = False

    def __init__(
        self,
        keys: Tensor,
        calls: Sequence[CallLayout] = (),
        *,
        replicate: int = 1,
        premade: dict[int, tuple[float, Tensor]] | None = None,
    ) -> None:
        self.keys = keys
        # call index -> (p, its (B, per_row) multipliers), made for the whole pass at once
        # (masks.PassMultipliers); each is used once, and only where rate, dtype and shape agree
        self.premade = premade
        self.layouts = calls
        self.replicate = replicate
        self.batch = keys.shape[0] // replicate
        self.calls = 0
        self._into: masks.KeepScaleInto | None = None  # made at the first dropout_into
        self._modes: list[DropoutMode] = []
        self._token: contextvars.Token[SamplingContext | None] | None = None

    def __enter__(self) -> SamplingContext:
        self._token = _active.set(self)
        mode = self.mode(self)
        mode.__enter__()
        self._modes.append(mode)
        return self

    def __exit__(self, *exc: object) -> None:
        self._modes.pop().__exit__(*exc)
        if self._token is not None:
            _active.reset(self._token)
            self._token = None

    def active(self) -> _Active:
        """Make this the thread's context without the torch-function mode, for a caller that
        hands every dropout call to the context itself (:class:`mcdrop.planning.LayerChain`)."""
        return _Active(self)

    def rows(
        self, x: Tensor, kind: str, batch_dim: int | None = None
    ) -> tuple[Tensor, CallLayout] | None:
        """The next stochastic call's input and where its rows are.

        Args:
            x: the call's input; on the first call of a context that defers replication it has
                ``N`` rows and is returned replicated to ``B``.
            kind: what the call is (``"dropout"``, ``"LockedDropout"``, ...), for messages.
            batch_dim: the batch dimension the call's own semantics fix (channel dropout: 0),
                checked against the plan when it is made.

        Returns:
            ``x`` with ``B`` rows and the call's layout; None while probing a model's layout
            (:mod:`mcdrop.planning`), when the call leaves ``x`` as it is.
        """
        found = self.take(x, kind, batch_dim)
        if found is None:
            return None
        x, layout, times = found
        return (x if times == 1 else replicate(x, times, layout.dim)), layout

    def take(
        self, x: Tensor, kind: str, batch_dim: int | None = None
    ) -> tuple[Tensor, CallLayout, int] | None:
        """:meth:`rows` without the replication: ``x`` as given, its layout, and how many times
        the caller must replicate it along the layout's dimension (1 but on the first call of a
        context that defers replication)."""
        index = self.calls
        if index >= len(self.layouts):
            raise UnsupportedModelError(
                f"dropout call {index + 1} ({kind}) is not in the model's sampling plan, which "
                f"has {len(self.layouts)} calls: the model's dropout calls depend on the contents "
                "of its inputs"
            )
        layout = self.layouts[index]
        expected = layout.shape_at(self.batch)
        if layout.kind != kind or tuple(x.shape) != expected:
            raise UnsupportedModelError(
                f"dropout call {index + 1} ({kind}) received shape {tuple(x.shape)}, but the "
                f"model's sampling plan expects {expected} for {self.batch} rows (call {layout}): "
                "the model's dropout inputs depend on the contents of its inputs, so masks cannot "
                "be keyed per row"
            )
        self.calls += 1
        times = self.replicate
        if times > 1:
            self.batch *= times
            self.replicate = 1
        return x, layout, times

    def check_rate(self, p: float) -> None:
        """Check ``p``, the rate of the stochastic call about to be made: the ValueError torch
        raises for one outside [0, 1] (the context that plans notes a rate of 1:
        :class:`mcdrop.planning.SamplingPlan`'s ``rate_one``)."""
        check_p(p)

    def keep(self, call: CallLayout, per_row: int, p: float) -> Tensor:
        """``(B, per_row)`` boolean keep-mask for ``call``."""
        return masks.keep_mask(self.keys, call.index, per_row, p)

    def scale(self, call: CallLayout, per_row: int, p: float, dtype: torch.dtype) -> Tensor:
        """``(B, per_row)`` inverted-dropout multipliers (0 or ``1/(1 − p)``) for ``call``."""
        if self.premade is not None:
            made = self.premade.pop(call.index, None)
            if (
                made is not None
                and made[0] == p
                and made[1].dtype == dtype
                and made[1].shape == (self.keys.shape[0], per_row)
            ):
                return made[1]
        return masks.keep_scale(self.keys, call.index, per_row, p, dtype)

    # -- torch's dropout kinds ---------------------------------------------------------------------

    def dropout(
        self,
        x: Tensor,
        p: float,
        *,
        kind: str = "dropout",
        batch_dim: int | None = None,
        feature: bool = False,
        alpha: bool = False,
        inplace: bool = False,
        batched_rank: int | None = None,
    ) -> Tensor:
        """Inverted (or alpha) dropout of ``x`` with one mask entry per element, or per channel
        when ``feature`` (``x (N, C, ...)``: masks broadcast over the dimensions after ``C``).
        ``kind`` and ``batch_dim`` as for :meth:`rows`. ``batched_rank``: the only rank at which
        the channel dropout takes ``x`` as batched (``F.dropout1d``: 3, ``F.dropout3d``: 5)."""
        self.check_rate(p)
        if p == 0.0:
            return x
        if feature and batched_rank is not None and x.dim() != batched_rank:
            # torch takes x as one unbatched sample whose channels run over dimension 0, here
            # the rows: one mask entry per row (nn.Dropout1d on (N, F) keeps or drops rows whole)
            out = self.dropout(
                x.unsqueeze(1), p, kind=kind, batch_dim=batch_dim, feature=True, alpha=alpha,
                inplace=inplace,
            )  # fmt: skip
            return out.squeeze(1)
        if feature and x.dim() < 2:
            raise UnsupportedModelError(
                f"channel dropout needs a batched (N, C, ...) input, got shape {tuple(x.shape)}"
            )
        if not (alpha or p == 1.0) and self.replicate > 1:
            # The first call of a pass that shares the prefix, the common case: multiply the
            # multipliers of all B rows by the N rows broadcast, rather than replicate the N rows
            # and multiply (the same products, one pass over the activation fewer).
            taken = self.take(x, kind, 0 if feature else batch_dim)
            if taken is not None:
                x, call, times = taken
                if call.dim == 0 and feature and x.is_contiguous():
                    # (times · N, C) multipliers broadcast over the channels' elements: the
                    # products of replicating, then multiplying, in one pass
                    scale = self.scale(call, x.shape[1], p, x.dtype)
                    shaped = scale.view(times, *x.shape[:2], *([1] * (x.dim() - 2)))
                    return torch.mul(shaped, x).view(times * x.shape[0], *x.shape[1:])
                if call.dim == 0 and not feature:  # (a channel dropout's: per channel, below)
                    scale = self._scale_like(x, p, call, times)  # (times · x.shape[0], ...)
                    return scale.view(times, *x.shape).mul_(x).view(scale.shape)
                x = replicate(x, times, call.dim)
                found: tuple[Tensor, CallLayout] | None = (x, call)
            else:
                found = None
        else:
            found = self.rows(x, kind, 0 if feature else batch_dim)
        if found is None:
            return x
        x, call = found
        if p == 1.0:
            return x.mul_(0) if inplace else torch.zeros_like(x)
        if alpha:
            return self._alpha_dropout(x, p, call, feature=feature, inplace=inplace)
        if feature:
            scale = self.scale(call, x.shape[1], p, x.dtype)
            scale = scale.view(*x.shape[:2], *([1] * (x.dim() - 2)))
            return x.mul_(scale) if inplace else x * scale
        scale = self._scale_like(x, p, call)
        if inplace:
            return x.mul_(scale)
        if call.dim == 0 and x.is_contiguous():
            # The multipliers are a fresh contiguous tensor of x's shape and layout: multiply
            # into it, saving an allocation the size of the activation.
            return scale.mul_(x)
        return x * scale  # the output keeps x's layout (a later .view() may rely on it)

    def dropout_into(
        self, x: Tensor, p: float, *, kind: str = "dropout", batch_dim: int | None = None
    ) -> Tensor:
        """:meth:`dropout` (inverted, per element) of a tensor the caller owns, in place: ``x``
        times its multipliers, hashed and multiplied in one compiled pass with no multipliers in
        memory where numba makes the masks (:func:`mcdrop.masks.keep_scale_into`: ~0.5× the
        time of the blocks below on an encoder's activations), else made for
        :data:`DROP_BLOCK_BYTES` of ``x`` at a time. ``kind`` and ``batch_dim`` as for
        :meth:`rows`.

        Why: the multipliers of a whole large activation are a fresh array as large (6.5 MB for
        the feed-forward units of a 2,048-wide encoder layer over 50 rows), and fresh memory
        is paid for in page faults: ~3,300 a call on that encoder, more than the hash and the
        product together. Blocks of rows stay in the cache and reuse the same memory. A row's
        multipliers depend on its key only, so the products are those of :meth:`dropout`, bit
        for bit. On the CPU only: on a device each block would be a kernel launch.
        """
        if not 0.0 < p < 1.0 or self.replicate > 1 or self.premade is not None:
            if p == 0.0:
                return x
            return self.dropout(x, p, kind=kind, batch_dim=batch_dim, inplace=True)
        found = self.take(x, kind, batch_dim)  # replicate is 1: x as it is
        if found is None:
            return x
        call = found[1]
        if call.dim != 0:  # what dropout(inplace=True) does
            return x.mul_(self._scale_like(x, p, call))
        batch = self.keys.shape[0]
        into = self._into  # the pass's keys checked once, for all its calls
        if into is None:
            into = self._into = masks.KeepScaleInto(self.keys)
        # numba: one pass, no multipliers, no blocks; x (B, ...) as it is, no view made
        if call.group == 1 and into(x, call.index, p):
            return x
        if not x.is_contiguous():
            return x.mul_(self._scale_like(x, p, call))
        flat = x.view(batch, -1)  # (B, per_row): rows first, `group` entries of x per row
        if call.group != 1 and into(flat, call.index, p):
            return x
        per_row = flat.shape[1]
        block = max(1, DROP_BLOCK_BYTES // max(1, per_row * x.element_size()))
        if block >= batch or x.device.type != "cpu":  # a device: one launch, not one a block
            return x.mul_(self.scale(call, per_row, p, x.dtype).view(x.shape))
        for b0 in range(0, batch, block):
            b1 = min(b0 + block, batch)
            flat[b0:b1].mul_(masks.keep_scale(self.keys[b0:b1], call.index, per_row, p, x.dtype))
        return x

    def relu_dropout_into(self, x: Tensor, p: float, *, kind: str = "dropout") -> Tensor:
        """:meth:`dropout_into` of ``relu(x)``, in place: torch's ``relu_`` of a tensor the
        caller owns, then its dropout (a fast pass applies both in one compiled pass:
        :class:`mcdrop.fast_pass.ModeContext`)."""
        return self.dropout_into(x.relu_(), p, kind=kind)

    def _scale_like(self, x: Tensor, p: float, call: CallLayout, times: int = 1) -> Tensor:
        """Multipliers shaped like ``x`` (one per element), its batch along ``call.dim``; with
        ``times``, like ``x`` replicated ``times`` times along it."""
        rest = (*x.shape[: call.dim], *x.shape[call.dim + 1 :])
        per_row = math.prod(rest) * call.group  # entries owned by each of the B rows
        scale = self.scale(call, per_row, p, x.dtype)  # (B, per_row)
        if call.dim == 0:
            return scale.view(times * x.shape[0], *rest)
        return scale.view(times * x.shape[call.dim], *rest).movedim(0, call.dim)

    def _alpha_dropout(
        self, x: Tensor, p: float, call: CallLayout, *, feature: bool, inplace: bool
    ) -> Tensor:
        """Alpha dropout (SELU networks): dropped units go to SELU's negative saturation value,
        then an affine map keeps mean and variance."""
        p_eff = round(p * masks.P_RESOLUTION) / masks.P_RESOLUTION
        if feature:
            keep = self.keep(call, x.shape[1], p).view(*x.shape[:2], *([1] * (x.dim() - 2)))
        else:
            moved = x.movedim(call.dim, 0)
            keep = self.keep(call, moved[0].numel() * call.group, p)
            keep = keep.reshape(moved.shape).movedim(0, call.dim)
        a = 1.0 / math.sqrt((_ALPHA * _ALPHA * p_eff + 1.0) * (1.0 - p_eff))
        kept = x * a + _ALPHA * a * p_eff
        out = torch.where(keep, kept, _ALPHA * a * (p_eff - 1.0))
        return x.copy_(out) if inplace else out


class _Active:
    """:meth:`SamplingContext.active`'s context manager."""

    def __init__(self, ctx: SamplingContext) -> None:
        self.ctx = ctx
        self.token: contextvars.Token[SamplingContext | None] | None = None

    def __enter__(self) -> SamplingContext:
        self.token = _active.set(self.ctx)
        return self.ctx

    def __exit__(self, *exc: object) -> None:
        if self.token is not None:
            _active.reset(self.token)


def apply_multipliers(
    x: Tensor,
    scale: Tensor,
    times: int,
    inplace: bool,
    channels: bool = False,
    keep: bool = False,
) -> Tensor:
    """``x`` times its premade inverted-dropout multipliers ``scale`` (rows first, as many as
    ``x``'s elements, ``times`` over where the call replicates ``x`` first: the first call of a
    pass that shares the prefix): :meth:`SamplingContext.dropout`'s products for a per-element
    call, without its checks, for the callers that made the multipliers before the pass
    (:meth:`mcdrop.planning.LayerChain.run_made`, :mod:`mcdrop.routing`). ``channels``: a
    channel dropout's (``x (N, C, ...)``, one multiplier per row and channel, broadcast over the
    dimensions after ``C``). ``scale`` may come flat or, where ``times`` is 1, already of the
    shape it is applied in (``x``'s; ``(N, C, 1, ...)`` for channels): a view costs ~3 µs.
    ``keep``: ``scale`` is kept for later passes, so the product is never written into it (nor
    is it returned); else it may be, where it is fresh and laid out as the product."""
    if channels:  # as SamplingContext.dropout's feature branch
        rest = [1] * (x.dim() - 2)
        if times > 1:
            if x.is_contiguous():
                shaped = scale.view(times, *x.shape[:2], *rest)
                return torch.mul(shaped, x).view(times * x.shape[0], *x.shape[1:])
            x = replicate(x, times)
        if scale.dim() != x.dim():
            scale = scale.view(*x.shape[:2], *rest)
        return x.mul_(scale) if inplace else x * scale
    if times > 1:  # the N rows broadcast against all samples' multipliers: one pass
        shape = x.shape
        shaped = scale.view(times, *shape)
        product = torch.mul(shaped, x) if keep else shaped.mul_(x)
        return product.view(times * shape[0], *shape[1:])
    if scale.shape != x.shape:
        scale = scale.view(x.shape)
    if inplace:
        return x.mul_(scale)
    # into the fresh multipliers where x is contiguous: no allocation
    return scale.mul_(x) if x.is_contiguous() and not keep else x * scale


def fresh_layout(x: Tensor) -> bool:
    """Whether ``x`` is laid out as a copy of it would be, for a matrix product or a convolution:
    contiguous, its data on a 16-byte boundary. They round differently on other strides and
    alignments (a row 4 bytes off, a transposed batch), so a pass reads the caller's rows in
    place only where they are laid out so, and a copy of them otherwise. 16 bytes, not torch's
    64: NumPy aligns its buffers (a request's rows, the multipliers a pass computes into) to 16,
    and the passes already rely on 16 sufficing (on AVX-512, no offset of 16, 32 or 48 bytes
    changed a bit of 240 matrix products; every offset of 4 to 12 bytes did, in half of them)."""
    return x.is_contiguous() and x.data_ptr() % 16 == 0


def replicate(x: Tensor, times: int, dim: int = 0) -> Tensor:
    """``x`` repeated ``times`` times along ``dim``, sample-major (index ``s · size + i``), the
    layout of the keys: a new tensor equal to ``x.repeat``'s, which is several times slower on
    the small activations of one request."""
    if times == 1:  # one sample per pass: the copy alone
        return x.clone(memory_format=torch.contiguous_format)
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
    kind: str,
    *,
    feature: bool = False,
    alpha: bool = False,
    always_inplace: bool = False,
    batched_rank: int | None = None,
) -> Handler:
    """Handler for a dropout function with signature ``(input, p, training[, inplace])``."""

    def handle(ctx: SamplingContext, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
        x = arg(args, kwargs, 0, "input", None)
        p = float(arg(args, kwargs, 1, "p", 0.5))
        inplace = always_inplace or bool(arg(args, kwargs, 3, "inplace", False))
        return ctx.dropout(
            x, p, kind=kind, feature=feature, alpha=alpha, inplace=inplace,
            batched_rank=batched_rank,
        )  # fmt: skip

    return handle


# Every dropout function torch has, and how it drops: per element or per channel (feature),
# inverted or alpha, in place or not; F.dropout1d and F.dropout3d take an input of any rank but
# one (batched_rank) as one unbatched sample (F.dropout2d takes every rank as batched).
DROPOUT_FUNCTIONS: dict[Callable[..., Any], dict[str, Any]] = {
    F.dropout: {},
    F.dropout1d: {"feature": True, "batched_rank": 3},
    F.dropout2d: {"feature": True},
    F.dropout3d: {"feature": True, "batched_rank": 5},
    F.alpha_dropout: {"alpha": True},
    F.feature_alpha_dropout: {"feature": True, "alpha": True},
    torch.dropout: {},
    torch.dropout_: {"always_inplace": True},
    torch.feature_dropout: {"feature": True},
    torch.feature_dropout_: {"feature": True, "always_inplace": True},
    torch.alpha_dropout: {"alpha": True},
    torch.alpha_dropout_: {"alpha": True, "always_inplace": True},
    torch.feature_alpha_dropout: {"feature": True, "alpha": True},
    torch.feature_alpha_dropout_: {"feature": True, "alpha": True, "always_inplace": True},
}

_HANDLERS: dict[Callable[..., Any], Handler] = {
    func: _functional(func.__name__, **options) for func, options in DROPOUT_FUNCTIONS.items()
}
_HANDLERS[F.multi_head_attention_forward] = attention.multi_head_attention
_HANDLERS[F.scaled_dot_product_attention] = attention.scaled_dot_product_attention
_HANDLERS.update(rnn.HANDLERS)  # dropout between the layers of nn.LSTM, nn.GRU, nn.RNN
# an nn.TransformerEncoderLayer that a pass runs directly (mcdrop.encoders)
_HANDLERS[encoders.encoder_layer] = lambda ctx, args, kwargs: encoders.handle_layer(ctx, *args)
_HANDLERS[encoders.encoder_stack] = lambda ctx, args, kwargs: encoders.handle_stack(ctx, *args)


class DropoutMode(TorchFunctionMode):
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


SamplingContext.mode = DropoutMode
encoders.SAMPLING_MODE = DropoutMode  # (its hand-over of a layer's call: mcdrop.encoders)


# -- deterministic prediction ----------------------------------------------------------------------

#: How a call of a function the mode intercepts is made with its dropout off: its arguments with
#: the flag that turns dropout on set off, and whether the call as given drops.
Switch = Callable[[tuple[Any, ...], dict[str, Any]], tuple[tuple[Any, ...], dict[str, Any], bool]]


def _set(
    args: tuple[Any, ...], kwargs: dict[str, Any], index: int, name: str, value: Any
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The call's arguments with argument ``name`` (at position ``index``) set to ``value``."""
    if len(args) > index:
        return (*args[:index], value, *args[index + 1 :]), kwargs
    return args, {**kwargs, name: value}


def _flag_off(flag: str, at: int, rate: str, rate_at: int, default_rate: float) -> Switch:
    """The switch of a function that drops where ``flag`` (default on) is on and ``rate`` is
    above 0."""

    def switch(
        args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any], bool]:
        on = bool(arg(args, kwargs, at, flag, True))
        drops = on and float(arg(args, kwargs, rate_at, rate, default_rate)) > 0.0
        return (*_set(args, kwargs, at, flag, False), drops)

    return switch


def _sdpa_off(
    args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any], bool]:
    """F.scaled_dot_product_attention drops wherever its ``dropout_p`` is above 0 (it has no
    training flag)."""
    drops = float(arg(args, kwargs, 4, "dropout_p", 0.0)) > 0.0
    return (*_set(args, kwargs, 4, "dropout_p", 0.0), drops)


def _kernel_off(
    args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any], bool]:
    off, drops = rnn.train_off(args, kwargs)
    return off, kwargs, drops


#: Every function whose call the mode samples (:data:`DROPOUT_FUNCTIONS`, the attention and the
#: recurrent kernels) and its :data:`Switch`: torch.nn.functional's take ``training``, torch's
#: own ``train``.
DROPOUT_SWITCHES: dict[Callable[..., Any], Switch] = {
    **{
        func: _flag_off(
            "training" if getattr(F, func.__name__, None) is func else "train", 2, "p", 1, 0.5
        )
        for func in DROPOUT_FUNCTIONS
    },
    F.multi_head_attention_forward: _flag_off("training", 13, "dropout_p", 10, 0.0),
    F.scaled_dot_product_attention: _sdpa_off,
    **{kernel: _kernel_off for kernel in rnn.HANDLERS},
}


class EvalDropoutMode(TorchFunctionMode):
    """Deterministic prediction of a model whose eval pass drops (``F.dropout(h, p,
    training=True)``, MC-dropout style, ``torch.dropout(h, p, True)``, ...): every call that
    MC sampling samples runs as torch's own with its dropout off (``training``/``train`` False,
    ``dropout_p`` 0), as if the model passed ``self.training``; every other call as it is.
    :attr:`dropped` says whether a call of the pass had its dropout on. No sampling context is
    active: :func:`mcdrop.is_sampling` is False, as in any deterministic prediction."""

    def __init__(self) -> None:
        super().__init__()
        self.dropped = False

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        switch = DROPOUT_SWITCHES.get(func)
        if switch is None:
            return func(*args, **(kwargs or {}))
        args, kwargs, drops = switch(args, kwargs or {})
        if drops:
            self.dropped = True
        return func(*args, **kwargs)
