"""The sampling plans that calls given none make and keep, per model and row shape.

``mcdrop.sample(model, x, n)`` needs the model's :class:`~mcdrop.planning.SamplingPlan`: five to
seven small forward passes, ~0.6–0.9 ms on a small MLP, where one sample of one row costs
~0.05 ms with a kept plan. A call given no plan makes it once and keeps it here for later calls
with rows of the same shape and dtype (under the same autocast), so ``sample`` in a loop costs
what a call with ``plan=mcdrop.plan(model, x)`` costs (:func:`mcdrop.sampling.sample`).

A kept plan serves a call only while the model is as it was planned:

- the same modules in the same places (no layer swapped, added, removed or renamed), each of
  the class it had (``torch.nn.utils.parametrize`` and ``module.__class__ = ...`` change one),
  none with a ``forward`` set on it since, the same forward hooks and pre-hooks on each module
  and on every module (``register_module_forward_hook``: a hook may make the layers before the
  first dropout depend on the batch, or use their output after it), on the same device;
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
per row (a global, a class attribute or a list read there, values set in place, a buffer set to
None: BatchNorm's running statistics), keeps the plan's shared prefix: call :func:`forget` after
such a change.)

Beside them lives what :func:`mcdrop.predict` found at a model's first prediction of each input
key (the inputs' shape, the batch's size included, and dtype: a ``forward`` may drop for some
only, ``if x.shape[0] > 1``): whether its eval pass makes a dropout call that drops
(:func:`eval_drops`, :func:`plain_eval`), for the latest :data:`MAX_EVAL_KEYS` keys. It goes
with the plans: made anew by a sampling call for a model changed since, and by :func:`forget`
(a prediction that finds the model changed keeps what was found to drop nothing).

The plans live on the model (the ``_mcdrop_plans`` entry of its ``__dict__``), not in a global
table: a plan references the model's modules, so a table would keep every model it saw alive.
On the model they form a reference cycle with it, which Python's cycle collector frees with the
model (``gc.collect()`` frees it at once). The entry pickles as an empty ``dict`` (a model saved
whole with ``torch.save`` loads without mcdrop) and copies (``copy.copy``, ``copy.deepcopy``,
``nn.DataParallel``'s replicas) as no plans: a plan is for one model object.
"""

from __future__ import annotations

import functools
import operator
import os
import threading
import weakref
from collections.abc import Callable, Iterable
from types import CodeType
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

#: The most input keys (the inputs' shape, the batch's size included, and dtype) a model keeps
#: what :func:`mcdrop.predict` found for (:func:`eval_drops`): a server's merged batches of
#: 1 to 256 rows (its default ``max_batch_rows``) of one shape fit; a key evicted (the oldest
#: first) is found again at its next prediction, at the cost of one pass watched.
MAX_EVAL_KEYS = 256

_ATTRIBUTE = "_mcdrop_plans"

_lock = threading.Lock()  # held while plans (or findings) are kept: rare, never on a hit


def _forked() -> None:
    """A child forked while another thread held the lock gets a free one."""
    global _lock
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_forked)

# rows' shape and dtype, and the dtypes autocast gives on the CPU and on CUDA devices (False
# where it is off): a plan made under autocast sees its dropouts' inputs in that dtype, which
# sets its pass sizes and routes
_Key = tuple[torch.Size, torch.dtype, "torch.dtype | bool", "torch.dtype | bool"]
# the inputs' shape (the batch's size too: a forward may drop for some only) and dtype: the key
# of what a prediction found. Not the autocast: a forward's dropout calls follow its inputs, and
# asking for it would cost every prediction a call (~0.2 µs, a third of the lookup's cost).
_EvalKey = tuple[torch.Size, torch.dtype]


