"""The HTTP contract: request and response models (pydantic only; no torch, no FastAPI).

The client parses responses with these same models, so both sides share one definition.
Field names are the library's: ``inputs``, ``n_samples``, ``seed``, ``mean``, ``variance``,
``entropy``, ``mutual_information``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_SEED = (1 << 63) - 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class PredictRequest(_Strict):
    """Rows to predict, each of the model's ``input_shape`` (e.g. 64 numbers for ``digits``)."""

    inputs: list[Any] = Field(
        ...,
        min_length=1,
        description="a list of rows, each a (nested) list of numbers of the input_shape",
        examples=[[[0.0] * 10]],
    )


class UncertaintyRequest(PredictRequest):
    """Rows to sample, with the MC options."""

    n_samples: int | None = Field(
        None, ge=1, description="MC-dropout samples (default: the model's default_n_samples)"
    )
    seed: int | None = Field(
        None,
        ge=0,
        le=MAX_SEED,
        description="reproducible samples: a row's result depends only on the seed and the row",
    )
    level: float = Field(0.95, gt=0.0, lt=1.0, description="level of the central interval")
    return_samples: bool = Field(False, description="include every sample of every row")


class ErrorBody(BaseModel):
    code: str = Field(..., description="machine-readable kind, e.g. invalid_input")
    message: str = Field(..., description="what is wrong and how to fix it")
    details: list[dict[str, Any]] = Field(default_factory=list)


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


class ModelInfo(BaseModel):
    """What a client needs to call a model."""

    name: str
    version: str
    task: Literal["classification", "regression"]
    description: str
    input_shape: list[int]
    labels: list[str]
    likelihood: Literal["homoscedastic", "heteroscedastic"]
    tau: float | None
    dropout: float | None
    default_n_samples: int
    max_n_samples: int
    max_rows: int
    metrics: dict[str, float]


class ModelList(BaseModel):
    models: list[ModelInfo]


class ClassificationPrediction(BaseModel):
    label: str
    label_index: int
    probabilities: list[float]


class RegressionPrediction(BaseModel):
    mean: list[float] = Field(..., description="prediction in original units, one per target")
    noise_variance: list[float] = Field(..., description="the model's noise variance (1/tau)")


class PredictResponse(BaseModel):
    model: str
    task: Literal["classification", "regression"]
    predictions: list[ClassificationPrediction] | list[RegressionPrediction]


class ClassificationUncertainty(BaseModel):
    """MC summary of one row of a classifier (entropies in nats)."""

    label: str
    label_index: int
    probabilities: list[float] = Field(..., description="MC mean of the class probabilities")
    mean: list[float] = Field(..., description="same as probabilities")
    variance: list[float] = Field(..., description="per-class variance of the probabilities")
    std: list[float]
    entropy: float = Field(..., description="predictive entropy: total uncertainty")
    expected_entropy: float = Field(..., description="mean entropy of the samples: aleatoric")
    mutual_information: float = Field(..., description="BALD: epistemic uncertainty")
    variation_ratio: float = Field(..., description="share of samples off the modal label")
    samples: list[list[float]] | None = Field(None, description="(n_samples, K) probabilities")


class RegressionUncertainty(BaseModel):
    """MC summary of one row of a regressor, in original units, one entry per target."""

    mean: list[float]
    variance: list[float] = Field(..., description="epistemic + aleatoric")
    std: list[float]
    epistemic_variance: list[float] = Field(..., description="spread of the sampled means")
    aleatoric_variance: list[float] = Field(..., description="noise: 1/tau or predicted")
    lower: list[float] = Field(..., description="lower bound of the central interval")
    upper: list[float] = Field(..., description="upper bound of the central interval")
    samples: list[list[float]] | None = Field(None, description="(n_samples, K) sampled means")


class UncertaintyResponse(BaseModel):
    model: str
    task: Literal["classification", "regression"]
    n_samples: int
    seed: int = Field(..., description="the seed used; send it back to reproduce the result")
    level: float
    results: list[ClassificationUncertainty] | list[RegressionUncertainty]
