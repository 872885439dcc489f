"""What MC sampling will do with a model, before anyone relies on its uncertainty.

:func:`check` (and ``mcdrop check models/x``) runs a model on a few example rows and reports the
dropout it declares and how often each made a stochastic call, the dropout calls of the sampling
plan, whether the samples vary (per output), whether the layers before the first dropout run
once per row, what one sample of one row costs, and the problems found: no dropout, dropout
sampling cannot reach (:mod:`mcdrop.coverage`), dropout at rate 1, layers that mix the rows of
a batch, a batch size that a server's warm-up runs and the model fails on, a classifier that
returns probabilities rather than logits, outputs that never vary. An *error* makes MC dropout
meaningless on the model (or a server refuse it); a *warning* makes its variance too small or
its answers suspect.

Shape legend: ``S`` samples, ``N`` rows, ``K`` outputs.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from mcdrop import sampling
from mcdrop.checkpoint import LoadedModel, ModelSpec, outputs_problem
from mcdrop.coverage import CallCounter, RateUse, declared_rates
from mcdrop.exceptions import (
    InvalidArgumentError,
    McDropError,
    NoDropoutError,
    UnsampledDropoutWarning,
)
from mcdrop.planning import CallLayout, SamplingPlan

Severity = Literal["error", "warning"]

#: The cost of one sample is timed on passes grown (×4 at a time, up to _TIMED_MAX_ROWS
#: replicated rows) until one takes _TIMED_MIN_S: small passes are dominated by per-pass
#: overhead, and a large model must not make the check slow.
_TIMED_MIN_S = 0.05
_TIMED_MAX_ROWS = 1024
_TIMED_REPEATS = 3

#: :func:`check`'s bounds (and ``mcdrop check``'s): a probe of a model, not a dataset's worth of
#: rows or samples (``n_rows=10**12`` would allocate terabytes before the model ran).
MAX_ROWS = 64
MAX_SAMPLES = 10_000


@dataclass(frozen=True)
class Problem:
    """One thing wrong: ``severity`` "error" (MC dropout is meaningless on the model, or a server
    refuses it) or "warning", a stable ``code`` and a message that says what to do."""

    severity: Severity
    code: str
    message: str


@dataclass(frozen=True)
class FoundDropout:
    """A dropout rate the model declares: its module, type, attribute and rate, the stochastic
    calls its own code made per forward pass, and whether sampling reaches it (see
    :mod:`mcdrop.coverage`)."""

    module: str
    type: str
    attribute: str
    rate: float
    calls: int
    sampled: bool


@dataclass(frozen=True)
class CheckReport:
    """What sampling does with one model (see :func:`check`).

    Attributes:
        model: the model's name (or class name).
        input_shape: shape of one input row; outputs: the names of the K outputs.
        dropouts: every dropout rate the model declares, with its module's runs and stochastic
            calls per forward pass; None where the check stopped before a pass that counts them
            (the model failed on the example rows, or on one of them alone).
        calls: the sampling plan's dropout calls, in order (empty when no plan could be made).
        n_samples, n_rows: the samples drawn of the example rows.
        constant_outputs: outputs whose samples were equal in every example row.
        varies: whether any output varied (None: no samples were drawn).
        prefix: whether the layers before the first dropout run once per row; prefix_reason:
            why not.
        ms_per_row_sample: measured cost of one sample of one row, in milliseconds.
        problems: errors first, then warnings.
    """

    model: str
    input_shape: tuple[int, ...]
    outputs: tuple[str, ...]
    dropouts: tuple[FoundDropout, ...] | None = None
    calls: tuple[CallLayout, ...] = ()
    n_samples: int = 0
    n_rows: int = 0
    varies: bool | None = None
    constant_outputs: tuple[str, ...] = ()
    prefix: bool | None = None
    prefix_reason: str = ""
    ms_per_row_sample: float | None = None
    problems: tuple[Problem, ...] = field(default=())

    @property
    def ok(self) -> bool:
        """No error: MC dropout means something on this model."""
        return not any(p.severity == "error" for p in self.problems)

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON values (``mcdrop check --json``)."""
        return {
            "model": self.model,
            "ok": self.ok,
            "input_shape": list(self.input_shape),
            "outputs": list(self.outputs),
            "dropouts": None if self.dropouts is None else [asdict(d) for d in self.dropouts],
            "calls": [
                {"kind": c.kind, "shape": _shape(c), "batch_dim": c.dim, "per_row": c.group}
                for c in self.calls
            ],
            "samples": {
                "n_samples": self.n_samples,
                "n_rows": self.n_rows,
                "vary": self.varies,
                "constant_outputs": list(self.constant_outputs),
            },
            "prefix": {"shared": self.prefix, "reason": self.prefix_reason},
            "ms_per_row_sample": self.ms_per_row_sample,
            "problems": [
                {"severity": p.severity, "code": p.code, "message": p.message}
                for p in self.problems
            ],
        }

    def __str__(self) -> str:
        k = len(self.outputs)
        lines = [f"{self.model}: rows {list(self.input_shape)}, {k} output{'s' * (k != 1)}"]
        if self.dropouts:
            lines.append("dropout (module, type, rate: stochastic calls per forward pass):")
            width = max(len(d.module) for d in self.dropouts)
            width_type = max(len(d.type) for d in self.dropouts)
            for d in self.dropouts:
                reach = "" if d.sampled else ": NOT SAMPLED"
                if d.sampled and not d.calls:
                    reach = " (its submodules')"
                lines.append(
                    f"  {d.module:{width}}  {d.type:{width_type}}  {d.attribute}={d.rate:g}: "
                    f"{d.calls} call{'s' * (d.calls != 1)}{reach}"
                )
        elif self.dropouts is None:
            lines.append("dropout: not counted (the check stopped before a pass that counts it)")
        else:
            lines.append("dropout: none declared")
        if self.calls:
            lines.append("dropout calls of a sampling pass (B: replicated rows):")
            lines += [f"  {call}" for call in self.calls]
        if self.varies is not None:
            if not self.varies:
                verdict = "no"
            elif self.constant_outputs:
                verdict = f"yes, but not {', '.join(self.constant_outputs)}"
            else:
                verdict = "yes, every output"
            lines.append(
                f"samples vary: {verdict} ({self.n_samples} samples of {self.n_rows} rows)"
            )
        if self.prefix is not None:
            lines.append(
                "prefix: shared (the layers before the first dropout run once per row)"
                if self.prefix
                else f"prefix: not shared: {self.prefix_reason}"
            )
        if self.ms_per_row_sample is not None:
            lines.append(f"cost: {self.ms_per_row_sample:.3g} ms per sample of one row")
        if self.problems:
            lines.append("problems:")
            lines += [f"  {p.severity} ({p.code}): {p.message}" for p in self.problems]
        errors = sum(p.severity == "error" for p in self.problems)
        warned = len(self.problems) - errors
        if errors:
            lines.append(f"result: not fit for MC dropout as it is ({_many(errors, 'error')})")
        elif warned:
            lines.append(f"result: ok, with {_many(warned, 'warning')}")
        else:
            lines.append("result: ok")
        return "\n".join(lines)


