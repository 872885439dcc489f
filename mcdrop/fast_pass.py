"""The fast pass: a whole sampling call in one short function, for the small requests where
Python's bookkeeping costs more than the model's arithmetic.

The common small request is one pass of a kept plan on the CPU, for a model that is a plain
chain of torch layers (:class:`~mcdrop.planning.LayerChain`) whose multipliers numba makes in one
call (:meth:`~mcdrop.masks.PassMultipliers.make_from_rows`), or one with a ``forward`` of its own
whose dropout modules are routed (:mod:`mcdrop.routing`). The general path runs it through a
dozen functions and ~350 lines of Python, each checking what it is handed. A request finds that
code cold: it cost ~50 µs a call beyond the model's own arithmetic (UCI MLP and an 8→64→64→1
MLP, one sample of one row, each call timed alone as ``benchmarks`` does), against ~10 µs for
the same pass written out in one function.

A :class:`FastPass` is made once per plan and call shape (rows, samples, first sample, pass
bound, prefix), with the answer to every check that cannot change between calls worked out then;
what can change (the rows, the seed, hooks, the model's layers, modes, rates and device,
autocast) is checked on every call in a few flat loops. Where any check fails, :func:`run`
returns None and the general path runs the call (and raises, where the call is wrong): errors
come from one place. Both paths make the same pass, so the same samples, bit for bit.
:class:`ChainPass` runs a layer chain; :class:`RoutedPass` a routed model's own forward, its
inverted dropout calls' multipliers (per element or per channel) made before the pass and
handed to each call's route (:class:`MadeContext`); :class:`ModePass` any other model's forward
under the torch-function mode, as the general path runs it.

A request's few rows are checked, keyed and their multipliers made in one compiled call
(:meth:`FastPass._pass_of_rows`), and a pass keeps its buffer of multipliers for its next calls
where nothing that shares its memory can outlive a pass: a chain whose every dropout product goes
into a linear layer, a routed pass whose routes write each product into a tensor of its own, a
pass under the mode whose calls do the same (``kept``). Run cold after a large model's pass, a
fresh buffer and its tensors, and three compiled calls, cost tens of µs.
"""

from __future__ import annotations

import math
import operator
import threading
from collections.abc import Callable, Sequence
from itertools import repeat
from types import ModuleType
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from torch import Tensor, nn

from mcdrop import masks, modes
from mcdrop._hooks import global_hooks
from mcdrop._walk import every_module
from mcdrop.devices import model_device_slot
from mcdrop.exceptions import InvalidArgumentError
from mcdrop.routing import DropoutRoutes, FunctionCall, routed_forward
from mcdrop.sampling_context import DROPOUT_FUNCTIONS, SamplingContext, fresh_layout, replicate

if TYPE_CHECKING:
    from mcdrop.planning import CallLayout, LayerChain, SamplingPlan

#: The most call shapes a plan keeps fast passes for (request sizes vary: the latest few).
MAX_KEPT = 64

#: The largest buffer of multipliers a :class:`ChainPass` or :class:`RoutedPass` keeps for its
#: next calls, in bytes: a one-row request's (a 28×28 CNN's: 13.6 KB), with room for a few rows.
KEPT_BUFFER = 65536

#: The most buffers such a pass keeps (one per call running at once, on threads).
KEPT_BUFFERS = 2

#: The most multipliers of one call of a pass under the mode (ModePass) made before the pass:
#: 32 KB of float32, within a core's L1 or L2 cache.
_MADE_IN_MODE = 8192


def run(
    plan: SamplingPlan,
    model: nn.Module,
    x: Tensor,
    n_samples: int,
    seed: object,
    max_pass_rows: int,
    prefix: str,
    first_sample: int = 0,
) -> Tensor | None:
    """The ``(S, N, K...)`` samples of a sampling call (:func:`mcdrop.sampling.sample_chunks`'
    arguments; ``max_pass_rows`` resolved) by its :class:`FastPass`, or None where the call has
    none (then the general path runs it)."""
    if (
        type(n_samples) is not int  # (a bool is an int that the general path refuses)
        or type(first_sample) is not int
        or type(max_pass_rows) is not int
        or torch.is_autocast_enabled("cpu")  # the multipliers' dtype is then autocast's
    ):
        return None
    try:
        key = (x.shape[0], n_samples, first_sample, max_pass_rows, prefix)
        fast = plan.fast_passes.get(key)
    except (AttributeError, IndexError, TypeError):  # not a tensor, no rows, unhashable
        return None
    if fast is None:
        if key in plan.fast_passes or plan._model() is not model:  # none, or a wrong call
            return None
        if len(plan.fast_passes) >= MAX_KEPT:
            plan.fast_passes.clear()
        fast = plan.fast_passes[key] = _make(plan, model, key)
        if fast is None:
            return None
    return fast.run(model, x, seed)


def _make(
    plan: SamplingPlan, model: nn.Module, key: tuple[int, int, int, int, str]
) -> FastPass | None:
    """The :class:`FastPass` of a call shape ``key``; None where the call cannot have one
    (another dtype, CUDA graphs, more than one pass, a layer chain whose masks numba does not
    make in one call, masks not made by numba)."""
    n_rows, n_samples, first_sample, max_pass_rows, prefix = key
    if (
        plan.graphs is not None
        or plan.dtype != torch.float32
        or n_rows < 1
        or n_samples < 1
        or first_sample < 0
        or first_sample > masks.MAX_SEED - n_samples  # (the general path says what is wrong)
        or max_pass_rows < 1
        or prefix not in ("auto", "off")
    ):
        return None
    shared = prefix == "auto" and plan.prefix
    share = shared and n_samples > 1  # one sample per pass gains nothing from sharing
    rows = n_rows * n_samples
    if rows > plan.pass_rows(n_rows, n_samples, max_pass_rows, prefix=share):
        return None
    if plan.layers is not None:
        # None unless numba makes the masks (then it is loaded)
        made = plan.layers.fused(rows, plan)
        kernels = None if made is None else masks.numba_kernels()
        if made is None or kernels is None:
            return None
        return ChainPass(plan, model, kernels, key, share, plan.layers, made)
    if plan.routes is not None and masks.CPU_BACKEND == "numba":
        kernels = masks.numba_kernels()
        if kernels is None:
            return None
        return RoutedPass(plan, model, kernels, key, share, plan.routes)
    if plan.layers is None and plan.routes is None and masks.CPU_BACKEND == "numba":
        kernels = masks.numba_kernels()
        if kernels is None:
            return None
        return ModePass(plan, model, kernels, key, share)
    return None


