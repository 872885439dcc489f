"""Between JSON and tensors: parsing request inputs, and building responses from library results.

Shared by the routes and the CLI's local mode, so both print the same JSON.
"""

from __future__ import annotations

import math
from functools import lru_cache
from itertools import chain
from typing import Annotated, Any

import numpy as np
import torch
from pydantic import Field, TypeAdapter, ValidationError
from torch import Tensor

from mcdrop import calibration
from mcdrop.checkpoint import ModelSpec
from mcdrop.exceptions import InvalidInputError
from mcdrop.predictor import (
    ClassificationPrediction,
    Prediction,
    Predictor,
    Summary,
    check_finite,
)
from mcdrop.stats import ClassificationSummary
from service import schemas
from service.errors import validation_details

#: An input number: finite and within float32 (exactly the schema's minimum and maximum, so a
#: number just above float32's largest is refused here rather than rounded to it or to inf).
InputFloat = Annotated[
    float, Field(allow_inf_nan=False, ge=-schemas.FLOAT32_MAX, le=schemas.FLOAT32_MAX)
]


@lru_cache(maxsize=8)
def _rows_adapter(rank: int) -> TypeAdapter[Any]:
    """Validator of a batch of rows nested ``rank`` deep: numbers only (no strings, no bools)."""
    row: Any = InputFloat
    # Each list at its first invalid item, the rest unread (pydantic's error for each of
    # fashion's 1000 rows of strings, 784 000, took 3.9-4.5 s, the GIL held).
    for _ in range(rank):
        row = Annotated[list[row], Field(fail_fast=True)]
    return TypeAdapter(Annotated[list[row], Field(fail_fast=True)])


def longer_than(data: list[Any], shape: list[int]) -> bool:
    """Whether a list of nested ``data`` holds more items than ``shape`` allows at its depth:
    lengths only, no value read, so the walk is bounded by the shape however long the data."""
    # The lists at one depth: ~2 µs for a row; ~3 ms for 1000 images of 28 x 28, whose values
    # take ~17 ms to validate.
    level = [data]
    for size in shape[:-1]:
        if max(map(len, level), default=0) > size:
            return True
        level = [item for item in chain.from_iterable(level) if isinstance(item, list)]
    return max(map(len, level), default=0) > shape[-1]


def nested_shape(data: Any, rank: int) -> list[int]:
    """The lengths along ``data[0][0]...``, at most ``rank`` deep: the shape NumPy reads nested
    data as, if rectangular."""
    dims: list[int] = []
    while isinstance(data, list) and len(dims) < rank:
        dims.append(len(data))
        data = data[0] if data else None
    return dims


def _rows_longer(rows: list[Any], shape: list[int]) -> bool:
    """Whether a list of ``rows`` holds a list longer than ``shape`` allows at its depth
    (:func:`longer_than`; a loop of its own for a flat shape, ~0.3 µs for one row)."""
    if len(shape) != 1:
        return longer_than(rows, [len(rows), *shape])
    size = shape[0]
    for row in rows:  # noqa: SIM110 (any() of a generator: ~0.9 µs for one row, this ~0.3)
        if isinstance(row, list) and len(row) > size:
            return True
    return False


def to_tensor(inputs: list[Any], predictor: Predictor) -> Tensor:
    """``inputs`` as a float32 ``(N, *input_shape)`` tensor, or an InvalidInputError that says
    which entry is wrong."""
    shape = predictor.spec.input_shape
    # Lengths first, no value read (pydantic validates a list's items before its max_length):
    # one row of 785 000 values for fashion's [28, 28], every value validated before its shape
    # was refused, held the event loop 0.08-0.17 s.
    if _rows_longer(inputs, shape):
        found = nested_shape(inputs, len(shape) + 1)
        if found[1:] == shape:  # the first row fits: a later one is longer
            raise InvalidInputError(f"every row must have shape {shape}; rows differ in length")
        raise InvalidInputError(
            f"model {predictor.spec.name!r} expects rows of shape {shape}, got a batch of shape "
            f"{found}"
        )
    try:
        rows = _rows_adapter(len(shape)).validate_python(inputs, strict=True)
    except ValidationError as exc:
        details = validation_details(exc.errors())
        where = "; ".join(f"inputs.{d['field']}: {d['message']}" for d in details[:3])
        raise InvalidInputError(
            f"inputs must be a list of rows of shape {shape} holding finite numbers: {where}"
        ) from None
    try:
        # Through NumPy: a third of torch.tensor's time on a row of 64 numbers.
        x = torch.from_numpy(np.array(rows, dtype=np.float32))
    except ValueError:  # ragged rows: torch's own message says where
        try:
            x = torch.tensor(rows, dtype=torch.float32)
        except ValueError as exc:
            raise InvalidInputError(
                f"every row must have shape {shape}; rows differ in length ({exc})"
            ) from None
    if x.shape[0] > 0 and list(x.shape[1:]) == shape:
        # Every number was checked finite and within float32 above, so its float32 is finite:
        # only the shape was left to check (the predictor's check would scan for NaN again).
        return x
    return predictor.check_inputs(x)  # says what is wrong with the shape


