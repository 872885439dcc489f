"""Between JSON and tensors: parsing request inputs, and building responses from library results.

Shared by the routes and the CLI's local mode, so both print the same JSON.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Annotated, Any

import numpy as np
import torch
from pydantic import Field, TypeAdapter, ValidationError
from torch import Tensor

from mcdrop import calibration
from mcdrop.checkpoint import ModelSpec
from mcdrop.exceptions import InvalidInputError
from mcdrop.predictor import ClassificationPrediction, Prediction, Predictor, Summary
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
    for _ in range(rank):
        row = list[row]
    return TypeAdapter(list[row])


def to_tensor(inputs: list[Any], predictor: Predictor) -> Tensor:
    """``inputs`` as a float32 ``(N, *input_shape)`` tensor, or an InvalidInputError that says
    which entry is wrong."""
    shape = predictor.spec.input_shape
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


def predict_response(predictor: Predictor, prediction: Prediction) -> schemas.PredictResponse:
    spec = predictor.spec
    rows: list[Any]
    if isinstance(prediction, ClassificationPrediction):
        rows = [
            schemas.ClassificationPrediction(label=spec.labels[i], label_index=i, probabilities=p)
            for i, p in zip(
                prediction.label.tolist(), _floats(prediction.probabilities), strict=True
            )
        ]
    else:
        rows = [
            schemas.RegressionPrediction(mean=m, noise_variance=v)
            for m, v in zip(
                _floats(prediction.mean), _floats(prediction.noise_variance), strict=True
            )
        ]
    return schemas.PredictResponse(model=spec.name, task=spec.task, predictions=rows)


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
    """The response of an uncertainty request; with a ``tolerance`` (``n_samples: "auto"``), the
    response's ``n_samples`` is "auto" and each row says how many samples it used, and a row's
    returned samples are its own (the NaN padding of ``(S, N, K)`` is left out). A
    ``decision`` adds each row's reject flag and conformal set or interval."""
    spec = predictor.spec
    auto = tolerance is not None
    n_rows = summary.variance.shape[0]
    used: list[Any] = summary.row_n_samples.tolist() if auto else [None] * n_rows
    sample_rows: list[Any] = [None] * n_rows
    if samples is not None:
        sample_rows = _floats(samples.transpose(0, 1))
        if auto:
            sample_rows = [row[:n] for row, n in zip(sample_rows, used, strict=True)]
    decided = (
        calibration.Decisions()
        if decision is None or decision.empty
        else calibration.decide(decision, summary)
    )
    reject: list[Any] = [None] * n_rows if decided.reject is None else decided.reject.tolist()
    rows: list[Any]
    if isinstance(summary, ClassificationSummary):
        sets: list[Any] = [None] * n_rows
        if decided.prediction_set is not None:
            sets = [
                [spec.labels[k] for k, inside in enumerate(row) if inside]
                for row in decided.prediction_set.tolist()
            ]
        rows = [
            schemas.ClassificationUncertainty(
                label=spec.labels[label],
                label_index=label,
                probabilities=p,
                mean=p,
                variance=v,
                std=[x**0.5 for x in v],
                entropy=h,
                expected_entropy=eh,
                mutual_information=mi,
                variation_ratio=vr,
                reject=r,
                prediction_set=ps,
                n_samples=n,
                samples=s,
            )
            for label, p, v, h, eh, mi, vr, r, ps, n, s in zip(
                summary.label.tolist(),
                _floats(summary.probabilities),
                _floats(summary.variance),
                summary.entropy.tolist(),
                summary.expected_entropy.tolist(),
                summary.mutual_information.tolist(),
                summary.variation_ratio.tolist(),
                reject,
                sets,
                used,
                sample_rows,
                strict=True,
            )
        ]
    else:
        lows: list[Any] = [None] * n_rows
        highs: list[Any] = [None] * n_rows
        if decided.lower is not None and decided.upper is not None:
            lows, highs = _floats(decided.lower), _floats(decided.upper)
        rows = [
            schemas.RegressionUncertainty(
                mean=m,
                variance=v,
                std=sd,
                epistemic_variance=ep,
                aleatoric_variance=al,
                lower=lo,
                upper=hi,
                reject=r,
                conformal_lower=clo,
                conformal_upper=chi,
                n_samples=n,
                samples=s,
            )
            for m, v, sd, ep, al, lo, hi, r, clo, chi, n, s in zip(
                _floats(summary.mean),
                _floats(summary.variance),
                _floats(summary.std),
                _floats(summary.epistemic_variance),
                _floats(summary.aleatoric_variance),
                _floats(summary.lower),
                _floats(summary.upper),
                reject,
                lows,
                highs,
                used,
                sample_rows,
                strict=True,
            )
        ]
    return schemas.UncertaintyResponse(
        model=spec.name,
        task=spec.task,
        n_samples="auto" if auto else summary.n_samples,
        tolerance=tolerance,
        max_n_samples=max_n_samples,
        seed=seed,
        level=level,
        reject_score=None if decision is None else decision.reject_score,
        reject_threshold=None if decision is None else decision.reject_threshold,
        reject_rate=None if decision is None else decision.reject_rate,
        coverage=None if decision is None else decision.coverage,
        results=rows,
    )


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
