"""The endpoints. All are ``async``: model work goes through the model's batcher, which runs
small work on the event loop and larger work in worker threads, and large inputs and responses
are converted in worker threads too, so the loop (and ``/health``) keeps answering while a large
request computes. (A plain ``def`` route would cost two thread handoffs per request, the route
and its response validation, more than a one-row model pass.) FastAPI still parses the JSON body
and validates the response model on the loop; the body limit bounds that work."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from mcdrop.masks import fresh_seed
from mcdrop.predictor import Predictor
from service import convert, schemas
from service.config import Settings
from service.deps import RegistryDep, SettingsDep
from service.errors import LimitExceededError

router = APIRouter()

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": schemas.ErrorResponse, "description": text}
    for code, text in {
        400: "invalid JSON",
        404: "unknown model",
        413: "request body too large",
        422: "invalid inputs or options, or a limit exceeded",
        503: "model still loading, or it failed to load",
    }.items()
}


@router.get("/health", response_model=schemas.Health, tags=["status"])
async def health() -> schemas.Health:
    """Liveness: the process answers."""
    return schemas.Health(status="ok")


@router.get(
    "/ready",
    response_model=schemas.Readiness,
    tags=["status"],
    responses={503: {"model": schemas.Readiness}},
)
async def ready(registry: RegistryDep) -> Any:
    """Readiness: 200 once every model has loaded and run a warm-up pass (``ready``), or every
    model but those that failed to load, at least one (``degraded``: only with exit_on_error
    off); 503 while a model loads, or when none loaded. ``models`` gives each model's state."""
    status, models = registry.readiness()
    body = schemas.Readiness(status=status, models=models)
    if status not in ("ready", "degraded"):
        return JSONResponse(status_code=503, content=body.model_dump())
    return body


@router.get(
    "/models/{name}/ready",
    response_model=schemas.ModelReadiness,
    response_model_exclude_none=True,
    tags=["status"],
    responses={
        404: _ERRORS[404],
        503: {"model": schemas.ModelReadiness, "description": "loading, or failed to load"},
    },
)
async def model_ready(name: str, registry: RegistryDep) -> Any:
    """One model's readiness: 200 once it has loaded and run a warm-up pass; 503 while it loads
    or if it failed to load, with the reason."""
    status, reason = registry.model_readiness(name)
    body = schemas.ModelReadiness(name=name, status=status, reason=reason)
    if status != "ready":
        return JSONResponse(status_code=503, content=body.model_dump(exclude_none=True))
    return body


@router.get("/models", response_model=schemas.ModelList, tags=["models"])
async def list_models(registry: RegistryDep, settings: SettingsDep) -> schemas.ModelList:
    """The models that are loaded."""
    return schemas.ModelList(models=[_info(s, settings) for s in registry.ready_specs()])


@router.get("/models/{name}", response_model=schemas.ModelInfo, tags=["models"], responses=_ERRORS)
async def get_model(name: str, registry: RegistryDep, settings: SettingsDep) -> schemas.ModelInfo:
    """What a client needs to call a model: task, input shape, labels, sample limits, metrics."""
    return _info(registry.get(name).spec, settings)


def _info(spec: Any, settings: Settings) -> schemas.ModelInfo:
    return convert.model_info(
        spec,
        max_n_samples=settings.max_n_samples,
        max_rows=settings.max_rows,
        default_n_samples=settings.default_n_samples,
    )


#: Past these sizes, turning a request into a tensor or a result into a response model runs in a
#: worker thread (tens of milliseconds), not on the event loop that also answers ``/health``.
LARGE_INPUT_VALUES = 20_000
LARGE_RESPONSE_ROWS = 256
LARGE_RESPONSE_SAMPLES = 20_000

T = TypeVar("T")


def _large_inputs(body: schemas.PredictRequest, predictor: Predictor) -> bool:
    return len(body.inputs) * math.prod(predictor.spec.input_shape) > LARGE_INPUT_VALUES


