"""The HTTP contract: request and response models (pydantic only; no torch, no FastAPI).

The service validates requests and writes responses with these models (``service.schemas``
re-exports them) and the client parses responses with them, so both sides share one definition;
it ships in the client's distribution, which the service's depends on, at the same version.
Field names are the library's: ``inputs``, ``n_samples``, ``seed``, ``mean``, ``variance``,
``entropy``, ``mutual_information``.
"""

from __future__ import annotations

import json
from enum import StrEnum
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WithJsonSchema,
    WrapValidator,
    model_validator,
)
from pydantic_core import PydanticCustomError

__all__ = [
    "DECISION_RULES",
    "FLOAT32_MAX",
    "MAX_ROW_RANK",
    "MAX_SEED",
    "N_SAMPLES_RULE",
    "REJECT_SCORES",
    "ROW_SCHEMA",
    "AsInt",
    "CalibrationInfo",
    "ClassificationPrediction",
    "ClassificationUncertainty",
    "ErrorBody",
    "ErrorCode",
    "ErrorResponse",
    "FiniteFloat",
    "Health",
    "ModelInfo",
    "ModelList",
    "ModelReadiness",
    "NSamples",
    "PredictRequest",
    "PredictResponse",
    "Readiness",
    "RegressionPrediction",
    "RegressionUncertainty",
    "RejectScore",
    "Seed",
    "UncertaintyRequest",
    "UncertaintyResponse",
    "check_decision_options",
    "explained",
]

#: The largest seed the library accepts (``mcdrop.masks.MAX_SEED``, which this module cannot
#: import: it loads torch, and the client imports this module). A test asserts they agree.
MAX_SEED = (1 << 63) - 1
#: The largest float32 magnitude: inputs are float32 tensors, so larger numbers would be inf.
FLOAT32_MAX = 3.4028234663852886e38
#: Deepest nesting of a row the schema describes: (C, H, W) images and one more.
MAX_ROW_RANK = 4


def _integral(value: Any) -> Any:
    """An integral float (``5.0``) as an int: JSON Schema's ``integer`` counts it as one, and
    pydantic's strict int would refuse it. Anything else is left for the int validator."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


#: The JSON spelling of an integer (``5`` or ``5.0``, never ``"5"`` or ``true``); it goes last in
#: an ``Annotated`` list, after the int's bounds, so the schema keeps them.
AsInt = BeforeValidator(_integral)

#: A seed: 0 to 2**63 - 1. The schema states the range as ``format: int64`` with a minimum of 0,
#: because FastAPI writes numeric bounds as floats and 2**63 - 1 is no float (it would round up
#: to 2**63 and admit one seed too many).
Seed = Annotated[
    int,
    Field(ge=0, le=MAX_SEED),
    AsInt,
    WithJsonSchema({"type": "integer", "format": "int64", "minimum": 0}),
]

#: A number a response may carry: never NaN or ±inf (JSON has no such numbers).
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]


def _shown(value: Any) -> str:
    """A refused value as a message quotes it: its JSON, at most 100 characters."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):  # e.g. an integer of more than 4300 digits
        text = f"a value of type {type(value).__name__}"
    return text if len(text) <= 100 else f"{text[:100]}... ({len(text)} characters)"


