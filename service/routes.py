"""The endpoints. All are ``async``: model work goes through the model's batcher, which runs
small work on the event loop and larger work in worker threads, and large inputs and responses
are converted in worker threads too, so the loop (and ``/health``) keeps answering while a large
request computes. (A plain ``def`` route would cost two thread handoffs per request, the route
and its response validation, more than a one-row model pass.) FastAPI still parses the JSON body
on the loop; the body limit bounds that work. Inference responses are rendered to JSON bytes
here (pydantic-core), and their size is bounded.

The path of an inference request, one direction: ``body → registry.get(name) → ModelHandle →
tensor → batcher (with the request's deadline, and a watch for the client going away) → result
→ response bytes``."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, TypeVar

import torch
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from mcdrop.masks import fresh_seed
from service import convert, schemas
from service.arrivals import INFERENCE_TAG
from service.batching import MCOptions
from service.config import Settings
from service.deps import RegistryDep, SettingsDep
from service.errors import LimitExceededError
from service.registry import ModelHandle, Registry

router = APIRouter()

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": schemas.ErrorResponse, "description": text}
    for code, text in {
        400: "invalid JSON",
        404: "unknown model",
        413: "request body too large",
        422: "invalid inputs or options, or a limit exceeded",
        408: "the request body did not arrive in time",
        503: "model still loading or failed to load, or its queue is full (see Retry-After)",
        504: "the answer was not ready within the request deadline",
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


#: Past these sizes, turning a request into a tensor or a result into a response runs in a
#: worker thread (tens of milliseconds), not on the event loop that also answers ``/health``.
LARGE_INPUT_VALUES = 20_000
LARGE_RESPONSE_VALUES = 20_000

#: Upper bound on the JSON bytes of one float as pydantic-core writes it (``-1.2345678e-05``
#: and the separator), and of a result row's keys and scalars.
FLOAT_BYTES = 25
ROW_BYTES = 400

T = TypeVar("T")


async def _off_loop(large: bool, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)``: in a worker thread when ``large``, else right here."""
    if not large:
        return fn(*args, **kwargs)
    return await asyncio.get_running_loop().run_in_executor(None, partial(fn, *args, **kwargs))


def _disconnected(request: Request) -> Callable[[], Awaitable[None]]:
    """An awaitable factory that completes when the client goes away (the body is read by
    then, so the next ASGI message is the disconnect)."""

    async def wait() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    return wait


def _render(model: BaseModel, limit: int, *, exclude_none: bool = False) -> Response:
    """The response as JSON bytes, refused if larger than ``limit``."""
    body = model.model_dump_json(exclude_none=exclude_none).encode()
    if len(body) > limit:
        raise LimitExceededError(
            f"the response would be {len(body)} bytes, above the limit of {limit} "
            "(max_response_bytes); send fewer rows or ask for fewer samples"
        )
    return Response(body, media_type="application/json")


def _check_rows(body: schemas.PredictRequest, settings: Settings) -> None:
    if len(body.inputs) > settings.max_rows:
        raise LimitExceededError(
            f"{len(body.inputs)} rows is more than the limit of {settings.max_rows} per request; "
            "split the batch"
        )


def _check_response_size(rows: int, values_per_row: int, limit: int) -> None:
    """Refuse up front a response whose estimated size is above the limit (before computing)."""
    estimate = rows * (ROW_BYTES + values_per_row * FLOAT_BYTES)
    if estimate > limit:
        raise LimitExceededError(
            f"the response would be about {estimate} bytes, above the limit of {limit} "
            "(max_response_bytes); send fewer rows, or ask for fewer samples or none returned"
        )


async def _tensor(
    body: schemas.PredictRequest, handle: ModelHandle, request: Request, registry: Registry
) -> torch.Tensor:
    large = len(body.inputs) * math.prod(handle.spec.input_shape) > LARGE_INPUT_VALUES
    x = await _off_loop(large, convert.to_tensor, body.inputs, handle.predictor)
    registry.arrivals.settle(request.scope)  # read and valid: its job queues now
    return x


@router.post(
    "/models/{name}/predict",
    response_model=schemas.PredictResponse,
    tags=[INFERENCE_TAG],
    responses=_ERRORS,
)
async def predict(
    name: str,
    body: schemas.PredictRequest,
    request: Request,
    registry: RegistryDep,
    settings: SettingsDep,
) -> Response:
    """Deterministic prediction (dropout off): probabilities and label, or the value in original
    units."""
    handle = registry.get(name)
    _check_rows(body, settings)
    rows, k = len(body.inputs), handle.spec.n_outputs
    _check_response_size(rows, 2 * k, settings.max_response_bytes)
    x = await _tensor(body, handle, request, registry)
    prediction = await handle.predict(x, gone=_disconnected(request))
    response = await _off_loop(
        rows * k > LARGE_RESPONSE_VALUES, convert.predict_response, handle.predictor, prediction
    )
    return await _off_loop(
        rows * k > LARGE_RESPONSE_VALUES, _render, response, settings.max_response_bytes
    )


def _n_samples(body: schemas.UncertaintyRequest, handle: ModelHandle, settings: Settings) -> int:
    if body.n_samples is None:
        default = settings.default_n_samples or handle.spec.default_n_samples
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
    tags=[INFERENCE_TAG],
    responses=_ERRORS,
)
async def uncertainty(
    name: str,
    body: schemas.UncertaintyRequest,
    request: Request,
    registry: RegistryDep,
    settings: SettingsDep,
) -> Response:
    """MC-dropout uncertainty: ``n_samples`` stochastic passes per row, summarised (mean,
    variance, std; entropy, mutual information, variation ratio for classifiers; interval and
    epistemic/aleatoric split for regressors)."""
    handle = registry.get(name)
    _check_rows(body, settings)
    n_samples = _n_samples(body, handle, settings)
    rows, k = len(body.inputs), handle.spec.n_outputs
    total = rows * n_samples
    if total > settings.max_row_samples:
        raise LimitExceededError(
            f"rows × n_samples = {rows} × {n_samples} = {total} is above the limit "
            f"of {settings.max_row_samples}; send fewer rows or ask for fewer samples"
        )
    if body.return_samples and total > settings.max_returned_samples:
        raise LimitExceededError(
            f"return_samples with rows × n_samples = {total} is above the limit of "
            f"{settings.max_returned_samples}"
        )
    values = 7 * k + (n_samples * k if body.return_samples else 0)
    _check_response_size(rows, values, settings.max_response_bytes)
    options = MCOptions(n_samples, body.level, body.return_samples)
    x = await _tensor(body, handle, request, registry)
    seed = fresh_seed() if body.seed is None else body.seed
    summary, samples = await handle.uncertainty(x, options, seed=seed, gone=_disconnected(request))
    large = rows * values > LARGE_RESPONSE_VALUES
    response = await _off_loop(
        large,
        convert.uncertainty_response,
        handle.predictor,
        summary,
        samples,
        seed=seed,
        level=body.level,
    )
    return await _off_loop(large, _render, response, settings.max_response_bytes, exclude_none=True)
