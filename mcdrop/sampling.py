"""Deterministic prediction and batched, memory-bounded, seeded MC-dropout sampling.

Shape legend: ``S`` samples, ``N`` rows, ``D...`` input dims, ``K...`` output dims; samples first.

The ``S`` samples of ``N`` rows are drawn by replicating the batch to ``S * N`` rows and running
one forward pass (split into passes of at most ``max_pass_rows`` replicated rows, so memory is
bounded whatever ``S`` is). Every pass follows the model's
:class:`~mcdrop.planning.SamplingPlan`, which knows the batch dimension of every dropout call,
whether the layers before the first dropout may run once on the ``N`` rows with the activations
replicated there ("deterministic prefix"), and how large a pass may be. A plan is made by
:func:`plan` (five to seven small forward passes) and may be kept and passed to :func:`sample` /
:func:`sample_chunks`, as :class:`~mcdrop.Predictor` does. A call given none makes one and keeps
it on the model for later calls with rows of the same shape and dtype, for as long as the model
stays as it was planned (:mod:`mcdrop.plan_cache`): ``sample`` in a loop pays for the probe
once.

Sampling runs on the model's device (that of its first parameter). Inputs may be anywhere: row
keys are hashed from them as given (on the host: hashing is done by ``hashlib``), then inputs and
keys move to the device once; every mask is made there (:mod:`mcdrop.masks`), and no pass reads a
value back to the host, so a GPU never waits for Python between passes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from mcdrop import fast_pass, masks, plan_cache, planning
from mcdrop.devices import model_device
from mcdrop.exceptions import InvalidArgumentError, InvalidInputError, UnsupportedModelError
from mcdrop.modes import eval_mode
from mcdrop.planning import SamplingPlan
from mcdrop.sampling_context import EvalDropoutMode, active_context

#: Default bound on rows per forward pass (replicated rows: samples × rows) on the CPU. On other
#: devices passes are bounded by the plan's activation budget alone
#: (:data:`~mcdrop.planning.DEVICE_ACTIVATION_BUDGET`): a GPU pass cut smaller only adds launches.
DEFAULT_MAX_PASS_ROWS = 8192

Prefix = Literal["auto", "off"]


@dataclass(frozen=True)
class Chunk:
    """One forward pass worth of MC samples: ``values`` is ``(s, n, K...)`` for samples
    ``samples`` of rows ``rows``."""

    samples: slice
    rows: slice | Tensor  # a slice of the call's rows, or (adaptive sampling) their indices
    values: Tensor


def _check_inputs(x: Tensor) -> None:
    if not isinstance(x, Tensor):
        raise InvalidInputError(f"inputs must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1 or x.shape[0] == 0:
        raise InvalidInputError(
            f"inputs must have a non-empty batch dimension, got {tuple(x.shape)}"
        )
    if x.is_floating_point() and not all_finite(x):
        raise InvalidInputError("inputs contain NaN or infinite values")


def all_finite(x: Tensor) -> bool:
    """Whether every value of ``x`` is finite."""
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64):
        values = (x.detach() if x.requires_grad else x).resolve_neg().numpy()
        # One compiled loop, where numba makes the masks (so it is loaded anyway) and works.
        compiled = masks.numba_kernels() if masks.CPU_BACKEND == "numba" else None
        if compiled is not None:
            return compiled.all_finite(values)
        # NumPy's check costs a third of torch's on the small inputs of one request.
        return bool(np.isfinite(values).all())
    return bool(torch.isfinite(x).all())


def uncompiled(model: nn.Module) -> nn.Module:
    """``model``, or the module a ``torch.compile`` wrapper holds. Compiled code cannot make a
    pass's per-row masks (dynamo would trace the sampler's NumPy and fail), so a compiled model
    samples its original module: the same parameters, the same samples. (By class name: testing
    the class would import torch._dynamo, a second or more of ``import mcdrop``.)"""
    if type(model).__name__ == "OptimizedModule":
        original = getattr(model, "_orig_mod", None)
        if isinstance(original, nn.Module):
            return original
    return model


def predict(model: nn.Module, x: Tensor) -> Tensor:
    """Deterministic prediction: one eval-mode pass (inverted dropout needs no rescaling).

    Every dropout call that MC sampling samples is the identity here, as it is in eval mode for
    a model that passes ``self.training``: a model whose ``forward`` drops in any mode
    (``F.dropout(h, p, training=True)``, ``torch.dropout(h, p, True)``, an attention's
    ``dropout_p``) runs with those calls' dropout off (:class:`~mcdrop.sampling_context.
    EvalDropoutMode`), so its predictions are deterministic too, and equal those of the same
    model with ``training=False`` in its calls. Whether a model's eval pass drops is found at
    its first prediction of each input key, the inputs' shape (the batch's size included) and
    dtype (a ``forward`` may drop for some only); that prediction's one pass runs under that
    mode, and plainly once more where nothing dropped and the mode changes what the model
    computes (compiled, or torch's transformer fast path). It is kept beside the model's
    sampling plans, for the latest :data:`~mcdrop.plan_cache.MAX_EVAL_KEYS` keys
    (:mod:`mcdrop.plan_cache`): inputs whose eval pass drops nothing run the plain eval pass,
    with nothing watching it.

    Args:
        model: any module; its modes are left exactly as they were.
        x: ``(N, D...)`` inputs, moved to the model's device.

    Returns:
        ``(N, K...)`` outputs, on the model's device.
    """
    _check_inputs(x)
    return predict_of_checked_inputs(model, x)


def predict_of_checked_inputs(model: nn.Module, x: Tensor) -> Tensor:
    """:func:`predict` for a caller that has checked ``x`` itself (a tensor with a non-empty
    batch dimension, every value finite: :func:`all_finite`), as :class:`~mcdrop.Predictor`
    does: the check is a good share of a one-row prediction."""
    # (torch's own guard, as fast_pass's: torch.inference_mode()'s Python wrapper costs ~1 µs)
    with eval_mode(model), fast_pass._inference_mode(True):
        inputs = x.to(model_device(model))
        # a model may write into its input (an in-place ReLU first): never into the caller's
        fresh = x.clone() if inputs is x else inputs
        if plan_cache.plain_eval(model, x):  # the common case: nothing to watch
            return model(fresh)
        return _predict_watched(model, x, fresh)


#: torch's modules whose eval pass takes a fast path that any torch-function mode turns off.
_FAST_PATHS = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerEncoder)


def _has_fast_path(model: nn.Module) -> bool:
    """Whether ``model`` computes otherwise under a torch-function mode (:data:`_FAST_PATHS`)."""
    return any(isinstance(module, _FAST_PATHS) for module in model.modules())


def _predict_watched(model: nn.Module, x: Tensor, inputs: Tensor) -> Tensor:
    """:func:`predict_of_checked_inputs` (in eval and inference mode) of a model whose eval pass
    is not known to drop nothing for inputs like ``x``: with its dropout off where it drops,
    found out (and kept, for ``x``'s key) where that is not known. ``inputs``: ``x`` on the
    model's device, the pass's own copy (keyed by ``x``: the pass may write into it)."""
    original = uncompiled(model)  # (a compiled forward cannot run under the mode)
    drops = plan_cache.eval_drops(original, x)
    if drops is False:  # a compiled model's (its wrapper has no kept facts)
        return model(inputs)
    watch = EvalDropoutMode()
    with watch:
        y = original(inputs)
    if drops is None:
        plan_cache.keep_eval_drops(original, x, watch.dropped)
        if not watch.dropped and (model is not original or _has_fast_path(original)):
            # the plain pass, as every later call runs it, where it computes otherwise: compiled,
            # or torch's transformer fast path (off under a mode). Only there: a second pass of
            # a model whose forward keeps state (a stream's buffer, a hook) is a wrong answer.
            again = x.to(model_device(model))
            return model(x.clone() if again is x else again)
    return y


def is_sampling() -> bool:
    """Whether the current thread runs an MC-sampling forward pass (or its plan's probe).

    For a custom ``forward`` that gives its dropout a rate only in training, e.g.
    ``F.scaled_dot_product_attention(q, k, v, dropout_p=self.p if self.training else 0.0)``:
    in eval mode no dropout call happens and sampling cannot reach it. Writing ``self.p if
    self.training or mcdrop.is_sampling() else 0.0`` keeps deterministic prediction exact and lets
    MC sampling drop (with seeded per-row masks).
    """
    ctx = active_context()
    if ctx is None:
        return False
    ctx.asked = True  # a routed pass that asks runs under the mode (mcdrop.routing)
    return True


def _check_args(n_samples: int, max_pass_rows: int | None) -> None:
    for name, value in (("n_samples", n_samples), ("max_pass_rows", max_pass_rows)):
        if name == "max_pass_rows" and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidArgumentError(f"{name} must be an integer, got {type(value).__name__}")
        if value < 1:
            raise InvalidArgumentError(f"{name} must be at least 1, got {value}")


def _checked_call(
    x: Tensor,
    n_samples: int,
    seed: int | Tensor | None,
    max_pass_rows: int | None,
    prefix: Prefix,
    first_sample: int,
) -> int | Tensor:
    """Check a sampling call's arguments (not ``x``'s values); returns its seed (a fresh one
    from the OS for None)."""
    _check_args(n_samples, max_pass_rows)
    if isinstance(first_sample, bool) or not isinstance(first_sample, int) or first_sample < 0:
        raise InvalidArgumentError(f"first_sample must be an integer >= 0, got {first_sample!r}")
    if first_sample > masks.MAX_SEED - n_samples:  # (a sample's index is a 63-bit counter)
        raise InvalidArgumentError(
            f"first_sample + n_samples must be at most 2**63 - 1 (mcdrop.MAX_SEED), got "
            f"{first_sample} + {n_samples}"
        )
    if prefix not in ("auto", "off"):
        raise InvalidArgumentError(f"prefix must be 'auto' or 'off', got {prefix!r}")
    if seed is None:
        return masks.fresh_seed()
    if isinstance(seed, Tensor):
        if seed.shape != (x.shape[0],):
            raise InvalidArgumentError(f"per-row seeds must have shape ({x.shape[0]},)")
        if seed.is_floating_point() or seed.is_complex() or seed.dtype == torch.bool:
            raise InvalidArgumentError(f"per-row seeds must be integers, got {seed.dtype}")
        return seed  # their range: masks.row_keys
    return masks.check_seed(seed)


def _one_pass(
    model: nn.Module,
    x: Tensor,
    n_samples: int,
    seed: int | Tensor,
    max_pass_rows: int | None,
    prefix: Prefix,
    plan: SamplingPlan,
) -> Tensor | None:
    """:func:`sample`'s ``(S, N, K...)`` samples where the call is one pass of a kept plan on
    the CPU, the common small request: a layer chain's with its multipliers made from the row
    keys (:func:`planning.run_chain_pass`), else :func:`planning.run_pass` (an encoder's twin,
    or the mode's path); None otherwise (then the general path runs). The same pass, and so the
    same samples, as the general path: only its generator, chunks and per-pass bookkeeping are
    skipped, which cost a good share of a small request (and more inside a large one, whose
    arithmetic has pushed the interpreter's data out of the caches)."""
    if plan.graphs is not None or x.device.type != "cpu" or model_device(model).type != "cpu":
        return None
    n = x.shape[0]
    if max_pass_rows is None:
        max_pass_rows = DEFAULT_MAX_PASS_ROWS
    shared = prefix == "auto" and plan.prefix
    if n * n_samples > plan.pass_rows(n, n_samples, max_pass_rows, prefix=shared and n_samples > 1):
        return None  # more than one pass
    # One sample per pass gains nothing from sharing the prefix.
    share = shared and n_samples > 1
    layers = plan.layers
    chain = layers is not None and layers.runnable(model)
    modules = layers.containers if chain and layers is not None else None
    made = layers.fused(n * n_samples, plan) if chain and layers is not None else None
    keys = masks.row_keys(x, seed)
    with eval_mode(model, modules), torch.inference_mode():
        plan.check(model, x)
        if made is not None:
            return planning.run_chain_pass(model, x, keys, 0, n_samples, share, plan, made)
        values = planning.run_pass(
            model, x, masks.sample_keys(keys, 0, n_samples), n_samples, share, plan, chain=chain
        )
    return values.contiguous()  # as the general path returns a single pass's


def plan(model: nn.Module, x: Tensor) -> SamplingPlan:
    """The sampling plan of ``model`` for rows like those of ``x``: the batch dimension of every
    dropout call, whether the deterministic prefix is shared, and how large a pass may be.

    Costs five forward passes (six where a sixth checks that its dropout modules may be routed,
    seven where a seventh checks its dropout functions too: :mod:`mcdrop.routing`) of at most
    four replicated rows (made from the first two rows of
    ``x``), the price :func:`sample` pays on its first call given no plan (it keeps that plan for
    later calls: :mod:`mcdrop.plan_cache`). A plan depends on the model and the rows' shape and
    dtype only; a plan of your own is never replaced behind your back.

    Args:
        model: a module with at least one dropout; its modes are left as they were.
        x: ``(N, D...)`` example inputs.

    Raises:
        NoDropoutError: the model made no stochastic dropout call.
        UnsupportedModelError: a dropout input without a batch dimension, or with masks that
            could not be keyed per row.
    """
    model = uncompiled(model)
    _check_inputs(x)
    with eval_mode(model), torch.inference_mode():
        return planning.probe(model, x.to(model_device(model)))


def sample_chunks(
    model: nn.Module,
    x: Tensor,
    n_samples: int,
    *,
    seed: int | Tensor | None = None,
    max_pass_rows: int | None = None,
    prefix: Prefix = "auto",
    plan: SamplingPlan | None = None,
    first_sample: int = 0,
) -> Iterator[Chunk]:
    """MC-dropout samples, one forward pass at a time (for streaming statistics).

    Args:
        model: a module with at least one dropout; its modes are left as they were.
        x: ``(N, D...)`` inputs.
        n_samples: S, the number of stochastic passes.
        seed: an int (or ``(N,)`` int64, one per row) for reproducible samples; a row's samples
            depend only on its seed and its contents, never on the other rows of the batch.
            None draws a fresh seed from the OS. The global torch RNG is never used.
        max_pass_rows: the most replicated rows (samples × rows) in one forward pass (None:
            :data:`DEFAULT_MAX_PASS_ROWS` on the CPU, no count on other devices); passes are
            also cut so the largest activation a dropout sees stays under
            :data:`~mcdrop.planning.ACTIVATION_BUDGET` bytes on the CPU and
            :data:`~mcdrop.planning.DEVICE_ACTIVATION_BUDGET` elsewhere (see
            :meth:`~mcdrop.planning.SamplingPlan.pass_rows`). Chunking changes no mask (results
            agree to float rounding, which depends on pass sizes, and are bit-identical from run
            to run).
        prefix: "auto" runs layers before the first dropout once per row where the plan found
            that valid; "off" always replicates the input.
        plan: the model's plan for inputs like ``x``, from :func:`plan`; None takes the one a
            call given none kept for the model and rows like ``x``, or makes and keeps one
            (five to seven small forward passes; :mod:`mcdrop.plan_cache`).
        first_sample: draw samples ``first_sample .. first_sample + S - 1`` of every row: a
            call from 16 continues one of 16 samples with exactly the samples a single call of
            32 would draw (masks are keyed by sample index). ``first_sample + S`` at most
            ``mcdrop.MAX_SEED`` (2**63 − 1).

    Yields:
        :class:`Chunk` objects whose ``values`` are ``(s, n, K...)``, covering all ``(S, N)``,
        on the model's device
        (``samples`` counts from 0 in this call, whatever ``first_sample`` is).

    Raises:
        NoDropoutError: the model made no stochastic dropout call.
        UnsupportedModelError: a dropout call the plan cannot key per row.
    """
    _check_inputs(x)
    yield from sample_chunks_of_checked_inputs(
        model,
        x,
        n_samples,
        seed=seed,
        max_pass_rows=max_pass_rows,
        prefix=prefix,
        plan=plan,
        first_sample=first_sample,
    )


def sample_chunks_of_checked_inputs(
    model: nn.Module,
    x: Tensor,
    n_samples: int,
    *,
    seed: int | Tensor | None = None,
    max_pass_rows: int | None = None,
    prefix: Prefix = "auto",
    plan: SamplingPlan | None = None,
    first_sample: int = 0,
) -> Iterator[Chunk]:
    """:func:`sample_chunks` for a caller that has checked ``x`` itself (a tensor with a
    non-empty batch dimension, every value finite: :func:`all_finite`), as
    :class:`~mcdrop.Predictor` does: the check is a good share of a small call's cost. Every other
    argument is checked here."""
    model = uncompiled(model)
    if plan is None:
        kept = plan_cache.kept(model, x)
        if kept is not None:
            started = False
            try:
                for chunk in _chunks(
                    model, x, n_samples, seed, max_pass_rows, prefix, kept, first_sample
                ):
                    started = True
                    yield chunk
                return
            except UnsupportedModelError:
                if started:
                    raise
                plan_cache.forget(model)  # a call the kept plan lacks: the call with a fresh one
        seed = _checked_call(x, n_samples, seed, max_pass_rows, prefix, first_sample)
        plan = _kept_plan(model, x)
    yield from _chunks(model, x, n_samples, seed, max_pass_rows, prefix, plan, first_sample)


def _kept_plan(model: nn.Module, x: Tensor) -> SamplingPlan:
    """A new plan of ``model`` for rows like those of checked ``x``, kept for later calls given
    none (:mod:`mcdrop.plan_cache`)."""
    with eval_mode(model), torch.inference_mode():
        made = planning.probe(model, x.to(model_device(model)))
    plan_cache.keep(model, x, made)
    return made


def _chunks(
    model: nn.Module,
    x: Tensor,
    n_samples: int,
    seed: int | Tensor | None,
    max_pass_rows: int | None,
    prefix: Prefix,
    plan: SamplingPlan,
    first_sample: int,
) -> Iterator[Chunk]:
    """:func:`sample_chunks_of_checked_inputs` with a plan."""
    if x.device.type == "cpu":
        mpr = DEFAULT_MAX_PASS_ROWS if max_pass_rows is None else max_pass_rows
        values = fast_pass.run(plan, model, x, n_samples, seed, mpr, prefix, first_sample)
        if values is not None:
            # in inference mode, as the general path yields its chunks (a caller's loop body
            # runs in it, and may update tensors made from earlier chunks in place)
            with torch.inference_mode():
                yield Chunk(slice(0, n_samples), slice(0, x.shape[0]), values)
            return
    seed = _checked_call(x, n_samples, seed, max_pass_rows, prefix, first_sample)
    # A kept plan may keep CUDA graphs of its passes.
    device = model_device(model)
    graphs = plan.graphs
    if graphs is not None and graphs.device != device:  # the model moved since its plan
        graphs = None
    # Keys from the rows as given (on the host when they are), then one move each to the device
    # (where each pass makes its sample keys): no pass waits on a copy from the host.
    keys = masks.row_keys(x, seed).to(device)
    x = x.to(device)
    n_total = x.shape[0]
    # Whether the kept plan's layer chain runs this call's passes, checked once for all of them.
    chain = plan.layers is not None and plan.layers.runnable(model)
    modules = plan.layers.containers if chain and plan.layers else None
    # A chain on the CPU may make its passes' multipliers from the row keys (LayerChain.fused).
    layers = plan.layers if chain and device.type == "cpu" else None
    with eval_mode(model, modules), torch.inference_mode():
        plan.check(model, x)
        shared = prefix == "auto" and plan.prefix
        if max_pass_rows is None:
            max_pass_rows = DEFAULT_MAX_PASS_ROWS if device.type == "cpu" else plan.budget_rows
        per_pass = plan.pass_rows(
            n_total, n_samples, max_pass_rows, prefix=shared and n_samples > 1
        )
        rows_per = min(n_total, per_pass)
        samples_per = max(1, min(n_samples, per_pass // rows_per))
        for r0 in range(0, n_total, rows_per):
            rows = slice(r0, min(r0 + rows_per, n_total))
            # All rows in one pass (most calls): no slicing, which costs µs per tensor.
            x_rows, row_keys = (x, keys) if rows_per == n_total else (x[rows], keys[rows])
            for s0 in range(0, n_samples, samples_per):
                s = min(samples_per, n_samples - s0)
                # One sample per pass gains nothing from sharing the prefix.
                share = shared and s > 1
                if graphs is not None and graphs.takes(plan, s * x_rows.shape[0]):
                    values = graphs.run(
                        model, x_rows, row_keys, first_sample + s0, s, share, plan, chain or None
                    )
                else:
                    fused = layers.fused(s * x_rows.shape[0], plan) if layers else None
                    if fused is not None:
                        values = planning.run_chain_pass(
                            model, x_rows, row_keys, first_sample + s0, s, share, plan, fused
                        )
                    else:
                        chunk_keys = masks.sample_keys(row_keys, first_sample + s0, s)
                        values = planning.run_pass(
                            model, x_rows, chunk_keys, s, share, plan, chain=chain or None
                        )
                yield Chunk(slice(s0, s0 + s), rows, values)


def sample(
    model: nn.Module,
    x: Tensor,
    n_samples: int,
    *,
    seed: int | Tensor | None = None,
    max_pass_rows: int | None = None,
    prefix: Prefix = "auto",
    plan: SamplingPlan | None = None,
) -> Tensor:
    """Draw ``n_samples`` MC-dropout predictions for every row of ``x``.

    Arguments as for :func:`sample_chunks`.

    Returns:
        ``(S, N, K...)`` samples, samples first, on the model's device.

    Raises:
        NoDropoutError: the model made no stochastic dropout call.
        UnsupportedModelError: a dropout call the plan cannot key per row.
    """
    model = uncompiled(model)
    if plan is None:
        kept = plan_cache.kept(model, x)
        if kept is not None:
            try:
                return sample(
                    model, x, n_samples, seed=seed, max_pass_rows=max_pass_rows, prefix=prefix,
                    plan=kept,
                )  # fmt: skip
            except UnsupportedModelError:
                plan_cache.forget(model)  # a call the kept plan lacks: the call with a fresh one
        _check_inputs(x)
        seed = _checked_call(x, n_samples, seed, max_pass_rows, prefix, 0)  # before the probe
        plan = _kept_plan(model, x)
    out: Tensor | None = None
    if plan is not None:
        mpr = DEFAULT_MAX_PASS_ROWS if max_pass_rows is None else max_pass_rows
        out = fast_pass.run(plan, model, x, n_samples, seed, mpr, prefix)
        if out is not None:
            return out
    _check_inputs(x)
    if plan is not None:
        seed = _checked_call(x, n_samples, seed, max_pass_rows, prefix, 0)
        out = _one_pass(model, x, n_samples, seed, max_pass_rows, prefix, plan)
        if out is not None:
            return out
    chunks = sample_chunks_of_checked_inputs(
        model, x, n_samples, seed=seed, max_pass_rows=max_pass_rows, prefix=prefix, plan=plan
    )
    for chunk in chunks:
        if out is None:
            if chunk.values.shape[:2] == (n_samples, x.shape[0]):  # one pass: no copy
                out = chunk.values.contiguous()
                continue
            out = chunk.values.new_empty((n_samples, x.shape[0], *chunk.values.shape[2:]))
        out[chunk.samples, chunk.rows] = chunk.values
    assert out is not None  # n_samples >= 1 and N >= 1 give at least one chunk
    return out