class _Plans:
    """One model's kept plans, and the model as they were made for it: :attr:`fits`."""

    def __init__(self, model: nn.Module) -> None:
        self.owner = weakref.ref(model)
        self.plans: dict[_Key, SamplingPlan] = {}
        #: Whether the model's eval pass makes a dropout call that drops, per input key (see
        #: :func:`eval_drops`): the latest :data:`MAX_EVAL_KEYS`, oldest first.
        self.eval_drops: dict[_EvalKey, bool] = {}
        #: Whether the model is as its plans were made for (see :meth:`note_state`).
        self.fits: Callable[[nn.Module], bool] = _unnoted

    def note_state(self, model: nn.Module) -> None:
        """Note the model as it is now (with this entry in the model's ``__dict__``), for
        :attr:`fits`: the same object, its modules of the same classes, with the same children
        in the same order under the same names, the same forward hooks and pre-hooks on each
        module and on every module (in the same dicts: one set anew is a change), none with a
        ``forward`` set on it since; the attributes of the modules of classes not torch's, a
        flag their ``forward`` reads, and how many they are, with the ``forward`` of every class
        not torch.nn's; the settings of torch's modules: their attributes whose names do not
        start with ``_``, but for tensors (``spectral_norm`` and ``prune`` set ``weight`` on
        every call); on the same device.

        A setting may change the plan without a dropout call the pass would miss
        (``softmax.dim = 0`` before the first dropout: the prefix depends on the batch; an
        encoder layer's ``activation``). (Reading every attribute of a torch module would cost
        ~0.5 µs a module.) Never ``training``: a plan is made in eval mode whatever the model's
        flags, and a call on a model in training mode switches them for its length (a call
        beside it on another thread would plan again). Objects are compared by identity, never
        ``==``: a tensor's would compute, and an equal value set anew is a change."""
        modules = every_module(model)
        dicts = tuple(vars(m) for m in modules)
        check = _Check()
        # the hooks registered for every module (register_module_forward_hook), then each's
        check.hooks(_module_hooks._global_forward_pre_hooks)
        check.hooks(_module_hooks._global_forward_hooks)
        for name in ("_global_forward_pre_hooks", "_global_forward_hooks"):
            # (torch calls a dict set anew there)
            check.item(vars(_module_hooks), name, vars(_module_hooks)[name])
        # the modules model_device walks to the first parameter: with their children and
        # parameter dicts as noted, the device is that parameter's (see below)
        path = first_parameter_path(model)
        walked = {id(m) for m in path or ()}
        for m, d in zip(modules, dicts, strict=True):
            check.class_of(m)
            check.items(m._modules.values())  # in order: a Sequential runs its children so
            if m._modules:  # under the same names: a forward of one's own reads them so
                check.items(m._modules)
            check.hooks(m._forward_pre_hooks)
            check.hooks(m._forward_hooks)
            # read from a copy made at once (in C): another thread's pass may set an attribute
            # meanwhile (a route), which a loop over the dict itself would fail on
            now = d.copy()
            if not type(m).__module__.startswith("torch."):
                check.size(d, len(now))  # an attribute added
                # (not the entry _mcdrop_plans: it is this object, where kept and keep find it)
                names = [name for name in now if name not in ("training", _ATTRIBUTE)]
            else:
                names = [
                    name
                    for name, value in now.items()
                    if not (type(name) is str and name.startswith("_"))  # (any key: vars())
                    and name != "training"
                    and not isinstance(value, Tensor)
                    # another thread's route, there for its pass only (routed() below)
                    and not (name == "forward" and isinstance(value, _Route))
                ]
                # the dicts read above through views noted on them: one set anew
                # (ModuleList.__delitem__, ``module._forward_hooks = OrderedDict()``) leaves
                # the views on dicts no longer the module's (a user module's are noted above)
                names += ["_modules", "_forward_pre_hooks", "_forward_hooks"]
            if id(m) in walked:
                names += [name for name in ("_modules", "_parameters") if name not in names]
            for name in names:
                if name in now:  # (one of torch's deleted: the check's lookup fails, says no)
                    check.item(d, name, now[name])
        # the forward of the classes of the modules not torch.nn's: a notebook may set a new
        # one on a class, a torch.fx.GraphModule sets one on its own when recompiled
        for c in {type(m): None for m in modules if not type(m).__module__.startswith("torch.nn.")}:
            check.forward(c)

        patched = _own_forwards(dicts)

        def routed() -> bool:  # a forward set on a module since, or another thread's route
            return _own_forwards(dicts) == patched

        # the device, where model_device finds it: the first entry of the parameters of the
        # last module on the way, where those before have none (their dicts as noted)
        parameters = None if path is None else path[-1]._parameters.values()
        helpers = {
            "owner": self.owner,
            "routed": routed,
            "model_device": model_device,
            "device": model_device(model),
            "before": tuple(m._parameters for m in (path or [])[:-1]),
            "parameters": parameters,
        }

        def first_fits(model: nn.Module) -> bool:
            # compiled at the first hit: a model sampled once without a plan needs no check
            self.fits = check.compile(dicts, direct=parameters is not None, **helpers)
            return self.fits(model)

        self.fits = first_fits

    def __reduce__(self) -> tuple[Any, ...]:
        return (dict, ())

    def __copy__(self) -> dict[str, Any]:
        return {}

    def __deepcopy__(self, memo: dict[int, Any]) -> dict[str, Any]:
        return {}


