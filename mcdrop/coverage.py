"""Which of a model's dropout rates MC sampling reaches, and which it cannot.

Sampling makes every dropout *call* of a forward pass stochastic. A rate that never turns into a
call is out of its reach: a custom ``forward`` that writes ``dropout_p=self.p if self.training
else 0.0`` passes 0 in eval mode, and a module whose weights another module's code uses is never
called. Such a model samples with too little variance, silently, unless someone says so.

:func:`declared_rates` finds the modules that declare a rate (torch's dropout layers, mcdrop's,
``nn.MultiheadAttention``, ``nn.LSTM``/``GRU``/``RNN`` with dropout between layers, and any module
with a float attribute named ``p`` or containing ``drop`` between 0 and 1); :class:`CallCounter`
counts, during a forward pass under a sampling context, the stochastic calls made inside each of
them, and the calls to ``F.scaled_dot_product_attention`` with ``dropout_p=0`` (the training-only
idiom, seen from inside). A module that declares a rate and made no stochastic call is
*unsampled*, unless it made no zero-rate call either and a submodule with its rate made calls (a
block that keeps ``self.p`` for the ``nn.Dropout(p)`` it builds).
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass
from types import TracebackType
from typing import Any, cast

from torch import nn

from mcdrop.dropout import DROPOUT_TYPES
from mcdrop.sampling_context import active_context

# The counters counting on this thread (they nest: a plan made inside one counts in both).
_counting: contextvars.ContextVar[tuple[CallCounter, ...]] = contextvars.ContextVar(
    "mcdrop_call_counters", default=()
)


@dataclass(frozen=True)
class DeclaredRate:
    """A module that declares a dropout rate: its name in the model, class, the attribute that
    holds the rate, and the rate."""

    name: str
    type: str
    attribute: str
    rate: float


def _rate_attributes(module: nn.Module) -> list[tuple[str, float]]:
    """``(attribute, rate)`` of every dropout rate ``module`` declares itself."""
    if isinstance(module, nn.RNNBase):
        # torch ignores (and warns about) dropout on a one-layer RNN: nothing to sample there.
        rate = float(module.dropout) if module.num_layers > 1 else 0.0
        return [("dropout", rate)] if rate > 0 else []
    # Both rates are floats that the layers set in __init__ without a declared type, so the
    # type checker sees nn.Module.__getattr__'s Tensor | Module: hence the casts.
    if isinstance(module, DROPOUT_TYPES):
        rate = float(cast(float, module.p))
        return [("p", rate)] if rate > 0 else []
    if isinstance(module, nn.MultiheadAttention):
        rate = float(cast(float, module.dropout))
        return [("dropout", rate)] if rate > 0 else []
    return [
        (key, float(value))
        for key, value in vars(module).items()
        # (a key of another type, which setattr cannot make but __dict__ takes, is no rate)
        if type(key) is str
        and (key == "p" or "drop" in key.lower())
        and isinstance(value, float)
        and 0.0 < value < 1.0
    ]


def declared_rates(model: nn.Module) -> list[DeclaredRate]:
    """Every dropout rate above zero that a module of ``model`` declares, in module order."""
    return [
        DeclaredRate(name or "(model)", type(module).__name__, attribute, rate)
        for name, module in model.named_modules()
        for attribute, rate in _rate_attributes(module)
    ]


@dataclass(frozen=True)
class RateUse:
    """A declared rate and what forward passes did with it: how often its module ran (``runs``)
    and how many stochastic calls its own code made (``calls``: those of submodules that declare
    a rate of their own are theirs)."""

    declared: DeclaredRate
    runs: int
    calls: int
    zero_rate_calls: int = 0

    def why_unsampled(self) -> str:
        """One line: what was found and the likely reason, for messages."""
        d = self.declared
        what = f"{d.name} ({d.type}, {d.attribute}={d.rate:g})"
        if self.runs == 0:
            return (
                f"{what} never ran in the forward pass: its dropout is applied elsewhere (e.g. "
                "its weights are used by another module's code) or nowhere"
            )
        passed = (
            "called F.scaled_dot_product_attention with dropout_p=0"
            if self.zero_rate_calls
            else "ran without a dropout call"
        )
        return (
            f"{what} {passed}: its forward applies dropout in training only (e.g. "
            "dropout_p=self.p if self.training else 0.0; write `self.training or "
            "mcdrop.is_sampling()` so MC sampling gets the rate too)"
        )


class CallCounter:
    """Counts, per module that declares a rate, its runs and the stochastic calls its own code
    made, during forward passes under a sampling context on this thread (hooks on those modules
    only, removed on exit; passes on other threads are not counted)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._declared = declared_rates(model)
        self._runs: dict[str, int] = {}
        self._calls: dict[str, int] = {}
        self._zero: dict[str, int] = {}
        # One frame per declared module running: [calls when it started, calls of its
        # declared submodules, its own zero-rate calls].
        self._frames: list[list[int]] = []
        self._handles: list[Any] = []
        self._token: contextvars.Token[tuple[CallCounter, ...]] | None = None

    def __enter__(self) -> CallCounter:
        modules = dict(self.model.named_modules())
        for name in dict.fromkeys(d.name for d in self._declared):
            module = modules["" if name == "(model)" else name]
            self._handles.append(module.register_forward_pre_hook(self._pre))
            self._handles.append(module.register_forward_hook(self._post(name)))
        self._token = _counting.set((*_counting.get(), self))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._token is not None:
            _counting.reset(self._token)
            self._token = None

    def _pre(self, module: nn.Module, args: Any) -> None:
        ctx = active_context()
        if self in _counting.get() and ctx is not None:
            self._frames.append([ctx.calls, 0, 0])

    def _post(self, name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            ctx = active_context()
            if self not in _counting.get() or ctx is None or not self._frames:
                return
            start, inner, zero = self._frames.pop()
            total = ctx.calls - start
            self._runs[name] = self._runs.get(name, 0) + 1
            self._calls[name] = self._calls.get(name, 0) + total - inner
            self._zero[name] = self._zero.get(name, 0) + zero
            if self._frames:
                self._frames[-1][1] += total

        return hook

    def uses(self) -> list[RateUse]:
        """Every declared rate with its module's runs and own calls so far."""
        return [
            RateUse(
                d, self._runs.get(d.name, 0), self._calls.get(d.name, 0), self._zero.get(d.name, 0)
            )
            for d in self._declared
        ]

    def unsampled(self) -> list[RateUse]:
        """The declared rates that sampling did not reach: no stochastic call in their module's
        own code, and either a zero-rate attention call there or no submodule with the same rate
        that made calls (a block that keeps ``self.p`` for its ``nn.Dropout(p)``)."""
        uses = self.uses()
        return [
            use
            for use in uses
            if use.calls == 0
            and (
                use.zero_rate_calls > 0
                or not any(
                    other.calls > 0
                    and other.declared.rate == use.declared.rate
                    and _inside(other.declared.name, use.declared.name)
                    for other in uses
                )
            )
        ]


def note_zero_rate_call() -> None:
    """Record, for the counters of this thread, a call that could drop but was given rate 0
    (``F.scaled_dot_product_attention(dropout_p=0)`` under sampling): it belongs to the
    innermost declared module running."""
    for counter in _counting.get():
        if counter._frames:
            counter._frames[-1][2] += 1


def _inside(name: str, parent: str) -> bool:
    """Whether module ``name`` is ``parent`` or below it."""
    return parent == "(model)" or name == parent or name.startswith(parent + ".")
