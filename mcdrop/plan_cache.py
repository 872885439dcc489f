"""The sampling plans that calls given none make and keep, per model and row shape.

``mcdrop.sample(model, x, n)`` needs the model's :class:`~mcdrop.planning.SamplingPlan`: five to
seven small forward passes, ~0.6–0.9 ms on a small MLP, where one sample of one row costs
~0.05 ms with a kept plan. A call given no plan makes it once and keeps it here for later calls
with rows of the same shape and dtype (under the same autocast), so ``sample`` in a loop costs
what a call with ``plan=mcdrop.plan(model, x)`` costs (:func:`mcdrop.sampling.sample`).

A kept plan serves a call only while the model is as it was planned:

- the same modules in the same places (no layer swapped, added or removed), each of the class
  it had (``torch.nn.utils.parametrize`` and ``module.__class__ = ...`` change one), none with a
  ``forward`` set on it since, the same forward hooks and pre-hooks on each module and on every
  module (``register_module_forward_hook``: a hook may make the layers before the first dropout
  depend on the batch, or use their output after it), on the same device;
- the modules of the user's own classes (not torch's) with the same attributes (but
  ``training``: a plan is made in eval mode), a flag their ``forward`` reads: compared by
  identity, so a value set anew (even an equal float) makes a new plan, as does a ``forward``
  set on their class (or a ``torch.fx.GraphModule`` recompiled); and a ``forward`` that sets an
  attribute of its own on every call (a counter) makes one on every call, as every call given
  no plan did before plans were kept;
- torch's modules with the same settings (their attributes but ``training``, tensors and those
  named with a leading ``_``: a dropout rate, ``inplace``, a softmax's ``dim``, an encoder
  layer's ``activation``), compared the same way.

Anything else that changes the pass's dropout calls (a ``forward`` that reads a global, or a
list or dict attribute changed in place) shows in the pass as a call the plan does not have; the
sampling call then runs again with a fresh plan (:func:`forget`). Either way a call's samples
are those a fresh plan gives. (The exceptions, as with a plan the caller keeps: a routed plan
(:mod:`mcdrop.routing`) made when a global kept an ``F.dropout`` call out of the ``forward``
does not see that call once the global lets it in; and what changes no dropout call but makes
the layers before the first dropout depend on the batch, so that they may no longer run once
per row (a global or a list read there, values set in place, a buffer set to None: BatchNorm's
running statistics), keeps the plan's shared prefix: call :func:`forget` after such a change.)

The plans live on the model (the ``_mcdrop_plans`` entry of its ``__dict__``), not in a global
table: a plan references the model's modules, so a table would keep every model it saw alive.
On the model they form a reference cycle with it, which Python's cycle collector frees with the
model (``gc.collect()`` frees it at once). The entry pickles as an empty ``dict`` (a model saved
whole with ``torch.save`` loads without mcdrop) and copies (``copy.copy``, ``copy.deepcopy``,
``nn.DataParallel``'s replicas) as no plans: a plan is for one model object.
"""

from __future__ import annotations

import operator
import os
import threading
import weakref
from collections.abc import Iterable, Iterator, Sized
from itertools import chain, repeat
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _module_hooks

from mcdrop._walk import every_module
from mcdrop.devices import first_parameter_path, model_device
from mcdrop.planning import SamplingPlan
from mcdrop.routing import _Route

#: The most row shapes (and dtypes) a model keeps plans for: a model fed sequences of many
#: lengths keeps those of the latest few.
MAX_PLANS = 8

_ATTRIBUTE = "_mcdrop_plans"

_lock = threading.Lock()  # held while plans are kept (a plan made: rare), never on a hit


def _forked() -> None:
    """A child forked while another thread held the lock gets a free one."""
    global _lock
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_forked)

_FORWARD = repeat("forward")  # (stateless: one for every map that asks each dict or class)

# rows' shape and dtype, and the dtypes autocast gives on the CPU and on CUDA devices (False
# where it is off): a plan made under autocast sees its dropouts' inputs in that dtype, which
# sets its pass sizes and routes
_Key = tuple[torch.Size, torch.dtype, "torch.dtype | bool", "torch.dtype | bool"]