def _many(n: int, what: str) -> str:
    return f"{n} {what}{'s' * (n != 1)}"


def _shape(call: CallLayout) -> list[str | int]:
    shape: list[str | int] = list(call.shape)
    shape[call.dim] = "B" if call.group == 1 else f"B*{call.group}"
    return shape


def example_inputs(model: ModelSpec | LoadedModel, n_rows: int = 4, seed: int = 0) -> Tensor:
    """``(n_rows, *input_shape)`` float32 rows to probe a model with: drawn from a loaded
    model's own example rows (``example_inputs``, in an order fixed by ``seed``, repeated when
    ``n_rows`` is more than it has) where it has them; else standard normal rows, on the scale
    of the model's inputs where the manifest knows it (its input normalisation). ``n_rows`` is
    at most :data:`MAX_ROWS` (:class:`~mcdrop.exceptions.InvalidArgumentError` otherwise)."""
    _count("n_rows", n_rows, MAX_ROWS)
    generator = torch.Generator().manual_seed(seed)
    own = model.example_inputs if isinstance(model, LoadedModel) else None
    if own is not None:
        order = torch.randperm(own.shape[0], generator=generator)
        return own[order[torch.arange(n_rows) % own.shape[0]]]
    spec = model.spec if isinstance(model, LoadedModel) else model
    x = torch.randn(n_rows, *spec.input_shape, generator=generator)
    norm = spec.input_normalization
    if norm is not None:
        x = x * torch.tensor(norm.std, dtype=torch.float32) + torch.tensor(norm.mean)
    return x