class FastPass:
    """One call shape of a kept plan, run in one function (see the module docstring): the
    checks of the call and its rows, and the row keys; :class:`ChainPass`, :class:`RoutedPass`
    and :class:`ModePass` run the pass.

    Args:
        plan: the kept plan, of ``model``; kernels: :mod:`mcdrop.cpu_masks` (numba works).
        key: the call shape (rows N, samples S, first sample, pass bound, prefix).
        share: whether the layers before the first dropout run once per row.
    """

    def __init__(
        self,
        plan: SamplingPlan,
        model: nn.Module,
        kernels: ModuleType,
        key: tuple[int, int, int, int, str],
        share: bool,
    ) -> None:
        self.model = plan._model
        n_rows, n_samples, first_sample, _, _ = key
        # (N, D...) float32 rows: another shape is another call shape (or a wrong call)
        self.shape = torch.Size((n_rows, *plan.input_shape))
        self.n_rows, self.n_samples, self.first_sample = n_rows, n_samples, first_sample
        self.share = share
        self.replicas = n_samples if share else 1
        self.rows = n_rows * n_samples
        self.kernels = kernels
        self.device = model_device_slot(model)
        # several short rows: their keys hashed by numba (cpu_masks.row_keys), else by hashlib
        self.short = n_rows > 1 and math.prod(plan.input_shape) <= kernels.SHORT_ROW
        # A request's few rows (cpu_masks.FEW_VALUES), or several rows that are not long
        # (SHORT_ROW): their finiteness check and keys made with the multipliers, in one
        # compiled call, not three (each ~10-25 µs, run cold after a large model's pass); one
        # long row is hashed by hashlib.
        self.few = self.short or n_rows * math.prod(plan.input_shape) <= kernels.FEW_VALUES
        # rows whose keys numba hashes in the pass's one compiled call with its multipliers
        # (:meth:`_pass_of_rows`; a pass that makes them in one call sets it where few)
        self.at_once = False

    def run(self, model: nn.Module, x: Tensor, seed: object) -> Tensor | None:
        """The ``(S, N, K...)`` samples of ``x`` ``(N, D...)`` under ``seed`` (None: a fresh one
        from the OS), or None where this pass does not apply to the call (then the general path
        runs it)."""
        if seed is None:
            seed = masks.fresh_seed()
        # (N,) int64 seeds, one per row (requests with seeds of their own, merged in a batch):
        # their range is checked as the row keys are hashed
        row_seeds: Tensor | None = None
        one = 0  # else the seed of every row
        if type(seed) is Tensor and _row_seeds(seed, self.n_rows):
            row_seeds = seed
        elif type(seed) is int and 0 <= seed <= masks.MAX_SEED:
            one = seed
        else:
            return None
        if (
            type(x) is not Tensor
            or x.shape != self.shape
            or x.dtype is not torch.float32
            or self.model() is not model
        ):
            return None
        try:  # on the CPU, outside autograd, no negative bit: else NumPy refuses it
            values = x.numpy()
        except (RuntimeError, TypeError):
            return None
        seen = modes.switches
        # (the row keys as an array: the compiled calls after take arrays)
        keys: np.ndarray | None = None
        # one int seed, or the rows' own (a seed out of range, as a value not finite: no keys,
        # and the general path says what is wrong)
        seeds = one if row_seeds is None else row_seeds.numpy()
        if self.at_once:
            finite = 1  # checked by the pass's one compiled call (_pass_of_rows)
        elif self.short:  # the keys and the finiteness check in one call
            keys = self.kernels.row_key_array(values, seeds)
            finite = keys is not None
        else:
            finite = self.kernels.finite_state(values)
        if (
            not finite
            or modes.switching  # a call holds a training model switched (mcdrop.modes)
            or not self._runnable(model)
            or not self._on_the_cpu()
            or modes.switches != seen
        ):
            return None
        if not (self.short or self.at_once):
            # the bytes masks.row_keys hashes: -0.0 written as 0.0
            data = values.tobytes() if finite == 1 else masks.positive_zero_bytes(values)
            if row_seeds is None:
                keys = masks.key_array_of_bytes(data, self.n_rows, one)
            else:
                try:
                    keys = masks.keys_of_bytes(data, self.n_rows, row_seeds).numpy()
                except InvalidArgumentError:  # a seed out of range: the general path says so
                    return None
        y = (
            self._pass(model, x, keys)
            if keys is not None
            else self._pass_of_rows(model, x, values, seeds)
        )
        if type(y) is not Tensor or y.dim() < 1 or y.shape[0] != self.rows:
            return None  # the general path says what is wrong (planning._check_output)
        # contiguous, as sample returns a single pass's (channels-last weights make a
        # convolution's output another layout); the copy in inference mode, where the general
        # path makes its samples: an inference tensor as theirs. (One sample: indexing views
        # it in a third of reshape's time.)
        y = y[None] if self.n_samples == 1 else y.reshape(self.n_samples, self.n_rows, *y.shape[1:])
        if y.is_contiguous():
            return y
        with _inference_mode(True):
            return y.contiguous()

    def _on_the_cpu(self) -> bool:
        if self.device is None:  # no parameter or buffer at all
            return True
        # (indexed, not .get: a scripted module's dict of parameters is a wrapper without it)
        try:
            tensor = self.device[0][self.device[1]]
        except KeyError:  # removed since the plan
            return False
        return tensor is not None and tensor.is_cpu

    def _runnable(self, model: nn.Module) -> bool:
        """Whether nothing that the pass depends on changed since it was made."""
        raise NotImplementedError

    def _pass(self, model: nn.Module, x: Tensor, keys: np.ndarray) -> object:
        """The pass's ``(S · N, K...)`` outputs from the rows and their keys ``(N,)`` int64
        (None where it did not apply after all)."""
        raise NotImplementedError

    def _pass_of_rows(
        self, model: nn.Module, x: Tensor, values: np.ndarray, seed: int | np.ndarray
    ) -> object:
        """:meth:`_pass` with the rows' keys under ``seed`` (one, or ``(N,)`` int64 seeds, one
        per row) made from ``values`` (``x``'s memory) in the compiled call that makes the
        multipliers (where :attr:`at_once`); None where a value is not finite or a seed
        negative."""
        raise NotImplementedError