def _floats(t: Tensor) -> list[Any]:
    return t.tolist()


def _finite(values: list[Any], nested: bool = False) -> bool:
    """True when every float of ``values`` (a list, or with ``nested`` a list of lists) is
    finite; False when one may not be (or the sum overflowed): then the exact check decides."""
    return math.isfinite(sum(map(sum, values)) if nested else sum(values))


def _checked(result: Prediction | Summary, samples: Tensor | None, finite: bool) -> None:
    """When a quick sum says a value may not be finite, the exact check of
    :func:`mcdrop.predictor.check_finite` (a NonFiniteOutputError naming the rows)."""
    if not finite:
        check_finite(result, samples)


def predict_body(predictor: Predictor, prediction: Prediction) -> dict[str, Any]:
    """The JSON of a :class:`~service.schemas.PredictResponse` (its fields, in its order), built
    from each tensor's ``tolist()`` without a model object per row: :func:`predict_response` is
    this, validated. A NaN or ±inf output is a NonFiniteOutputError naming its rows."""
    spec = predictor.spec
    rows: list[dict[str, Any]]
    if isinstance(prediction, ClassificationPrediction):
        probabilities = _floats(prediction.probabilities)
        _checked(prediction, None, _finite(probabilities, nested=True))
        labels = spec.labels
        rows = [
            {"label": labels[i], "label_index": i, "probabilities": p}
            for i, p in zip(prediction.label.tolist(), probabilities, strict=True)
        ]
    else:
        means, noises = _floats(prediction.mean), _floats(prediction.noise_variance)
        _checked(prediction, None, _finite(means, nested=True) and _finite(noises, nested=True))
        rows = [{"mean": m, "noise_variance": v} for m, v in zip(means, noises, strict=True)]
    return {"model": spec.name, "task": spec.task, "predictions": rows}


def predict_response(predictor: Predictor, prediction: Prediction) -> schemas.PredictResponse:
    return schemas.PredictResponse.model_validate(predict_body(predictor, prediction))


#: A regression result's statistics, in the schema's order.
_REGRESSION_STATISTICS = (
    "mean",
    "variance",
    "std",
    "epistemic_variance",
    "aleatoric_variance",
    "lower",
    "upper",
)


