"""The Open Inference Protocol's JSON objects (REST), as the specification names them, and the
request parameters mcdrop reads (pydantic only; no torch, no FastAPI)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    WithJsonSchema,
    model_validator,
)

from service.schemas import (
    DECISION_RULES,
    AsInt,
    NSamples,
    RejectScore,
    Seed,
    check_decision_options,
    explained,
)

# Integers, written in JSON as ``5`` or ``5.0`` (never ``"5"``, ``true`` or ``5.5``), as in the
# native contract; the bounds come before ``AsInt``, so that the JSON schema states them.
Integer = Annotated[int, AsInt]
Count = Annotated[int, Field(ge=1), AsInt]
Size = Annotated[int, Field(ge=0), AsInt]

#: The longest ``timeout``: int64's largest, the type the protocol gives it (Triton's
#: schedule-policy extension); µs, about 292,000 years.
MAX_TIMEOUT_US = (1 << 63) - 1

#: A request's own deadline in µs, 0 to :data:`MAX_TIMEOUT_US` (0: none of its own, as Triton
#: reads it). The schema states the range as ``format: int64``, as for the seed: FastAPI writes
#: numeric bounds as floats, and 2**63 - 1 is no float.
Timeout = Annotated[
    int,
    Field(ge=0, le=MAX_TIMEOUT_US),
    AsInt,
    explained(
        "an integer number of microseconds from 0 (none: the server's deadline) to 2**63 - 1"
    ),
    WithJsonSchema({"type": "integer", "format": "int64", "minimum": 0}),
]

#: Parameters that only an adaptive request (``n_samples: "auto"``) takes, as in the native API.
AUTO_OPTIONS = ("tolerance", "max_n_samples")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class InputParameters(_Strict):
    binary_data_size: Size | None = Field(
        None, description="bytes of this tensor's data after the JSON header"
    )


class RequestInput(_Strict):
    """``$request_input``: one tensor, its ``data`` in JSON (nested or flat, row-major) or, with
    ``parameters.binary_data_size``, in the binary part of the body."""

    name: str
    # fail_fast, on each list of a request: refused at its first invalid item, the rest unread
    # (pydantic's error for each item of a long list cost seconds, the GIL held, so the whole
    # server waited: 2.2-2.8 s for 200 000 inputs that are no objects).
    shape: Annotated[list[Integer], Field(fail_fast=True)]
    datatype: str
    parameters: InputParameters = Field(default_factory=InputParameters)
    data: list[Any] | None = None


class OutputParameters(_Strict):
    binary_data: bool | None = Field(None, description="return this output as binary data")


class RequestOutput(_Strict):
    """``$request_output``: an output tensor to return."""

    name: str
    parameters: OutputParameters = Field(default_factory=OutputParameters)


#: The decision parameters (reject flags, conformal outputs): mode ``uncertainty`` only.
DECISION_PARAMETERS = ("reject_rate", "reject_threshold", "reject_score", "coverage")


#: The parameters :meth:`InferParameters._mc_only` checks against the others (None by default).
_CROSS_CHECKED = frozenset({"n_samples", "seed", "level", *AUTO_OPTIONS, *DECISION_PARAMETERS})


class InferParameters(_Strict):
    """The request ``parameters`` mcdrop reads (any other is refused)."""

    model_config = ConfigDict(json_schema_extra={"dependentSchemas": DECISION_RULES})

    mode: Literal["predict", "uncertainty"] = Field(
        "uncertainty", description="uncertainty: MC dropout; predict: one pass, dropout off"
    )
    n_samples: NSamples | None = Field(
        None,
        description='MC-dropout samples (default: the model\'s default_n_samples), or "auto": '
        "each row samples until the Monte Carlo standard error of its estimate is within "
        "tolerance, or it has max_n_samples (the n_samples output says how many each used)",
    )
    tolerance: Annotated[float, Field(gt=0.0, allow_inf_nan=False)] | None = Field(
        None,
        description='with n_samples "auto": the Monte Carlo standard error at which a row '
        "stops (default 0.01 for a classifier, 0.05 for a regressor), as the native API's "
        "tolerance",
    )
    max_n_samples: Count | None = Field(
        None,
        description='with n_samples "auto": the most samples a row may use (default 1000, or '
        "the server's max_n_samples if lower)",
    )
    seed: Seed | None = Field(None, description="reproducible samples")
    level: Annotated[float, Field(gt=0.0, lt=1.0, allow_inf_nan=False)] | None = Field(
        None, description="level of the central interval (default 0.95)"
    )
    binary_data_output: bool = Field(False, description="every output as binary data")
    timeout: Timeout | None = Field(
        None,
        description="microseconds, 0 to 2**63 - 1: the request's deadline, counted from when "
        "the server has read it, if shorter than the server's (request_timeout_s; 0: none of "
        "its own). An answer not ready by then is a 504, whether the model work waited in a "
        "queue or ran at once: a timeout shorter than the work itself always is.",
    )
    reject_rate: Annotated[float, Field(ge=0.0, lt=1.0, allow_inf_nan=False)] | None = Field(
        None,
        description="output reject (BOOL): rows above the threshold that rejects this share of "
        "the calibration rows (needs a calibrated model)",
    )
    reject_threshold: Annotated[float, Field(allow_inf_nan=False)] | None = Field(
        None, description="output reject (BOOL): rows whose reject_score is above this value"
    )
    reject_score: RejectScore | None = Field(
        None,
        description="entropy (default), mutual_information, least_confidence (classifier); "
        "std (default), epistemic_std (regressor)",
    )
    coverage: Annotated[float, Field(gt=0.0, lt=1.0, allow_inf_nan=False)] | None = Field(
        None,
        description="conformal outputs at this coverage: prediction_set (BOOL, N x K) for a "
        "classifier, conformal_lower and conformal_upper (FP32, N x K) for a regressor",
    )

    @model_validator(mode="after")
    def _mc_only(self) -> InferParameters:
        if self.model_fields_set.isdisjoint(_CROSS_CHECKED):  # all None: nothing to check
            return self
        if self.mode == "predict":
            mc = ("n_samples", "seed", "level", *AUTO_OPTIONS)
            given = [k for k in mc if getattr(self, k) is not None]
            given += [k for k in DECISION_PARAMETERS if getattr(self, k) is not None]
            if given:
                raise ValueError(f"{', '.join(given)}: only for mode 'uncertainty'")
        auto_only = [k for k in AUTO_OPTIONS if getattr(self, k) is not None]
        if auto_only and self.n_samples != "auto":
            raise ValueError(
                f'{" and ".join(auto_only)}: only with n_samples "auto"; send '
                f'"n_samples": "auto" or leave {" and ".join(auto_only)} out'
            )
        check_decision_options(self.reject_rate, self.reject_threshold, self.reject_score)
        return self


#: The longest request ``id``: the response echoes it, so it is bounded (Triton's client sends
#: the ``request_id`` it is given; a UUID is 36 characters, a W3C trace ID 32).
MAX_ID_CHARS = 256


class InferenceRequest(_Strict):
    """``$inference_request``."""

    id: Annotated[str, Field(max_length=MAX_ID_CHARS)] | None = Field(
        None, description=f"echoed in the response; at most {MAX_ID_CHARS} characters"
    )
    parameters: InferParameters = Field(default_factory=InferParameters)
    inputs: Annotated[list[RequestInput], Field(fail_fast=True)] = Field(..., min_length=1)
    outputs: Annotated[list[RequestOutput], Field(fail_fast=True)] | None = None


class MetadataTensor(BaseModel):
    """``$metadata_tensor``: -1 for a dimension of any size (the batch)."""

    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    """``$metadata_model_response``."""

    name: str
    versions: list[str]
    platform: str
    inputs: list[MetadataTensor]
    outputs: list[MetadataTensor]


class ServerMetadata(BaseModel):
    """``$metadata_server_response``."""

    name: str
    version: str
    extensions: list[str]


class ServerLive(BaseModel):
    live: bool


class ServerReady(BaseModel):
    ready: bool


class ModelReady(BaseModel):
    """``$ready_model_response``; when not ready (503), ``error`` says why."""

    name: str
    ready: bool
    error: str | None = None


class ResponseOutput(BaseModel):
    """``$response_output``: ``data`` flat in row-major order, or, with
    ``parameters.binary_data_size``, in the binary part of the body."""

    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class InferenceResponse(BaseModel):
    """``$inference_response``; ``parameters`` gives the mode, and ``n_samples``, ``seed`` and
    ``level`` used for an uncertainty."""

    model_name: str
    model_version: str
    id: str | None = None
    parameters: dict[str, Any]
    outputs: list[ResponseOutput]


class ErrorResponse(BaseModel):
    """``$inference_error_response`` (every v2 error)."""

    error: str