class ChainPass(FastPass):
    """The fast pass of a :class:`~mcdrop.planning.LayerChain` (``layers``), with every
    multiplier made in one compiled call: ``made`` is the chain's
    :meth:`~mcdrop.planning.LayerChain.fused` for the pass, at the layers' current rates."""

    def __init__(
        self,
        plan: SamplingPlan,
        model: nn.Module,
        kernels: ModuleType,
        key: tuple[int, int, int, int, str],
        share: bool,
        layers: LayerChain,
        made: masks.PassMultipliers,
    ) -> None:
        super().__init__(plan, model, kernels, key, share)
        self.layers = layers
        self.fresh_first = layers.fresh_first
        self.compiled = made.compiled()  # numba's maker of every multiplier of the pass
        self.at_once = self.few
        # What LayerChain.runnable checks, flattened, read from each module's own __dict__
        # (an item of a dict costs less than an attribute of a module): its hook dicts and
        # _modules, read on every call (a caller may replace one), each container's children
        # as planned, and no forward set on an instance.
        self.modules = layers.containers
        self.types = layers.types
        self.dicts = tuple(vars(m) for m in layers.containers)
        self.children = tuple(
            (d, planned) for d, planned in zip(self.dicts, layers.children, strict=True) if planned
        )
        # the rates the multipliers were made for, as LayerChain._pass reads them, and their
        # layers (read by one C-level map: a generator over them cost ~3 µs of a cold call)
        self.rate_layers = tuple(layer for _, layer in layers.elementwise)
        self.rates = tuple(float(cast(Any, layer).p) for layer in self.rate_layers)
        # each call's multipliers made in its activation's shape (but the first's where the
        # pass shares the prefix: it broadcasts the rows)
        self.made_shapes = tuple(
            None if (self.replicas > 1 and k == 0) else _shape(plan, i, self.rows, n)
            for k, (i, n, _) in enumerate(made.calls)
        )
        # Buffers of multipliers, each with its calls' tensors, kept for the next calls where no
        # tensor that shares them outlives a pass: a fresh buffer's allocation and its tensors
        # (NumPy slices, torch.from_numpy) cost ~40 µs of a one-row call, run cold after a
        # large model's pass. A call takes one (list.pop and append: atomic, so a call on
        # another thread takes another), and puts it back once its pass is done.
        size = sum(n for _, n, _ in made.calls) * self.rows * 4  # (float32: plan.dtype)
        self.keeps = self.at_once and size <= KEPT_BUFFER and layers.drops_into_linear()
        self.buffers: list[tuple[np.ndarray, list[Tensor]]] = []

    def _runnable(self, model: nn.Module) -> bool:
        """No hook, the chain's modules and their classes as planned, none with a forward set
        on the instance, every module in eval mode, the dropout rates the multipliers were made
        for."""
        try:
            if (
                global_hooks()
                or any(map(any, map(_hooks_or_training, self.dicts)))
                or tuple(map(type, self.modules)) != self.types
                or any(map(operator.contains, self.dicts, repeat("forward")))
            ):
                return False
            for found, planned in self.children:
                if tuple(found["_modules"].values()) != planned:
                    return False
        except KeyError:  # a module without the dicts nn.Module makes: not torch's own
            return False
        return tuple(map(_rate, self.rate_layers)) == self.rates

    def _pass(self, model: nn.Module, x: Tensor, keys: np.ndarray) -> object:
        inputs = self._inputs(x)
        # (the multipliers made in inference mode: tensors of its own, whose in-place products
        # there skip autograd's version bookkeeping)
        with _inference_mode(True):
            multipliers: list[Tensor] = self.compiled.make(
                keys, self.first_sample, self.n_samples, self.made_shapes
            )
            return self.layers.run_made(inputs, multipliers, self.replicas)

    def _pass_of_rows(
        self, model: nn.Module, x: Tensor, values: np.ndarray, seed: int | np.ndarray
    ) -> object:
        if not self.keeps:
            with _inference_mode(True):
                multipliers = self.compiled.make_from_values(
                    values, seed, self.first_sample, self.n_samples, self.made_shapes
                )
                if multipliers is None:  # a value is not finite: the general path says so
                    return None
                return self.layers.run_made(self._inputs(x), multipliers, self.replicas)
        with _inference_mode(True):
            kept = _take(self.buffers, lambda: self.compiled.buffer(self.rows, self.made_shapes))
            out, multipliers = kept
            if not self.compiled.fill_from_values(
                values, seed, self.first_sample, self.n_samples, out
            ):
                _give_back(self.buffers, kept)
                return None  # a value is not finite: the general path says so
            y = self.layers.run_made(self._inputs(x), multipliers, self.replicas)
        _give_back(self.buffers, kept)  # (not where the pass raised: a traceback may hold one)
        return y

    def _inputs(self, x: Tensor) -> Tensor:
        """As planning.run_chain_pass: the caller's rows themselves only where the chain's first
        step writes a new tensor, one pass of them is all it needs, and they are laid out as a
        copy would be (sampling_context.fresh_layout); else a copy, or the replicated rows."""
        if self.share or self.n_samples == 1:
            if self.fresh_first and fresh_layout(x):
                return x
            return x.clone(memory_format=torch.contiguous_format)
        return replicate(x, self.n_samples)


