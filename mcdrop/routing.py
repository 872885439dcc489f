"""Dropout modules and functions handed straight to the sampling context, without the
torch-function mode.

The mode (:class:`~mcdrop.sampling_context.DropoutMode`) sees every torch call of a forward to
find its dropout calls. torch's own Python around a mode (a context manager per call) costs
~10 µs a call of a cold one-row request: on a small model with a ``forward`` of its own that is
more than its arithmetic (an 8→64→64→1 MLP with two dropout layers: ~100 µs a call beyond its
38 µs forward). Where every stochastic call of a model comes from a torch dropout module
(``nn.Dropout`` and its kin), a dropout function of ``torch.nn.functional`` (``F.dropout``
and its kin, which a forward and torch's modules look up there at every call), torch's
``nn.MultiheadAttention`` (its weights' dropout) or the dropout between the layers of
``nn.LSTM``, ``nn.GRU`` and ``nn.RNN`` (whose kernels they look up in ``torch._VF`` at every
call), a pass may instead give those modules, functions and kernels, for the pass's thread only,
a forward that hands the call to the sampling context (the attention and the kernels: to the
mode's own handlers, :mod:`mcdrop.attention` and :mod:`mcdrop.rnn`, so the arithmetic is the
mode's), and run the model's forward with no mode.

While routed passes run, each dropout module of the model has a :class:`_Route` as its
instance ``forward``, shared by the passes on the module at that moment (counted, under a lock)
and removed by the last; where the plan routes functions, ``torch.nn.functional``'s dropout
functions are :class:`_FunctionRoute` s for the whole process, and ``torch._VF``'s recurrent
kernels :class:`_KernelRoute` s, put there by the first such pass and torch's own put back by
the last. A call on another thread, or outside a routed pass (a deterministic prediction, a pass
under the mode), runs torch's own forward and function. A plan routes its passes only where a
routed pass gave the mode's samples, bit for bit, when the plan was made
(:func:`mcdrop.planning.probe`; the modules alone first, the functions too only where that
fails), and each routed pass must make every call of the plan: one that routing misses (a
``torch.dropout`` in a custom ``forward``, a rate set to 0 since) leaves the count short or
shifts the calls, and the pass runs again under the mode. A call routing cannot see makes no
such trace: a pass is routed only while the model's containers hold the children they held when
the plan was made (a dropout module put in since is not routed), and a pass whose forward asks
:func:`mcdrop.is_sampling` runs again under the mode (the answer may lead to a functional call,
on some inputs only). Where a plan routes the modules alone, a forward's ``F.dropout`` on some
inputs only (``if x.abs().max() > 5: h = F.dropout(h, p, self.training)``) is torch's own on
those inputs: the identity in eval mode, torch's unseeded dropout with ``training=True``, where
the mode refuses the call the plan does not have; so is, whatever the plan routes, a dropout
function routing leaves alone (``torch.dropout``: torch's own namespace, which torch.compile's
tables read; one imported by name, bound at import) called on some inputs only.
"""

from __future__ import annotations

import copyreg
import functools
import os
import threading
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import _VF, Tensor, nn

from mcdrop import attention
from mcdrop.attention import arg
from mcdrop.exceptions import UnsupportedModelError
from mcdrop.sampling_context import (
    _HANDLERS,
    DROPOUT_FUNCTIONS,
    DROPOUT_SWITCHES,
    DropoutMode,
    SamplingContext,
    _active,
    apply_multipliers,
)

_lock = threading.Lock()
_installed: set[_Route] = set()  # the module routes in place now (under _lock)


class _Route:
    """A dropout module's forward while routed passes run (see the module docstring)."""

    __slots__ = ("channels", "count", "inplace", "module", "options")

    def __init__(self, module: nn.Module, func: Callable[..., Any], inplace: bool) -> None:
        self.module = module
        self.options = {"kind": func.__name__, **DROPOUT_FUNCTIONS[func]}
        self.channels = bool(self.options.get("feature"))  # its multipliers: per channel
        self.inplace = inplace  # whether the layer's forward passes its inplace flag
        self.count = 0  # routed passes on the module now

    def __call__(self, input: Tensor) -> Tensor:
        x = input  # (torch's forward's name: a model may call drop(input=h))
        ctx = _active.get()  # active_context(), without a call
        module: Any = self.module  # a torch dropout layer: p and inplace
        if ctx is None or not ctx.routed:  # another thread's call, or this one's not routed
            return type(module).forward(module, x)
        if ctx.callers is not None:  # a pass that notes which module makes each call
            ctx.callers.append((module, x.dtype))
        inplace = self.inplace and bool(module.inplace)
        p = float(module.p)
        entry = _made_entry(ctx)
        # the call of the plan's making: this module, its rate, the plan's shape (rows first);
        # anything else goes to the context's dropout, which explains
        if entry is not None and entry[0] is module and entry[1] == p and _fits(x, entry):
            return _apply_made(ctx, x, entry[3], inplace, self.channels)
        return ctx.dropout(x, p, **self.options, inplace=inplace)


