"""The fast pass: a whole sampling call in one short function, for the small requests where
Python's bookkeeping costs more than the model's arithmetic.

The common small request is one pass of a kept plan on the CPU, for a model that is a plain
chain of torch layers (:class:`~mcdrop.planning.LayerChain`) whose multipliers numba makes in one
call (:meth:`~mcdrop.masks.PassMultipliers.make_from_rows`). The general path runs it through a
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
"""

from __future__ import annotations

import operator
from itertools import repeat
from types import ModuleType
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor, nn

from mcdrop import masks, modes
from mcdrop._hooks import global_hooks
from mcdrop.devices import model_device_slot
from mcdrop.sampling_context import replicate

if TYPE_CHECKING:
    from mcdrop.planning import LayerChain, SamplingPlan

#: The most call shapes a plan keeps fast passes for (request sizes vary: the latest few).
MAX_KEPT = 64


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
    (another dtype, no layer chain, CUDA graphs, more than one pass, masks that numba does not
    make in one call)."""
    n_rows, n_samples, first_sample, max_pass_rows, prefix = key
    layers = plan.layers
    if (
        layers is None
        or plan.graphs is not None
        or plan.dtype != torch.float32
        or n_rows < 1
        or n_samples < 1
        or first_sample < 0
        or max_pass_rows < 1
        or prefix not in ("auto", "off")
    ):
        return None
    shared = prefix == "auto" and plan.prefix
    share = shared and n_samples > 1  # one sample per pass gains nothing from sharing
    rows = n_rows * n_samples
    if rows > plan.pass_rows(n_rows, n_samples, max_pass_rows, prefix=share):
        return None
    made = layers.fused(rows, plan)  # None unless numba makes the masks (then it is loaded)
    kernels = None if made is None else masks.numba_kernels()
    if made is None or kernels is None:
        return None
    return FastPass(plan, model, layers, made, kernels, n_rows, n_samples, first_sample, share)


class FastPass:
    """One call shape of a kept plan, run in one function (see the module docstring).

    Args:
        plan: the kept plan, of ``model``; layers: its :class:`~mcdrop.planning.LayerChain`.
        made: the chain's :meth:`~mcdrop.planning.LayerChain.fused` multipliers for the pass, at
            the layers' current rates; kernels: :mod:`mcdrop.cpu_masks` (numba works).
        n_rows: N; n_samples: S; first_sample: the index of the first sample drawn.
        share: whether the layers before the first dropout run once per row.
    """

    def __init__(
        self,
        plan: SamplingPlan,
        model: nn.Module,
        layers: LayerChain,
        made: masks.PassMultipliers,
        kernels: ModuleType,
        n_rows: int,
        n_samples: int,
        first_sample: int,
        share: bool,
    ) -> None:
        self.model = plan._model
        self.layers = layers
        # (N, D...) float32 rows: another shape is another call shape (or a wrong call)
        self.shape = torch.Size((n_rows, *plan.input_shape))
        self.n_rows, self.n_samples, self.first_sample = n_rows, n_samples, first_sample
        self.share = share
        self.fresh_first = layers.fresh_first
        self.replicas = n_samples if share else 1
        self.rows = n_rows * n_samples
        self.kernels = kernels
        self.compiled = made.compiled()  # numba's maker of every multiplier of the pass
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
        self.device = model_device_slot(model)
        # the rates the multipliers were made for, as LayerChain._pass reads them
        self.rates = tuple((layer, float(cast(Any, layer).p)) for _, layer in layers.elementwise)

    def run(self, model: nn.Module, x: Tensor, seed: object) -> Tensor | None:
        """The ``(S, N, K...)`` samples of ``x`` ``(N, D...)`` under ``seed`` (None: a fresh one
        from the OS), or None where this pass does not apply to the call (then the general path
        runs it)."""
        if seed is None:
            seed = masks.fresh_seed()
        if (
            type(x) is not Tensor
            or x.shape != self.shape
            or x.dtype is not torch.float32
            or type(seed) is not int
            or not 0 <= seed <= masks.MAX_SEED
            or self.model() is not model
        ):
            return None
        try:  # on the CPU, outside autograd, no negative bit: else NumPy refuses it
            values = x.numpy()
        except (RuntimeError, TypeError):
            return None
        if not self.kernels.all_finite(values) or not self._runnable():
            return None
        keys = masks.keys_of_bytes(masks.float32_bytes(values), self.n_rows, seed)
        multipliers: list[Tensor] = self.compiled.make(keys, self.first_sample, self.n_samples)
        # As planning.run_chain_pass: the caller's rows themselves only where the chain's first
        # step writes a new tensor, one pass of them is all it needs, and they are laid out as
        # a copy would be (sampling_context.fresh_layout).
        if self.share or self.n_samples == 1:
            if self.fresh_first and x.is_contiguous() and x.data_ptr() % 16 == 0:  # fresh_layout
                inputs = x
            else:
                inputs = x.clone(memory_format=torch.contiguous_format)
        else:
            inputs = replicate(x, self.n_samples)
        with _inference_mode(True):
            y = self.layers.run_made(inputs, multipliers, self.replicas)
        if type(y) is not Tensor or y.dim() < 1 or y.shape[0] != self.rows:
            return None  # the general path says what is wrong (planning._check_output)
        # contiguous, as sample returns a single pass's (channels-last weights make a
        # convolution's output another layout)
        return y.reshape(self.n_samples, self.n_rows, *y.shape[1:]).contiguous()

    def _runnable(self) -> bool:
        """Whether nothing changed since the plan that the pass depends on: no hook, the
        chain's layers, every module in eval mode (and no call switching one:
        :mod:`mcdrop.modes`), the dropout rates, the model on the CPU."""
        seen = modes.switches
        try:
            if (
                modes.switching
                or global_hooks()
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
        for layer, p in self.rates:
            if layer.p != p:
                return False
        if self.device is not None:
            tensor = self.device[0].get(self.device[1])
            if tensor is None or not tensor.is_cpu:
                return False
        return modes.switches == seen


# A module's hook dicts and training flag, from its __dict__: any() of them is whether it has a
# hook or trains.
_hooks_or_training = operator.itemgetter(
    "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks", "training"
)

# torch.inference_mode()'s own guard: the Python context manager around it (built and entered
# on every use) cost 5–7 µs of a cold one-row call, a fifth of a small MLP's arithmetic.
_inference_mode = getattr(torch._C, "_InferenceMode", torch.inference_mode)