class ForwardPass(FastPass):
    """A fast pass that runs the model's own forward (:class:`RoutedPass`, :class:`ModePass`),
    which may call any of its modules: each must be in eval mode (the general path switches
    one in training mode; a fast pass leaves that call to it), and the containers must hold the
    children they held when :attr:`children` was taken (a module put in since is checked)."""

    def __init__(
        self,
        plan: SamplingPlan,
        model: nn.Module,
        kernels: ModuleType,
        key: tuple[int, int, int, int, str],
        share: bool,
        children: tuple[tuple[dict[str, nn.Module | None], tuple[nn.Module | None, ...]], ...]
        | None = None,
    ) -> None:
        super().__init__(plan, model, kernels, key, share)
        self.calls = plan.calls
        self.modules = tuple(every_module(model))
        # None: the containers' children now
        self.children = (
            children
            if children is not None
            else tuple((m._modules, tuple(m._modules.values())) for m in self.modules if m._modules)
        )
        # The calls whose multipliers are made for the whole pass at once, before it, in one
        # compiled call (set by the subclasses): (call index, multipliers per row, the module or
        # function call that makes it, None where unknown), their dtype, and what makes each call
        self.made_calls: tuple[tuple[int, int, Any], ...] = ()
        self.made_dtype = plan.dtype
        self.callers: tuple[Any, ...] = (None,) * len(self.calls)
        # per rates: the compiled maker (cpu_masks.FusedPass: numba's, loaded) and its calls
        self._made: dict[
            tuple[float, ...],
            tuple[
                Any,
                tuple[tuple[int, Any, float, torch.Size], ...],
                tuple[tuple[int, ...] | None, ...],
            ],
        ] = {}
        # each call's input shape in a pass of rows·samples rows; the first call's with the
        # prefix shared, of the N rows (the call replicates it)
        self.shapes = tuple(
            torch.Size(call.shape_at(self.n_rows if share and call.index == 0 else self.rows))
            for call in plan.calls
        )

    def _runnable(self, model: nn.Module) -> bool:
        """Every module of the model as when the pass was made, in eval mode."""
        if any(map(_training, self.modules)):
            return False
        return all(tuple(found.values()) == planned for found, planned in self.children)

    def _inputs(self, x: Tensor) -> Tensor:
        """As planning.run_pass: the rows copied (a layer may write into its input) or
        replicated."""
        if self.share:
            return x.clone(memory_format=torch.contiguous_format)
        return replicate(x, self.n_samples)

    def _made_at(
        self, keys: np.ndarray, rates: tuple[float, ...]
    ) -> list[tuple[Any, float, tuple[int, ...], Tensor] | None] | None:
        """:meth:`RoutedPass._made_now` with the made calls' ``rates`` given."""
        return self._made_by(self._maker_at(rates), keys)

    def _maker_at(
        self, rates: tuple[float, ...]
    ) -> tuple[
        Any,
        tuple[tuple[int, Any, float, torch.Size], ...],
        tuple[tuple[int, ...] | None, ...],
    ]:
        """:meth:`_maker` of the made calls at ``rates``, kept for the next passes."""
        found = self._made.get(rates)
        if found is None:
            if len(self._made) >= 8:  # rates changed between calls: keep the latest few
                self._made.clear()
            found = self._made[rates] = self._maker(self.made_calls, rates)
        return found

    def _made_by(
        self,
        found: tuple[
            Any,
            tuple[tuple[int, Any, float, torch.Size], ...],
            tuple[tuple[int, ...] | None, ...],
        ],
        keys: np.ndarray,
    ) -> list[tuple[Any, float, tuple[int, ...], Tensor] | None] | None:
        """The made calls' entries (see :meth:`RoutedPass._made_now`) by a :meth:`_maker`'s
        maker ``found``, from the row keys ``(N,)``."""
        fused, table, shapes = found
        if fused is None:
            return None
        return self._entries(table, fused.make(keys, self.first_sample, self.n_samples, shapes))

    def _entries(
        self, table: tuple[tuple[int, Any, float, torch.Size], ...], values: list[Tensor]
    ) -> list[tuple[Any, float, tuple[int, ...], Tensor] | None]:
        """Per call of the plan, the made call's entry of a :meth:`_maker`'s ``table`` with its
        multipliers ``values`` (in the table's order); None for the other calls."""
        out: list[tuple[Any, float, tuple[int, ...], Tensor] | None] = [None] * len(self.calls)
        for (call, module, p, shape), v in zip(table, values, strict=True):
            out[call] = (module, p, shape, v)
        return out

    def _maker(
        self, made_calls: tuple[tuple[int, int, Any], ...], rates: tuple[float, ...]
    ) -> tuple[
        Any,
        tuple[tuple[int, Any, float, torch.Size], ...],
        tuple[tuple[int, ...] | None, ...],
    ]:
        """The multipliers' compiled maker for the ``made_calls`` at ``rates``
        (:meth:`masks.PassMultipliers.compiled`; None where numba does not make them in one
        call), each made call's index, module, rate and input shape, and the shape its
        multipliers are made in (:func:`apply_multipliers`' own; None: flat, where the call
        replicates its input)."""
        calls = tuple(
            (i, n, p) for (i, n, _), p in zip(made_calls, rates, strict=True)
            if 0.0 < p < 1.0
        )  # fmt: skip
        made = masks.PassMultipliers(calls, self.made_dtype) if calls else None
        if made is None or not made.takes_rows(self.rows):
            return None, (), ()
        table = tuple((i, self.callers[i], p, self.shapes[i]) for i, _, p in calls)
        shapes = tuple(self._made_shape(i, n) for i, n, _ in calls)
        return made.compiled(), table, shapes

    def _made_shape(self, call: int, n: int) -> tuple[int, ...] | None:
        """The shape call ``call``'s ``n`` multipliers per row are applied in: its input's, or
        ``(B, C, 1, ...)`` for a channel dropout (:func:`apply_multipliers`); None (flat) for
        the first call of a pass that shares the prefix, which replicates its input."""
        shape = self.shapes[call]
        if self.replicas > 1 and call == 0:
            return None
        if n == math.prod(shape[1:]):
            return tuple(shape)
        if len(shape) >= 2 and n == shape[1]:  # per channel
            return (shape[0], shape[1], *[1] * (len(shape) - 2))
        return None


