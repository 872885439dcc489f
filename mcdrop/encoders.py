"""Transformer encoder layers under MC sampling without the torch-function mode.

Under the sampling context's torch-function mode (:mod:`mcdrop.sampling_context`) an
``nn.TransformerEncoderLayer`` runs its Python slow path: ~30 intercepted torch calls, its own
and its attention's fast-path checks on every call (each walks the layer's modules), eleven
module calls. On a small encoder that costs as much as a third of the floor (2-layer encoder,
d = 64, 100 samples of one row). A pass through :class:`EncoderLayers` runs the model's own
``forward``, in the mode as before, on a *twin* of the model: per pass, shallow copies of the
modules on the way from the model to its encoder layers (sharing every parameter, buffer and
other submodule) in which each layer's ``forward`` is handed to the mode as one call
(:func:`encoder_layer`; an ``nn.TransformerEncoder`` whose layers all run directly hands its
whole stack over at once, :func:`encoder_stack`), whose handler computes the layer in direct
torch calls with the mode off, every dropout handed to the context in the order and with the
shapes the mode's path gives it (and multiplied in place:
:meth:`mcdrop.sampling_context.SamplingContext.dropout_into`). The model itself is never
changed, so another thread's deterministic prediction sees it as it is.

A layer is run directly when it is exactly an ``nn.TransformerEncoderLayer`` with batch-first
attention, a packed biased input projection, ReLU or GELU (torch's own functions or modules),
exact torch submodules and no hook, and is called without masks on a plain CPU tensor; any other
call runs the layer's own ``forward`` in the mode. The samples equal the mode's path bit for
bit: the same torch calls on the same values (the attention's in
:func:`mcdrop.attention.packed_self_attention`), but the residual sums, the ReLU and the GELU,
made in place into fresh tensors.

Shape legend: ``B`` replicated rows, ``L`` sequence length, ``E`` embedding size.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch._C import (
    _get_function_stack_at,
    _len_torch_function_stack,
    _pop_torch_function_stack,
    _push_on_torch_function_stack,
)
from torch.overrides import handle_torch_function, has_torch_function

from mcdrop._hooks import global_hooks, has_hooks
from mcdrop.attention import packed_self_attention

if TYPE_CHECKING:
    from mcdrop.sampling_context import SamplingContext

#: The activations a layer may have, as functions or modules (exact types: a subclass may call
#: dropout, which the direct run would not hand to the context).
_ACTIVATION_FUNCTIONS: tuple[Callable[..., Any], ...] = (F.relu, torch.relu, F.gelu)
_ACTIVATION_MODULES: frozenset[type[nn.Module]] = frozenset({nn.ReLU, nn.GELU})

# The submodules of an encoder layer the direct run reads, and the type each must be exactly.
_SUBMODULES: dict[str, tuple[type[nn.Module], ...]] = {
    "self_attn": (nn.MultiheadAttention,),
    "linear1": (nn.Linear,),
    "linear2": (nn.Linear,),
    "norm1": (nn.LayerNorm,),
    "norm2": (nn.LayerNorm,),
    "dropout": (nn.Dropout,),
    "dropout1": (nn.Dropout,),
    "dropout2": (nn.Dropout,),
}


#: torch's in-place GELU (``F.gelu`` has no ``inplace``): a fresh ``(B, L, F)`` tensor per layer
#: cost more than the GELU itself (~17 µs of a one-row call of a 2,048-wide encoder).
_gelu_: Callable[..., Tensor] = torch._C._nn.gelu_  # type: ignore[attr-defined]


def _runs_directly(layer: nn.Module) -> bool:
    """Whether ``layer`` is an encoder layer that :func:`run_layer` computes as its own
    ``forward`` would (checked when a plan is made; what may change between calls is checked
    on every call)."""
    if type(layer) is not nn.TransformerEncoderLayer:
        return False
    for name, kinds in _SUBMODULES.items():
        if type(getattr(layer, name, None)) not in kinds:
            return False
    attn = layer.self_attn
    if type(attn.out_proj) not in (nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear):
        return False
    activation = layer.activation
    if not (
        type(activation) in _ACTIVATION_MODULES
        or any(activation is f for f in _ACTIVATION_FUNCTIONS)
    ):
        return False
    return not any("forward" in vars(m) for m in layer.modules())


def _direct_layer(layer: nn.TransformerEncoderLayer) -> bool:
    """Whether ``layer``'s attributes (which a user may set between calls) let a call run
    directly."""
    attn = layer.__dict__["_modules"]["self_attn"]  # (the layer's children are as planned)
    return bool(
        attn.batch_first
        and attn._qkv_same_embed_dim
        and _pair(attn, "in_proj_weight", "in_proj_bias")[1] is not None
        and attn.bias_k is None
        and attn.bias_v is None
        and not attn.add_zero_attn
    )


def _direct_input(layer: nn.TransformerEncoderLayer, src: Tensor) -> bool:
    """Whether ``src`` lets a call of ``layer`` run directly (checked with the mode off: each
    of these calls costs µs through it)."""
    return (
        src.dim() == 3
        and src.is_contiguous()  # else the mode's attention works sequence-first
        and src.is_cpu
        and src.shape[-1] == layer.__dict__["_modules"]["self_attn"].embed_dim
    )


def _drop(ctx: SamplingContext, x: Tensor, layer: nn.Dropout) -> Tensor:
    """What the mode does with the ``F.dropout`` call of ``layer``'s ``forward``, in place
    (``x`` is a fresh tensor of the layer's own), but where it gives zeros (:func:`_zeroes`)."""
    p = float(layer.p)
    if _zeroes(layer, p):
        return ctx.dropout(x, p)
    return ctx.dropout_into(x, p)


def _zeroes(layer: nn.Dropout, p: float) -> bool:
    """Whether the mode's call of ``layer`` at rate ``p`` gives zeros: at a rate of 1, not in
    place (in place, ``x · 0``, as :meth:`SamplingContext.dropout_into` gives: NaN where ``x``
    is ±inf or NaN, −0.0 where negative)."""
    return p == 1.0 and not layer.inplace


def _pair(module: nn.Module, first: str = "weight", second: str = "bias") -> tuple[Any, Any]:
    """``(getattr(module, first), getattr(module, second))`` for two parameters (an
    ``nn.Linear``'s or ``nn.LayerNorm``'s weight and bias by default): read from the module's
    parameters' dict where both are there and no attribute of the instance shadows them, as
    ``Module.__getattr__`` would find them; else by ``getattr``.

    Why: ``Module.__getattr__`` is a Python call of its own, ~0.7 µs a read; a pass through a
    2-layer encoder read 24 parameters so, 10–15 µs of a one-row call.
    """
    own = module.__dict__
    params = own["_parameters"]
    if first in params and second in params and first not in own and second not in own:
        return params[first], params[second]
    return getattr(module, first), getattr(module, second)


def _child(module: nn.Module, name: str) -> Any:
    """``getattr(module, name)`` for a submodule: from the module's dict of them where there
    and not shadowed by an attribute of the instance (:func:`_pair`'s why)."""
    own = module.__dict__
    modules = own["_modules"]
    return modules[name] if name in modules and name not in own else getattr(module, name)


def _norm(norm: nn.LayerNorm, x: Tensor) -> Tensor:
    """``norm.forward(x)``: the same ``torch.layer_norm`` call, without two Python frames and
    ``F.layer_norm``'s check for torch-function overrides (the mode is off here)."""
    weight, bias = _pair(norm)
    return torch.layer_norm(x, norm.normalized_shape, weight, bias, norm.eps)


def _attention_block(
    ctx: SamplingContext, attn: nn.MultiheadAttention, dropout1: nn.Dropout, h: Tensor
) -> Tensor:
    """The layer's self-attention block of ``h`` ``(B, L, E)``, its output dropped
    (``dropout1``)."""
    out_proj = cast(nn.Linear, attn.__dict__["_modules"]["out_proj"])
    weights = (*_pair(attn, "in_proj_weight", "in_proj_bias"), *_pair(out_proj))
    p = float(attn.dropout)
    if p == 0.0:  # no mask to draw: torch's own function, as the mode's handler calls it
        seq = h.transpose(0, 1)  # (L, B, E), as nn.MultiheadAttention passes it
        out = F.multi_head_attention_forward(
            seq, seq, seq, attn.embed_dim, attn.num_heads, *weights[:2], None, None, False,
            p, *weights[2:], training=attn.training, need_weights=False,
        )[0].transpose(0, 1)  # fmt: skip
    else:
        out = packed_self_attention(ctx, h, attn.num_heads, weights, p)
    return _drop(ctx, out, dropout1)


def run_layer(ctx: SamplingContext, layer: nn.TransformerEncoderLayer, x: Tensor) -> Tensor:
    """``layer``'s slow-path ``forward`` of ``x`` ``(B, L, E)`` without masks, its attention
    weights' dropout and its three dropout layers' calls handed to ``ctx``, in the order and
    with the shapes of the mode's path. Called with the torch-function mode off (its handler
    for :func:`encoder_layer`).

    Returns ``(B, L, E)``.
    """
    # The submodules from the layer's own dict (exact torch types, checked when planned): a
    # Module.__getattr__ each costs as much as a small tensor op's dispatch.
    modules = layer.__dict__["_modules"]
    attn = cast(nn.MultiheadAttention, modules["self_attn"])
    linear1 = cast(nn.Linear, modules["linear1"])
    linear2 = cast(nn.Linear, modules["linear2"])
    dropout = cast(nn.Dropout, modules["dropout"])
    dropout1 = cast(nn.Dropout, modules["dropout1"])
    dropout2 = cast(nn.Dropout, modules["dropout2"])
    norm1 = cast(nn.LayerNorm, modules["norm1"])
    norm2 = cast(nn.LayerNorm, modules["norm2"])
    # (a module activation is a submodule, a function an attribute of the layer's own)
    own = layer.__dict__
    activation = (
        modules["activation"]
        if "activation" in modules and "activation" not in own
        else layer.activation
    )
    # in place where ReLU, as torch's fast path does: the same values, without a fresh
    # (B, L, F) tensor, whose first touch (page faults) cost more than the ReLU itself
    relu = activation is F.relu or activation is torch.relu or type(activation) is nn.ReLU
    # GELU in place too (torch's gelu_: the same kernel, the same values), where the layer's is
    # torch's own: its approximation, else None
    gelu: str | None = None
    if activation is F.gelu:
        gelu = "none"
    elif type(activation) is nn.GELU:
        gelu = activation.approximate

    def feed_forward_block(h: Tensor) -> Tensor:
        h = F.linear(h, *_pair(linear1))  # Linear.forward's own call
        p = float(dropout.p)
        if relu and not _zeroes(dropout, p):  # (in the dropout's pass where a fast pass hashes)
            h = ctx.relu_dropout_into(h, p)
        else:
            if relu:
                h = h.relu_()
            elif gelu is not None:
                h = _gelu_(h, approximate=gelu)
            else:  # another, set since the plan: called in the mode, as the layer's forward
                # calls it (a dropout in it is the context's, not torch's own random one)
                with ctx.mode(ctx):
                    h = activation(h)
            h = _drop(ctx, h, dropout)
        return _drop(ctx, F.linear(h, *_pair(linear2)), dropout2)

    # The residual sums go into the blocks' outputs, fresh tensors of x's shape (o + x equals
    # x + o bit for bit): a new (B, L, E) tensor per sum costs more than the sum on small passes.
    if layer.norm_first:
        x = _attention_block(ctx, attn, dropout1, _norm(norm1, x)).add_(x)
        return feed_forward_block(_norm(norm2, x)).add_(x)
    x = _norm(norm1, _attention_block(ctx, attn, dropout1, x).add_(x))
    return _norm(norm2, feed_forward_block(x).add_(x))


#: The sampling context's torch-function mode (:class:`mcdrop.sampling_context.DropoutMode`,
#: set by that module, which imports this one), whose handlers run the layers.
SAMPLING_MODE: type[Any] | None = None


def _sampling_mode_on_top() -> Any:
    """The sampling mode where it is the innermost torch-function mode of the thread (an
    instance of :data:`SAMPLING_MODE` itself, not of a subclass, which may handle calls
    otherwise), else None."""
    depth = _len_torch_function_stack()
    if not depth:
        return None
    mode = _get_function_stack_at(depth - 1)
    return mode if type(mode) is SAMPLING_MODE else None


def _hand_over(
    handler: Callable[[SamplingContext, Any, Tensor], Tensor],
    func: Callable[[Any, Tensor], Tensor],
    module: nn.Module,
    src: Tensor,
) -> Tensor:
    """``func(module, src)`` handed to the torch-function modes (``src`` overrides it): where
    the sampling mode is the innermost, its ``handler`` called with that mode off, as
    ``handle_torch_function`` would call it, without its Python context manager (~4 µs of a
    one-row call); else by ``handle_torch_function``."""
    mode = _sampling_mode_on_top()
    if mode is None:
        return handle_torch_function(func, (src,), module, src)
    _pop_torch_function_stack()
    try:
        return handler(mode.ctx, module, src)
    finally:
        _push_on_torch_function_stack(mode)


def encoder_layer(layer: nn.TransformerEncoderLayer, src: Tensor) -> Tensor:
    """``layer``'s forward of ``src`` ``(B, L, E)`` without masks, as the twin calls it: under
    MC sampling the torch-function mode hands the call to :func:`handle_layer`, which runs with
    the mode off as every handler does, while any mode a caller entered outside the sampling
    context still sees its torch calls. Outside MC sampling, the layer's own ``forward``."""
    if has_torch_function((src,)):
        return _hand_over(handle_layer, encoder_layer, layer, src)
    return layer.forward(src)


def handle_layer(ctx: SamplingContext, layer: nn.TransformerEncoderLayer, src: Tensor) -> Tensor:
    """The sampling mode's handler of :func:`encoder_layer`: :func:`run_layer` where ``src``
    allows, else the layer's own ``forward`` in a mode of ``ctx`` again."""
    if _direct_input(layer, src):
        return run_layer(ctx, layer, src)
    with ctx.mode(ctx):
        return layer.forward(src)


def _direct_forward(layer: nn.TransformerEncoderLayer) -> Callable[..., Tensor]:
    """The ``forward`` of ``layer``'s twin: :func:`encoder_layer` where the call allows, else
    the layer's own ``forward`` (in the mode)."""

    def forward(
        src: Tensor,
        src_mask: Tensor | None = None,
        src_key_padding_mask: Tensor | None = None,
        is_causal: bool = False,
    ) -> Tensor:
        unmasked = src_mask is None and src_key_padding_mask is None and not is_causal
        if unmasked and type(src) is Tensor and _direct_layer(layer):
            return encoder_layer(layer, src)
        return layer.forward(src, src_mask, src_key_padding_mask, is_causal)

    return forward


def encoder_stack(encoder: nn.TransformerEncoder, src: Tensor) -> Tensor:
    """The layers of ``encoder`` on ``src`` ``(B, L, E)`` without masks (its norm not
    included), as its twin calls them: under MC sampling the mode hands the call to
    :func:`handle_stack`, which runs every layer with the mode off, one hand-over for the
    stack rather than one per layer. Outside MC sampling, the layers' own ``forward``."""
    if has_torch_function((src,)):
        return _hand_over(handle_stack, encoder_stack, encoder, src)
    for layer in encoder.layers:
        src = layer.forward(src)
    return src


def handle_stack(ctx: SamplingContext, encoder: nn.TransformerEncoder, src: Tensor) -> Tensor:
    """The sampling mode's handler of :func:`encoder_stack`: :func:`handle_layer` for each
    layer in turn, as ``nn.TransformerEncoder.forward`` without masks calls them through
    their twins' ``forward``."""
    for layer in _child(encoder, "layers"):
        src = handle_layer(ctx, layer, src)
    return src


def _stack_forward(
    encoder: nn.TransformerEncoder, twin: nn.TransformerEncoder
) -> Callable[..., Tensor]:
    """The ``forward`` of an ``nn.TransformerEncoder``'s twin whose layers all run directly:
    called without masks, :func:`encoder_stack` and the encoder's norm; else
    ``nn.TransformerEncoder.forward`` of the twin (whose layers' twins run directly where
    they can).

    Why: that ``forward`` runs its mask and fast-path checks through the mode, and its
    layers' calls go one by one through ``Module.__call__`` and a hand-over to the mode: one
    sample of one row of a 2-layer encoder took ~50 µs (a tenth) less without them.
    """
    layers = tuple(encoder.layers)

    def forward(
        src: Tensor,
        mask: Tensor | None = None,
        src_key_padding_mask: Tensor | None = None,
        is_causal: bool | None = None,
    ) -> Tensor:
        if (
            mask is None
            and src_key_padding_mask is None
            and not is_causal
            and type(src) is Tensor
            and all(_direct_layer(layer) for layer in layers)
        ):
            out = encoder_stack(encoder, src)
            norm = _child(encoder, "norm")
            return out if norm is None else norm(out)
        return nn.TransformerEncoder.forward(twin, src, mask, src_key_padding_mask, is_causal)

    return forward


@dataclass(frozen=True)
class EncoderLayers:
    """The ``nn.TransformerEncoderLayer`` modules of a model that a pass runs directly, and the
    modules on the way to them: see the module docstring."""

    model: weakref.ref[nn.Module]
    # every module copied into a twin (the model, the containers on the way to the layers) and
    # every module of the layers (whose calls the direct run skips), each with its children
    # as planned: none may have hooks, nor change children
    checked: tuple[tuple[nn.Module, tuple[nn.Module | None, ...]], ...]
    layers: frozenset[int]  # id() of the layers run directly
    copied: frozenset[int]  # id() of the modules a twin copies: the layers, those on the way
    stacks: frozenset[int] = frozenset()  # id() of the nn.TransformerEncoders run as one call

    @classmethod
    def of(cls, model: nn.Module) -> EncoderLayers | None:
        """The encoder layers of ``model`` that passes can run directly, or None if none."""
        found: list[nn.Module] = []
        on_the_way: dict[int, nn.Module] = {}

        def visit(m: nn.Module, path: tuple[nn.Module, ...]) -> None:
            if _runs_directly(m):
                found.append(m)
                on_the_way.update((id(p), p) for p in path)
                return
            for child in m._modules.values():
                if child is not None:
                    visit(child, (*path, m))

        visit(model, ())
        if not found or any(
            # a scripted module, or a forward set on the instance (torch.compile's wrapper):
            # its copy would not call its copied children
            isinstance(m, torch.jit.ScriptModule) or "forward" in vars(m)
            for m in on_the_way.values()
        ):
            return None
        modules = [*on_the_way.values(), *(sub for layer in found for sub in layer.modules())]
        direct = frozenset(id(m) for m in found)
        return cls(
            weakref.ref(model),
            tuple((m, tuple(m._modules.values())) for m in modules),
            direct,
            frozenset(on_the_way) | direct,
            frozenset(
                id(m)
                for m in on_the_way.values()
                if type(m) is nn.TransformerEncoder
                and len(m.layers) > 0
                and all(id(layer) in direct for layer in m.layers)
            ),
        )

    def runnable(self, model: nn.Module) -> bool:
        """Whether a pass may run the twin: the model's modules are those planned and none of
        them (nor any module globally) has a hook."""
        if self.model() is not model or global_hooks():
            return False
        return not any(
            has_hooks(m) or tuple(m._modules.values()) != children for m, children in self.checked
        )

    def unchanged(self) -> bool:
        """Whether the modules hold the children they held when planned (:meth:`runnable`
        without its hooks)."""
        return all(tuple(m._modules.values()) == children for m, children in self.checked)

    def twin(self, model: nn.Module) -> nn.Module:
        """The module a pass calls in place of ``model`` (in the sampling context): its twin,
        or ``model`` itself where the twin may not run (or under autocast, where the layer's
        own residual sums promote a bfloat16 block output to the float32 of its input, and the
        direct run's sums in place would round them to bfloat16). Made anew for every pass, so
        that it holds the modules' attributes as they are."""
        if not self.runnable(model) or torch.is_autocast_enabled("cpu"):
            return model
        return self._copy(model)[0]

    def kept_twin(self, model: nn.Module) -> KeptTwin:
        """A twin of ``model`` kept for many passes (a fast pass's, which checks what
        :meth:`runnable` checks itself): see :class:`KeptTwin`."""
        return KeptTwin(self, *self._copy(model))

    def _copy(self, model: nn.Module) -> tuple[nn.Module, tuple[_Pair, ...]]:
        """A twin of ``model``, and each module copied (:data:`_Pair`)."""
        made: dict[int, nn.Module] = {}
        pairs: list[_Pair] = []

        def copy(m: nn.Module) -> nn.Module:
            if id(m) in made:
                return made[id(m)]
            twin = object.__new__(type(m))
            twin.__dict__.update(m.__dict__)
            made[id(m)] = twin
            own: dict[str, Any] = {}
            if id(m) in self.layers:
                assert isinstance(m, nn.TransformerEncoderLayer)
                own["forward"] = _direct_forward(m)
            else:
                own["_modules"] = {
                    name: copy(child) if child is not None and id(child) in self.copied else child
                    for name, child in m._modules.items()
                }
                if id(m) in self.stacks:
                    assert isinstance(m, nn.TransformerEncoder)
                    assert isinstance(twin, nn.TransformerEncoder)
                    own["forward"] = _stack_forward(m, twin)
            twin.__dict__.update(own)
            pairs.append((m, twin, m.__dict__, twin.__dict__, own))
            return twin

        return copy(model), tuple(pairs)


#: A module a twin copies: the module, its twin, their ``__dict__``, and what the twin's holds in
#: place of the module's own entries (its children's twins, a forward of the twin's own).
_Pair = tuple[nn.Module, nn.Module, dict[str, Any], dict[str, Any], dict[str, Any]]


class KeptTwin:
    """A twin (:meth:`EncoderLayers.twin`) kept for many passes: :meth:`take` brings each
    twin's attributes up to date with its module's (two dict updates each), where a fresh twin
    per pass cost ~20 µs of a cold one-row call (a 2-layer encoder: five modules copied, two
    closures made). One pass at a time runs it: a pass on another thread meanwhile gets a fresh
    twin, as the general path's every pass does, since a forward may write attributes of its
    own into the twin (``self.features = ...``) and read them back later in the pass."""

    def __init__(
        self,
        layers: EncoderLayers,
        twin: nn.Module,
        pairs: tuple[_Pair, ...],
    ) -> None:
        self.layers = layers
        self.twin = twin
        self.pairs = pairs
        self._held = threading.Lock()  # held by the pass that runs the kept twin

    def take(self, model: nn.Module) -> tuple[nn.Module, bool]:
        """The module a pass calls in place of ``model`` (as :meth:`EncoderLayers.twin` would
        make it now, where the caller has checked :meth:`EncoderLayers.runnable`'s conditions),
        and whether it is the kept twin, which the caller then hands back (:meth:`give_back`)
        after the pass."""
        if torch.is_autocast_enabled("cpu"):
            return model, False
        if not self._held.acquire(blocking=False):  # another pass runs it: a twin of its own
            return self.layers._copy(model)[0], False
        try:
            return self.now(model), True
        except BaseException:
            self._held.release()
            raise

    def give_back(self) -> None:
        """The kept twin's pass is over (:meth:`take`)."""
        self._held.release()

    def now(self, model: nn.Module) -> nn.Module:
        """The kept twin of ``model``, brought up to date (the caller holds it: :meth:`take`)."""
        for module, twin, source, target, own in self.pairs:
            target.update(source)
            target.update(own)
            extra = len(target) - len(source)
            for key in own:  # (a loop, not a generator's sum: ~0.6 µs a module less)
                if key not in source:
                    extra -= 1
            if extra or type(twin) is not type(module):
                # an attribute deleted since (or one the forward wrote into the twin), or a
                # class set on the module (module.__class__ = ..., a forward of its own): a
                # twin made anew, kept from now on
                self.twin, self.pairs = self.layers._copy(model)
                break
        return self.twin
