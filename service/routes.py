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
import contextlib
import email.message
import json
import math
from collections.abc import Awaitable, Callable, Coroutine
from functools import lru_cache, partial
from typing import Any, TypeVar

import torch
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel

from mcdrop import adaptive
from mcdrop.masks import fresh_seed
from mcdrop.predictor import check_finite
from service import convert, schemas
from service.arrivals import INFERENCE_TAG
from service.batching import MCOptions
from service.config import Settings
from service.deps import RegistryDep, SettingsDep
from service.errors import LimitExceededError, UnsupportedMediaTypeError
from service.registry import ModelHandle, Registry


class _OffLoopBody(APIRoute):
    """A route that parses a large JSON body in a worker thread: FastAPI's own ``json.loads``
    runs on the event loop, and a 4 MB body of image rows holds it (and ``/health``) for
    ~100 ms. The parsed body is left where Starlette's ``Request.json()`` caches it, so
    FastAPI validates it as usual (and a body that is not JSON fails there, as before)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()

        async def handler(request: Request) -> Response:
            body = await request.body()
            if len(body) > LARGE_BODY_BYTES and is_json(request.headers.get("content-type")):
                with contextlib.suppress(ValueError):  # not JSON: FastAPI reports it
                    request._json = await asyncio.to_thread(json.loads, body)
            return await handle(request)

        return handler


#: Bodies above this are parsed off the event loop.
LARGE_BODY_BYTES = 256 * 1024

router = APIRouter(route_class=_OffLoopBody)

# The statuses each route can answer besides 200, and nothing else (a route that cannot 422 must
# not list it). Once an API key can be required, every route but /health and /ready adds 401.
_STATUS_TEXT = {
    400: "the body is not valid JSON",
    404: "unknown model",
    413: "request body too large",
    415: "the body is not application/json",
    408: "the request body did not arrive in time",
    422: "invalid inputs or options, a limit exceeded, or outputs that are not finite",
    500: "the model failed while computing (see the server log)",
    503: "the model is still loading or failed to load, its queue is full (see Retry-After), or "
    "the server is stopping",
    504: "the answer was not ready within the request deadline",
}


#: The ``name`` path parameter, for routes that read it from the path rather than declare it.
NAME_PARAMETER = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {s: {"model": schemas.ErrorResponse, "description": _STATUS_TEXT[s]} for s in statuses}


class _HeadRoute(APIRoute):
    """HEAD of a GET route: the GET's status and headers (its Content-Length included), no
    body (RFC 9110 §9.3.2)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        get = super().get_route_handler()

        async def head(request: Request) -> Response:
            response = await get(request)
            return Response(status_code=response.status_code, headers=dict(response.headers))

        return head