def _count(name: str, value: int, most: int) -> None:
    """Refuse a count of rows or samples that is not an integer from 1 to ``most``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgumentError(f"{name} must be an integer, got {type(value).__name__}")
    if value < 1:
        raise InvalidArgumentError(f"{name} must be at least 1, got {value}")
    if value > most:
        raise InvalidArgumentError(
            f"{name}={value} is above a check's limit of {most:_} (a probe of the model)"
        )


def _output_names(spec: ModelSpec | None, k: int) -> tuple[str, ...]:
    if spec is None or spec.n_outputs not in (k, k // 2):
        return tuple(f"output {i}" for i in range(k))
    if spec.likelihood == "heteroscedastic" and k == 2 * spec.n_outputs:
        return (*spec.labels, *(f"{label} (log-variance)" for label in spec.labels))
    return tuple(spec.labels)


def check(
    model: LoadedModel | nn.Module,
    x: Tensor | None = None,
    *,
    n_rows: int = 4,
    n_samples: int = 16,
    seed: int = 0,
    timed: bool = True,
) -> CheckReport:
    """What MC sampling will do with ``model``, and what is wrong with it.

    Args:
        model: a loaded model directory, or any module.
        x: ``(N, *input_shape)`` example rows; for a loaded model, by default ``n_rows`` rows
            from :func:`example_inputs` (its own example rows where it has them).
        n_rows: how many example rows when ``x`` is not given, at most :data:`MAX_ROWS`.
        n_samples: samples drawn of every row to see whether they vary, at most
            :data:`MAX_SAMPLES`.
        seed: the samples' seed (and the example rows').
        timed: measure the cost of one sample (a few passes of 64 row-samples).

    Returns:
        the :class:`CheckReport`; ``report.ok`` is False when MC dropout is meaningless or a
        server refuses the model.

    Raises:
        InvalidArgumentError: ``n_rows`` or ``n_samples`` out of bounds, or a module without
            ``x``.
    """
    _count("n_samples", n_samples, MAX_SAMPLES)
    spec = model.spec if isinstance(model, LoadedModel) else None
    module = model.module if isinstance(model, LoadedModel) else model
    random_rows = False
    if x is None:
        if not isinstance(model, LoadedModel):
            raise InvalidArgumentError("check(module, x) needs example rows x (N, *input_shape)")
        x = example_inputs(model, n_rows, seed)
        random_rows = model.example_inputs is None
    name = spec.name if spec is not None else type(module).__name__
    report = _Builder(name, tuple(x.shape[1:]))
    try:
        out = sampling.predict(module, x)
    except Exception as exc:
        hint = ""
        if random_rows:
            # Random rows are not every model's inputs (token ids, counts, pixels in [0, 255]).
            hint = (
                " (random standard-normal rows: if the model takes other values, save it with "
                "mcdrop.save(..., example_inputs=rows) so it is probed on rows of its own)"
            )
        report.error("forward_failed", f"the model fails on {x.shape[0]} example rows: {exc}{hint}")
        return report.done()
    if not isinstance(out, Tensor):
        report.error(
            "output_shape",
            f"the model returns {type(out).__name__} for {x.shape[0]} rows, not a tensor of "
            "(N, K) outputs: mcdrop samples models that map a batch of rows to a batch of outputs",
        )
        return report.done()
    report.outputs = _output_names(spec, out.shape[-1] if out.dim() == 2 else 0)
    if spec is not None and (problem := outputs_problem(spec, out, x.shape[0])):
        report.error("output_shape", problem)
    elif spec is not None and (problem := probabilities_problem(spec, module, x, out)):
        report.error("probabilities", problem)
    try:
        mixes = mixing(module, x, out) > 0
    except Exception as exc:  # the model's own code: a forward written for one batch size
        report.error(
            "forward_failed",
            f"the model fails on one of its {x.shape[0]} example rows alone "
            f"({type(exc).__name__}: {exc}): a row's output must not depend on its batch, and "
            "a server answers each row alone or merged with other requests' rows",
        )
        return report.done()
    if mixes:
        report.error(
            "batch_mixing",
            "a row's output depends on the other rows of its batch (e.g. BatchNorm in training "
            "mode, or a normalisation over the batch): the S samples of a row run in one batch, "
            "so they would mix with each other and with other requests' rows",
        )
    with CallCounter(module) as probed:
        try:
            plan = _plan(module, x, report)
        except Exception as exc:  # the model's own code, on the probe's replicated rows
            # (its passes stopped short: what they counted says nothing of the dropout)
            report.error("forward_failed", _fails_in_passes(x.shape[0], exc))
            return report.done()
    if plan is None:
        # Calls per run of each module, over the probe's passes.
        report.dropouts = _found(probed.uses(), None, lambda use: use.calls > 0)
        return report.done()
    report.calls = plan.calls
    report.prefix, report.prefix_reason = plan.prefix, plan.prefix_reason
    if problem := rate_one_problem(module, plan):
        report.error("rate_one", problem)
    unsampled = {use.declared for use in plan.unsampled}
    try:
        with CallCounter(module) as counter:
            chunks = list(sampling.sample_chunks(module, x, n_samples, seed=seed, plan=plan))
    except Exception as exc:  # the model's own code, on a pass of samples × rows
        report.error("forward_failed", _fails_in_passes(x.shape[0], exc))
        # The calls the planning passes counted (per run of each module).
        report.dropouts = _found(probed.uses(), None, lambda use: use.declared not in unsampled)
        return report.done()
    report.dropouts = _found(counter.uses(), len(chunks), lambda use: use.declared not in unsampled)
    for use in plan.unsampled:
        report.warning("unsampled_dropout", use.why_unsampled())
    _judge_variance(_gather(chunks, x.shape[0]), report, n_samples)
    if problem := warm_up_batch_problem(module, x, plan):
        report.error("batch_size", problem)
    elif timed:
        try:
            report.ms_per_row_sample = _time_one_sample(module, x, plan)
        except Exception as exc:  # the model's own code, on passes larger than the warm-up's
            report.error("forward_failed", _fails_in_passes(x.shape[0], exc))
    return report.done()


def _fails_in_passes(n_rows: int, exc: Exception) -> str:
    return (
        f"the model fails on a sampling pass of its {_many(n_rows, 'example row')} "
        f"({type(exc).__name__}: {exc}): a pass runs several samples of each row in one batch "
        "(samples × rows, where the layers before the first dropout cannot run once per row), "
        "so the model must take batches of any size"
    )


def _found(
    uses: list[RateUse], passes: int | None, sampled: Callable[[RateUse], bool]
) -> tuple[FoundDropout, ...]:
    """The report's dropout list from counted ``uses`` over ``passes`` forward passes (None:
    per run of each module)."""
    return tuple(
        FoundDropout(
            module=u.declared.name,
            type=u.declared.type,
            attribute=u.declared.attribute,
            rate=u.declared.rate,
            calls=u.calls // (passes or max(1, u.runs)),
            sampled=sampled(u),
        )
        for u in uses
    )


def mixing(module: nn.Module, x: Tensor, out: Tensor | None = None) -> float:
    """How far a row's deterministic output moves with the batch it is in: the largest
    difference between ``x (N, *input_shape)`` predicted together (``out``, computed when None)
    and one row at a time, beyond the rounding of the model's compute dtype (0.0 within it;
    NaN where NaN is no difference).

    Why a tolerance: a matrix product rounds a row's last bits otherwise when more rows share
    it, by up to a few units of the dtype's last place of the largest output (a bfloat16
    network's a hundred times float32's), while a normalisation over the batch moves outputs
    by a share of their size."""
    if out is None:
        out = sampling.predict(module, x)
    alone = torch.cat([sampling.predict(module, x[i : i + 1]) for i in range(x.shape[0])])
    rtol = max(1e-4, 4 * compute_eps(module, x.device))
    finite = out[torch.isfinite(out)]
    scale = max(1.0, float(finite.abs().max())) if finite.numel() else 1.0
    if torch.allclose(alone, out, rtol=rtol, atol=rtol / 10 * scale, equal_nan=True):
        return 0.0
    both = torch.isfinite(alone) & torch.isfinite(out)
    return float((alone - out)[both].abs().max()) if bool(both.any()) else math.inf


def mixing_problem(
    module: nn.Module, x: Tensor, out: Tensor | None = None, *, rows: str = "the rows"
) -> str | None:
    """Why ``module`` cannot be served, where :func:`mixing` finds that the rows ``x (N,
    *input_shape)`` (named ``rows`` in the message) give other outputs together than one at a
    time; else None, also where the model fails on one of them alone (then nothing is compared:
    :func:`batch_problem` says why)."""
    try:
        moved = mixing(module, x, out)
    except Exception:
        return None
    if moved == 0:
        return None
    return (
        f"{rows} give other outputs together than one at a time (by up to {moved:.3g}): a "
        "row's output depends on the other rows of its batch (e.g. a normalisation over the "
        "batch, or BatchNorm in training mode), and a request's rows are merged with other "
        "requests' and its samples with each other"
    )


def probabilities_problem(spec: ModelSpec, module: nn.Module, x: Tensor, out: Tensor) -> str | None:
    """Why ``module`` cannot be served, where it is a classifier (``spec``) that returns
    probabilities rather than logits: its outputs ``out (N, K)`` on the rows ``x (N,
    *input_shape)`` lie in [0, 1] and sum to 1 (within 1e-4, or the rounding of its compute
    dtype) in every row, K at least 2, the rows of at least two different inputs; else None.

    Why refused: mcdrop takes a classifier's outputs as logits and softmaxes them, and the
    softmax of probabilities squashes them toward uniform (of [0.9, 0.1], [0.69, 0.31]), so
    every probability and uncertainty served would be wrong, silently. Log-probabilities are
    logits (their softmax is the probabilities); sigmoids of a multi-label model do not sum to
    1. A genuine classifier's logits sum to 1 within 1e-4 on one row by chance, rarely (a
    binary one's whose logits lie in [0, 1], ~1e-4), on each of several different rows
    practically never: one row, or rows of one input repeated, decide nothing. A classifier of
    one label, whose softmax is 1 whatever it returns, is left alone (its output says nothing
    of what it is)."""
    if spec.task != "classification" or out.dim() != 2:
        return None
    n, k = out.shape
    if k < 2 or n != x.shape[0] or torch.unique(x.reshape(n, -1), dim=0).shape[0] < 2:
        return None
    eps = compute_eps(module, out.device)
    if out.is_floating_point():
        eps = max(eps, torch.finfo(out.dtype).eps)
    tol = max(1e-4, 4 * eps)
    p = out.detach().double()
    inside = bool(((p >= 0) & (p <= 1 + tol)).all())  # (False on NaN)
    if not (inside and bool(((p.sum(1) - 1).abs() <= tol).all())):
        return None
    return (
        f"the model returns probabilities, not logits: its {k} outputs lie in [0, 1] and sum "
        "to 1 on every row probed, as a softmax's do; mcdrop takes a classifier's outputs as "
        "logits and softmaxes them, so its probabilities would be squashed toward uniform and "
        "their uncertainty (entropy, mutual information, ...) would be wrong; return logits: "
        "drop the final softmax (nn.Softmax, torch.softmax) from its forward, or return "
        "log-probabilities (log_softmax), whose softmax is the probabilities"
    )


def rate_one_problem(module: nn.Module, plan: SamplingPlan) -> str | None:
    """Why ``module`` cannot be served, where a dropout call of ``plan`` (its sampling plan) has
    rate 1, naming the calls and the modules that declare that rate; else None.

    Why refused: a call at rate 1 drops all of its input in every sample, so along its path the
    samples do not depend on the input (nor vary: where every path has it, all are equal),
    while a prediction, dropout off, keeps all of it: the samples are not of the model that
    predicts. No model is trained to be served so (trained at rate 1, that path learned
    nothing), and torch takes the rate without a word."""
    if not plan.rate_one:
        return None
    calls = [str(plan.calls[i]) for i in plan.rate_one]
    where = f"call{'s' * (len(calls) > 1)} {', '.join(calls)}"
    declared = [
        f"{d.name} ({d.type}, {d.attribute}=1)" for d in declared_rates(module) if d.rate >= 1
    ]
    if declared:
        where += f", declared by {', '.join(declared)}"
    one = len(calls) == 1
    dropped = "that call's input" if one else "those calls' inputs"
    return (
        f"dropout at rate 1 ({where}): every sample drops all of {dropped}, so along "
        f"{'its path' if one else 'their paths'} the samples do not depend on the model's input "
        f"(and may all be equal), while a prediction (dropout off) keeps all of "
        f"{'it' if one else 'them'}: the samples are not of the model that predicts; give it "
        "the rate the model was trained with, below 1"
    )


#: The batch sizes :func:`batch_problem` runs a model at: a row alone, the warm-up's two rows,
#: the sampling plan's probes (two to four replicated rows), and the largest batches a server's
#: warm-up times (32 rows, and a pass of 16 samples of them: ``service.batching.CostModel``).
PROBED_BATCH_ROWS = (1, 2, 3, 4, 32, 512)
_FEW_ROWS = 4  # (the sizes up to which a model failing at every one is no batch's fault)


def batch_problem(module: nn.Module, x: Tensor, largest: int | None = None) -> str | None:
    """Why ``module`` cannot be served, where it takes a batch of the rows ``x (N,
    *input_shape)`` of one size but not of another: ``x`` itself, then batches of
    :data:`PROBED_BATCH_ROWS` rows (``x``'s rows repeated; none of more than ``largest`` rows
    where given), until one passes and one fails, named with the error. None where it takes
    them all, or none (then the rows' values are at fault, not the batch's size).

    A server answers a row alone, merges requests' rows into one batch, and runs a row's samples
    as rows of one pass (up to thousands), so a model must take batches of any size; these sizes
    are those a server runs before it serves (a larger request runs larger passes)."""
    n = x.shape[0]
    took: int | None = None
    failed: tuple[int, Exception] | None = None
    sizes = [size for size in PROBED_BATCH_ROWS if largest is None or size <= largest]
    for size in dict.fromkeys((n, *sizes)):
        if took is None and size > max(n, _FEW_ROWS):
            # Failing at every few rows, the rows' values are at fault: no large pass (its
            # memory, after a large network's warm-up failed on its row)
            break
        try:
            sampling.predict(module, x[torch.arange(size, device=x.device) % n])
        except Exception as exc:
            failed = failed or (size, exc)
        else:
            took = took or size
        if took is not None and failed is not None:
            rows, error = failed
            return (
                f"the model takes {_batch(took)} but fails on {_batch(rows)} "
                f"({type(error).__name__}: {error}): a server answers a row alone, merges "
                "requests' rows into one batch and runs a row's samples as rows of one pass, so "
                "the model must take batches of any size"
            )
    return None


def _batch(rows: int) -> str:
    return "a row alone" if rows == 1 else f"a batch of {rows} rows"


#: The largest passes a server's warm-up runs a model on, timing it
#: (``service.batching.CostModel``): a prediction of 32 rows, and 16 samples of them.
WARM_UP_ROWS, WARM_UP_SAMPLES = 32, 16


def warm_up_batch_problem(module: nn.Module, x: Tensor, plan: SamplingPlan) -> str | None:
    """Why a server's warm-up would refuse ``module`` for a batch's size, or None: where it
    fails on a batch of the rows ``x (N, *input_shape)`` of up to :data:`WARM_UP_ROWS` rows
    (:func:`batch_problem`'s sizes), or on the warm-up's largest pass
    (:func:`warm_up_pass_problem`), said as :func:`batch_problem` says it, as the warm-up does.

    Its cost: the warm-up's passes, once, in the activation budget that cuts a server's
    passes; batches of up to 512 rows without dropout only where the pass failed (as the
    warm-up's diagnosis runs them)."""
    return batch_problem(module, x, largest=WARM_UP_ROWS) or warm_up_pass_problem(module, x, plan)


def warm_up_pass_problem(module: nn.Module, x: Tensor, plan: SamplingPlan) -> str | None:
    """Why a server's warm-up would refuse ``module``, a model that takes batches of the rows
    ``x (N, *input_shape)`` of up to :data:`WARM_UP_ROWS` rows, for its largest pass, or None:
    :data:`WARM_UP_SAMPLES` samples of :data:`WARM_UP_ROWS` rows (by ``plan``: 512 rows from
    the first dropout on, from the input where the prefix is not shared; its work is
    :func:`warm_up_pass_flops`), said as :func:`batch_problem` says it where a batch of 512
    rows without dropout fails too."""
    rows = x[torch.arange(WARM_UP_ROWS, device=x.device) % x.shape[0]]
    try:
        sampling.sample(module, rows, WARM_UP_SAMPLES, seed=0, plan=plan)
    except Exception as exc:  # the model's own code, on more rows than its own
        return batch_problem(module, x) or (
            f"the model fails on a pass of {WARM_UP_SAMPLES} samples of {WARM_UP_ROWS} rows, "
            f"as a server's warm-up runs ({type(exc).__name__}: {exc}): a server runs a "
            "row's samples as rows of one pass, so the model must take batches of any size"
        )
    return None


def warm_up_pass_flops(plan: SamplingPlan) -> int:
    """The work of :func:`warm_up_pass_problem`'s pass by ``plan``'s count (multiply-adds ×2 of
    the matrix products and convolutions): the layers before the first dropout on
    :data:`WARM_UP_ROWS` rows where they run once per row (else on every replicated row), the
    rest on :data:`WARM_UP_ROWS` × :data:`WARM_UP_SAMPLES` replicated rows."""
    replicated = WARM_UP_ROWS * WARM_UP_SAMPLES
    prefix_rows = WARM_UP_ROWS if plan.prefix else replicated
    return prefix_rows * plan.prefix_flops + replicated * plan.rest_flops


def compute_eps(module: nn.Module, device: torch.device) -> float:
    """The relative rounding of ``module``'s arithmetic on ``device``: its parameters' dtype's
    machine epsilon (the widest of them), or TensorFloat-32's (2**-10) for float32 on a CUDA
    device where torch lets cuDNN's convolutions or the matrix products use it (cuDNN's
    default): a batch of another size may take another kernel, rounding otherwise."""
    floats = [p.dtype for p in module.parameters() if p.is_floating_point()]
    eps = max((torch.finfo(d).eps for d in floats), default=torch.finfo(torch.float32).eps)
    tf32 = torch.backends.cudnn.allow_tf32 or torch.get_float32_matmul_precision() != "highest"
    if device.type == "cuda" and tf32:
        eps = max(eps, 2.0**-10)
    return eps


def _plan(module: nn.Module, x: Tensor, report: _Builder) -> SamplingPlan | None:
    try:
        with warnings.catch_warnings():
            # The plan records what the warning says; the report lists it as a problem.
            warnings.simplefilter("ignore", UnsampledDropoutWarning)
            return sampling.plan(module, x)
    except NoDropoutError as exc:
        report.error("no_dropout", str(exc))
    except McDropError as exc:
        report.error("unsupported", str(exc))
    return None


def _gather(chunks: list[sampling.Chunk], n_rows: int) -> Tensor:
    """The chunks' values as one ``(S, n_rows, K...)`` tensor."""
    n_samples = max(c.samples.stop for c in chunks)
    first = chunks[0].values
    out = first.new_empty(n_samples, n_rows, *first.shape[2:])
    for c in chunks:
        out[c.samples, c.rows] = c.values
    return out


def _judge_variance(samples: Tensor, report: _Builder, n_samples: int) -> None:
    """``samples (S, N, K...)``: whether they vary, and which outputs never do."""
    report.n_samples, report.n_rows = n_samples, samples.shape[1]
    spread = (samples.amax(0) - samples.amin(0)).reshape(samples.shape[1], -1)  # (N, K)
    varying = spread > 0
    report.varies = bool(varying.any())
    if not report.varies:
        report.error(
            "no_variance",
            f"{n_samples} samples of each of {samples.shape[1]} rows are all equal: the dropout "
            "calls do not reach the outputs (e.g. dropout before a layer that ignores its input)",
        )
        return
    constant = ~varying.any(0)
    if bool(constant.any()) and len(report.outputs) == constant.numel():
        names = tuple(o for o, c in zip(report.outputs, constant.tolist(), strict=True) if c)
        report.constant_outputs = names
        report.warning(
            "constant_outputs",
            f"the samples of {', '.join(names)} never vary: no dropout comes before "
            "them, so their uncertainty reads as zero",
        )


def _time_one_sample(module: nn.Module, x: Tensor, plan: SamplingPlan) -> float:
    """Milliseconds per sample of one row: the best of a few timed runs of ``S`` samples of the
    rows ``x``, ``S`` grown until a run takes long enough to time."""

    def run(n_samples: int) -> float:
        start = time.perf_counter()
        sampling.sample(module, x, n_samples, seed=0, plan=plan)
        return time.perf_counter() - start

    rows, n_samples = x.shape[0], 1
    run(n_samples)  # warm-up
    while run(n_samples) < _TIMED_MIN_S and n_samples * rows * 4 <= _TIMED_MAX_ROWS:
        n_samples *= 4
    best = min(run(n_samples) for _ in range(_TIMED_REPEATS))
    return best * 1000 / (n_samples * rows)


class _Builder:
    """The report's fields while :func:`check` fills them in."""

    def __init__(self, model: str, input_shape: tuple[int, ...]) -> None:
        self.model = model
        self.input_shape = input_shape
        self.outputs: tuple[str, ...] = ()
        self.dropouts: tuple[FoundDropout, ...] | None = None
        self.calls: tuple[CallLayout, ...] = ()
        self.n_samples = self.n_rows = 0
        self.varies: bool | None = None
        self.constant_outputs: tuple[str, ...] = ()
        self.prefix: bool | None = None
        self.prefix_reason = ""
        self.ms_per_row_sample: float | None = None
        self.problems: list[Problem] = []

    def error(self, code: str, message: str) -> None:
        self.problems.append(Problem("error", code, message))

    def warning(self, code: str, message: str) -> None:
        self.problems.append(Problem("warning", code, message))

    def done(self) -> CheckReport:
        fields = {k: v for k, v in vars(self).items() if k != "problems"}
        order = {"error": 0, "warning": 1}
        problems = tuple(sorted(self.problems, key=lambda p: order[p.severity]))
        return CheckReport(**fields, problems=problems)