def _unnoted(model: nn.Module) -> bool:
    return False


class _Check:
    """A model's ``fits(model)``, compiled from Python source with a line for each thing it
    compares, by identity (``is``: never ``==``), to the object noted.

    In Python of its own, a thing costs ~20 ns, half what it costs in C loops over tuples of the
    same things (``all(map(operator.is_, ...))``, with the loops' own costs): on a hit, 1.6
    against 4.4 µs on a four-module MLP, 6 against 12 on a 23-module ResNet. It is compiled
    at the first hit (~6 µs a line: 0.4 ms on that MLP, 1.2 on that ResNet, a fifth of the
    probe that made the plan), once for a model's layout: a model planned again (changed, or
    with a ``forward`` that sets an attribute on every call) or another of the same layout
    takes the code of the first (then 0.1-0.3 ms to write the source)."""

    def __init__(self) -> None:
        self.notes: list[tuple[Any, ...]] = []  # (kind, ...) as the methods below say

    def class_of(self, module: nn.Module) -> None:
        self.notes.append(("type", module, type(module)))

    def items(self, items: Iterable[Any]) -> None:
        """``items`` (a live view) give the same objects, as many, in the same order."""
        values = tuple(items)
        self.notes.append(("items", items, values) if values else ("empty", items))

    def hooks(self, hooks: dict[int, Any]) -> None:
        """The same hooks under the same keys (the handles' ids, never given twice)."""
        self.items(hooks)
        if hooks:  # (none: the common case)
            self.items(hooks.values())

    def size(self, found: dict[str, Any], size: int) -> None:
        """``found`` (a live dict) holds ``size`` items."""
        self.notes.append(("size", found, size))

    def item(self, found: dict[str, Any], key: str, value: object) -> None:
        """``found`` (a live dict) holds ``value`` under ``key``."""
        self.notes.append(("item", found, key, value))

    def forward(self, cls: type[nn.Module]) -> None:
        self.notes.append(("forward", cls, cls.forward))

    def compile(
        self, dicts: tuple[dict[str, Any], ...], *, direct: bool, **helpers: Any
    ) -> Callable[[nn.Module], bool]:
        """The check (``helpers``: the names it reads besides the objects noted); ``dicts``:
        each module's, which has no ``forward`` set on it, or ``routed()`` says why; ``direct``:
        whether the way to the model's first parameter is noted (else its device is
        ``model_device``'s)."""
        objects: dict[str, Any] = {}
        names: dict[int, str] = {}

        def name(obj: object) -> str:  # one a distinct object
            known = names.get(id(obj))
            if known is None:
                known = names[id(obj)] = f"o{len(objects)}"
                objects[known] = obj
            return known

        unpacked: list[str] = []
        # the classes, and the dicts that must still be empty, compared in C loops: as fast, and
        # a line less each to compile
        modules = tuple(found for kind, found, *_ in self.notes if kind == "type")
        classes = tuple(noted[0] for kind, _, *noted in self.notes if kind == "type")
        empty = tuple(found for kind, found, *_ in self.notes if kind == "empty")
        tests = [
            f"any(map(is_not, map(type, {name(modules)}), {name(classes)}))",  # (never ==)
            f"any({name(empty)})",
        ]
        if len(modules) <= 16:  # (a few: a line each costs less than the loop)
            tests[0] = " or ".join(
                f"type({name(m)}) is not {name(c)}" for m, c in zip(modules, classes, strict=True)
            )
        # (grouped by kind, each kind in the order noted: ~10% faster on a 23-module ResNet)
        for kind, found, *noted in sorted(self.notes, key=lambda note: _KINDS.index(note[0])):
            if kind in ("type", "empty"):
                continue
            elif kind == "items":  # (as many: else unpacking raises ValueError)
                each = [f"v{len(unpacked)}_{i}" for i in range(len(noted[0]))]
                unpacked.append(f"{', '.join(each)}, = {name(found)}")
                tests += (f"{v} is not {name(obj)}" for v, obj in zip(each, noted[0], strict=True))
            elif kind == "size":
                tests.append(f"len({name(found)}) != {noted[0]}")
            elif kind == "item":  # a str key as a literal, anything else by name
                key = repr(noted[0]) if type(noted[0]) is str else name(noted[0])
                tests.append(f"{name(found)}[{key}] is not {name(noted[1])}")
            else:
                tests.append(f"{name(found)}.forward is not {name(noted[0])}")
        forwards = " or ".join(f"'forward' in {name(d)}" for d in dicts) or "False"
        first_parameter = [  # the one model_device finds, where the way to it is as noted
            "    if not any(before):",
            "        first = next(iter(parameters), None)",
            "        if first is not None:",
            "            return first.device == device",
        ]
        source = "\n".join(
            [
                "def fits(model):",
                "    if owner() is not model:",
                "        return False",
                "    try:",
                *(f"        {line}" for line in unpacked),
                "        if (",
                "            " + "\n            or ".join(tests),
                "        ):",
                "            return False",
                "    except Exception:  # a name gone or that fails to hash; more or fewer items",
                "        return False",
                f"    if ({forwards}) and not routed():",
                "        return False",
                *(first_parameter if direct else []),
                "    return model_device(model) == device",
            ]
        )
        namespace = {**objects, **helpers, "is_not": operator.is_not}
        exec(_compiled(source), namespace)  # (our source: names, and str keys as literals)
        fits: Callable[[nn.Module], bool] = namespace["fits"]
        return fits