def explained(rule: str) -> WrapValidator:
    """A validator that words any error of the value it wraps as one: "must be ``rule``; got
    <the value>", in place of pydantic's one error per branch of a union (with names of its
    internals: ``function-before[_integral(), constrained-int]``). Goes last in an
    ``Annotated`` list; the JSON schema stays the wrapped type's."""

    def validate(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        try:
            return handler(value)
        except ValidationError:
            raise PydanticCustomError(
                "invalid_value", "must be {rule}; got {got}", {"rule": rule, "got": _shown(value)}
            ) from None

    return WrapValidator(validate)


#: What ``n_samples`` takes, in words (the limit is the server's, so it is named, not stated).
N_SAMPLES_RULE = (
    "an integer from 1 to the server's max_n_samples (GET /models/<name> gives it), or 'auto'"
)

#: A request's ``n_samples``: a count of at least 1 (written ``5`` or ``5.0``), or ``"auto"``.
NSamples = Annotated[
    Annotated[int, Field(ge=1), AsInt] | Literal["auto"], explained(N_SAMPLES_RULE)
]


class ErrorCode(StrEnum):
    """Every ``error.code`` the service sends (statuses in :mod:`service.errors`)."""

    BODY_TOO_LARGE = "body_too_large"
    CLIENT_CLOSED_REQUEST = "client_closed_request"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    DECISION_UNAVAILABLE = "decision_unavailable"
    HTTP_ERROR = "http_error"
    INTERNAL_ERROR = "internal_error"
    INVALID_ARGUMENT = "invalid_argument"
    INVALID_INPUT = "invalid_input"
    INVALID_JSON = "invalid_json"
    INVALID_REQUEST = "invalid_request"
    LIMIT_EXCEEDED = "limit_exceeded"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    MODEL_ERROR = "model_error"
    MODEL_NOT_FOUND = "model_not_found"
    MODEL_NOT_READY = "model_not_ready"
    MODEL_REJECTED_INPUT = "model_rejected_input"
    NON_FINITE_OUTPUT = "non_finite_output"
    NOT_FOUND = "not_found"
    OVERLOADED = "overloaded"
    REQUEST_TIMEOUT = "request_timeout"
    SHUTTING_DOWN = "shutting_down"
    UNAUTHORIZED = "unauthorized"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"


def _nested_numbers(rank: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "number", "minimum": -FLOAT32_MAX, "maximum": FLOAT32_MAX}
    for _ in range(rank):
        schema = {"type": "array", "items": schema, "minItems": 1}
    return schema


#: JSON schema of one row: numbers nested as deep as the model's input_shape (the exact shape
#: depends on the model, so convert.to_tensor checks it at runtime).
ROW_SCHEMA: dict[str, Any] = {
    "anyOf": [_nested_numbers(rank) for rank in range(1, MAX_ROW_RANK + 1)],
    "description": "one row: numbers nested to the model's input_shape, e.g. 64 numbers",
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class PredictRequest(_Strict):
    """Rows to predict, each of the model's ``input_shape`` (e.g. 64 numbers for ``digits``)."""

    inputs: list[Any] = Field(
        ...,
        min_length=1,
        description=(
            "a list of rows, each a (nested) list of numbers of the model's input_shape, "
            f"finite and at most {FLOAT32_MAX:.7g} in magnitude (float32)"
        ),
        examples=[[[0.0] * 10]],
        json_schema_extra={"items": ROW_SCHEMA},
    )


#: Options that only an adaptive request (``n_samples: "auto"``) takes.
AUTO_OPTIONS = ("tolerance", "max_n_samples")

#: The request schema says it too, so a schema-valid request never meets the check below: each
#: adaptive option requires ``n_samples: "auto"``.
_AUTO_ONLY: dict[str, Any] = {
    name: {"required": ["n_samples"], "properties": {"n_samples": {"const": "auto"}}}
    for name in AUTO_OPTIONS
}


#: Every reject score of either task (``mcdrop.calibration.SCORES``, which this module cannot
#: import; a test asserts they agree): which of them a model offers depends on its task.
RejectScore = Literal["entropy", "epistemic_std", "least_confidence", "mutual_information", "std"]
REJECT_SCORES: tuple[str, ...] = get_args(RejectScore)


def _number(name: str) -> dict[str, Any]:
    """Schema: ``name`` is given, as a number (not null)."""
    return {"required": [name], "properties": {name: {"type": "number"}}}


#: The decision options, said in the schema too: a reject_score goes with a rate or a
#: threshold, and a rate excludes a threshold (the check below says the same).
DECISION_RULES: dict[str, Any] = {
    "reject_score": {"anyOf": [_number("reject_rate"), _number("reject_threshold")]},
    "reject_rate": {"not": {"required": ["reject_threshold"]}},
}


def check_decision_options(
    reject_rate: float | None, reject_threshold: float | None, reject_score: str | None
) -> None:
    """Raise ValueError for decision options that do not go together."""
    if reject_rate is not None and reject_threshold is not None:
        raise ValueError(
            "send reject_rate or reject_threshold, not both (a rate is turned into a threshold)"
        )
    if reject_score is not None and reject_rate is None and reject_threshold is None:
        raise ValueError("reject_score applies with reject_rate or reject_threshold")


class UncertaintyRequest(PredictRequest):
    """Rows to sample, with the MC options."""

    model_config = ConfigDict(json_schema_extra={"dependentSchemas": _AUTO_ONLY | DECISION_RULES})

    n_samples: NSamples | None = Field(
        None,
        description=(
            'MC-dropout samples per row (default: the model\'s default_n_samples), or "auto": '
            "each row samples until the Monte Carlo standard error of its estimate is within "
            "tolerance, or it has max_n_samples (each result says how many it used)"
        ),
    )
    tolerance: Annotated[float, Field(gt=0.0, allow_inf_nan=False)] | None = Field(
        None,
        description=(
            'with n_samples "auto": the Monte Carlo standard error at which a row stops: for a '
            "classifier, of the mean probabilities (largest over classes; default 0.01); for a "
            "regressor, of the mean and of the std, the larger, in units of the predictive std "
            "(largest over outputs; default 0.05)"
        ),
    )
    max_n_samples: Annotated[int, Field(ge=1), AsInt] | None = Field(
        None,
        description=(
            'with n_samples "auto": the most samples a row may use (default 1000, or the '
            "server's max_n_samples if lower)"
        ),
    )
    seed: Seed | None = Field(
        None,
        description=(
            "reproducible samples, 0 to 2**63 - 1: a row's result depends only on the seed and "
            "the row (default: a fresh random seed, reported in the response)"
        ),
    )
    level: Annotated[float, Field(gt=0.0, lt=1.0, allow_inf_nan=False)] = Field(
        0.95, description="level of the central interval"
    )
    return_samples: bool = Field(False, description="include every sample of every row")
    reject_rate: Annotated[float, Field(ge=0.0, lt=1.0, allow_inf_nan=False)] | None = Field(
        None,
        description=(
            "flag each row whose reject_score is above the threshold that rejects this share of "
            "the model's held-out calibration rows (each result's reject; needs a calibrated "
            "model)"
        ),
    )
    reject_threshold: Annotated[float, Field(allow_inf_nan=False)] | None = Field(
        None,
        description="flag each row whose reject_score is above this value (instead of a rate)",
    )
    reject_score: RejectScore | None = Field(
        None,
        description=(
            "the score a row is rejected on: entropy (default), mutual_information or "
            "least_confidence (1 - max probability) for a classifier; std (default) or "
            "epistemic_std for a regressor (GET /models/{name}: calibration.reject_scores)"
        ),
    )
    coverage: Annotated[float, Field(gt=0.0, lt=1.0, allow_inf_nan=False)] | None = Field(
        None,
        description=(
            "split-conformal output at this coverage (needs a calibrated model): each result's "
            "prediction_set (classifier) or conformal_lower/conformal_upper (regressor) holds "
            "the true answer with this probability"
        ),
    )

    @model_validator(mode="after")
    def _auto_options_need_auto(self) -> UncertaintyRequest:
        given = [name for name in AUTO_OPTIONS if getattr(self, name) is not None]
        if given and self.n_samples != "auto":
            names = " and ".join(given)
            verb = "apply" if len(given) > 1 else "applies"
            raise ValueError(
                f'{names} {verb} only to n_samples "auto"; send "n_samples": "auto" or leave '
                f"{names} out"
            )
        check_decision_options(self.reject_rate, self.reject_threshold, self.reject_score)
        return self


class ErrorBody(BaseModel):
    code: ErrorCode = Field(..., description="machine-readable kind, e.g. invalid_input")
    message: str = Field(..., description="what is wrong and how to fix it")
    details: list[dict[str, Any]] = Field(default_factory=list)
    request_id: str | None = Field(
        None, description="the request's ID (also the X-Request-ID header): quote it in reports"
    )


class ErrorResponse(BaseModel):
    error: ErrorBody


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    """The server's readiness: ``ready`` (200) when every model is; ``degraded`` (200) when some
    failed to load (with ``exit_on_error`` off) and every other one is ready; ``loading`` (503)
    while a model loads; ``failed`` (503) when none loaded."""

    status: Literal["ready", "degraded", "loading", "failed"]
    models: dict[str, str] = Field(
        ..., description="model name -> loading | ready | why it failed to load"
    )


class ModelReadiness(BaseModel):
    """One model's readiness: 200 when ``ready``, else 503."""

    name: str
    status: Literal["ready", "loading", "failed"]
    reason: str | None = Field(None, description="why the model failed to load")


class CalibrationInfo(BaseModel):
    """The held-out rows a model's decisions were calibrated on (``mcdrop calibrate``)."""

    n_rows: int = Field(..., description="held-out rows")
    n_samples: int = Field(..., description="MC samples per row the calibration used")
    seed: int
    data: str = Field(..., description="where the rows came from")
    reject_scores: list[str] = Field(..., description="the scores reject_score may name")
    default_reject_score: str
    conformal_method: str = Field(
        ..., description="lac (classifier: 1 - p_y) or normalized_residual (|y - mean| / std)"
    )
    max_coverage: FiniteFloat = Field(..., description="the highest coverage it can give: n/(n+1)")


class ModelInfo(BaseModel):
    """What a client needs to call a model."""

    name: str
    version: str
    task: Literal["classification", "regression"]
    description: str
    input_shape: list[int]
    labels: list[str]
    likelihood: Literal["homoscedastic", "heteroscedastic"]
    tau: FiniteFloat | None
    dropout: FiniteFloat | None
    default_n_samples: int
    max_n_samples: int
    max_request_rows: int
    metrics: dict[str, FiniteFloat]
    calibration: CalibrationInfo | None = Field(
        None, description="present when the model can serve reject_rate and coverage"
    )


class ModelList(BaseModel):
    models: list[ModelInfo]


class ClassificationPrediction(BaseModel):
    label: str
    label_index: int
    probabilities: list[FiniteFloat]


class RegressionPrediction(BaseModel):
    mean: list[FiniteFloat] = Field(..., description="prediction in original units, one per target")
    noise_variance: list[FiniteFloat] = Field(..., description="the model's noise variance (1/tau)")


class PredictResponse(BaseModel):
    model: str
    task: Literal["classification", "regression"]
    predictions: list[ClassificationPrediction] | list[RegressionPrediction]


class ClassificationUncertainty(BaseModel):
    """MC summary of one row of a classifier (entropies in nats)."""

    label: str
    label_index: int
    probabilities: list[FiniteFloat] = Field(..., description="MC mean of the class probabilities")
    mean: list[FiniteFloat] = Field(..., description="same as probabilities")
    variance: list[FiniteFloat] = Field(..., description="per-class variance of the probabilities")
    std: list[FiniteFloat]
    entropy: FiniteFloat = Field(..., description="predictive entropy: total uncertainty")
    expected_entropy: FiniteFloat = Field(..., description="mean entropy of the samples: aleatoric")
    mutual_information: FiniteFloat = Field(..., description="BALD: epistemic uncertainty")
    variation_ratio: FiniteFloat = Field(..., description="share of samples off the modal label")
    reject: bool | None = Field(
        None, description="the row's reject_score is above the threshold: do not trust it"
    )
    prediction_set: list[str] | None = Field(
        None, description="the labels of the conformal prediction set at coverage (may be empty)"
    )
    n_samples: int | None = Field(
        None, description='the samples this row used (requests with n_samples "auto" only)'
    )
    samples: list[list[FiniteFloat]] | None = Field(
        None, description="(n_samples, K) probabilities"
    )


class RegressionUncertainty(BaseModel):
    """MC summary of one row of a regressor, in original units, one entry per target."""

    mean: list[FiniteFloat]
    variance: list[FiniteFloat] = Field(..., description="epistemic + aleatoric")
    std: list[FiniteFloat]
    epistemic_variance: list[FiniteFloat] = Field(..., description="spread of the sampled means")
    aleatoric_variance: list[FiniteFloat] = Field(..., description="noise: 1/tau or predicted")
    lower: list[FiniteFloat] = Field(..., description="lower bound of the central interval")
    upper: list[FiniteFloat] = Field(..., description="upper bound of the central interval")
    reject: bool | None = Field(
        None, description="the row's reject_score is above the threshold: do not trust it"
    )
    conformal_lower: list[FiniteFloat] | None = Field(
        None, description="lower bound of the conformal interval at coverage"
    )
    conformal_upper: list[FiniteFloat] | None = Field(
        None, description="upper bound of the conformal interval at coverage"
    )
    n_samples: int | None = Field(
        None, description='the samples this row used (requests with n_samples "auto" only)'
    )
    samples: list[list[FiniteFloat]] | None = Field(
        None, description="(n_samples, K) sampled means"
    )


class UncertaintyResponse(BaseModel):
    model: str
    task: Literal["classification", "regression"]
    n_samples: int | Literal["auto"] = Field(
        ..., description='samples per row, or "auto" (then each result has its own n_samples)'
    )
    tolerance: FiniteFloat | None = Field(None, description='with "auto": the tolerance used')
    max_n_samples: int | None = Field(
        None, description='with "auto": the most samples a row could use'
    )
    seed: Seed = Field(..., description="the seed used; send it back to reproduce the result")
    level: FiniteFloat
    reject_score: str | None = Field(None, description="the score rows were flagged on")
    reject_threshold: FiniteFloat | None = Field(
        None, description="the threshold used (a rate's, from the calibration)"
    )
    reject_rate: FiniteFloat | None = Field(None, description="the rejection rate asked for")
    coverage: FiniteFloat | None = Field(None, description="the conformal coverage asked for")
    results: list[ClassificationUncertainty] | list[RegressionUncertainty]