def uncertainty_body(
    predictor: Predictor,
    summary: Summary,
    samples: Tensor | None,
    *,
    seed: int,
    level: float,
    tolerance: float | None = None,
    max_n_samples: int | None = None,
    decision: calibration.DecisionRequest | None = None,
) -> dict[str, Any]:
    """The JSON of an :class:`~service.schemas.UncertaintyResponse` (its fields in its order,
    those that are None left out), built from each tensor's ``tolist()`` without a model object
    per row: :func:`uncertainty_response` is this, validated. With a ``tolerance`` (``n_samples:
    "auto"``), the response's ``n_samples`` is "auto" and each row says how many samples it
    used, and a row's returned samples are its own (the NaN padding of ``(S, N, K)`` is left
    out). A ``decision`` adds each row's reject flag and conformal set or interval. A NaN or
    ±inf statistic or sample is a NonFiniteOutputError naming its rows."""
    spec = predictor.spec
    auto = tolerance is not None
    used: list[Any] | None = summary.row_n_samples.tolist() if auto else None
    sample_rows: list[Any] | None = None
    finite = True
    if samples is not None:
        sample_rows = _floats(samples.transpose(0, 1))
        if used is not None:
            sample_rows = [row[:n] for row, n in zip(sample_rows, used, strict=True)]
        finite = all(_finite(row, nested=True) for row in sample_rows)
    decided = (
        calibration.Decisions()
        if decision is None or decision.empty
        else calibration.decide(decision, summary)
    )
    # The optional fields, in the schema's order after the statistics: (name, one per row).
    optional: list[tuple[str, list[Any]]] = []
    if decided.reject is not None:
        optional.append(("reject", decided.reject.tolist()))
    rows: list[dict[str, Any]]
    if isinstance(summary, ClassificationSummary):
        probabilities, variances = _floats(summary.probabilities), _floats(summary.variance)
        scalars = [
            summary.entropy.tolist(),
            summary.expected_entropy.tolist(),
            summary.mutual_information.tolist(),
            summary.variation_ratio.tolist(),
        ]
        finite = (
            finite
            and _finite(probabilities, nested=True)
            and _finite(variances, nested=True)
            and _finite(scalars, nested=True)
        )
        _checked(summary, samples, finite)
        labels = spec.labels
        rows = [
            {
                "label": labels[label],
                "label_index": label,
                "probabilities": p,
                "mean": p,
                "variance": v,
                "std": [x**0.5 for x in v],
                "entropy": h,
                "expected_entropy": eh,
                "mutual_information": mi,
                "variation_ratio": vr,
            }
            for label, p, v, h, eh, mi, vr in zip(
                summary.label.tolist(), probabilities, variances, *scalars, strict=True
            )
        ]
        if decided.prediction_set is not None:
            sets = [
                [labels[k] for k, inside in enumerate(row) if inside]
                for row in decided.prediction_set.tolist()
            ]
            optional.append(("prediction_set", sets))
    else:
        stats = [
            _floats(summary.mean),
            _floats(summary.variance),
            _floats(summary.std),
            _floats(summary.epistemic_variance),
            _floats(summary.aleatoric_variance),
            _floats(summary.lower),
            _floats(summary.upper),
        ]
        _checked(summary, samples, finite and all(_finite(s, nested=True) for s in stats))
        rows = [
            dict(zip(_REGRESSION_STATISTICS, values, strict=True))
            for values in zip(*stats, strict=True)
        ]
        if decided.lower is not None and decided.upper is not None:
            optional.append(("conformal_lower", _floats(decided.lower)))
            optional.append(("conformal_upper", _floats(decided.upper)))
    if used is not None:
        optional.append(("n_samples", used))
    if sample_rows is not None:
        optional.append(("samples", sample_rows))
    for name, values in optional:
        for row, value in zip(rows, values, strict=True):
            row[name] = value
    body: dict[str, Any] = {
        "model": spec.name,
        "task": spec.task,
        "n_samples": "auto" if auto else summary.n_samples,
    }
    if tolerance is not None:
        body["tolerance"] = tolerance
    if max_n_samples is not None:
        body["max_n_samples"] = max_n_samples
    body["seed"] = seed
    body["level"] = level
    if decision is not None:
        given = {
            "reject_score": decision.reject_score,
            "reject_threshold": decision.reject_threshold,
            "reject_rate": decision.reject_rate,
            "coverage": decision.coverage,
        }
        body.update((k, v) for k, v in given.items() if v is not None)
    body["results"] = rows
    return body


def uncertainty_response(
    predictor: Predictor,
    summary: Summary,
    samples: Tensor | None,
    *,
    seed: int,
    level: float,
    tolerance: float | None = None,
    max_n_samples: int | None = None,
    decision: calibration.DecisionRequest | None = None,
) -> schemas.UncertaintyResponse:
    """:func:`uncertainty_body` as the response model."""
    body = uncertainty_body(
        predictor,
        summary,
        samples,
        seed=seed,
        level=level,
        tolerance=tolerance,
        max_n_samples=max_n_samples,
        decision=decision,
    )
    return schemas.UncertaintyResponse.model_validate(body)


def model_info(
    spec: ModelSpec,
    *,
    max_n_samples: int,
    max_request_rows: int,
    default_n_samples: int,
    calibrated: calibration.Calibration | None = None,
) -> schemas.ModelInfo:
    return schemas.ModelInfo(
        name=spec.name,
        version=spec.version,
        task=spec.task,
        description=spec.description,
        input_shape=spec.input_shape,
        labels=spec.labels,
        likelihood=spec.likelihood,
        tau=spec.tau,
        dropout=spec.dropout,
        default_n_samples=default_n_samples,
        max_n_samples=max_n_samples,
        max_request_rows=max_request_rows,
        metrics=spec.metrics,
        calibration=None
        if calibrated is None
        else schemas.CalibrationInfo(**calibration.describe(calibrated)),
    )