_KINDS = ("type", "empty", "size", "items", "item", "forward")


@functools.lru_cache(maxsize=64)
def _compiled(source: str) -> CodeType:
    return compile(source, "<mcdrop.plan_cache fits>", "exec")


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


def _eval_key(x: Tensor) -> _EvalKey:
    """The key of inputs like ``x`` ``(N, D...)``: its shape, ``N`` included, and dtype."""
    return (x.shape, x.dtype)


def _own_forwards(dicts: tuple[dict[str, Any], ...]) -> tuple[bool, ...]:
    """Which of the modules (``dicts``: their ``vars``) have a ``forward`` set on them, not
    counting the routes that a routed pass (:mod:`mcdrop.routing`, on another thread) puts on
    its dropout modules for its length: else a call beside it would plan again, and keep a plan
    that the next call would find out of date."""
    return tuple("forward" in d and not isinstance(d["forward"], _Route) for d in dicts)


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
            if not _noted(plans, model):
                return
        if len(plans.plans) >= MAX_PLANS:
            del plans.plans[next(iter(plans.plans))]  # the oldest
        plans.plans[_key(x)] = plan


def plain_eval(model: nn.Module, x: Tensor) -> bool:
    """Whether ``model``'s eval pass was found to make no dropout call that drops for inputs like
    ``x`` ``(N, D...)`` (the same shape, ``N`` included, and dtype): its deterministic
    prediction of ``x`` is the plain eval pass (:func:`mcdrop.predict`). The common case,
    checked on every prediction: two lookups (~0.5 µs), no check that the model is as it was
    when found (a model changed since is found anew when a sampling call plans it anew, a
    prediction of a key not kept finds it changed, or after :func:`forget`)."""
    plans = model.__dict__.get(_ATTRIBUTE)
    # (_eval_key written out: a call less on every prediction)
    return type(plans) is _Plans and plans.eval_drops.get((x.shape, x.dtype)) is False


