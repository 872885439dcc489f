"""The endpoints. All are ``async``: model work goes through the model's batcher, which runs
small work on the event loop and larger work in worker threads, and large inputs and responses
are converted in worker threads too, so the loop (and ``/health``) keeps answering while a large
request computes. (A plain ``def`` route would cost two thread handoffs per request, the route
and its response validation, more than a one-row model pass.) FastAPI still parses the JSON body
and validates the response model on the loop; the body limit bounds that work."""

from __future__ import annotations

import asyncio
import email.message
import math
from collections.abc import Callable, Coroutine
from functools import lru_cache, partial
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute

from mcdrop.masks import fresh_seed
from mcdrop.predictor import Predictor, check_finite
from service import convert, schemas
from service.config import Settings
from service.deps import RegistryDep, SettingsDep
from service.errors import LimitExceededError, UnsupportedMediaTypeError

router = APIRouter()

# The statuses each route can answer besides 200, and nothing else (a route that cannot 422 must
# not list it). Once an API key can be required, every route but /health and /ready adds 401.
_STATUS_TEXT = {
    400: "the body is not valid JSON",
    404: "unknown model",
    413: "request body too large",
    415: "the body is not application/json",
    422: "invalid inputs or options, a limit exceeded, or outputs that are not finite",
    500: "the model failed while computing (see the server log)",
    503: "the model is still loading, or failed to load",
}


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
    """Readiness: 200 once every model has loaded and run a warm-up pass, else 503."""
    status, models = registry.readiness()
    body = schemas.Readiness(status=status, models=models)
    if status != "ready":
        return JSONResponse(status_code=503, content=body.model_dump())
    return body


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
    openapi_extra={
        "parameters": [
            {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
        ]
    },
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


_INFERENCE_ERRORS = _errors(400, 404, 413, 415, 422, 500, 503)


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
    responses=_INFERENCE_ERRORS,
    dependencies=[Depends(require_json)],
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
    check_finite(prediction)  # this request's rows only: a merged batch is not checked whole
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
    responses=_INFERENCE_ERRORS,
    dependencies=[Depends(require_json)],
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
    check_finite(summary, samples)
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
