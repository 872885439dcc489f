"""Deterministic prediction and batched, memory-bounded, seeded MC-dropout sampling.

Shape legend: ``S`` samples, ``N`` rows, ``D...`` input dims, ``K...`` output dims; samples first.

The ``S`` samples of ``N`` rows are drawn by replicating the batch to ``S * N`` rows and running
one forward pass (split into chunks of at most ``max_rows`` replicated rows, so memory is bounded
whatever ``S`` is). Where it is valid, the layers before the first dropout run once on the ``N``
rows and the activations are replicated there ("deterministic prefix"); validity is checked once
per model and input signature against full replication.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from mcdrop import masks
from mcdrop.exceptions import (
    InvalidArgumentError,
    InvalidInputError,
    NoDropoutError,
    UnsupportedModelError,
)
from mcdrop.sampling_context import SamplingContext, replicate

#: Default bound on rows per forward pass (replicated rows: samples × rows).
DEFAULT_MAX_ROWS = 8192

#: Bound on the bytes of the largest activation a dropout sees in one pass. Passes are also cut
#: to fit it once a model's per-row activation size is known (after its first sampled pass):
#: an image model's conv activations at 8192 rows take hundreds of MB, and a pass that large
#: runs about 2× slower per row than one that stays near the caches (Fashion CNN, 32×100 rows).
ACTIVATION_BUDGET = 16 << 20

Prefix = Literal["auto", "off"]

_locks: weakref.WeakKeyDictionary[nn.Module, threading.Lock] = weakref.WeakKeyDictionary()
_locks_guard = threading.Lock()


@dataclass
class _Plan:
    """What the first sampled pass of a model on one input signature taught us."""

    prefix: bool | None = None  # the deterministic prefix is valid (None: not checked yet)
    row_bytes: int = 0  # bytes per replicated row of the largest activation a dropout saw
    prefix_share: float = 1.0  # share of a prefix pass's time spent before the first dropout
    share_rows: int = 0  # replicated rows of the (largest) pass that share was measured on


# model -> {(input trailing shape, dtype): plan}
_plans: weakref.WeakKeyDictionary[nn.Module, dict[tuple[object, ...], _Plan]] = (
    weakref.WeakKeyDictionary()
)


def _plan(model: nn.Module, x: Tensor) -> _Plan:
    return _plans.setdefault(model, {}).setdefault((tuple(x.shape[1:]), x.dtype), _Plan())


@dataclass(frozen=True)
class Chunk:
    """One forward pass worth of MC samples: ``values`` is ``(s, n, K...)`` for samples
    ``samples`` of rows ``rows``."""

    samples: slice
    rows: slice
    values: Tensor


def _model_lock(model: nn.Module) -> threading.Lock:
    with _locks_guard:
        lock = _locks.get(model)
        if lock is None:
            lock = _locks[model] = threading.Lock()
        return lock


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Run ``model`` with every module in eval mode, restoring each flag exactly afterwards.

    A model already in eval mode is not touched at all, so concurrent callers never observe a
    flag change; a model in training mode is switched under a per-model lock.
    """
    training = [m for m in model.modules() if m.training]
    if not training:
        yield
        return
    with _model_lock(model):
        for m in training:
            m.training = False
        try:
            yield
        finally:
            for m in training:
                m.training = True