class _AttentionRoute(_Route):
    """An ``nn.MultiheadAttention``'s forward while routed passes run. On a routed pass it runs
    the path torch's own forward takes under the mode (torch's eval-mode fast path, a fused
    kernel with no dropout, takes other arithmetic): ``F.multi_head_attention_forward`` with
    the layer's settings, handed to the mode's handler, which drops the attention weights with
    the context's masks (:mod:`mcdrop.attention`). Nested tensors (torch's fast path only) run
    torch's forward under the mode."""

    __slots__ = ()

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.options = {}
        self.channels = self.inplace = False
        self.count = 0

    def __call__(  # type: ignore[override]  # (nn.MultiheadAttention.forward's signature)
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        ctx = _active.get()
        m: Any = self.module
        given = (query, key, value, key_padding_mask, need_weights, attn_mask)
        if ctx is None or not ctx.routed:  # another thread's call, or this one's not routed
            return type(m).forward(m, *given, average_attn_weights, is_causal)
        if query.is_nested or key.is_nested or value.is_nested:
            with DropoutMode(ctx):
                return type(m).forward(m, *given, average_attn_weights, is_causal)
        # torch's slow path (nn.MultiheadAttention.forward), as it runs under the mode
        batched = query.dim() == 3
        key_padding_mask = F._canonical_mask(
            mask=key_padding_mask,
            mask_name="key_padding_mask",
            other_type=F._none_or_dtype(attn_mask),
            other_name="attn_mask",
            target_type=query.dtype,
        )
        attn_mask = F._canonical_mask(
            mask=attn_mask,
            mask_name="attn_mask",
            other_type=None,
            other_name="",
            target_type=query.dtype,
            check_other=False,
        )
        if m.batch_first and batched:  # (transposed so that the "is" of q, k and v holds)
            if key is value:
                if query is key:
                    query = key = value = query.transpose(1, 0)
                else:
                    query, key = (t.transpose(1, 0) for t in (query, key))
                    value = key
            else:
                query, key, value = (t.transpose(1, 0) for t in (query, key, value))
        separate = (
            {}
            if m._qkv_same_embed_dim
            else {
                "use_separate_proj_weight": True,
                "q_proj_weight": m.q_proj_weight,
                "k_proj_weight": m.k_proj_weight,
                "v_proj_weight": m.v_proj_weight,
            }
        )
        args = (
            query, key, value, m.embed_dim, m.num_heads, m.in_proj_weight, m.in_proj_bias,
            m.bias_k, m.bias_v, m.add_zero_attn, m.dropout, m.out_proj.weight, m.out_proj.bias,
        )  # fmt: skip
        kwargs = {
            "training": m.training,
            "key_padding_mask": key_padding_mask,
            "need_weights": need_weights,
            "attn_mask": attn_mask,
            **separate,
            "average_attn_weights": average_attn_weights,
            "is_causal": is_causal,
        }
        before = ctx.calls
        # torch's function (the handler's path for what it does not compute itself) calls
        # F.dropout, which must be torch's there as under the mode: its dropout is intercepted
        functions, ctx.routes_functions = ctx.routes_functions, False
        try:
            out, weights = attention.multi_head_attention(ctx, args, kwargs)
        finally:
            ctx.routes_functions = functions
        if ctx.callers is not None:  # a probe: the layer made these calls
            ctx.callers.extend([(m, query.dtype)] * (ctx.calls - before))
        if m.batch_first and batched:
            out = out.transpose(1, 0)
        return out, weights


def _made_entry(ctx: SamplingContext) -> tuple[Any, float, tuple[int, ...], Tensor] | None:
    """A routed fast pass's premade entry for its next call (module or function call, rate,
    input shape, multipliers); None where it has none."""
    made = ctx.made
    if made is None or ctx.calls >= len(made):
        return None
    return made[ctx.calls]


def _fits(x: Tensor, entry: tuple[Any, float, tuple[int, ...], Tensor]) -> bool:
    """Whether the premade multipliers of ``entry`` are made for ``x``'s shape and dtype."""
    return x.shape == entry[2] and x.dtype == entry[3].dtype


def _apply_made(
    ctx: SamplingContext, x: Tensor, scale: Tensor, inplace: bool, channels: bool
) -> Tensor:
    """``x`` times its premade multipliers: the pass's next call taken, and the replication
    of its first call (> 1 where the pass shares the prefix) done."""
    ctx.calls += 1
    times = ctx.replicate
    ctx.replicate = 1
    return apply_multipliers(x, scale, times, inplace, channels, ctx.kept)


class FunctionCall:
    """A dropout function's call as :attr:`DropoutRoutes.callers` notes it: the function
    (torch's own) and the rate it was given when the plan was made (a routed fast pass makes
    that call's multipliers before the pass at that rate; the route checks it at the call)."""

    __slots__ = ("func", "p")

    def __init__(self, func: Callable[..., Any], p: float) -> None:
        self.func = func
        self.p = p


class _FunctionRoute:
    """A ``torch.nn.functional`` dropout function while routed passes that route functions
    run (see the module docstring): torch's own function on every thread but the routed
    passes', whose calls it hands to their sampling context, as the mode's handler does.

    Other threads' code finds it in torch's place meanwhile, so it passes for torch's function
    where it can: its name, signature and docstring (``functools.update_wrapper``: torch.fx
    writes its call as ``torch.nn.functional.dropout``); a pickle of it is torch's function;
    torch.compile traces torch's function (``__original_fn``, which dynamo inlines instead of
    this ``__call__``, whose context variable it cannot trace), and TorchScript compiles
    torch's (a dispatch on ``inplace`` to torch's function either way). A pickle of torch's
    function itself fails meanwhile (pickle finds another object by its name)."""

    # the attributes a call reads as slots; update_wrapper's in __dict__
    __slots__ = ("__dict__", "__weakref__", "channels", "func", "handler", "name")

    def __init__(self, func: Callable[..., Any]) -> None:
        self.func = func
        self.name = func.__name__
        self.handler = _HANDLERS[func]
        self.channels = bool(DROPOUT_FUNCTIONS[func].get("feature"))  # its multipliers: per channel
        functools.update_wrapper(self, func)
        # (set by name: in the class body, Python would mangle them)
        setattr(self, "__original_fn", func)
        setattr(self, "__script_if_tracing_wrapper", True)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        ctx = _active.get()
        # another thread's call, or this one's pass routes no functions (its plan has none to
        # route, or it is under the mode): what it would find with no other pass running
        if ctx is None or not ctx.routes_functions:
            return self.func(*args, **kwargs)
        if ctx.refuses_functions:  # a probe of the modules alone (mcdrop.planning)
            raise UnsupportedModelError(
                f"torch.nn.functional.{self.name} called in a pass that routes dropout modules only"
            )
        x = arg(args, kwargs, 0, "input", None)
        p = float(arg(args, kwargs, 1, "p", 0.5))
        if ctx.callers is not None and isinstance(x, Tensor):
            ctx.callers.append((FunctionCall(self.func, p), x.dtype))
        entry = _made_entry(ctx) if isinstance(x, Tensor) else None
        if entry is not None and type(entry[0]) is FunctionCall and entry[0].func is self.func:
            if entry[1] == p and _fits(x, entry):
                inplace = bool(arg(args, kwargs, 3, "inplace", False))
                return _apply_made(ctx, x, entry[3], inplace, self.channels)
            # the rate given now is the one the next passes' multipliers are made at (a
            # forward's F.dropout(h, self.p) whose p changed since the plan)
            entry[0].p = p
        return self.handler(ctx, args, kwargs)

    def __reduce__(self) -> tuple[Callable[[str], Callable[..., Any]], tuple[str]]:
        return _torch_function, (self.name,)

    def __repr__(self) -> str:
        return f"<mcdrop route of torch.nn.functional.{self.name}>"


class _KernelRoute:
    """A fused recurrent kernel (``torch.lstm``, ``torch.gru``, ``torch.rnn_tanh``,
    ``torch.rnn_relu``), which ``nn.LSTM``, ``nn.GRU`` and ``nn.RNN`` look up in ``torch._VF`` at
    every call, while routed passes that route functions run: torch's kernel on every thread but
    the routed passes', which hand the call to the mode's handler (:mod:`mcdrop.rnn`: layer by
    layer, the context's dropout between the layers, which the kernel applies in training only),
    so the arithmetic is the mode's. Other threads' code finds it in torch's place meanwhile: it
    has the kernel's name and docstring, a pickle of it is torch's kernel, and torch.compile
    goes through it to torch's (no ``__original_fn`` as :class:`_FunctionRoute` has: the kernel
    is a builtin, which torch.compile takes that way for Python code, and fails on)."""

    __slots__ = ("__dict__", "__weakref__", "func", "handler", "name")

    def __init__(self, func: Callable[..., Any]) -> None:
        self.func = func
        self.name = func.__name__
        self.handler = _HANDLERS[func]
        functools.update_wrapper(self, func)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        ctx = _active.get()
        if ctx is None or not ctx.routes_functions:
            return self.func(*args, **kwargs)
        p = _kernel_rate(args, kwargs)
        if ctx.refuses_functions:  # a probe of the modules alone (mcdrop.planning)
            if p:  # (torch's kernel drops nothing in eval mode, where the mode drops)
                raise UnsupportedModelError(
                    f"torch.{self.name} called with dropout between layers in a pass that "
                    "routes dropout modules only"
                )
            return self.func(*args, **kwargs)
        before = ctx.calls
        out = self.handler(ctx, args, kwargs)
        if ctx.callers is not None and ctx.calls > before:  # a probe: the kernel made these
            call = (FunctionCall(self.func, p), args[0].dtype)
            ctx.callers.extend([call] * (ctx.calls - before))
        return out

    def install(self) -> None:
        setattr(_VF, self.name, self)

    def remove(self) -> None:
        """torch's own back (torch._VF's missing attributes are torch's kernels), where no one
        has put a function of their own there since."""
        if vars(_VF).get(self.name) is self:
            delattr(_VF, self.name)

    def routable(self) -> bool:
        """Whether torch._VF has no kernel of anyone else's in place (or has this route)."""
        return vars(_VF).get(self.name, self) is self

    def __reduce__(self) -> tuple[Callable[[str], Callable[..., Any]], tuple[str]]:
        return _torch_function, (self.name,)

    def __repr__(self) -> str:
        return f"<mcdrop route of torch._VF.{self.name}>"


def _kernel_rate(args: tuple[Any, ...], kwargs: dict[str, Any]) -> float:
    """The dropout between the layers of a recurrent kernel's call (nn.RNNBase's positional
    arguments: ``(input, hx, params, has_biases, num_layers, dropout, ...)``, or for a
    PackedSequence ``(data, batch_sizes, hx, params, has_biases, num_layers, dropout, ...)``)."""
    if kwargs or len(args) != 9:
        return 0.0
    layers, p = (args[4], args[5]) if isinstance(args[3], bool) else (args[5], args[6])
    return float(p) if layers > 1 else 0.0


def _torch_function(name: str) -> Callable[..., Any]:
    """torch's own function ``name``: what a pickled route unpickles as."""
    return _TORCH_FUNCTIONS[name]


# torch.nn.functional's dropout functions, routed by a pass that routes functions: a forward's
# F.dropout(h, p, training) looks its function up in torch.nn.functional at every call (so does
# nn.Dropout's forward). torch.dropout and its kin (torch's namespace) are not routed: a call of
# theirs leaves a routed pass's count short, and the pass runs under the mode. (torch.compile
# builds its tables of torch's functions from their names in torch's namespace, once: a compile
# on another thread meanwhile would keep a route in torch.dropout's place for good.)
_FUNCTION_ROUTES = tuple(
    _FunctionRoute(func)
    for func in (
        F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout
    )
)  # fmt: skip
# While a pass routes them, torch's function looks itself up in torch.nn.functional for its
# torch-function dispatch (F.dropout's handle_torch_function(dropout, ...)): a pass under the
# mode on another thread is handed the route as the function called, and samples it as torch's.
_HANDLERS.update((route, route.handler) for route in _FUNCTION_ROUTES)
# (so is a deterministic prediction's mode: sampling_context.EvalDropoutMode)
DROPOUT_SWITCHES.update((route, DROPOUT_SWITCHES[route.func]) for route in _FUNCTION_ROUTES)
# nn.LSTM, nn.GRU and nn.RNN's kernels, routed with the functions (looked up in torch._VF, a
# module whose missing attributes are torch's: a route is an attribute of its own there, deleted
# after)
_KERNEL_ROUTES = tuple(
    _KernelRoute(func) for func in (torch.lstm, torch.gru, torch.rnn_tanh, torch.rnn_relu)
)
_TORCH_FUNCTIONS: dict[str, Callable[..., Any]] = {
    **{route.name: route.func for route in _FUNCTION_ROUTES},
    **{route.name: route.func for route in _KERNEL_ROUTES},
}


def _script_dispatch(route: _FunctionRoute) -> dict[str, Any]:
    """How TorchScript resolves a call of ``route`` (another thread's script of a model while a
    pass routes the functions): torch's function, whichever ``inplace``."""
    return {"if_true": route.func, "if_false": route.func, "index": 3, "default": False,
            "arg_name": "inplace"}  # fmt: skip


# (torch's private table: where a torch version has none, a script of a model on another thread
# meanwhile fails, and nothing else changes)
_dispatched = getattr(getattr(torch, "_jit_internal", None), "boolean_dispatched", None)
if isinstance(_dispatched, MutableMapping):
    _dispatched.update((route, _script_dispatch(route)) for route in _FUNCTION_ROUTES)
_functions_routed = 0  # passes that route functions now (under _lock)


def _install_functions() -> bool:
    """Route torch.nn.functional's dropout functions (under ``_lock``), for one more pass;
    False where one of them is not torch's own (a user's or another library's wrapper, which a
    route would skip)."""
    global _functions_routed
    if _functions_routed == 0:
        if not functions_routable():
            return False
        for route in _FUNCTION_ROUTES:
            setattr(F, route.name, route)
        for kernel in _KERNEL_ROUTES:
            kernel.install()
    _functions_routed += 1
    return True


def functions_routable() -> bool:
    """Whether torch.nn.functional's dropout functions are torch's own (or routes): none is a
    wrapper of one's own, which a pass never routes."""
    found = F.__dict__
    return all(found.get(route.name) in (route.func, route) for route in _FUNCTION_ROUTES) and all(
        route.routable() for route in _KERNEL_ROUTES
    )


def _forked() -> None:
    """In a child forked while another thread's pass was routed (a DataLoader's worker): no
    pass runs in it, so torch's own functions and modules' forwards go back, and the lock (which
    that thread may have held) is made afresh. (A pass of the forking thread's own, in flight,
    goes on in the child with torch's: a call it then makes runs again under the mode, and its
    end counts nothing.)"""
    global _lock, _functions_routed
    _lock = threading.Lock()
    if _functions_routed:
        _functions_routed = 1
        _remove_functions()
    for route in _installed:
        own = route.module.__dict__
        if own.get("forward") is route:
            del own["forward"]
        route.count = 0
    _installed.clear()


os.register_at_fork(after_in_child=_forked)


def _remove_functions() -> None:
    """End one pass's routing of the dropout functions (under ``_lock``); the last puts torch's
    own back (where no one has put a function of their own there since)."""
    global _functions_routed
    if _functions_routed == 0:  # a pass in flight in a forked child (_forked: none counted)
        return
    _functions_routed -= 1
    if _functions_routed == 0:
        found = F.__dict__
        for route in _FUNCTION_ROUTES:
            if found.get(route.name) is route:
                setattr(F, route.name, route.func)
        for kernel in _KERNEL_ROUTES:
            kernel.remove()


class DropoutRoutes:
    """The dropout modules of one model, routed to the sampling context for a pass.

    Args:
        modules: each module and (the function its forward calls, whether it passes
            ``inplace``).
    """

    def __init__(
        self,
        modules: tuple[tuple[nn.Module, Callable[..., Any], bool], ...],
        children: tuple[tuple[dict[str, nn.Module | None], tuple[nn.Module | None, ...]], ...] = (),
        functions: bool = False,
    ) -> None:
        self.modules = modules
        # each module's route, made once (a pass that finds another pass's in place shares it)
        self.routes = tuple(
            _AttentionRoute(module)
            if func is F.multi_head_attention_forward
            else _Route(module, func, inplace)
            for module, func, inplace in modules
        )
        # whether a pass routes torch.nn.functional's dropout functions too (a forward that
        # calls them): only where the modules alone do not give the mode's samples
        self.functions = functions
        # each container of the model and its children when the plan was made: a dropout
        # module put in since is not routed, and its call would pass unseen (the mode refuses it)
        self.children = children
        # whether a routed pass missed a call since the plan: no pass is routed from then on
        self.missed = False
        # the module (or function call) that made each call of the plan, and its input's dtype,
        # in call order (noted by probe)
        self.callers: tuple[tuple[nn.Module | FunctionCall, torch.dtype], ...] = ()

    @classmethod
    def of(
        cls,
        model: nn.Module,
        kinds: Mapping[type[nn.Module], tuple[Callable[..., Any], bool]],
        functions: bool = False,
    ) -> DropoutRoutes | None:
        """The routes of ``model``'s modules whose class is one of ``kinds`` (torch's dropout
        layers, and what each calls), and of torch's dropout functions where ``functions``;
        None where there is nothing to route. (A module with a ``forward`` of its own is never
        routed: :meth:`install`.)"""
        every = list(model.modules())
        found = [m for m in every if type(m) in kinds]
        if not found and not functions:
            return None
        for kind in kinds:  # copies made while a pass is routed (another thread's) leave it
            copyreg.dispatch_table.setdefault(kind, _reduce)
        children = tuple((m._modules, tuple(m._modules.values())) for m in every if m._modules)
        return cls(tuple((m, *kinds[type(m)]) for m in found), children, functions)

    def unchanged(self) -> bool:
        """Whether every container of the model has the children it had when the plan was
        made."""
        return all(tuple(found.values()) == planned for found, planned in self.children)

    def install(self) -> bool:
        """Route the modules for a pass on this thread (to :meth:`remove` after it); False,
        routing none, where a module has a ``forward`` of its own now."""
        with _lock:
            if self.functions and not _install_functions():
                return False
            for i, made in enumerate(self.routes):
                own = made.module.__dict__
                route = own.get("forward")
                if route is None:
                    route = own["forward"] = made
                    # counted afresh: a pass that ended with another forward in its place (one
                    # set meanwhile, since removed) counted none off
                    route.count = 0
                    _installed.add(route)
                elif not isinstance(route, _Route):
                    self._remove(i)
                    return False
                route.count += 1
        return True

    def remove(self) -> None:
        """End a pass's routing (after a successful :meth:`install`)."""
        with _lock:
            self._remove(len(self.modules))

    def _remove(self, installed: int) -> None:
        if self.functions:
            _remove_functions()
        for module, _, _ in self.modules[:installed]:
            own = module.__dict__
            route = own.get("forward")
            if isinstance(route, _Route):
                route.count -= 1
                if route.count == 0:
                    del own["forward"]
                    _installed.discard(route)


def _reduce(module: nn.Module) -> str | tuple[Any, ...]:
    """A dropout module's pickle and copy (``copy.deepcopy``, ``torch.save``): torch's, less a
    :class:`_Route` that a routed pass (on another thread) has put there for its own length: a
    copy would keep it for good, a ``forward`` of its own that no pass removes."""
    reduced = module.__reduce_ex__(4)
    if isinstance(reduced, tuple) and len(reduced) > 2 and isinstance(reduced[2], dict):
        state = reduced[2]  # (nn.Module.__getstate__: a copy of the module's __dict__)
        if isinstance(state.get("forward"), _Route):
            del state["forward"]
    return reduced


def routed_forward(
    model: nn.Module, inputs: Tensor, ctx: SamplingContext, routes: DropoutRoutes, calls: int
) -> Any:
    """``model(inputs)`` with its dropout modules' calls handed to ``ctx`` and no mode; None
    where the pass did not make exactly the ``calls`` calls of its plan, or its forward asked
    :func:`mcdrop.is_sampling` (then the caller runs it under the mode, on inputs made afresh:
    this one may have written into ``inputs``)."""
    if routes.missed or not routes.install():
        return None
    ctx.routed = True
    ctx.routes_functions = routes.functions
    token = _active.set(ctx)  # as ctx.active(), without its context manager (µs a pass)
    try:
        y = model(inputs)
    except UnsupportedModelError:  # a missed call shifted the others: the mode will say
        routes.missed = True
        return None
    finally:
        _active.reset(token)
        routes.remove()
    # a forward that asked mcdrop.is_sampling() may have made a functional call that routing
    # cannot see (F.dropout(h, p, self.training or is_sampling()) on some inputs only: torch's
    # own unseeded dropout), which the mode sees
    if ctx.calls != calls or ctx.asked:
        # The model does what routing cannot follow since its plan: its passes run under the
        # mode from now on, rather than twice (its forward's side effects, hooks, included).
        routes.missed = True
        return None
    return y