def eval_drops(model: nn.Module, x: Tensor) -> bool | None:
    """Whether ``model``'s eval pass makes a dropout call that drops (``F.dropout(h, p,
    training=True)``) for inputs like ``x`` ``(N, D...)``, as found by :func:`keep_eval_drops`;
    None where it is not known, or it was found to drop but the model has changed since (checked
    as a kept plan is)."""
    plans = model.__dict__.get(_ATTRIBUTE)
    if type(plans) is not _Plans:
        return None
    drops = plans.eval_drops.get(_eval_key(x))
    if drops and not plans.fits(model):
        return None
    return drops


def keep_eval_drops(model: nn.Module, x: Tensor, drops: bool) -> None:
    """Keep what a deterministic prediction of ``x`` ``(N, D...)`` found: whether ``model``'s eval
    pass drops for inputs like it (for the latest :data:`MAX_EVAL_KEYS` keys). It lives beside
    the model's plans and goes with them (:func:`forget`, or plans that a sampling call makes
    anew for a model changed since); a prediction that finds the model changed keeps only what
    was found to drop nothing."""
    if not isinstance(model, nn.Module):
        return
    key = _eval_key(x)
    with _lock:  # threads finding keys at once: one evicts the oldest, not both
        plans = model.__dict__.get(_ATTRIBUTE)
        if type(plans) is not _Plans or not plans.fits(model):
            before, plans = plans, _Plans(model)
            if type(before) is _Plans and before.owner() is model:
                # what was found to drop nothing: no prediction checks it against the model
                # (plain_eval), so neither does this one. A forward that keeps its last output
                # (a change on every call) keeps the plain pass of the keys it was found for.
                plans.eval_drops = {k: v for k, v in before.eval_drops.items() if not v}
            model.__dict__[_ATTRIBUTE] = plans
            if not _noted(plans, model):
                return
        found = plans.eval_drops
        if key not in found and len(found) >= MAX_EVAL_KEYS:
            del found[next(iter(found))]  # the oldest
        found[key] = drops


def _noted(plans: _Plans, model: nn.Module) -> bool:
    """Whether ``plans`` (the model's entry) noted the model's state (:meth:`_Plans.note_state`);
    where it cannot be read, nothing is kept (the entry removed), and each call plans afresh: a
    submodule compiled by ``torch.jit.script`` has wrappers for dicts and a ``forward`` that its
    class does not give."""
    try:
        plans.note_state(model)
    except (AttributeError, KeyError, TypeError, RuntimeError):
        model.__dict__.pop(_ATTRIBUTE, None)
        return False
    return True


def forget(model: nn.Module) -> None:
    """Drop every plan kept for ``model`` (a pass found one out of date), and whether its eval
    pass drops (found again at its next prediction)."""
    model.__dict__.pop(_ATTRIBUTE, None)