def _check_inputs(x: Tensor) -> None:
    if not isinstance(x, Tensor):
        raise InvalidInputError(f"inputs must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1 or x.shape[0] == 0:
        raise InvalidInputError(
            f"inputs must have a non-empty batch dimension, got {tuple(x.shape)}"
        )
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        raise InvalidInputError("inputs contain NaN or infinite values")


def predict(model: nn.Module, x: Tensor) -> Tensor:
    """Deterministic prediction: one eval-mode pass (inverted dropout needs no rescaling).

    Args:
        model: any module; its modes are left exactly as they were.
        x: ``(N, D...)`` inputs.

    Returns:
        ``(N, K...)`` outputs.
    """
    _check_inputs(x)
    with eval_mode(model), torch.inference_mode():
        return model(x)


def _check_args(n_samples: int, max_rows: int) -> None:
    for name, value in (("n_samples", n_samples), ("max_rows", max_rows)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidArgumentError(f"{name} must be an integer, got {type(value).__name__}")
        if value < 1:
            raise InvalidArgumentError(f"{name} must be at least 1, got {value}")


def _forward(
    model: nn.Module, x: Tensor, keys: Tensor, n_samples: int, prefix: bool, plan: _Plan
) -> Tensor:
    """One stochastic forward pass of ``n_samples`` samples of the rows ``x`` ``(n, D...)``.

    Returns ``(n_samples, n, K...)``.
    """
    n = x.shape[0]
    replicated = n * n_samples
    if prefix:
        inputs = x
        ctx = SamplingContext(keys, replicate=n_samples)
    else:
        inputs = replicate(x, n_samples)  # (S * n, D...), sample-major
        ctx = SamplingContext(keys)
    started = time.perf_counter()
    with ctx:
        y = model(inputs)
    if prefix and ctx.first_call_at is not None and replicated >= plan.share_rows:
        # The largest pass so far is the best guide to the passes sampling will run.
        took = time.perf_counter() - started
        plan.prefix_share = (ctx.first_call_at - started) / took if took > 0 else 1.0
        plan.share_rows = replicated
    if ctx.calls == 0:
        raise NoDropoutError(
            f"{type(model).__name__} made no stochastic dropout call (no dropout layer, or every "
            "rate is 0): MC samples would all be equal. Add dropout to the model, or use "
            "deterministic prediction."
        )
    if not isinstance(y, Tensor) or y.dim() < 1 or y.shape[0] != replicated:
        got = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
        raise UnsupportedModelError(
            f"expected the model to return a tensor with {replicated} rows (samples × rows), "
            f"got {got}; mcdrop samples models that map a batch of rows to a batch of outputs"
        )
    plan.row_bytes = max(plan.row_bytes, ctx.row_bytes)
    return y.reshape(n_samples, n, *y.shape[1:])


def _forward_auto(model: nn.Module, x: Tensor, keys: Tensor, n_samples: int, plan: _Plan) -> Tensor:
    """:func:`_forward` with the deterministic prefix where a one-off check found it valid."""
    if n_samples < 2:
        return _forward(model, x, keys, n_samples, False, plan)
    if plan.prefix:
        return _forward(model, x, keys, n_samples, True, plan)
    full = _forward(model, x, keys, n_samples, False, plan)
    if plan.prefix is None:
        try:
            fast = _forward(model, x, keys, n_samples, True, plan)
            plan.prefix = fast.shape == full.shape and torch.allclose(
                fast, full, rtol=1e-4, atol=1e-5
            )
        except (RuntimeError, UnsupportedModelError, IndexError, ValueError):
            # The model mixes pre-dropout activations with replicated ones (e.g. a residual
            # connection across the first dropout): full replication is the correct path.
            plan.prefix = False
    return full


#: Above this share of a pass's time in the deterministic prefix, passes are not cut to the
#: activation budget: each extra pass over the same rows reruns the prefix.
PREFIX_SHARE_LIMIT = 0.1


def _pass_rows(plan: _Plan, max_rows: int) -> int:
    """Replicated rows per pass: ``max_rows``, cut to :data:`ACTIVATION_BUDGET` once the
    activation size is known, unless the prefix is a large share of the work."""
    if plan.row_bytes == 0 or (plan.prefix and plan.prefix_share > PREFIX_SHARE_LIMIT):
        return max_rows
    return max(1, min(max_rows, ACTIVATION_BUDGET // plan.row_bytes))


def sample_chunks(
    model: nn.Module,
    x: Tensor,
    n_samples: int,
    *,
    seed: int | Tensor | None = None,
    max_rows: int = DEFAULT_MAX_ROWS,
    prefix: Prefix = "auto",
) -> Iterator[Chunk]:
    """MC-dropout samples, one forward pass at a time (for streaming statistics).

    Args:
        model: a module with at least one dropout; its modes are left as they were.
        x: ``(N, D...)`` inputs.
        n_samples: S, the number of stochastic passes.
        seed: an int (or ``(N,)`` int64, one per row) for reproducible samples; a row's samples
            depend only on its seed and its contents, never on the other rows of the batch.
            None draws a fresh seed from the OS. The global torch RNG is never used.
        max_rows: the most replicated rows (samples × rows) in one forward pass; after a
            model's first sampled pass, passes are also cut so the largest activation a dropout
            sees stays under :data:`ACTIVATION_BUDGET` bytes. Chunking changes no mask (results
            agree to float rounding, which depends on pass sizes).
        prefix: "auto" runs layers before the first dropout once per row where that is valid;
            "off" always replicates the input.

    Yields:
        :class:`Chunk` objects whose ``values`` are ``(s, n, K...)``, covering all ``(S, N)``.
    """
    _check_inputs(x)
    _check_args(n_samples, max_rows)
    if prefix not in ("auto", "off"):
        raise InvalidArgumentError(f"prefix must be 'auto' or 'off', got {prefix!r}")
    if seed is None:
        seed = masks.fresh_seed()
    elif isinstance(seed, Tensor):
        if seed.shape != (x.shape[0],):
            raise InvalidArgumentError(f"per-row seeds must have shape ({x.shape[0]},)")
    else:
        masks.check_seed(seed)
    keys = masks.row_keys(x, seed)
    n_total = x.shape[0]
    plan = _plan(model, x)
    with eval_mode(model), torch.inference_mode():
        if plan.row_bytes == 0 and prefix == "auto":
            # First sampling of this model and input signature: a two-row probe (discarded)
            # checks the prefix and measures the activations before any full-size pass.
            # Two rows even for a one-row input: with one row, a residual connection across
            # the first dropout would broadcast silently and pass the prefix check.
            probe = torch.arange(2) % n_total
            _forward_auto(model, x[probe], masks.sample_keys(keys[probe], 0, 2), 2, plan)
        per_pass = _pass_rows(plan, max_rows)
        rows_per = min(n_total, per_pass)
        samples_per = max(1, min(n_samples, per_pass // rows_per))
        for r0 in range(0, n_total, rows_per):
            rows = slice(r0, min(r0 + rows_per, n_total))
            for s0 in range(0, n_samples, samples_per):
                s = min(samples_per, n_samples - s0)
                chunk_keys = masks.sample_keys(keys[rows], s0, s)
                if prefix == "auto":
                    values = _forward_auto(model, x[rows], chunk_keys, s, plan)
                else:
                    values = _forward(model, x[rows], chunk_keys, s, False, plan)
                yield Chunk(slice(s0, s0 + s), rows, values)


def sample(
    model: nn.Module,
    x: Tensor,
    n_samples: int,
    *,
    seed: int | Tensor | None = None,
    max_rows: int = DEFAULT_MAX_ROWS,
    prefix: Prefix = "auto",
) -> Tensor:
    """Draw ``n_samples`` MC-dropout predictions for every row of ``x``.

    Arguments as for :func:`sample_chunks`.

    Returns:
        ``(S, N, K...)`` samples, samples first.

    Raises:
        NoDropoutError: the model made no stochastic dropout call.
    """
    out: Tensor | None = None
    for chunk in sample_chunks(model, x, n_samples, seed=seed, max_rows=max_rows, prefix=prefix):
        if out is None:
            out = chunk.values.new_empty((n_samples, x.shape[0], *chunk.values.shape[2:]))
        out[chunk.samples, chunk.rows] = chunk.values
    assert out is not None  # n_samples >= 1 and N >= 1 give at least one chunk
    return out