class RoutedPass(ForwardPass):
    """The fast pass of a model whose dropout modules make all its stochastic calls, run by
    its own forward with those modules routed to the sampling context (``routes``,
    :mod:`mcdrop.routing`)."""

    def __init__(
        self,
        plan: SamplingPlan,
        model: nn.Module,
        kernels: ModuleType,
        key: tuple[int, int, int, int, str],
        share: bool,
        routes: DropoutRoutes,
    ) -> None:
        # each container's children as when the plan was made: a dropout module put in since
        # would pass unseen
        super().__init__(plan, model, kernels, key, share, routes.children)
        self.routes = routes
        # The calls whose multipliers are made for the whole pass at once, before it (where
        # numba makes them, as a layer chain's): an inverted dropout's, per element or per
        # channel, one row's entries after another's, in the dtype of the first call's input (a
        # network of its own dtype: nets.ReducedPrecision); each call making its own costs
        # ~10 µs of a cold call (~30 a channel dropout's).
        self.made_dtype = routes.callers[0][1] if routes.callers else plan.dtype
        funcs = {id(module): func for module, func, _ in routes.modules}
        sizes = (
            (call, caller, _made_size(call, caller, funcs) if dtype == self.made_dtype else None)
            for call, (caller, dtype) in zip(plan.calls, routes.callers, strict=False)
        )
        # (call index, multipliers per row, the module or function call that makes it)
        self.made_calls = tuple((call.index, n, caller) for call, caller, n in sizes if n)
        self.callers = tuple(module for module, _ in routes.callers)
        # A request's few rows whose every call is made before the pass: their finiteness
        # check, keys and multipliers in one compiled call (as a chain's, ChainPass)
        # (multipliers of a dtype of their own, rounded from float32's, are made by make)
        self.at_once = (
            len(self.made_calls) == len(self.calls)
            and self.made_dtype in kernels.DTYPES
            and self.few
        )
        # Buffers of multipliers kept for the next calls, as a chain's (ChainPass.buffers), each
        # with the maker it was made by (the rates): the routes read them and write each product
        # into a tensor of its own (apply_multipliers' keep), as the forward may keep a product
        size = sum(n for _, n, _ in self.made_calls) * self.rows
        self.keeps = self.at_once and size * torch.finfo(self.made_dtype).bits // 8 <= KEPT_BUFFER
        # (maker, buffer, its tensors, the context's entries of them: _entries)
        self.buffers: list[
            tuple[
                Any,
                np.ndarray,
                list[Tensor],
                list[tuple[Any, float, tuple[int, ...], Tensor] | None],
            ]
        ] = []

    def _pass(self, model: nn.Module, x: Tensor, keys: np.ndarray) -> object:
        inputs = self._inputs(x)
        # (the multipliers made in inference mode: inference tensors, as ChainPass._pass's)
        with _inference_mode(True):
            made = self._made_now(keys)
            ctx: SamplingContext
            if made is not None:
                # the made calls' multipliers straight to their routes: no context's dropout,
                # and no sample keys but for a call made in the pass (an attention's, a
                # recurrent kernel's) or one they do not fit, whose keys are made then
                ctx = MadeContext(
                    made,
                    self.replicas,
                    self.calls,
                    lambda: self.kernels.sample_keys(keys, self.first_sample, self.n_samples),
                )
            else:
                samples = self.kernels.sample_keys(keys, self.first_sample, self.n_samples)
                ctx = SamplingContext(samples, self.calls, replicate=self.replicas)
            return routed_forward(model, inputs, ctx, self.routes, len(self.calls))

    def _pass_of_rows(
        self, model: nn.Module, x: Tensor, values: np.ndarray, seed: int | np.ndarray
    ) -> object:
        rates = tuple([float(cast(Any, caller).p) for _, _, caller in self.made_calls])
        fused, table, shapes = self._maker_at(rates)
        if fused is None:  # (a rate of 0 or 1 now: no multipliers made) the keys alone
            keys = self.kernels.row_key_array(values, seed)
            return None if keys is None else self._pass(model, x, keys)
        inputs = self._inputs(x)
        with _inference_mode(True):
            kept = None
            entries = None
            if not self.keeps:
                made = fused.make_from_values(
                    values, seed, self.first_sample, self.n_samples, shapes
                )
                if made is not None:
                    entries = self._entries(table, made)
            else:

                def fresh() -> Any:
                    out, made = fused.buffer(self.rows, shapes)
                    return (fused, out, made, self._entries(table, made))

                # (one made at other rates than now is dropped)
                kept = _take(self.buffers, fresh, lambda k: k[0] is fused)
                if fused.fill_from_values(values, seed, self.first_sample, self.n_samples, kept[1]):
                    entries = kept[3]
            if entries is None:  # a value not finite, a seed negative: the general path's
                if kept is not None:
                    _give_back(self.buffers, kept)
                return None
            # (a call the multipliers do not fit, as a rate changed in the pass: its keys then)
            ctx = MadeContext(
                entries,
                self.replicas,
                self.calls,
                lambda: self.kernels.sample_keys(
                    self.kernels.row_key_array(values, seed), self.first_sample, self.n_samples
                ),
            )
            ctx.kept = kept is not None
            y = routed_forward(model, inputs, ctx, self.routes, len(self.calls))
        # (not where the pass raised: a traceback may hold the context)
        if kept is not None:
            _give_back(self.buffers, kept)
        return y

    def _made_now(
        self, keys: np.ndarray
    ) -> list[tuple[Any, float, tuple[int, ...], Tensor] | None] | None:
        """Per call of the plan, in call order: a made call's module (or function call), its
        rate now, its input's shape and its multipliers (flat) made from the row keys ``(N,)``
        in one compiled call; None for the other calls. None where no call is made
        (:func:`_made_size`) with a rate in (0, 1)."""
        if not self.made_calls:
            return None
        rates = tuple([float(cast(Any, caller).p) for _, _, caller in self.made_calls])
        return self._made_at(keys, rates)


def _take(
    buffers: list[Any], fresh: Callable[[], Any], fits: Callable[[Any], bool] | None = None
) -> Any:
    """A buffer of multipliers kept for a pass's next calls (:class:`ChainPass`,
    :class:`RoutedPass`), taken from ``buffers`` (list.pop: atomic, so a call on another thread
    takes another), or ``fresh()`` where none is there or the one there does not ``fit``."""
    try:
        kept = buffers.pop()
    except IndexError:  # the first call, or one running beside another
        return fresh()
    return kept if fits is None or fits(kept) else fresh()


def _give_back(buffers: list[Any], kept: Any) -> None:
    """``kept`` (:func:`_take`'s) back to ``buffers`` after its pass, up to
    :data:`KEPT_BUFFERS` of them."""
    if len(buffers) < KEPT_BUFFERS:
        buffers.append(kept)


def _row_seeds(seed: Tensor, n_rows: int) -> bool:
    """Whether ``seed`` is seeds of ``n_rows`` rows as the general path takes them: ``(N,)``
    int64 on the CPU (a tensor subclass or another dtype: the general path's to judge), their
    memory readable by NumPy (not negated lazily: NumPy refuses a tensor whose negative bit is
    set, which the general path reads as its values)."""
    return (
        seed.dtype is torch.int64
        and seed.shape == (n_rows,)
        and seed.device.type == "cpu"
        and not seed.is_neg()
    )


def _shape(plan: SamplingPlan, call: int, rows: int, n: int) -> tuple[int, ...] | None:
    """Call ``call``'s input shape in a pass of ``rows`` rows, where it has ``n`` elements per
    row (the multipliers of an element-wise call); else None (flat)."""
    if call >= len(plan.calls):
        return None
    shape = plan.calls[call].shape_at(rows)
    return shape if math.prod(shape) == rows * n else None


def _made_size(
    call: CallLayout, caller: object, funcs: dict[int, Callable[..., Any]]
) -> int | None:
    """The multipliers per row of a call whose multipliers a routed pass makes before it, as
    :meth:`SamplingContext.dropout` would make them: an inverted dropout's (not alpha), rows
    along dimension 0, one entry per element, or per channel (``(N, C, ...)``, at the rank the
    function takes as batched); None for any other call. ``caller``: the routed module or
    :class:`~mcdrop.routing.FunctionCall` (``funcs``: each routed module's function)."""
    func = caller.func if type(caller) is FunctionCall else funcs.get(id(caller))
    options = DROPOUT_FUNCTIONS.get(func) if func is not None else None
    if options is None or options.get("alpha") or call.dim != 0 or call.group != 1:
        return None
    if not options.get("feature"):
        return math.prod(call.shape)
    rank = options.get("batched_rank")
    if len(call.shape) < 2 or (rank is not None and len(call.shape) != rank):
        return None
    return call.shape[1]


