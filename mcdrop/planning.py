"""Sampling plans: where the rows are in every dropout call, and how a model's passes are cut.

Masks are keyed per replicated row, so every stochastic call must know which dimension of its
input runs over the rows. That is never guessed from sizes (a sequence length or a channel count
can equal the number of rows): a **probe** runs the model twice with dropout switched off, at
two batch sizes, and for each stochastic call (in call order) the one dimension whose size grows
in proportion to the batch is its batch dimension; the proportion is how many entries each row
owns along it (attention weights ``(B·H, L, S)``: ``H``). Calls whose own semantics fix the batch
dimension (channel dropout, ``LockedDropout``, ``DropConnectLinear``, attention weights
``(N, H, L, S)``) are checked against the probe. Every later pass follows the plan and refuses
with :class:`~mcdrop.exceptions.UnsupportedModelError` a call whose shape does not fit it.

Three seeded passes of two rows then check that a row's samples are the same alone and beside
another row, and whether the layers before the first dropout may run once per row instead of
once per sample (the deterministic "prefix"); the plan records why not where they may not.

Pass sizes follow from sizes alone (never from timings), so a seeded result is bit-identical
from run to run: the bytes per replicated row of the largest dropout input bound a pass to
:data:`ACTIVATION_BUDGET` on the CPU (:data:`DEVICE_ACTIVATION_BUDGET` on other devices: a plan
is made for the device the model is on), unless the prefix, counted in multiply-adds of matrix
products and convolutions during the probe, is a large share of the work (each extra pass
reruns it).

A model that is a plain chain of torch layers (an ``nn.Sequential``, mcdrop's MLP and CNN) gets a
:class:`LayerChain` in its plan: its passes run layer by layer without the torch-function mode,
whose cost per torch call is several times a small model's arithmetic.

Shape legend: ``N`` rows, ``S`` samples, ``B = S·N`` replicated rows, ``D...`` input dims.
"""

from __future__ import annotations

import math
import operator
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from itertools import repeat
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mcdrop import masks
from mcdrop._hooks import global_hooks, has_hooks
from mcdrop.attention import arg
from mcdrop.coverage import CallCounter, RateUse
from mcdrop.cuda_graphs import PassGraphs
from mcdrop.encoders import EncoderLayers
from mcdrop.exceptions import (
    InvalidArgumentError,
    NoDropoutError,
    UnsampledDropoutWarning,
    UnsupportedModelError,
)
from mcdrop.nets import CNN, MLP, Standardized
from mcdrop.routing import DropoutRoutes, functions_routable, routed_forward
from mcdrop.sampling_context import (
    DROPOUT_FUNCTIONS,
    DropoutMode,
    SamplingContext,
    apply_multipliers,
    fresh_layout,
    replicate,
)

if TYPE_CHECKING:
    from mcdrop.fast_pass import FastPass

#: Bound on the bytes of the largest activation a dropout sees in one pass: an image model's conv
#: activations at 8192 rows take hundreds of MB, and a pass that large runs about 2× slower per
#: row than one that stays near the caches (Fashion CNN, 32×100 rows).
ACTIVATION_BUDGET = 16 << 20

#: The same bound on a GPU (any device but the CPU), where there is no cache to stay in and a
#: pass cut smaller only adds launches and Python per row: 1 GiB, or a 32nd of a CUDA device's
#: memory if that is less (a pass's other activations, and concurrent passes, need room too).
DEVICE_ACTIVATION_BUDGET = 1 << 30