def _get(path: str, **kwargs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``router.get(path, **kwargs)`` that also answers HEAD. The HEAD twin is a route of its
    own, kept out of the OpenAPI schema (one route with both methods would document HEAD too,
    under the same operation id as GET)."""

    def register(endpoint: Callable[..., Any]) -> Callable[..., Any]:
        router.add_api_route(
            path,
            endpoint,
            methods=["HEAD"],
            include_in_schema=False,
            route_class_override=_HeadRoute,
            **kwargs,
        )
        return router.get(path, **kwargs)(endpoint)

    return register


@lru_cache(maxsize=64)
def is_json(content_type: str | None) -> bool:
    """Whether a Content-Type header names JSON: ``application/json`` or ``application/*+json``,
    with any parameters (e.g. ``; charset=utf-8``); the same test FastAPI applies before it
    parses a body. (Cached: parsing the header costs more than a dict lookup, and clients send
    the same few values.)"""
    if not content_type:
        return False
    header = email.message.Message()
    header["content-type"] = content_type
    subtype = header.get_content_subtype()
    return header.get_content_maintype() == "application" and (
        subtype == "json" or subtype.endswith("+json")
    )


async def require_json(request: Request) -> None:
    """415 unless the body is declared JSON. A missing Content-Type is refused too: FastAPI would
    not parse such a body, and ``curl -d`` sends form encoding unless told otherwise."""
    content_type = request.headers.get("content-type")
    if not is_json(content_type):
        got = f"Content-Type {content_type!r}" if content_type else "no Content-Type"
        raise UnsupportedMediaTypeError(
            f"the body must be JSON sent as Content-Type: application/json, got {got[:100]} "
            "(with curl: -H 'content-type: application/json')"
        )


@_get("/health", response_model=schemas.Health, tags=["status"])
async def health() -> schemas.Health:
    """Liveness: the process answers."""
    return schemas.Health(status="ok")


@_get(
    "/ready",
    response_model=schemas.Readiness,
    tags=["status"],
    responses={503: {"model": schemas.Readiness, "description": "not every model is ready"}},
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


@_get(
    "/models/{name}/ready",
    response_model=schemas.ModelReadiness,
    response_model_exclude_none=True,
    tags=["status"],
    responses={
        **_errors(404),
        503: {"model": schemas.ModelReadiness, "description": "loading, or failed to load"},
    },
    openapi_extra={"parameters": [NAME_PARAMETER]},  # no 422: see get_model
)
async def model_ready(request: Request, registry: RegistryDep) -> Any:
    """One model's readiness: 200 once it has loaded and run a warm-up pass; 503 while it loads
    or if it failed to load, with the reason."""
    name = request.path_params["name"]
    status, reason = registry.model_readiness(name)
    body = schemas.ModelReadiness(name=name, status=status, reason=reason)
    if status != "ready":
        return JSONResponse(status_code=503, content=body.model_dump(exclude_none=True))
    return body


@_get(
    "/metrics",
    tags=["status"],
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}},
)
async def metrics(request: Request) -> Response:
    """Prometheus metrics: per model requests, rows, executions, queue and compute time."""
    body, content_type = request.app.state.metrics.scrape()
    return Response(body, media_type=content_type)


@_get("/models", response_model=schemas.ModelList, tags=["models"])
async def list_models(registry: RegistryDep, settings: SettingsDep) -> schemas.ModelList:
    """The models that are loaded."""
    return schemas.ModelList(models=[_info(s, settings) for s in registry.ready_specs()])


@_get(
    "/models/{name}",
    response_model=schemas.ModelInfo,
    tags=["models"],
    responses=_errors(404, 503),
    # ``name`` is read from the path rather than declared: FastAPI documents a 422 for every
    # route with a declared parameter, and no name can fail validation here.
    openapi_extra={"parameters": [NAME_PARAMETER]},
)
async def get_model(
    request: Request, registry: RegistryDep, settings: SettingsDep
) -> schemas.ModelInfo:
    """What a client needs to call a model: task, input shape, labels, sample limits, metrics."""
    return _info(registry.get(request.path_params["name"]).spec, settings)


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


_INFERENCE_ERRORS = _errors(400, 404, 408, 413, 415, 422, 500, 503, 504)


@router.post(
    "/models/{name}/predict",
    response_model=schemas.PredictResponse,
    tags=[INFERENCE_TAG],
    responses=_INFERENCE_ERRORS,
    dependencies=[Depends(require_json)],
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
    check_finite(prediction)  # this request's rows only: a merged batch is not checked whole
    response = await _off_loop(
        rows * k > LARGE_RESPONSE_VALUES, convert.predict_response, handle.predictor, prediction
    )
    return await _off_loop(
        rows * k > LARGE_RESPONSE_VALUES, _render, response, settings.max_response_bytes
    )


def _n_samples(body: schemas.UncertaintyRequest, handle: ModelHandle, settings: Settings) -> int:
    """The samples per row, or with ``n_samples: "auto"`` the most a row may use."""
    if body.n_samples == "auto":
        if body.max_n_samples is None:
            return min(adaptive.DEFAULT_MAX_N_SAMPLES, settings.max_n_samples)
        if body.max_n_samples > settings.max_n_samples:
            raise LimitExceededError(
                f"max_n_samples={body.max_n_samples} is above the limit of {settings.max_n_samples}"
            )
        return body.max_n_samples
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
    responses=_INFERENCE_ERRORS,
    dependencies=[Depends(require_json)],
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
    epistemic/aleatoric split for regressors). With ``n_samples: "auto"`` each row samples until
    its MC standard error is within ``tolerance`` (or it has ``max_n_samples``), and each result
    says how many samples it used."""
    handle = registry.get(name)
    _check_rows(body, settings)
    n_samples = _n_samples(body, handle, settings)
    auto = body.n_samples == "auto"
    # An adaptive request is held to the limits as if every row used max_n_samples.
    what = "max_n_samples" if auto else "n_samples"
    rows, k = len(body.inputs), handle.spec.n_outputs
    total = rows * n_samples
    if total > settings.max_row_samples:
        raise LimitExceededError(
            f"rows × {what} = {rows} × {n_samples} = {total} is above the limit "
            f"of {settings.max_row_samples}; send fewer rows or ask for fewer samples"
        )
    if body.return_samples and total > settings.max_returned_samples:
        raise LimitExceededError(
            f"return_samples with rows × {what} = {total} is above the limit of "
            f"{settings.max_returned_samples}"
        )
    values = 7 * k + (n_samples * k if body.return_samples else 0)
    _check_response_size(rows, values, settings.max_response_bytes)
    tolerance = None
    if auto:
        tolerance = adaptive.DEFAULT_TOLERANCE if body.tolerance is None else body.tolerance
    options = MCOptions(n_samples, body.level, body.return_samples, tolerance)
    x = await _tensor(body, handle, request, registry)
    seed = fresh_seed() if body.seed is None else body.seed
    summary, samples = await handle.uncertainty(x, options, seed=seed, gone=_disconnected(request))
    check_finite(summary, samples)
    large = rows * values > LARGE_RESPONSE_VALUES
    response = await _off_loop(
        large,
        convert.uncertainty_response,
        handle.predictor,
        summary,
        samples,
        seed=seed,
        level=body.level,
        tolerance=tolerance,
        max_n_samples=n_samples if auto else None,
    )
    return await _off_loop(large, _render, response, settings.max_response_bytes, exclude_none=True)