class ModePass(ForwardPass):
    """The fast pass of any other model (a forward that calls dropout functions or attention,
    an encoder's twin): its forward under the torch-function mode, as the general path runs
    it, without the general path's bookkeeping around the pass.

    Its inverted dropout calls per element (an encoder's, ``F.dropout``'s) have their
    multipliers made before the pass in one compiled call (as a routed pass's), at the rates a
    pass saw them drop at: the mode knows no module behind a call, so the first pass notes each
    call's rate (:class:`ModeContext`), and a later call at another rate makes its own (the
    same bits: a row's multipliers depend on its key, the call and the rate alone), after which
    the next pass notes them again. The multipliers go into a buffer kept from pass to pass
    (:class:`_KeptMultipliers`). Each call's own hash and bookkeeping cost ~10 µs of a cold
    call, the pass's one hash ~1 µs a call (a 2-layer encoder: 8 calls)."""

    def __init__(
        self,
        plan: SamplingPlan,
        model: nn.Module,
        kernels: ModuleType,
        key: tuple[int, int, int, int, str],
        share: bool,
    ) -> None:
        super().__init__(plan, model, kernels, key, share)
        # the encoders' twin, kept (EncoderLayers.kept_twin), where the modules are as planned;
        # and the dicts of the modules whose hooks keep it from a pass (EncoderLayers.runnable,
        # checked per pass: a hook there when the pass is made may be gone by the next; the
        # children are the pass's own check)
        encoders = plan.encoders
        self.twin = (
            encoders.kept_twin(model) if encoders is not None and encoders.unchanged() else None
        )
        self.hooked = () if encoders is None else tuple(vars(m) for m, _ in encoders.checked)
        # the maker of the multipliers of the calls a pass noted (ForwardPass._maker's), its
        # buffer kept from pass to pass (None where the maker makes none), the calls hashed
        # in place (_into_of) and the rates of the others (_others_of); None until a pass
        # notes them
        self.noted: (
            tuple[Any, _KeptMultipliers | None, list[Any] | None, list[Any] | None] | None
        ) = None
        # (with the kept buffer's multipliers, else on their own: cpu_masks.row_key_array)
        self.at_once = self.few

    def _pass(self, model: nn.Module, x: Tensor, keys: np.ndarray) -> object:
        return self._mode_pass(model, x, keys, None, 0)

    def _pass_of_rows(
        self, model: nn.Module, x: Tensor, values: np.ndarray, seed: int | np.ndarray
    ) -> object:
        return self._mode_pass(model, x, None, values, seed)

    def _mode_pass(
        self,
        model: nn.Module,
        x: Tensor,
        keys: np.ndarray | None,
        values: np.ndarray | None,
        seed: int | np.ndarray,
    ) -> object:
        """The pass, from the row keys ``keys`` ``(N,)``, or (None) from the rows' ``values``
        under ``seed``: their keys made with the kept buffer's multipliers in one compiled
        call where this pass holds it, else on their own (None where a value is not finite
        or a seed negative: the general path says so)."""
        # As planning.run_pass's pass under the mode
        inputs = self._inputs(x)
        noted = self.noted  # (once: another thread's pass may note them meanwhile)
        kept_made: _KeptMultipliers | None = None  # the kept buffer, where this pass holds it
        into = others = None
        with _inference_mode(True):
            if noted is not None:
                found, kept_made, into, others = noted
                if kept_made is not None and not kept_made.hold():
                    kept_made = None  # another pass holds it: multipliers of this pass's own
            try:
                samples: np.ndarray | None = None  # the sample keys, made with the multipliers
                made: list[tuple[Any, float, tuple[int, ...], Tensor] | None] | None
                if kept_made is not None:
                    if not kept_made.fill(keys, values, seed):
                        return None
                    made = kept_made.made
                    samples = kept_made.samples
                else:
                    if keys is None:
                        keys = self.kernels.row_key_array(values, seed)
                        if keys is None:
                            return None
                    made = None if noted is None else self._made_by(found, keys)
                ctx = ModeContext(
                    made,
                    self.replicas,
                    self.calls,
                    self._sample_keys(keys, samples),
                    [] if noted is None else None,
                    kept=kept_made is not None,
                    into=into,
                    into_keys=samples,
                    others=others,
                )
                y = self._forward(model, inputs, ctx)
            finally:
                if kept_made is not None:
                    kept_made.give_back()
        # a pass of other calls than the plan's: the general path raises its error
        if ctx.calls != len(self.calls):
            return None
        if ctx.noted is not None:
            found = self._maker_of(ctx.noted)
            into = self._into_of(ctx.noted, found)
            self.noted = (
                found,
                _KeptMultipliers.of(found, self),
                into,
                self._others_of(ctx.noted, found, into),
            )
        elif ctx.missed:  # a rate changed since noted: note them again on the next pass
            self.noted = None
        return y

    def _sample_keys(
        self, keys: np.ndarray | None, samples: np.ndarray | None
    ) -> Callable[[], Tensor]:
        """The maker of a pass's sample keys ``(S · N,)`` for the calls made in it: those made
        with the kept buffer's multipliers (``samples``, ``uint64``), else from the row keys."""
        if samples is not None:
            return lambda: torch.from_numpy(samples.view(np.int64))
        return lambda: self.kernels.sample_keys(keys, self.first_sample, self.n_samples)

    def _forward(self, model: nn.Module, inputs: Tensor, ctx: ModeContext) -> Any:
        """The model's forward of ``inputs`` (its encoders' twin's where it may run) in
        ``ctx``."""
        net = model
        kept = self.twin
        held = False  # whether this pass runs the kept twin, handed back after it
        if kept is not None and not global_hooks() and not any(map(any, map(_hooks, self.hooked))):
            net, held = kept.take(model)
        try:
            with ctx:
                return net(inputs)
        finally:
            if held and kept is not None:
                kept.give_back()

    def _maker_of(self, noted: list[tuple[int, float, torch.dtype]]) -> Any:
        """The maker of the multipliers of the calls a pass noted, (call index, rate, dtype)
        each: the inverted dropout calls per element, rows first, at a rate in (0, 1), of the
        plan's dtype; not the first call of a pass that shares the prefix (it replicates)."""
        made = [
            ((i, math.prod(self.calls[i].shape), None), p)
            for i, p, dtype in noted
            if 0.0 < p < 1.0
            and dtype == self.made_dtype
            and self.calls[i].dim == 0
            and self.calls[i].group == 1
            and not (self.replicas > 1 and i == 0)
            # a large call multiplies as it hashes (SamplingContext.dropout_into), with no
            # multipliers in memory: fresh memory costs it more than its call's bookkeeping
            and math.prod(self.calls[i].shape) * self.rows <= _MADE_IN_MODE
        ]
        # the smaller calls where all would be too many words for one hash
        by_size = sorted(made, key=lambda c: c[0][1])
        while by_size:
            calls = tuple((i, n, p) for (i, n, _), p in by_size)
            if masks.PassMultipliers(calls, self.made_dtype).words * self.rows <= masks.PASS_WORDS:
                break
            by_size.pop()
        made = sorted(by_size, key=lambda c: c[0][0])
        return self._maker(tuple(c for c, _ in made), tuple(p for _, p in made))

    def _into_of(
        self, noted: list[tuple[int, float, torch.dtype]], found: Any
    ) -> list[tuple[float, torch.Size, torch.dtype, int, Any] | None] | None:
        """Per call of the plan, the in-place call of each noted call that ``found`` (a
        :meth:`_maker_of`'s maker) does not make: its rate, input shape, dtype, multipliers
        per row, and its :class:`~mcdrop.cpu_masks.DropInto` (hashed and multiplied in one
        compiled call with the pass's sample keys, :class:`ModeContext`'s ``into``); None for
        the other calls, or for all where there is none. An inverted dropout call per element,
        rows first, at a rate in (0, 1), of float32 or float64."""
        made = {call for call, _, _, _ in found[1]}
        into: list[tuple[float, torch.Size, torch.dtype, int, Any] | None] = [None] * len(
            self.calls
        )
        for i, p, dtype in noted:
            layout = self.calls[i]
            if (
                i not in made
                and 0.0 < p < 1.0
                and dtype in self.kernels.DTYPES
                and layout.dim == 0
                and layout.group == 1
                and not (self.replicas > 1 and i == 0)
            ):
                call = self.kernels.DropInto(i, p, dtype)
                into[i] = (p, self.shapes[i], dtype, math.prod(layout.shape), call)
        return into if any(e is not None for e in into) else None

    def _others_of(
        self,
        noted: list[tuple[int, float, torch.dtype]],
        found: Any,
        into: list[Any] | None,
    ) -> list[tuple[float, torch.dtype] | None] | None:
        """Per call of the plan, the rate and dtype a pass noted of each noted call that is
        neither made before the pass (by ``found``) nor hashed in place (``into``): one at a
        rate of 1, of another dtype or layout; None for the other calls, or for all where there
        is none. A later pass that finds such a call at another rate or dtype misses
        (:class:`ModeContext`'s ``others``), so that the pass after it notes the call again:
        back at a rate in (0, 1), its multipliers are made again, not left to the context's
        own keys and checks for good."""
        made = {call for call, _, _, _ in found[1]}
        others: list[tuple[float, torch.dtype] | None] = [None] * len(self.calls)
        for i, p, dtype in noted:
            if i not in made and (into is None or into[i] is None):
                others[i] = (p, dtype)
        return others if any(e is not None for e in others) else None