def activation_budget(device: torch.device) -> int:
    """The bound on a pass's largest dropout input on ``device`` (bytes): see
    :data:`ACTIVATION_BUDGET` and :data:`DEVICE_ACTIVATION_BUDGET`."""
    if device.type == "cpu":
        return ACTIVATION_BUDGET
    if device.type == "cuda":
        memory = torch.cuda.get_device_properties(device).total_memory
        return min(DEVICE_ACTIVATION_BUDGET, max(ACTIVATION_BUDGET, memory // 32))
    return DEVICE_ACTIVATION_BUDGET


#: Above this share of a pass's multiply-adds in the deterministic prefix, passes are not cut to
#: the activation budget: each extra pass over the same rows reruns the prefix.
PREFIX_SHARE_LIMIT = 0.1

# Replicated rows of the two shape probes: any two sizes tell the batch dimension apart from
# dimensions that keep their size; small ones keep the probe cheap.
_PROBE_BATCHES = (2, 3)

# How close a row's samples must be alone and in a batch, or with and without the shared prefix
# (different pass sizes round differently).
_RTOL, _ATOL = 1e-4, 1e-5


@dataclass(frozen=True)
class CallLayout:
    """Where the rows are in the input of one stochastic call.

    ``shape`` is the input's shape for one replicated row: dimension ``dim`` runs over the rows
    and holds ``group`` entries per row (row-major blocks), so a pass of ``B`` replicated rows
    gives the call an input of shape :meth:`shape_at` ``(B)``.
    """

    index: int
    kind: str
    shape: tuple[int, ...]
    dim: int
    group: int

    def shape_at(self, batch: int) -> tuple[int, ...]:
        """The input shape for ``batch`` rows."""
        return (*self.shape[: self.dim], self.group * batch, *self.shape[self.dim + 1 :])

    def __str__(self) -> str:
        sizes = [str(s) for s in self.shape]
        sizes[self.dim] = "B" if self.group == 1 else f"B·{self.group}"
        return f"{self.index + 1}. {self.kind} ({', '.join(sizes)})"


@dataclass(frozen=True, repr=False)
class SamplingPlan:
    """How one model samples rows of one shape and dtype: made by :func:`mcdrop.plan`.

    Attributes:
        model: the model's class name.
        input_shape: ``(D...)``, the shape of one input row; dtype: the inputs' dtype.
        calls: the layout of every stochastic call, in call order.
        prefix: whether the layers before the first dropout run once per row (on the ``N``
            rows, replicated at the first dropout) rather than once per sample.
        prefix_reason: why the prefix is not shared ("" when it is).
        row_bytes: bytes per replicated row of the largest dropout input.
        budget_bytes: the bound on that input's bytes in one pass (:data:`ACTIVATION_BUDGET`
            on the CPU, :data:`DEVICE_ACTIVATION_BUDGET` elsewhere).
        prefix_flops: multiply-adds ×2 of matrix products and convolutions per row before the
            first dropout; rest_flops: the same per replicated row from the first dropout on.
        unsampled: the dropout rates the model declares that made no stochastic call (see
            :mod:`mcdrop.coverage`): sampling cannot reach them, so its variance understates
            the model's uncertainty.
        rate_one: the indices (into ``calls``) of the calls made at rate 1, which drop all of
            their input in every sample (:func:`mcdrop.checking.rate_one_problem`).
        encoders: the ``nn.TransformerEncoderLayer`` modules a pass runs without the
            torch-function mode (:class:`mcdrop.encoders.EncoderLayers`); None where none.
        layers: where the model is a plain chain of torch layers (see :class:`LayerChain`),
            the chain, which a pass runs without the torch-function mode; None otherwise.
        routes: where every stochastic call of a model that is no layer chain comes from a
            torch dropout module or a dropout function of ``torch.nn.functional``, those
            modules (and functions), whose calls a pass hands to the context without the
            torch-function mode (:mod:`mcdrop.routing`); None otherwise.
        graphs: for a model on a CUDA device, the passes this plan has captured as CUDA graphs
            (:mod:`mcdrop.cuda_graphs`), which calls that keep the plan replay; None elsewhere.
    """

    model: str
    input_shape: tuple[int, ...]
    dtype: torch.dtype
    calls: tuple[CallLayout, ...]
    prefix: bool
    prefix_reason: str
    row_bytes: int
    prefix_flops: int
    rest_flops: int
    budget_bytes: int
    _model: weakref.ref[nn.Module] = field(compare=False)
    unsampled: tuple[RateUse, ...] = ()
    rate_one: tuple[int, ...] = ()
    layers: LayerChain | None = field(default=None, compare=False)
    graphs: PassGraphs | None = field(default=None, compare=False)
    encoders: EncoderLayers | None = field(default=None, compare=False)
    routes: DropoutRoutes | None = field(default=None, compare=False)
    # The fast passes of the call shapes seen (mcdrop.fast_pass.run), None where one has none.
    # (Not an argument: a plan made from this one by dataclasses.replace starts with none.)
    fast_passes: dict[tuple[int, int, int, int, str], FastPass | None] = field(
        default_factory=dict, compare=False, init=False
    )

    @property
    def budget_rows(self) -> int:
        """The most replicated rows whose largest dropout input fits :attr:`budget_bytes`."""
        return max(1, self.budget_bytes // max(1, self.row_bytes))

    def pass_rows(self, n_rows: int, n_samples: int, max_pass_rows: int, *, prefix: bool) -> int:
        """Replicated rows per pass for ``n_rows`` rows of ``n_samples`` samples.

        ``max_pass_rows``, cut to :attr:`budget_rows`, unless the passes share the prefix
        (``prefix``) and it would be more than :data:`PREFIX_SHARE_LIMIT` of a cut pass's work.
        """
        cut = min(max_pass_rows, self.budget_rows)
        if cut == max_pass_rows or not prefix:
            return cut
        rows = min(n_rows, cut)
        samples = max(1, min(n_samples, cut // rows))
        work = self.prefix_flops + self.rest_flops * samples  # per row of a cut pass
        return max_pass_rows if work and self.prefix_flops / work > PREFIX_SHARE_LIMIT else cut

    def check(self, model: nn.Module, x: Tensor) -> None:
        """Raise :class:`InvalidArgumentError` unless the plan was made for ``model`` and rows
        like those of ``x`` ``(N, D...)``."""
        if self._model() is not model:
            raise InvalidArgumentError(
                f"this sampling plan was made for another model ({self.model}); make one for "
                "this model with mcdrop.plan(model, x)"
            )
        if tuple(x.shape[1:]) != self.input_shape or x.dtype != self.dtype:
            raise InvalidArgumentError(
                f"this sampling plan was made for rows of shape {list(self.input_shape)} "
                f"({self.dtype}), got a batch of shape {list(x.shape)} ({x.dtype}); make a plan "
                "for these inputs with mcdrop.plan(model, x)"
            )

    def __repr__(self) -> str:
        rows = [f"SamplingPlan for {self.model} on rows {self.input_shape} {self.dtype}"]
        rows.append("  dropout calls (B: replicated rows, samples × rows):")
        rows += [f"    {call}" for call in self.calls]
        if self.prefix:
            rows.append("  prefix: shared (layers before the first dropout run once per row)")
        else:
            rows.append(f"  prefix: not shared: {self.prefix_reason}")
        rows.append(
            f"  largest dropout input: {self.row_bytes} bytes per replicated row; at most "
            f"{self.budget_rows} rows per pass fit the {self.budget_bytes >> 20} MiB budget"
        )
        if self.layers is not None:
            rows.append("  layers: a plain chain, run without the torch-function mode")
        if self.encoders is not None:
            rows.append(
                f"  encoder layers: {len(self.encoders.layers)} nn.TransformerEncoderLayer, run "
                "directly (mcdrop.encoders)"
            )
        if self.routes is not None:
            what = "dropout modules and functions" if self.routes.functions else "dropout modules"
            rows.append(
                f"  forward: its own, its {what} routed to the sampler, without the "
                "torch-function mode (mcdrop.routing)"
            )
        elif self.layers is None:
            rows.append("  forward: its own, under the torch-function mode")
        rows.append(
            f"  FLOPs: {self.prefix_flops:.3g} per row before the first dropout, "
            f"{self.rest_flops:.3g} per replicated row from it on"
        )
        if self.unsampled:
            rows.append("  dropout that sampling cannot reach (too little variance):")
            rows += [f"    {use.why_unsampled()}" for use in self.unsampled]
        return "\n".join(rows)


def run_pass(
    model: nn.Module,
    x: Tensor,
    keys: Tensor,
    n_samples: int,
    prefix: bool,
    plan: SamplingPlan,
    *,
    chain: bool | None = None,
) -> Tensor:
    """One stochastic forward pass of ``n_samples`` samples of the rows ``x`` ``(n, D...)``,
    following ``plan``; with ``prefix``, the layers before the first dropout run on the ``n``
    rows. The caller holds the model in eval and inference mode. ``chain``: whether the plan's
    :class:`LayerChain` may run (its :meth:`~LayerChain.runnable`, when the caller checked it for
    the call's passes); None checks here.

    Returns ``(n_samples, n, K...)``.
    """
    n = x.shape[0]
    replicas = n_samples if prefix else 1
    # (S * n, D...), sample-major; with the prefix shared, a copy of the n rows all the same:
    # a layer before the first dropout may write into its input (an in-place ReLU). Contiguous,
    # as replicate's: the samples of rows in another layout are those of contiguous rows.
    inputs = x.clone(memory_format=torch.contiguous_format) if prefix else replicate(x, n_samples)
    layers = plan.layers
    if chain is None:
        chain = layers is not None and layers.runnable(model)
    if chain and layers is not None:
        made = layers.multipliers(keys, plan)
        if made is not None and made[1] is not None:
            y = layers.run_made(inputs, made[1], replicas)
            return _check_output(model, y, n * n_samples).reshape(n_samples, n, *y.shape[1:])
        ctx = SamplingContext(
            keys, plan.calls, replicate=replicas, premade=None if made is None else made[0]
        )
        y = layers.run(ctx, inputs)
    else:
        ctx = SamplingContext(keys, plan.calls, replicate=replicas)
        found = None
        if plan.routes is not None and plan.routes.unchanged():
            found = routed_forward(model, inputs, ctx, plan.routes, len(plan.calls))
            if found is None:  # a call routing missed: the pass again, under the mode
                ctx = SamplingContext(keys, plan.calls, replicate=replicas)
                inputs = (
                    x.clone(memory_format=torch.contiguous_format)
                    if prefix
                    else replicate(x, n_samples)
                )
        if found is None:
            net = model if plan.encoders is None else plan.encoders.twin(model)
            with ctx:
                found = net(inputs)
        y = found
    if ctx.calls != len(plan.calls):
        raise UnsupportedModelError(
            f"{type(model).__name__} made {ctx.calls} dropout calls in a pass, but "
            f"{len(plan.calls)} when its sampling plan was made: its dropout calls depend on the "
            "contents of its inputs, so masks cannot be keyed per row"
        )
    return _check_output(model, y, n * n_samples).reshape(n_samples, n, *y.shape[1:])


def run_chain_pass(
    model: nn.Module,
    x: Tensor,
    row_keys: Tensor,
    first_sample: int,
    n_samples: int,
    prefix: bool,
    plan: SamplingPlan,
    made: masks.PassMultipliers,
) -> Tensor:
    """:func:`run_pass` of samples ``first_sample ..`` for a plan whose :class:`LayerChain` is
    runnable (the caller checked), with every multiplier made straight from the row keys
    ``(n,)`` in one compiled call: ``made`` is the chain's :meth:`LayerChain.fused` for the
    pass. The same samples, bit for bit.

    Why: on a one-row request, the sample keys, the context and each call's own multipliers
    cost more than the model's arithmetic.
    """
    layers = plan.layers
    assert layers is not None  # the caller checked
    multipliers = made.make_from_rows(row_keys, first_sample, n_samples)
    assert multipliers is not None  # LayerChain.fused checked
    n = x.shape[0]
    replicas = n_samples if prefix else 1
    # As run_pass's: (S * n, D...) rows, or with the prefix shared the n rows, copied, but
    # where the chain's first step writes a new tensor and one pass of them is all it needs
    # (nothing writes into the caller's rows then), and they are laid out as the copy would be
    # (else the first layer rounds differently: fresh_layout).
    if prefix or n_samples == 1:
        reuse = layers.fresh_first and fresh_layout(x)
        inputs = x if reuse else x.clone(memory_format=torch.contiguous_format)
    else:
        inputs = replicate(x, n_samples)
    y = layers.run_made(inputs, multipliers, replicas)
    return _check_output(model, y, n * n_samples).reshape(n_samples, n, *y.shape[1:])


def torchscript_problem(model: nn.Module) -> str | None:
    """What to say where ``model`` is, or holds, a TorchScript module (``torch.jit.script`` or
    ``torch.jit.trace``): its layers are compiled, so mcdrop reads no dropout rate in it and
    sees no dropout call to sample; None where it holds none."""
    found = next(
        ((name, m) for name, m in model.named_modules() if isinstance(m, torch.jit.ScriptModule)),
        None,
    )
    if found is None:
        return None
    name, module = found
    which = "the model" if not name else f"its module {name}"
    return (
        f"{which} is a TorchScript module ({type(module).__name__}, from torch.jit.script or "
        "torch.jit.trace), whose dropout mcdrop cannot see: pass the eager nn.Module you "
        "scripted or traced"
    )


def probe(model: nn.Module, x: Tensor) -> SamplingPlan:
    """The :class:`SamplingPlan` of ``model`` for rows like those of ``x`` ``(N, D...)``.

    Five forward passes of at most four replicated rows, made from the first two rows of ``x``
    (a sixth, routed, where the model's dropout modules may be: :func:`_routes`).
    The caller validates ``x`` and holds the model in eval and inference mode.
    """
    # Two rows even for a one-row input: with one row, a residual connection across the first
    # dropout would broadcast silently and pass the prefix check.
    rows = x[torch.arange(2, device=x.device) % x.shape[0]]
    with CallCounter(model) as counter:
        small = _Probe.run(model, replicate(rows[:1], _PROBE_BATCHES[0]))
    large = _Probe.run(model, replicate(rows[:1], _PROBE_BATCHES[1]))
    unsampled = tuple(counter.unsampled())
    if not small.seen:
        if scripted := torchscript_problem(model):  # its dropout compiled out of sight
            raise NoDropoutError(
                f"{type(model).__name__} made no stochastic dropout call: {scripted}"
            )
        if unsampled:
            raise NoDropoutError(
                f"{type(model).__name__} made no stochastic dropout call, so MC samples would "
                "all be equal, but it declares dropout that sampling cannot reach: "
                + "; ".join(use.why_unsampled() for use in unsampled)
            )
        raise NoDropoutError(
            f"{type(model).__name__} made no stochastic dropout call (no dropout layer, or every "
            "rate is 0): MC samples would all be equal. Add dropout to the model, or use "
            "deterministic prediction."
        )
    if unsampled:
        warnings.warn(
            UnsampledDropoutWarning(
                f"{type(model).__name__} declares dropout that MC sampling cannot reach, so its "
                "samples vary less than the model's uncertainty: "
                + "; ".join(use.why_unsampled() for use in unsampled)
            ),
            stacklevel=2,
        )
    if [s.kind for s in small.seen] != [s.kind for s in large.seen]:
        raise UnsupportedModelError(
            f"{type(model).__name__} made the dropout calls {[s.kind for s in small.seen]} on "
            f"{_PROBE_BATCHES[0]} rows but {[s.kind for s in large.seen]} on "
            f"{_PROBE_BATCHES[1]}: its dropout calls depend on the batch size"
        )
    calls = tuple(
        _layout(i, a, b) for i, (a, b) in enumerate(zip(small.seen, large.seen, strict=True))
    )
    b_large = _PROBE_BATCHES[1]
    before = large.flops_before or 0
    plan = SamplingPlan(
        model=type(model).__name__,
        input_shape=tuple(x.shape[1:]),
        dtype=x.dtype,
        calls=calls,
        prefix=False,
        prefix_reason="not checked yet",
        row_bytes=max(
            math.prod(c.shape) * s.item_size for c, s in zip(calls, small.seen, strict=True)
        ),
        prefix_flops=before // b_large,
        rest_flops=(large.flops - before) // b_large,
        budget_bytes=activation_budget(x.device),
        _model=weakref.ref(model),
        unsampled=unsampled,
        rate_one=tuple(sorted(small.rate_one)),
        layers=LayerChain.of(model, tuple(x.shape[1:])),
        graphs=PassGraphs(x.device) if x.device.type == "cuda" else None,
        # on the CPU only: elsewhere the layers' direct run is not measured yet
        encoders=EncoderLayers.of(model) if x.device.type == "cpu" else None,
    )
    keys = masks.sample_keys(masks.row_keys(rows, 0).to(rows.device), 0, 2)
    full = run_pass(model, rows, keys, 2, False, plan)  # (2, 2, K...)
    _check_rows_alone(model, rows, full, plan)
    prefix, reason = _check_prefix(model, rows, keys, full, plan)
    return replace(
        plan, prefix=prefix, prefix_reason=reason, routes=_routes(model, rows, full, plan)
    )


def _routes(
    model: nn.Module, rows: Tensor, full: Tensor, plan: SamplingPlan
) -> DropoutRoutes | None:
    """The model's :class:`DropoutRoutes` where a pass routed through them gives ``full``, the
    samples of the pass under the mode (``(2, 2, K...)`` of ``rows``), bit for bit; None where
    it does not, or the plan runs its passes without the mode anyway."""
    if plan.layers is not None or plan.encoders is not None or plan.graphs is not None:
        return None
    if any(
        isinstance(m, _MODE_DEPENDENT)
        # (a class of one's own derived from it: not routed, so torch's fast path would run)
        or (isinstance(m, nn.MultiheadAttention) and type(m) is not nn.MultiheadAttention)
        for m in model.modules()
    ):
        return None  # the probe's rows may not tell (see _MODE_DEPENDENT)
    keys = masks.sample_keys(masks.row_keys(rows, 0).to(rows.device), 0, 2)
    # the dropout modules alone first; then with torch's dropout functions too (a forward that
    # calls F.dropout), which routing changes for every thread while a pass runs
    watch = functions_routable()
    for functions in (False, True):
        routes = DropoutRoutes.of(model, _ROUTED_LAYERS, functions)
        if routes is None:
            continue
        ctx = SamplingContext(keys, plan.calls)
        callers = ctx.callers = []
        if not functions and watch:
            # the functions routed to refuse a call, for this probe: torch's own would run,
            # drawing from torch's generator where the forward drops on whatever the mode
            routes.functions = ctx.refuses_functions = True
        y = routed_forward(model, replicate(rows, 2), ctx, routes, len(plan.calls))
        routes.functions = functions
        if isinstance(y, Tensor) and y.shape[0] == 4 and torch.equal(y.reshape(full.shape), full):
            routes.callers = tuple(callers)
            return routes
    return None


def _check_rows_alone(model: nn.Module, rows: Tensor, full: Tensor, plan: SamplingPlan) -> None:
    """Raise unless row 1's samples beside row 0 are those of row 1 alone (where its
    deterministic output is: a model that mixes rows makes no such promise)."""
    alone_keys = masks.sample_keys(masks.row_keys(rows[1:], 0).to(rows.device), 0, 2)
    alone = run_pass(model, rows[1:], alone_keys, 2, False, plan)
    if _close(full[:, 1], alone[:, 0]) or not _close(model(rows)[1], model(rows[1:])[0]):
        return
    raise UnsupportedModelError(
        f"{type(model).__name__}'s dropout masks would change with the batch a row is in: a "
        "dropout input mixes the rows within its batch dimension (e.g. a (time × batch) "
        "flattening, time-major), so masks cannot be keyed per row. Dropout calls:\n"
        + "\n".join(str(call) for call in plan.calls)
    )


def _check_prefix(
    model: nn.Module, rows: Tensor, keys: Tensor, full: Tensor, plan: SamplingPlan
) -> tuple[bool, str]:
    """Whether running the layers before the first dropout once per row gives the samples of
    full replication, and why not."""
    why = "e.g. a residual connection across it, or attention values"
    try:
        shared = run_pass(model, rows, keys, 2, True, plan)
    except (RuntimeError, IndexError, ValueError, UnsupportedModelError) as exc:
        # Shapes that no longer fit: an activation from before the first dropout (N rows) meets
        # one after it (S·N rows).
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        return False, (
            f"the model combines an activation from before the first dropout with one after it "
            f"({why}): running the layers before it once per row fails with "
            f"{type(exc).__name__}: {first_line}"
        )
    if not _close(shared, full):
        diff = float((shared - full).abs().max())
        return False, (
            f"the model uses an activation from before the first dropout after it ({why}): "
            f"running the layers before it once per row changes the samples by up to {diff:.3g}"
        )
    return True, ""


def _close(a: Tensor, b: Tensor) -> bool:
    """Equal to float32 rounding. The absolute tolerance scales with the largest value: a
    matrix product's rounding error does (it sums terms of that size), so an output near 0 beside
    outputs of ~300 may differ by a few units of the larger's last place between batch sizes,
    while the faults these checks look for (masks keyed on the wrong rows) differ by O(1)."""
    if a.shape != b.shape:
        return False
    scale = max(1.0, float(b.detach().abs().max())) if b.numel() else 1.0
    return torch.allclose(a, b, rtol=_RTOL, atol=_ATOL * scale)


def _check_output(model: nn.Module, y: object, rows: int) -> Tensor:
    if not isinstance(y, Tensor) or y.dim() < 1 or y.shape[0] != rows:
        got = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
        raise UnsupportedModelError(
            f"expected {type(model).__name__} to return a tensor with {rows} rows (samples × "
            f"rows), got {got}; mcdrop samples models that map a batch of rows to a batch of "
            "outputs"
        )
    return y


# -- the shape probe -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Seen:
    """One stochastic call as a probe saw it."""

    kind: str
    shape: tuple[int, ...]
    batch_dim: int | None  # where the call's own semantics put the batch, if they do
    item_size: int


Args = tuple[Any, ...]
Kwargs = dict[str, Any]
FlopCount = Callable[[Args, Kwargs, Tensor], int]


def _flop_table() -> dict[Callable[..., Any], FlopCount]:
    """FLOPs (2 × multiply-adds) of the calls that dominate a forward pass, from shapes."""

    def matmul(args: Args, kwargs: Kwargs, out: Tensor) -> int:
        return 2 * out.numel() * arg(args, kwargs, 0, "input", None).shape[-1]

    def linear(args: Args, kwargs: Kwargs, out: Tensor) -> int:
        return 2 * out.numel() * arg(args, kwargs, 1, "weight", None).shape[-1]

    def conv(args: Args, kwargs: Kwargs, out: Tensor) -> int:
        weight = arg(args, kwargs, 1, "weight", None)  # (out, in / groups, k...)
        return 2 * out.numel() * weight[0].numel()

    def conv_transpose(args: Args, kwargs: Kwargs, out: Tensor) -> int:
        weight = arg(args, kwargs, 1, "weight", None)  # (in, out / groups, k...)
        return 2 * arg(args, kwargs, 0, "input", None).numel() * weight[0].numel()

    def addmm(args: Args, kwargs: Kwargs, out: Tensor) -> int:
        return 2 * out.numel() * args[1].shape[-1]  # (input, mat1 (…, n, k), mat2)

    def sdpa(args: Args, kwargs: Kwargs, out: Tensor) -> int:
        query, key = arg(args, kwargs, 0, "query", None), arg(args, kwargs, 1, "key", None)
        return 4 * query.numel() * key.shape[-2]

    def recurrent(args: Args, kwargs: Kwargs, out: Tensor) -> int:
        # (input, hx, weights, ...): every weight matrix is applied once per time step and row.
        x, weights = args[0], args[2]
        steps = x.numel() // x.shape[-1]
        return 2 * steps * sum(w.numel() for w in weights if w.dim() == 2)

    def cell(args: Args, kwargs: Kwargs, out: Tensor) -> int:
        # (input (N, in), hx, w_ih, w_hh, ...): one step of a cell (nn.LSTMCell in a loop)
        x, w_ih, w_hh = args[0], args[2], args[3]
        return 2 * (x.numel() // x.shape[-1]) * (w_ih.numel() + w_hh.numel())

    def attention(args: Args, kwargs: Kwargs, out: Tensor) -> int:
        query, key = arg(args, kwargs, 0, "query", None), arg(args, kwargs, 1, "key", None)
        embed = query.shape[-1]  # query (L, N, E), key (S, N, E)
        projections = 2 * (2 * query.numel() + 2 * key.numel()) * embed  # q, out; k, v
        return projections + 4 * query.numel() * key.shape[0]

    def tensordot(args: Args, kwargs: Kwargs, out: Tensor) -> int:
        # a (free_a, c), b (c, free_b) -> out (free_a, free_b): c from the three sizes
        a, b = arg(args, kwargs, 0, "a", None), arg(args, kwargs, 1, "b", None)
        if not out.numel():
            return 0
        return 2 * out.numel() * math.isqrt(a.numel() * b.numel() // out.numel())

    table: dict[Callable[..., Any], FlopCount] = {
        F.linear: linear,
        torch.einsum: _einsum_flops,
        torch.tensordot: tensordot,
        F.scaled_dot_product_attention: sdpa,
        F.multi_head_attention_forward: attention,
    }
    table |= dict.fromkeys((F.conv1d, F.conv2d, F.conv3d), conv)
    table |= dict.fromkeys(
        (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d), conv_transpose
    )
    matmuls = (torch.matmul, torch.linalg.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__)
    table |= dict.fromkeys((*matmuls, torch.mm, torch.mv, torch.Tensor.mv), matmul)
    table |= dict.fromkeys((*matmuls, torch.Tensor.mm, torch.bmm, torch.Tensor.bmm), matmul)
    table |= dict.fromkeys((torch.addmm, torch.Tensor.addmm, torch.baddbmm), addmm)
    table |= dict.fromkeys((torch.lstm, torch.gru, torch.rnn_tanh, torch.rnn_relu), recurrent)
    cells = (torch.lstm_cell, torch.gru_cell, torch.rnn_tanh_cell, torch.rnn_relu_cell)
    table |= dict.fromkeys(cells, cell)
    return table


def _einsum_flops(args: Args, kwargs: Kwargs, out: Tensor) -> int:
    """FLOPs of ``torch.einsum(equation, *operands)`` (torch hands a mode the sublist form as an
    equation too), contracted left to right as torch does: each step's multiply-adds are the
    product of the sizes of every index its two operands hold (×2). 0 for one operand (a sum or
    a transpose) or an equation it cannot read.

    Why counted: attention and projections written with einsum are the bulk of such a model's
    work, and the plan's count bounds the work :func:`mcdrop.save` runs (uncounted, a pass of
    hundreds of GFLOP read as none)."""
    if not args or not isinstance(args[0], str):
        return 0
    operands = args[1:]
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = tuple(operands[0])
    lhs, arrow, rhs = args[0].replace(" ", "").partition("->")
    terms = lhs.split(",")
    if len(terms) != len(operands) or len(terms) < 2:
        return 0
    sizes: dict[str, int] = {}
    indices: list[list[str]] = []
    for term, operand in zip(terms, operands, strict=True):
        if not isinstance(operand, Tensor):
            return 0
        before, dots, after = term.partition("...")
        # an ellipsis's dimensions named by their place from the right, as they broadcast
        spread = operand.dim() - len(before) - len(after) if dots else 0
        names = [*before, *(f"...{spread - i}" for i in range(spread)), *after]
        if len(names) != operand.dim():
            return 0
        for name, size in zip(names, operand.shape, strict=True):
            sizes[name] = max(sizes.get(name, 1), int(size))
        indices.append(names)
    ellipsis = {name for name in sizes if name.startswith("...")}
    if arrow:
        kept = set(rhs.replace("...", "")) | (ellipsis if "..." in rhs else set())
    else:  # the implicit output: the indices named once, and the ellipsis
        every = [name for names in indices for name in names]
        kept = {name for name in every if every.count(name) == 1} | ellipsis
    flops, held = 0, set(indices[0])
    for i in range(1, len(indices)):
        both = held | set(indices[i])
        flops += 2 * math.prod(sizes[name] for name in both)
        later = kept.union(*indices[i + 1 :])
        held = both & later
    return flops


_FLOPS = _flop_table()


class _CountingMode(DropoutMode):
    """:class:`DropoutMode` that also counts FLOPs into its :class:`_Probe`."""

    ctx: _Probe

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        out = super().__torch_function__(func, types, args, kwargs)
        count = _FLOPS.get(func)
        if count is not None:
            first = out[0] if isinstance(out, tuple) else out
            self.ctx.flops += int(count(args, kwargs or {}, first))
        return out


class _Probe(SamplingContext):
    """A context that leaves every dropout call as it is and records its input, counting the
    FLOPs of matrix products and convolutions around the calls."""

    mode = _CountingMode

    def __init__(self, batch: int) -> None:
        super().__init__(torch.zeros(batch, dtype=torch.int64))
        self.seen: list[_Seen] = []
        self.flops = 0
        self.flops_before: int | None = None  # at the first stochastic call
        self.rate_one: set[int] = set()  # the calls made at rate 1

    @classmethod
    def run(cls, model: nn.Module, inputs: Tensor) -> _Probe:
        ctx = cls(inputs.shape[0])
        with ctx:
            y = model(inputs)
        _check_output(model, y, inputs.shape[0])
        return ctx

    def check_rate(self, p: float) -> None:
        super().check_rate(p)
        if p == 1.0:
            self.rate_one.add(self.calls)  # (the index of the call about to be made)

    def take(
        self, x: Tensor, kind: str, batch_dim: int | None = None
    ) -> tuple[Tensor, CallLayout, int] | None:
        if self.flops_before is None:
            self.flops_before = self.flops
        self.seen.append(_Seen(kind, tuple(x.shape), batch_dim, x.element_size()))
        self.calls += 1
        return None


def _layout(index: int, small: _Seen, large: _Seen) -> CallLayout:
    """Call ``index``'s layout from its inputs at the two probe batch sizes."""
    b_small, b_large = _PROBE_BATCHES
    where = f"dropout call {index + 1} ({small.kind})"
    grown = [d for d, (a, b) in enumerate(zip(small.shape, large.shape, strict=False)) if a != b]
    if len(small.shape) != len(large.shape) or len(grown) > 1:
        raise UnsupportedModelError(
            f"{where} receives shape {small.shape} for {b_small} rows and {large.shape} for "
            f"{b_large}: more than one dimension changes with the batch, so masks cannot be "
            "keyed per row"
        )
    if not grown:
        raise UnsupportedModelError(
            f"{where} receives a tensor of shape {small.shape} whatever the batch size: no "
            "dimension runs over the batch (the model mixes its rows before this dropout); "
            "mcdrop needs every dropout input to keep a batch dimension"
        )
    dim = grown[0]
    group, left = divmod(small.shape[dim], b_small)
    if left or group == 0 or large.shape[dim] != group * b_large:
        raise UnsupportedModelError(
            f"{where}: dimension {dim} of its input has {small.shape[dim]} entries for "
            f"{b_small} rows and {large.shape[dim]} for {b_large}, not a fixed number per row"
        )
    if small.batch_dim is not None and (dim, group) != (small.batch_dim, 1):
        raise UnsupportedModelError(
            f"{where} takes dimension {small.batch_dim} of its input as the batch, but its "
            f"input {large.shape} runs over the batch in dimension {dim}"
        )
    shape = (*small.shape[:dim], group, *small.shape[dim + 1 :])
    return CallLayout(index, small.kind, shape, dim, group)


# -- plain layer chains ----------------------------------------------------------------------------

#: torch layers whose ``forward`` is one deterministic computation on one input (in eval mode)
#: and calls no dropout: exact types only, since a subclass may override ``forward``.
_PLAIN_LAYERS: frozenset[type[nn.Module]] = frozenset(
    {
        nn.Linear,
        nn.Identity,
        nn.Flatten,
        nn.Unflatten,
        *(nn.Conv1d, nn.Conv2d, nn.Conv3d),
        *(nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d),
        *(nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d),
        *(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm),
        *(nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU),
        *(nn.SiLU, nn.Mish, nn.Tanh, nn.Sigmoid, nn.Softplus, nn.Hardtanh, nn.Hardswish),
        *(nn.Softmax, nn.LogSoftmax),
    }
)

# How LayerChain.run_made runs a step (see LayerChain.made_steps).
_LINEAR, _RELU, _FORWARD, _CALL, _DROP = range(5)

#: Layers whose output is always a new tensor, never their input written in place.
_FRESH_OUTPUT: frozenset[type] = frozenset({nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d})

#: torch's dropout layers: the function each ``forward`` calls, and whether it passes ``inplace``.
_DROPOUT_LAYERS: dict[type[nn.Module], tuple[Callable[..., Any], bool]] = {
    nn.Dropout: (F.dropout, True),
    nn.Dropout1d: (F.dropout1d, True),
    nn.Dropout2d: (F.dropout2d, True),
    nn.Dropout3d: (F.dropout3d, True),
    nn.AlphaDropout: (F.alpha_dropout, False),
    nn.FeatureAlphaDropout: (F.feature_alpha_dropout, False),
}

#: The layers a routed pass routes (mcdrop.routing): torch's dropout layers and its attention,
#: for its weights' dropout (torch's path under the mode, not its fast path). Not a plain chain's
#: dropout layers: an attention in an nn.Sequential makes it no chain.
_ROUTED_LAYERS: dict[type[nn.Module], tuple[Callable[..., Any], bool]] = {
    **_DROPOUT_LAYERS,
    nn.MultiheadAttention: (F.multi_head_attention_forward, False),
}


#: torch's layers that run other arithmetic where no torch-function mode is on (their fast
#: path, in eval mode): a routed pass of a model with one is not the mode's, whatever its probe
#: gave (an nn.MultiheadAttention on rows of zeros gives the mode's samples, on others not;
#: routed, one runs the mode's path: mcdrop.routing).
_MODE_DEPENDENT = (nn.TransformerEncoderLayer, nn.TransformerEncoder)


def _autocast() -> bool:
    """Whether autocast is on for the CPU: a dropout then sees activations in its dtype
    (bfloat16), and gets its multipliers in that dtype from the sampling context, not in the
    plan's (the rows')."""
    return torch.is_autocast_enabled("cpu")


@dataclass(frozen=True)
class LayerChain:
    """A model that is a plain chain of torch layers (an ``nn.Sequential`` of the layers in
    :data:`_PLAIN_LAYERS` and torch's dropout layers, or mcdrop's :class:`~mcdrop.nets.MLP` and
    :class:`~mcdrop.nets.CNN`, each possibly inside :class:`~mcdrop.nets.Standardized`, as a
    loaded model is), run layer by layer with each dropout layer's call handed straight to the
    sampling context.

    Why: the torch-function mode of the generic path costs ~6 µs for every torch call of a
    forward, several times the arithmetic of a small MLP (2-layer UCI MLP, 100 samples of one
    row: 59 µs of forward in the mode against 34 µs without). The chain makes the same calls in
    the same order, so its samples are bit-identical to the mode's. Its element-wise dropout
    layers' multipliers for a pass are made before it, in one hash over all their words
    (:class:`mcdrop.masks.PassMultipliers`, kept here per rates and dtype): the same bits as one
    :func:`~mcdrop.masks.keep_scale` per call, with one hash (~10 NumPy calls) per pass.
    """

    # (layer, None) or (dropout layer, how it drops: SamplingContext.dropout's options)
    steps: tuple[tuple[Callable[[Tensor], Tensor], dict[str, Any] | None], ...]
    # Every module of the chain: none may have hooks (the chain skips the containers' and the
    # dropout layers' calls, and a plain layer's hook would run outside the mode).
    containers: tuple[nn.Module, ...]
    children: tuple[tuple[nn.Module | None, ...], ...]  # each container's children, as planned
    model: weakref.ref[nn.Module]
    # (call index, layer) of the dropout layers that drop per element (not channel or alpha):
    # their multipliers are made for the whole pass at once (masks.PassMultipliers)
    elementwise: tuple[tuple[int, nn.Module], ...] = ()
    drops: int = 0  # dropout layers in the chain
    # whether the first step writes a new tensor and never its input (a linear layer or a
    # convolution): a one-sample pass may then hand it the caller's rows without a copy
    fresh_first: bool = False
    # steps as run_made runs them: (what, layer, extra), where what is _LINEAR (extra: its
    # _parameters) or _RELU (torch's own, called straight), _FORWARD (a module), _CALL (a
    # function) or _DROP (a dropout layer; extra: the options' inplace)
    made_steps: tuple[tuple[int, Any, Any], ...] = ()
    # the classes of containers as planned (see unchanged)
    types: tuple[type, ...] = ()
    # the PassMultipliers of the rates and dtype seen, made once (what depends on the plan only),
    # and whether run_made can run their passes
    _made: dict[tuple[tuple[float, ...], torch.dtype], tuple[masks.PassMultipliers, bool]] = field(
        default_factory=dict, compare=False, repr=False
    )

    @classmethod
    def of(cls, model: nn.Module, input_shape: tuple[int, ...]) -> LayerChain | None:
        """The chain of ``model`` for rows of ``input_shape`` ``(D...)``, or None if it is not
        one."""
        before: list[Callable[[Tensor], Tensor]] = []
        after: list[Callable[[Tensor], Tensor]] = []
        containers: list[nn.Module] = []
        net = model
        if type(net) is Standardized and "forward" not in vars(net):
            # Standardized.forward: standardize, the network, destandardize, each looked up on
            # every call as forward does (a method set on the instance replaces the class's)
            std = net
            before.append(lambda x: std.standardize(x))
            after.append(lambda y: std.destandardize(y))
            containers.append(net)
            net = net.net
        parts: list[nn.Module]
        if type(net) is MLP:
            if net.flatten:
                before.append(nn.Flatten(1))  # what MLP.forward does: x.flatten(1)
            parts = [net.layers]
        elif type(net) is CNN:
            if len(input_shape) == 2 and net.in_channels == 1:  # CNN.forward's unsqueeze(1)
                before.append(nn.Unflatten(1, (1, input_shape[0])))
            parts = [net.features, net.head]
        elif type(net) is nn.Sequential:
            parts = [net]
        else:
            return None
        if "forward" in vars(net):  # patched on the instance
            return None
        if net is not parts[0]:
            containers.append(net)
        steps: list[tuple[Callable[[Tensor], Tensor], dict[str, Any] | None]] = []
        steps += [(f, None) for f in before]
        while parts:
            part = parts.pop(0)
            kind = type(part)
            if "forward" in vars(part):  # patched on the instance
                return None
            if kind is nn.Sequential:
                containers.append(part)
                # what Sequential.forward runs: every entry, a module at two places twice
                # (children() would name it once)
                entries = list(part._modules.values())
                if any(m is None for m in entries):
                    return None
                parts[:0] = cast(list[nn.Module], entries)
            elif kind in _PLAIN_LAYERS:
                containers.append(part)
                steps.append((part, None))
            elif kind in _DROPOUT_LAYERS:
                func, inplace = _DROPOUT_LAYERS[kind]
                containers.append(part)  # its forward is replaced by the context's dropout
                options = {"kind": func.__name__, **DROPOUT_FUNCTIONS[func], "inplace": inplace}
                steps.append((part, options))
            else:
                return None
        steps += [(f, None) for f in after]
        children = tuple(tuple(c._modules.values()) for c in containers)
        drops = [(layer, options) for layer, options in steps if options is not None]
        elementwise = tuple(
            (i, cast(nn.Module, layer))
            for i, (layer, options) in enumerate(drops)
            if not (options.get("feature") or options.get("alpha"))
        )
        made_steps: list[tuple[int, Any, Any]] = []
        for step, step_options in steps:
            step_type: type = type(step)
            if step_options is not None:
                made_steps.append((_DROP, step, bool(step_options["inplace"])))
            elif step_type is nn.Linear:
                made_steps.append((_LINEAR, step, cast(nn.Module, step)._parameters))
            elif step_type is nn.ReLU:
                made_steps.append((_RELU, step, False))
            else:
                what = _FORWARD if isinstance(step, nn.Module) else _CALL
                made_steps.append((what, step, False))
        return cls(
            tuple(steps),
            tuple(containers),
            children,
            weakref.ref(model),
            elementwise,
            len(drops),
            bool(steps) and type(steps[0][0]) in _FRESH_OUTPUT,
            tuple(made_steps),
            tuple(map(type, containers)),
        )

    def multipliers(
        self, keys: Tensor, plan: SamplingPlan
    ) -> tuple[dict[int, tuple[float, Tensor]], list[Tensor] | None] | None:
        """The multipliers of the pass's element-wise dropout calls at their layers' current
        rates, for the keys ``(B,)``: call index -> (p, ``(B, per_row)``), for
        :class:`SamplingContext`'s ``premade``, and the same in call order where they are all
        the pass needs (:meth:`run_made` can run it), else None. Made in one hash
        (:class:`masks.PassMultipliers`); a rate of 0 or 1 makes none (those calls make no
        mask). None for a pass too large for one hash (:data:`masks.PASS_WORDS`): each call
        makes its own; and under autocast (see :func:`_autocast`)."""
        if _autocast():
            return None
        made, alone = self._pass(plan)
        if not made.calls or not made.fits(keys):
            return None
        values = made.make(keys)
        by_call = {call: (p, v) for (call, _, p), v in zip(made.calls, values, strict=True)}
        return by_call, (values if alone else None)

    def fused(self, rows: int, plan: SamplingPlan) -> masks.PassMultipliers | None:
        """The multipliers of a pass of ``rows`` replicated rows (samples × rows) where they are
        all the pass needs and numba makes them straight from the row keys on the CPU
        (:meth:`masks.PassMultipliers.make_from_rows`, for :func:`run_chain_pass`); None where
        that does not apply (a call that is not element-wise or has a rate of 0 or 1, no numba,
        a large pass, autocast: see :func:`_autocast`)."""
        if _autocast():
            return None
        made, alone = self._pass(plan)
        return made if alone and made.takes_rows(rows) else None

    def _pass(self, plan: SamplingPlan) -> tuple[masks.PassMultipliers, bool]:
        """The :class:`masks.PassMultipliers` of the layers' current rates and the plan's dtype
        (made once per rates), and whether they are all a pass needs (:meth:`run_made`)."""
        rates = tuple(float(cast(Any, layer).p) for _, layer in self.elementwise)
        found = self._made.get((rates, plan.dtype))
        if found is None:
            calls = tuple(
                (i, math.prod(plan.calls[i].shape), p)
                for (i, _), p in zip(self.elementwise, rates, strict=True)
                if 0.0 < p < 1.0 and i < len(plan.calls)
            )
            # Every dropout call of the chain is element-wise, masked (0 < p < 1) and has its
            # rows first, one per replicated row: the multipliers are all a pass needs.
            alone = len(calls) == len(plan.calls) == self.drops and all(
                c.dim == 0 and c.group == 1 for c in plan.calls
            )
            if len(self._made) >= 8:  # rates changed between calls: keep the latest few
                self._made.clear()
            found = self._made[(rates, plan.dtype)] = (
                masks.PassMultipliers(calls, plan.dtype),
                alone,
            )
        return found

    def run_made(self, x: Tensor, made: list[Tensor], replicas: int) -> Tensor:
        """:meth:`run` for a pass whose dropout calls' multipliers are all made (``made``, in
        call order, from :meth:`multipliers`, each of the call's input's size): the same
        products in the same order, without the sampling context's per-call bookkeeping (~10 µs
        a call, the cost of a small MLP's layer). ``replicas``: as the context's ``replicate``,
        the times the first dropout replicates its input.

        A linear layer and a ReLU are called straight (``F.linear`` of its parameters,
        ``torch.relu``): their ``forward`` and its attribute lookups cost ~8 µs of a cold
        one-row call of a 3-layer MLP, a quarter of its arithmetic. :meth:`runnable` checked
        that they are still torch's own, with no ``forward`` of their own; a linear layer whose
        weight or bias is no parameter runs its ``forward``, which finds them."""
        made_in_order = iter(made)
        call = 0
        for what, layer, extra in self.made_steps:
            if what == _LINEAR:
                try:
                    weight, bias = extra["weight"], extra["bias"]
                except KeyError:  # not a parameter (a plain tensor swapped in): forward finds it
                    x = layer.forward(x)
                else:
                    x = F.linear(x, weight, bias)
            elif what == _RELU:
                x = torch.relu_(x) if layer.inplace else torch.relu(x)
            elif what == _FORWARD:
                x = layer.forward(x)
            elif what == _CALL:
                x = layer(x)
            else:  # (extra: the options' inplace)
                inplace = replicas == 1 and extra and layer.inplace
                scale = next(made_in_order)
                call += 1
                try:
                    x = apply_multipliers(x, scale, replicas, inplace)
                except RuntimeError:
                    if x.numel() * replicas == scale.numel():
                        raise
                    # (no check on the way: a layer changed since the plan, rarely, costs only
                    # this)
                    raise UnsupportedModelError(
                        f"dropout call {call} received shape {tuple(x.shape)}, but the model's "
                        f"sampling plan made {scale.numel() // replicas} multipliers for it: a "
                        "layer before it changed its output's shape since the plan; make a new "
                        "plan (mcdrop.plan)"
                    ) from None
                replicas = 1
        return x

    def drops_into_linear(self) -> bool:
        """Whether :meth:`run_made` hands each dropout call's product, through ReLUs only, to a
        linear layer (torch's own, which writes a new tensor): then no tensor that shares the
        multipliers' memory outlives the pass, and the next pass may make its multipliers in
        the same memory (:class:`mcdrop.fast_pass.ChainPass`)."""
        after_drop = False
        for what, _, _ in self.made_steps:
            if what == _DROP:
                after_drop = True
            elif what == _LINEAR:
                after_drop = False
            elif what != _RELU and after_drop:  # another layer might keep or return its input
                return False
        return not after_drop  # (a chain ending in dropout returns its product)

    def runnable(self, model: nn.Module) -> bool:
        """Whether a pass may run the chain: the model's layers are still those planned, and no
        module of the chain has a hook, nor any module globally (the chain skips the calls of
        the model, its ``nn.Sequential`` parts and its dropout layers, and a hook of a plain
        layer would run outside the torch-function mode); and the modules are still of their
        classes, with no ``forward`` set on an instance (:meth:`unchanged`)."""
        if self.model() is not model or global_hooks():
            return False
        if any(
            has_hooks(m) or tuple(m._modules.values()) != planned
            for m, planned in zip(self.containers, self.children, strict=True)
        ):
            return False
        return self.unchanged()

    def unchanged(self) -> bool:
        """Whether the chain's modules are still of the classes planned, with no ``forward`` set
        on an instance: the chain skips the calls of the containers and the dropout layers, and
        calls linear layers and ReLUs straight (``torch.nn.utils.parametrize`` changes a class).
        (C-level maps: a call's fixed cost.)"""
        if tuple(map(type, self.containers)) != self.types:
            return False
        return not any(map(operator.contains, map(vars, self.containers), repeat("forward")))

    def run(self, ctx: SamplingContext, x: Tensor) -> Tensor:
        """The chain's forward of ``x`` with every dropout layer's call handed to ``ctx``."""
        with ctx.active():
            for layer, options in self.steps:
                if options is None:
                    # forward itself: runnable() found no hook, so __call__ would add only its
                    # checks (a µs per layer)
                    x = layer.forward(x) if isinstance(layer, nn.Module) else layer(x)
                else:  # what the mode does with the call the layer's forward makes
                    drop = cast(nn.modules.dropout._DropoutNd, layer)  # a torch dropout layer
                    inplace = options["inplace"] and drop.inplace
                    x = ctx.dropout(x, float(drop.p), **(options | {"inplace": inplace}))
        return x