async def _off_loop(large: bool, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)``: in a worker thread when ``large``, else right here."""
    if not large:
        return fn(*args, **kwargs)
    return await asyncio.get_running_loop().run_in_executor(None, partial(fn, *args, **kwargs))


def _check_rows(body: schemas.PredictRequest, settings: Settings) -> None:
    if len(body.inputs) > settings.max_rows:
        raise LimitExceededError(
            f"{len(body.inputs)} rows is more than the limit of {settings.max_rows} per request; "
            "split the batch"
        )


@router.post(
    "/models/{name}/predict",
    response_model=schemas.PredictResponse,
    tags=["inference"],
    responses=_ERRORS,
)
async def predict(
    name: str,
    body: schemas.PredictRequest,
    request: Request,
    registry: RegistryDep,
    settings: SettingsDep,
) -> schemas.PredictResponse:
    """Deterministic prediction (dropout off): probabilities and label, or the value in original
    units."""
    predictor = registry.get(name)
    _check_rows(body, settings)
    x = await _off_loop(_large_inputs(body, predictor), convert.to_tensor, body.inputs, predictor)
    registry.arrivals.settle(request.scope)  # read and valid: its job queues now
    prediction = await registry.predict(predictor, x)
    big = len(body.inputs) > LARGE_RESPONSE_ROWS
    return await _off_loop(big, convert.predict_response, predictor, prediction)


def _n_samples(body: schemas.UncertaintyRequest, predictor: Predictor, settings: Settings) -> int:
    if body.n_samples is None:
        default = settings.default_n_samples or predictor.spec.default_n_samples
        return min(default, settings.max_n_samples)
    if body.n_samples > settings.max_n_samples:
        raise LimitExceededError(
            f"n_samples={body.n_samples} is above the limit of {settings.max_n_samples}"
        )
    return body.n_samples


@router.post(
    "/models/{name}/uncertainty",
    response_model=schemas.UncertaintyResponse,
    response_model_exclude_none=True,
    tags=["inference"],
    responses=_ERRORS,
)
async def uncertainty(
    name: str,
    body: schemas.UncertaintyRequest,
    request: Request,
    registry: RegistryDep,
    settings: SettingsDep,
) -> schemas.UncertaintyResponse:
    """MC-dropout uncertainty: ``n_samples`` stochastic passes per row, summarised (mean,
    variance, std; entropy, mutual information, variation ratio for classifiers; interval and
    epistemic/aleatoric split for regressors)."""
    predictor = registry.get(name)
    _check_rows(body, settings)
    n_samples = _n_samples(body, predictor, settings)
    total = len(body.inputs) * n_samples
    if total > settings.max_row_samples:
        raise LimitExceededError(
            f"rows × n_samples = {len(body.inputs)} × {n_samples} = {total} is above the limit "
            f"of {settings.max_row_samples}; send fewer rows or ask for fewer samples"
        )
    if body.return_samples and total > settings.max_returned_samples:
        raise LimitExceededError(
            f"return_samples with rows × n_samples = {total} is above the limit of "
            f"{settings.max_returned_samples}"
        )
    x = await _off_loop(_large_inputs(body, predictor), convert.to_tensor, body.inputs, predictor)
    seed = fresh_seed() if body.seed is None else body.seed
    registry.arrivals.settle(request.scope)  # read and valid: its job queues now
    summary, samples = await registry.uncertainty(
        predictor, x, n_samples, seed=seed, level=body.level, return_samples=body.return_samples
    )
    big = len(body.inputs) > LARGE_RESPONSE_ROWS or (
        body.return_samples and total > LARGE_RESPONSE_SAMPLES
    )
    return await _off_loop(
        big,
        convert.uncertainty_response,
        predictor,
        summary,
        samples,
        seed=seed,
        level=body.level,
    )