class _KeptMultipliers:
    """The buffer of a :class:`ModePass`'s premade multipliers, kept from pass to pass: each
    pass that holds it hashes its multipliers into it (:meth:`hold`, :meth:`fill`), with the
    pass's sample keys (for its calls hashed in place: :meth:`ModePass._into_of`), where making
    a fresh buffer and a tensor on it per call cost ~10 µs of a one-row call (a 2-layer
    encoder: 8 calls). One pass at a time holds it: a pass on another thread meanwhile makes
    its own. Its calls take the multipliers in place only, never returning them: the next pass
    rewrites them (:class:`ModeContext`'s ``kept``)."""

    def __init__(
        self,
        fused: Any,
        made: list[tuple[Any, float, tuple[int, ...], Tensor] | None],
        out: np.ndarray,
        first_sample: int,
        n_samples: int,
        rows: int,
    ) -> None:
        self.fused = fused
        self.made = made  # as ForwardPass._made_by's, on the buffer
        self.out = out
        # the pass's sample keys, made with the multipliers: ModeContext's `into` calls'
        self.samples = np.empty(n_samples * rows, dtype=np.uint64)
        self.first_sample, self.n_samples = first_sample, n_samples
        self._held = threading.Lock()

    @classmethod
    def of(cls, found: Any, made_by: ModePass) -> _KeptMultipliers | None:
        """The kept buffer of a maker ``found`` (:meth:`ForwardPass._maker`'s) for the passes
        of ``made_by``; None where it makes no multipliers, or not in float32 or float64."""
        fused, table, shapes = found
        if fused is None or fused.dtype not in (torch.float32, torch.float64):
            return None
        with _inference_mode(True):  # (inference tensors, as the multipliers made per pass)
            out, values = fused.buffer(made_by.rows, shapes)
        made: list[tuple[Any, float, tuple[int, ...], Tensor] | None] = [None] * len(made_by.calls)
        for (call, module, p, shape), v in zip(table, values, strict=True):
            made[call] = (module, p, shape, v)
        return cls(fused, made, out, made_by.first_sample, made_by.n_samples, made_by.n_rows)

    def hold(self) -> bool:
        """Whether this pass holds the buffer (then it fills it, :meth:`fill`, and hands it
        back after the pass, :meth:`give_back`); False where another pass holds it."""
        return self._held.acquire(blocking=False)

    def fill(
        self, keys: np.ndarray | None, values: np.ndarray | None, seed: int | np.ndarray
    ) -> bool:
        """The multipliers and sample keys of the held buffer made from the row keys ``keys``
        ``(N,)``, or (None) from the rows' ``values`` under ``seed`` in the same compiled call
        as their keys; False where a value is not finite or a seed negative (nothing made)."""
        if keys is not None:
            self.fused.make_into(keys, self.first_sample, self.n_samples, self.out, self.samples)
            return True
        assert values is not None
        return bool(
            self.fused.fill_from_values(
                values, seed, self.first_sample, self.n_samples, self.out, self.samples
            )
        )

    def give_back(self) -> None:
        """The holding pass is over (:meth:`hold`)."""
        self._held.release()


class MadeContext(SamplingContext):
    """The context of a routed fast pass whose calls have their multipliers made before it, but
    for some (:attr:`made`, taken by each made call's route: :mod:`mcdrop.routing`). A call not
    made (an attention's, a recurrent kernel's, an alpha dropout's) or one they do not fit (a
    function's rate changed since the plan, a module that hands its call to the context itself)
    is sampled as :class:`SamplingContext` samples it, with the pass's sample keys made at the
    first such call (``sample_keys``): the pass runs once, as the general path would run it."""

    def __init__(
        self,
        made: list[tuple[Any, float, tuple[int, ...], Tensor] | None],
        replicate: int,
        calls: Sequence[CallLayout],
        sample_keys: Callable[[], Tensor],
    ) -> None:
        # no sample keys until a call needs them: none made for a pass whose every call
        # takes its multipliers
        super().__init__(_NO_KEYS, calls, replicate=replicate)
        self.made = made
        self.routed = True
        self._sample_keys: Callable[[], Tensor] | None = sample_keys

    def dropout(self, x: Tensor, p: float, **options: Any) -> Tensor:
        self._keyed()
        return super().dropout(x, p, **options)

    def take(
        self, x: Tensor, kind: str, batch_dim: int | None = None
    ) -> tuple[Tensor, CallLayout, int] | None:
        self._keyed()
        return super().take(x, kind, batch_dim)

    def _keyed(self) -> None:
        """The sample keys ``(B,)`` and the rows so far, at the first call not made before."""
        if self._sample_keys is not None:
            self.keys = self._sample_keys()
            self._sample_keys = None
            self.batch = self.keys.shape[0] // self.replicate