class _Plans:
    """One model's kept plans, and the model as they were made for it.

    :meth:`fits` runs on every call given no plan, so :meth:`note_state` lays out what it
    checks as flat tuples, each compared in one C loop: the classes (as a tuple: a class's
    ``==`` is identity), how many entries dicts have (none, the common case for children and
    hooks: their truth is the cheapest test), and the objects that must be the very same ones,
    compared by identity (never ``==``: a tensor's would compute, and an equal value set anew
    is a change)."""

    def __init__(self, model: nn.Module) -> None:
        self.owner = weakref.ref(model)
        self.plans: dict[_Key, SamplingPlan] = {}

    def note_state(self, model: nn.Module) -> None:
        """Note the model as it is now (with this entry in the model's ``__dict__``).

        Its modules (:func:`~mcdrop._walk.every_module`), their classes and children, which
        have a ``forward`` set on them, their forward hooks and pre-hooks and those of every
        module; the attributes of the modules of classes not torch's, a flag their ``forward``
        reads, and how many they are, with the ``forward`` of every class not torch.nn's; the
        settings of torch's modules: their attributes whose names do not start with ``_``, but
        for tensors (``spectral_norm`` and ``prune`` set ``weight`` on every call). A setting
        may change the plan without a dropout call the pass would miss (``softmax.dim = 0``
        before the first dropout: the prefix depends on the batch; an encoder layer's
        ``activation``). (Reading every attribute of a torch module would cost ~0.5 µs a
        module.) Never ``training``: a plan is made in eval mode whatever the model's flags,
        and a call on a model in training mode switches them for its length (a call beside it
        on another thread would plan again). And the device, with the way to it."""
        modules = every_module(model)
        own = [not type(m).__module__.startswith("torch.") for m in modules]
        self.modules = tuple(modules)
        self.types = tuple(map(type, modules))
        self.dicts = tuple(vars(m) for m in modules)
        self.patched = _own_forwards(self.dicts)
        # the forward of the classes of the modules not torch.nn's: a notebook may set a new
        # one on a class, a torch.fx.GraphModule sets one on its own when recompiled
        self.classes = tuple(
            {type(m): None for m in modules if not type(m).__module__.startswith("torch.nn.")}
        )
        self.forwards = tuple(c.forward for c in self.classes)

        children = [m._modules for m in modules]
        # the forward hooks and pre-hooks registered for every module
        # (register_module_forward_hook), then each module's; their keys are the handles' ids,
        # never given twice
        hooks: list[dict[int, Any]] = [
            _module_hooks._global_forward_pre_hooks,
            _module_hooks._global_forward_hooks,
            *(m._forward_pre_hooks for m in modules),
            *(m._forward_hooks for m in modules),
        ]
        # the dicts with no entry, which must have none still (a leaf's children, no hook);
        # the others' sizes, and own modules' (an attribute added)
        self.empty = tuple(d for d in (*children, *hooks) if not d)
        self.parents = tuple(c for c in children if c)
        self.hooked = tuple(h for h in hooks if h)
        self.sized: tuple[Sized, ...] = (
            *self.parents,
            *self.hooked,
            *(d for d, mine in zip(self.dicts, own, strict=True) if mine),
        )
        self.sizes = tuple(map(len, self.sized))
        # the children and hooks in their order (a Sequential runs its children in theirs)
        self.children = tuple(chain.from_iterable(map(dict.values, self.parents)))
        # (views follow their dicts: made once, not on every call; one parent, the common
        # case, needs no chain)
        views = tuple(p.values() for p in self.parents)
        self.children_now: Iterable[nn.Module | None] = (
            views[0] if len(views) == 1 else _Chained(views)
        )
        self.hook_items = (
            *chain.from_iterable(self.hooked),
            *chain.from_iterable(map(dict.values, self.hooked)),
        )

        # the modules model_device walks to the first parameter, with their children and
        # parameter dicts noted, give the device cheaply (see _on_its_device)
        self.device = model_device(model)
        path = first_parameter_path(model)
        self.before: tuple[dict[str, Any], ...] = ()
        self.holder: dict[str, Any] | None = None
        if path is not None:
            self.before = tuple(m._parameters for m in path[:-1])
            self.holder = path[-1]._parameters
        walked = {id(m) for m in path or ()}

        noted: list[tuple[dict[str, Any], str]] = []
        for m, d, mine in zip(modules, self.dicts, own, strict=True):
            if mine:
                # (the entry _mcdrop_plans is this object: found there, by kept and keep)
                names = [name for name in d if name not in ("training", _ATTRIBUTE)]
            else:
                names = [
                    name
                    for name, value in d.items()
                    if name[0] != "_" and name != "training" and not isinstance(value, Tensor)
                ]
            if id(m) in walked:
                names += [name for name in ("_modules", "_parameters") if name not in names]
            noted += ((d, name) for name in names)
        self.noted_dicts = tuple(d for d, _ in noted)
        self.noted_names = tuple(name for _, name in noted)
        self.noted = tuple(d[name] for d, name in noted)

    def fits(self, model: nn.Module) -> bool:
        """Whether the model is as its plans were made for (see :meth:`note_state`): the same
        object, its modules of the same classes, with the same children, hooks, attributes and
        settings, no ``forward`` set on one since, the same class forwards, on the same
        device."""
        try:
            return (
                self.owner() is model
                and tuple(map(type, self.modules)) == self.types
                and not any(self.empty)
                and tuple(map(len, self.sized)) == self.sizes
                # (the sizes equal, each side of each map below is as long as the other)
                and all(map(operator.is_, self.children_now, self.children))
                and all(
                    map(
                        operator.is_,
                        map(dict.__getitem__, self.noted_dicts, self.noted_names),
                        self.noted,
                    )
                )
                and all(map(operator.is_, map(getattr, self.classes, _FORWARD), self.forwards))
                and (not self.hooked or self._same_hooks())
                and (
                    not any(map(operator.contains, self.dicts, _FORWARD))
                    or _own_forwards(self.dicts) == self.patched  # another thread's pass routes
                )
                and self._on_its_device(model)
            )
        except KeyError:  # an attribute noted, since deleted
            return False

    def _same_hooks(self) -> bool:
        """Whether the hook dicts that had hooks have the same ones, in the same order."""
        now = chain(
            chain.from_iterable(self.hooked), chain.from_iterable(map(dict.values, self.hooked))
        )
        return all(map(operator.is_, now, self.hook_items))

    def _on_its_device(self, model: nn.Module) -> bool:
        """Whether :func:`model_device` gives the device noted: read from the parameter it
        finds, where the modules on its way are as noted (their children and parameter dicts,
        checked before in :meth:`fits`) and nothing comes before that parameter."""
        if self.holder is not None and not any(self.before):
            first = next(iter(self.holder.values()), None)
            if first is not None:
                return bool(first.device == self.device)
        return model_device(model) == self.device

    def __reduce__(self) -> tuple[Any, ...]:
        return (dict, ())

    def __copy__(self) -> dict[str, Any]:
        return {}

    def __deepcopy__(self, memo: dict[int, Any]) -> dict[str, Any]:
        return {}


