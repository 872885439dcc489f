"""The named output tensors of a model over the Open Inference Protocol, per task and mode.

Shape legend: ``N`` rows, ``K`` classes or regression targets, ``S`` samples (first, as
everywhere in mcdrop). A metadata shape gives -1 for ``N`` and ``S``.

=====================  =========  ===========  ==================================================
output                 datatype   shape        what
=====================  =========  ===========  ==================================================
classifier, uncertainty (MC dropout)
``probabilities``      FP32       (N, K)       MC mean of the class probabilities
``label``              BYTES      (N,)         the label of the most probable class
``label_index``        INT64      (N,)         its index
``variance``           FP32       (N, K)       per-class variance of the sampled probabilities
``std``                FP32       (N, K)       its square root
``entropy``            FP32       (N,)         predictive entropy, nats: total uncertainty
``expected_entropy``   FP32       (N,)         mean entropy of the samples: aleatoric
``mutual_information`` FP32       (N,)         entropy - expected_entropy: epistemic
``variation_ratio``    FP32       (N,)         share of samples off the modal label
``samples``            FP32       (S, N, K)    sampled probabilities (only when asked for)
``n_samples``          INT64      (N,)         samples each row used (by default with "auto")
``reject``             BOOL       (N,)         score above the threshold (with reject_rate or
                                               reject_threshold)
``prediction_set``     BOOL       (N, K)       class k in the conformal set (with coverage)
classifier, predict (dropout off): ``probabilities``, ``label``, ``label_index``
regressor, uncertainty, in the targets' units
``mean``               FP32       (N, K)       MC mean
``variance``           FP32       (N, K)       epistemic + aleatoric
``std``                FP32       (N, K)       its square root
``epistemic_variance`` FP32       (N, K)       spread of the sampled means
``aleatoric_variance`` FP32       (N, K)       noise: 1/τ or predicted
``lower``, ``upper``   FP32       (N, K)       central interval at ``level``
``samples``            FP32       (S, N, K)    sampled means (only when asked for)
``n_samples``          INT64      (N,)         samples each row used (by default with "auto")
``reject``             BOOL       (N,)         as for a classifier
``conformal_lower``,   FP32       (N, K)       conformal interval (with coverage)
``conformal_upper``
regressor, predict (dropout off): ``mean``, ``noise_variance`` (N, K)
=====================  =========  ===========  ==================================================
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property, lru_cache

import numpy as np
import torch

from mcdrop.calibration import DecisionRequest, Decisions, decide
from mcdrop.checkpoint import ModelSpec
from mcdrop.exceptions import InvalidArgumentError
from mcdrop.predictor import ClassificationPrediction, Prediction, Summary
from mcdrop.stats import ClassificationSummary
from service.errors import echo

PREDICT = "predict"
UNCERTAINTY = "uncertainty"
SAMPLES = "samples"
#: Samples each row used: a default output of adaptive requests (``n_samples: "auto"``) only,
#: so fixed-count responses stay as they were; any uncertainty request may name it.
N_SAMPLES = "n_samples"
REJECT = "reject"
#: Decision outputs, and the request parameter each needs: given only when asked for.
DECISIONS = {
    REJECT: "reject_rate or reject_threshold",
    "prediction_set": "coverage",
    "conformal_lower": "coverage",
    "conformal_upper": "coverage",
}


@dataclass(frozen=True)
class OutputInfo:
    """One output tensor: its datatype, its dimensions after the batch (``per_row``; ``-1``
    first for the samples' leading axis), and the modes that give it."""

    datatype: str
    per_row: tuple[int, ...]
    modes: frozenset[str]

    @property
    def shape(self) -> list[int]:
        """The metadata shape: -1 for the rows (after the samples for ``samples``)."""
        if self.per_row[:1] == (-1,):
            return [-1, -1, *self.per_row[1:]]
        return [-1, *self.per_row]

    def values_per_row(self, n_samples: int) -> int:
        """Values per input row (for response size estimates)."""
        fixed, per_sample = self._per_row
        return fixed * n_samples if per_sample else fixed

    @cached_property
    def _per_row(self) -> tuple[int, bool]:
        """The product of the fixed dimensions, and whether the samples' axis multiplies it."""
        return math.prod(d for d in self.per_row if d != -1), -1 in self.per_row


_BOTH = frozenset({PREDICT, UNCERTAINTY})
_MC = frozenset({UNCERTAINTY})
_PREDICT = frozenset({PREDICT})


def catalog(spec: ModelSpec) -> dict[str, OutputInfo]:
    """Every output of ``spec``'s model, in the order responses give them."""
    return _catalog(spec.task, spec.n_outputs)


@lru_cache(maxsize=64)
def _catalog(task: str, n_outputs: int) -> dict[str, OutputInfo]:
    k = (n_outputs,)
    if task == "classification":
        return {
            "probabilities": OutputInfo("FP32", k, _BOTH),
            "label": OutputInfo("BYTES", (), _BOTH),
            "label_index": OutputInfo("INT64", (), _BOTH),
            "variance": OutputInfo("FP32", k, _MC),
            "std": OutputInfo("FP32", k, _MC),
            "entropy": OutputInfo("FP32", (), _MC),
            "expected_entropy": OutputInfo("FP32", (), _MC),
            "mutual_information": OutputInfo("FP32", (), _MC),
            "variation_ratio": OutputInfo("FP32", (), _MC),
            SAMPLES: OutputInfo("FP32", (-1, *k), _MC),
            N_SAMPLES: OutputInfo("INT64", (), _MC),
            REJECT: OutputInfo("BOOL", (), _MC),
            "prediction_set": OutputInfo("BOOL", k, _MC),
        }
    return {
        "mean": OutputInfo("FP32", k, _BOTH),
        "noise_variance": OutputInfo("FP32", k, _PREDICT),
        "variance": OutputInfo("FP32", k, _MC),
        "std": OutputInfo("FP32", k, _MC),
        "epistemic_variance": OutputInfo("FP32", k, _MC),
        "aleatoric_variance": OutputInfo("FP32", k, _MC),
        "lower": OutputInfo("FP32", k, _MC),
        "upper": OutputInfo("FP32", k, _MC),
        SAMPLES: OutputInfo("FP32", (-1, *k), _MC),
        N_SAMPLES: OutputInfo("INT64", (), _MC),
        REJECT: OutputInfo("BOOL", (), _MC),
        "conformal_lower": OutputInfo("FP32", k, _MC),
        "conformal_upper": OutputInfo("FP32", k, _MC),
    }


@dataclass(frozen=True)
class Selected:
    """An output to return, and whether as binary data."""

    name: str
    info: OutputInfo
    binary: bool


def select(
    spec: ModelSpec,
    mode: str,
    requested: list[tuple[str, bool | None]] | None,
    binary_default: bool,
    decision: DecisionRequest | None = None,
    *,
    adaptive: bool = False,
) -> list[Selected]:
    """The outputs to return: those ``requested`` (name, binary or None for the default) in
    their order, else every output of ``mode`` but ``samples`` (and the decision outputs
    ``decision`` asks for; ``n_samples`` only when ``adaptive``); an InvalidArgumentError names
    an unknown, repeated or other-mode output, or a decision output without its parameter."""
    decided = _decided(decision)
    if requested is None:
        return list(
            _default_outputs(spec.task, spec.n_outputs, mode, binary_default, decided, adaptive)
        )
    outputs = catalog(spec)
    for name, _ in requested:
        if name in DECISIONS and name in outputs and name not in decided:
            raise InvalidArgumentError(
                f"output {name!r} needs the parameter {DECISIONS[name]} (parameters)"
            )
    chosen: list[Selected] = []
    for name, binary in requested:
        info = outputs.get(name)
        if info is None:
            raise InvalidArgumentError(
                f"model {spec.name!r} has no output {echo(name)}; its outputs: {list(outputs)}"
            )
        if mode not in info.modes:
            (other,) = info.modes
            raise InvalidArgumentError(
                f"output {name!r} comes only with mode {other!r} (parameters.mode); "
                f"this request's mode is {mode!r}"
            )
        if any(c.name == name for c in chosen):
            raise InvalidArgumentError(f"output {name!r} is requested twice")
        chosen.append(Selected(name, info, binary_default if binary is None else binary))
    return chosen


def values_per_row(selected: list[Selected], n_samples: int) -> tuple[int, int]:
    """The values per input row of the ``selected`` outputs written as JSON, and of those
    written as binary data (for response size estimates)."""
    as_json = as_binary = 0
    for s in selected:
        if s.binary:
            as_binary += s.info.values_per_row(n_samples)
        else:
            as_json += s.info.values_per_row(n_samples)
    return as_json, as_binary


@lru_cache(maxsize=256)
def _default_outputs(
    task: str, n_outputs: int, mode: str, binary: bool, decided: frozenset[str], adaptive: bool
) -> tuple[Selected, ...]:
    """The outputs a request that names none gets (the same few for every request of a model,
    so built once)."""
    left_out = {SAMPLES} if adaptive else {SAMPLES, N_SAMPLES}
    return tuple(
        Selected(name, info, binary)
        for name, info in _catalog(task, n_outputs).items()
        if mode in info.modes
        and name not in left_out
        and (name not in DECISIONS or name in decided)
    )


def _decided(decision: DecisionRequest | None) -> frozenset[str]:
    """The decision outputs ``decision`` gives."""
    if decision is None:
        return frozenset()
    names = {REJECT} if decision.reject_threshold is not None else set()
    if decision.coverage is not None:
        names |= {"prediction_set", "conformal_lower", "conformal_upper"}
    return frozenset(names)


#: Each output, built when asked for: a CPU tensor of its datatype, or for BYTES a numpy array
#: of ``str`` (the codec writes UTF-8 for binary data; JSON ``data`` takes the strings as they
#: are, and a tensor's straight from ``tolist()``, without a numpy array in between: ~3 µs per
#: output of a one-row answer).
Tensors = dict[str, Callable[[], torch.Tensor | np.ndarray]]


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _f32(t: torch.Tensor) -> Callable[[], torch.Tensor]:
    return lambda: _as(t, torch.float32)


def _labels(spec: ModelSpec, label: torch.Tensor) -> Tensors:
    return {
        "label": lambda: np.array([spec.labels[i] for i in label.tolist()], dtype=object),
        "label_index": lambda: _as(label, torch.int64),
    }


def predict_tensors(spec: ModelSpec, prediction: Prediction) -> Tensors:
    """The outputs of a deterministic prediction, each built when asked for."""
    if isinstance(prediction, ClassificationPrediction):
        return {"probabilities": _f32(prediction.probabilities), **_labels(spec, prediction.label)}
    return {"mean": _f32(prediction.mean), "noise_variance": _f32(prediction.noise_variance)}


def uncertainty_tensors(spec: ModelSpec, summary: Summary, samples: torch.Tensor | None) -> Tensors:
    """The outputs of an MC summary (and ``(S, N, K)`` samples), each built when asked for.

    Rows of an adaptive request use different counts: ``samples`` then has the most any of its
    rows used (a merged batch may have drawn more for other requests' rows), and NaN where a
    row drew fewer."""
    used = summary.row_n_samples
    tensors: Tensors = {N_SAMPLES: lambda: _as(used, torch.int64)}
    if samples is not None:
        tensors[SAMPLES] = _f32(samples[: int(used.max())])
    if isinstance(summary, ClassificationSummary):
        return {
            "probabilities": _f32(summary.probabilities),
            **_labels(spec, summary.label),
            "variance": _f32(summary.variance),
            "std": _f32(summary.variance.sqrt()),
            "entropy": _f32(summary.entropy),
            "expected_entropy": _f32(summary.expected_entropy),
            "mutual_information": _f32(summary.mutual_information),
            "variation_ratio": _f32(summary.variation_ratio),
            **tensors,
        }
    return {
        "mean": _f32(summary.mean),
        "variance": _f32(summary.variance),
        "std": _f32(summary.std),
        "epistemic_variance": _f32(summary.epistemic_variance),
        "aleatoric_variance": _f32(summary.aleatoric_variance),
        "lower": _f32(summary.lower),
        "upper": _f32(summary.upper),
        **tensors,
    }


def decision_tensors(decision: DecisionRequest, summary: Summary) -> Tensors:
    """The decision outputs of an MC summary (those ``decision`` asks for)."""
    decided = Decisions() if decision.empty else decide(decision, summary)
    tensors: Tensors = {}
    for name, value in (
        (REJECT, decided.reject),
        ("prediction_set", decided.prediction_set),
        ("conformal_lower", decided.lower),
        ("conformal_upper", decided.upper),
    ):
        if value is not None:
            tensors[name] = _bool(value) if value.dtype == torch.bool else _f32(value)
    return tensors


def _bool(t: torch.Tensor) -> Callable[[], torch.Tensor]:
    return lambda: t