_NO_KEYS = torch.zeros(0, dtype=torch.int64)  # a MadeContext's keys until a call needs them


class ModeContext(MadeContext):
    """The context of a :class:`ModePass`: the mode's inverted dropout calls per element take
    their premade multipliers (:attr:`made`) where made for the call's rate, shape and dtype
    (else they are sampled as :class:`SamplingContext` samples them, and :attr:`missed` says
    so); with ``noted`` (a list), each such call notes its index, rate and dtype there."""

    def __init__(
        self,
        made: list[tuple[Any, float, tuple[int, ...], Tensor] | None] | None,
        replicate: int,
        calls: Sequence[CallLayout],
        sample_keys: Callable[[], Tensor],
        noted: list[tuple[int, float, torch.dtype]] | None,
        *,
        kept: bool = False,
        into: list[tuple[float, torch.Size, torch.dtype, int, Any] | None] | None = None,
        into_keys: np.ndarray | None = None,
        others: list[tuple[float, torch.dtype] | None] | None = None,
    ) -> None:
        super().__init__([] if made is None else made, replicate, calls, sample_keys)
        # no route of this pass's (MadeContext's is): a routed module's call is another pass's
        self.routed = False
        self.noted = noted
        self.missed = False
        # whether the multipliers are a kept buffer's, which the next pass rewrites
        # (_KeptMultipliers), not this pass's own, which a call may return
        self.kept = kept
        # the in-place calls hashed with the pass's sample keys (ModePass._into_of), and those
        # keys (uint64; None: made from the context's own keys at the first such call)
        self.into = into
        self.into_keys = into_keys
        # the rate and dtype noted of each call neither made nor hashed in place
        # (ModePass._others_of): one found at another misses
        self.others = others

    def dropout(self, x: Tensor, p: float, **options: Any) -> Tensor:
        if not (options.get("feature") or options.get("alpha")):
            kind = options.get("kind", "dropout")
            out = self._premade(x, p, kind, bool(options.get("inplace", False)))
            if out is not None:
                return out
        return super().dropout(x, p, **options)

    def dropout_into(
        self, x: Tensor, p: float, *, kind: str = "dropout", batch_dim: int | None = None
    ) -> Tensor:
        out = self._premade(x, p, kind, True)
        if out is not None:
            return out
        if self.into is not None and self._hashed_into(x, p, kind):
            return x
        return super().dropout_into(x, p, kind=kind, batch_dim=batch_dim)

    def relu_dropout_into(self, x: Tensor, p: float, *, kind: str = "dropout") -> Tensor:
        if p != 0.0 and self.into is not None and self._hashed_into(x, p, kind, True):
            return x
        return self.dropout_into(x.relu_(), p, kind=kind)

    def _hashed_into(self, x: Tensor, p: float, kind: str, relu: bool = False) -> bool:
        """Whether the call was ``x`` (with ``relu``, ``relu(x)``) times its multipliers in
        place by its in-place call (:attr:`into`), hashed with the pass's sample keys in one
        compiled call: the bits of :meth:`SamplingContext.dropout_into`, without its per-call
        keys, checks and constants."""
        index = self.calls
        into = self.into
        entry = into[index] if into is not None and index < len(into) else None
        if entry is None:
            return False
        if (
            entry[0] != p
            or x.shape != entry[1]
            or x.dtype != entry[2]
            or self.replicate != 1
            or self.layouts[index].kind != kind
        ):
            self.missed = True
            return False
        try:
            values = x.numpy()
        except (RuntimeError, TypeError):  # needs a gradient, or negated lazily
            return False
        if not values.flags.c_contiguous:
            return False
        keys = self.into_keys
        if keys is None:
            self._keyed()
            keys = self.into_keys = self.keys.numpy().view(np.uint64)
        entry[4](keys, values.reshape(values.shape[0], entry[3]), relu)
        self.calls = index + 1
        return True

    def _premade(self, x: Tensor, p: float, kind: str, inplace: bool) -> Tensor | None:
        """``x`` times its premade multipliers, the call taken, where they are made for it;
        else None (the call is noted, where the pass notes them). At rate 0, ``x`` itself,
        as :meth:`SamplingContext.dropout` returns it: no call of the plan's, so not one
        that misses the multipliers made for the call after it (which would have every other
        pass note the rates again), nor one for which the pass's keys are made."""
        if p == 0.0:
            return x
        index = self.calls
        made = self.made
        entry = made[index] if made is not None and index < len(made) else None
        if entry is None:
            if self.noted is not None:
                if index < len(self.layouts):
                    self.noted.append((index, float(p), x.dtype))
            elif self.others is not None and index < len(self.others):
                noted = self.others[index]
                if noted is not None and (noted[0] != p or noted[1] != x.dtype):
                    self.missed = True  # (a rate of 1 when noted, now in (0, 1): made again)
            return None
        if (
            entry[1] != p
            or x.shape != entry[2]
            or x.dtype != entry[3].dtype
            or self.replicate != 1
            or self.layouts[index].kind != kind
        ):
            self.missed = True
            return None
        self.calls = index + 1
        scale = entry[3]
        if inplace:
            return x.mul_(scale)
        # multipliers of this pass's own are a fresh tensor of x's shape, used once: the product
        # into them where x is laid out as they are (x · m and m · x are the same floats)
        return scale.mul_(x) if not self.kept and x.is_contiguous() else x * scale


_training = operator.attrgetter("training")

_rate = operator.attrgetter("p")

# A module's hook dicts, from its __dict__: any() of them is whether it has a hook.
_hooks = operator.itemgetter(
    "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"
)

# A module's hook dicts and training flag, from its __dict__: any() of them is whether it has a
# hook or trains.
_hooks_or_training = operator.itemgetter(
    "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks", "training"
)

# torch.inference_mode()'s own guard: the Python context manager around it (built and entered
# on every use) cost 5–7 µs of a cold one-row call, a fifth of a small MLP's arithmetic.
_inference_mode = getattr(torch._C, "_InferenceMode", torch.inference_mode)