class _Chained:
    """Iterables iterated one after the other, each time anew."""

    def __init__(self, parts: tuple[Iterable[Any], ...]) -> None:
        self.parts = parts

    def __iter__(self) -> Iterator[Any]:
        return chain.from_iterable(self.parts)


def _key(x: Tensor) -> _Key:
    """The key of rows like those of ``x`` ``(N, D...)`` under the autocast now on."""
    if not torch._C._is_any_autocast_enabled():  # the common case: one call, not four
        return (x.shape[1:], x.dtype, False, False)
    return (
        x.shape[1:],
        x.dtype,
        torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu"),
        torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda"),
    )


def _own_forwards(dicts: tuple[dict[str, Any], ...]) -> tuple[bool, ...]:
    """Which of the modules (``dicts``: their ``vars``) have a ``forward`` set on them, not
    counting the routes that a routed pass (:mod:`mcdrop.routing`, on another thread) puts on
    its dropout modules for its length: else a call beside it would plan again, and keep a plan
    that the next call would find out of date."""
    return tuple("forward" in d and type(d["forward"]) is not _Route for d in dicts)


def kept(model: nn.Module, x: object) -> SamplingPlan | None:
    """The plan kept for ``model`` and rows like those of ``x`` ``(N, D...)``, if there is one
    and the model is as it was planned; None otherwise (the caller checks ``x``)."""
    plans = getattr(model, "__dict__", {}).get(_ATTRIBUTE)
    if type(plans) is not _Plans or not isinstance(x, Tensor):
        return None
    plan = plans.plans.get(_key(x))
    if plan is None or not plans.fits(model):
        return None
    return plan


def keep(model: nn.Module, x: Tensor, plan: SamplingPlan) -> None:
    """Keep ``plan``, made for ``model`` and rows like those of ``x``, for later calls."""
    if not isinstance(model, nn.Module):
        return
    with _lock:  # threads planning one model at once: one evicts the oldest, not both
        plans = model.__dict__.get(_ATTRIBUTE)
        if type(plans) is not _Plans or not plans.fits(model):
            # none yet, a copy's (another model's), or made for the model as it was
            plans = _Plans(model)
            model.__dict__[_ATTRIBUTE] = plans  # not setattr: a class may define its own
            plans.note_state(model)
        if len(plans.plans) >= MAX_PLANS:
            del plans.plans[next(iter(plans.plans))]  # the oldest
        plans.plans[_key(x)] = plan


def forget(model: nn.Module) -> None:
    """Drop every plan kept for ``model`` (a pass found one out of date)."""
    model.__dict__.pop(_ATTRIBUTE, None)
