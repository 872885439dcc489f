"""The native endpoints (the Open Inference Protocol's are in :mod:`service.v2.routes`, and the
checks both share in :mod:`service.dataplane`). All are ``async``: model work goes through the
model's batcher, which runs small work on the event loop and larger work in worker threads, and
large inputs and responses are converted in worker threads too, so the loop (and ``/health``)
keeps answering while a large request computes. (A plain ``def`` route would cost two thread
handoffs per request, the route and its response validation, more than a one-row model pass.)
The inference routes parse their JSON body themselves (:class:`_JsonBodyRoute`: small bodies on
the loop, large ones in a worker thread). Inference responses are rendered to JSON bytes here
(pydantic-core), and their size is bounded.

The path of an inference request, one direction: ``body → registry.get(name) → ModelHandle →
tensor → batcher (with the request's deadline, and a watch for the client going away) → result →
response bytes``."""

from __future__ import annotations

import email.message
import inspect
import json
import math
from collections.abc import Callable, Coroutine
from functools import lru_cache
from typing import Any

import pydantic_core
import torch
from fastapi import APIRouter, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute

from mcdrop import fresh_seed
from mcdrop.checkpoint import ModelSpec
from service import convert, dataplane, schemas
from service.arrivals import INFERENCE_TAG
from service.config import Settings
from service.deps import RegistryDep, SettingsDep, header_lines, registry_and_settings
from service.errors import ServiceError, UnsupportedMediaTypeError, echo
from service.registry import ModelHandle, Registry


class _JsonBodyRoute(APIRoute):
    """The inference routes' handler: ``endpoint(name, body, request)`` with ``body`` parsed
    and validated as FastAPI's own handler does (the same model field, the same errors), but
    without FastAPI's per-request machinery around it (dependency solving, telemetry, endpoint
    context: ~40 µs, a quarter of a one-row prediction's model work; and its per-call wrapping,
    :func:`dataplane.respond`). The route's declaration, and so the OpenAPI schema, is
    FastAPI's as usual.

    - Anything but a JSON body is a 415 (:func:`require_json`), before the body is parsed; so is
      a compressed one (:func:`require_identity`).
    - A large body is parsed in a worker thread: ``json.loads`` of a 4 MB body of image rows
      holds the event loop (and ``/health``) for ~100 ms.
    - A body that is not JSON is a ``json_invalid`` validation error (400), one that cannot be
      decoded at all (nested too deeply, not UTF-8, an integer of thousands of digits) a 400
      HTTP error that says which, an empty one a missing body (422), as FastAPI answers.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.app = dataplane.respond(self.get_route_handler())

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        field, endpoint = self.body_field, self.endpoint
        assert field is not None, "a JSON-body route takes a body"
        # The handler calls the endpoint with these, by name.
        assert list(inspect.signature(endpoint).parameters) == ["name", "body", "request"]

        async def handler(request: Request) -> Response:
            await require_json(request)
            await require_identity(request)
            raw = await request.body()
            if not raw:
                missing = {"type": "missing", "loc": ("body",), "msg": "Field required"}
                raise RequestValidationError([{**missing, "input": None}])
            # The model first (a 404 or 503 before the body is parsed, as on v2): its input
            # size bounds the values a body may hold (dataplane.check_values).
            registry, settings = registry_and_settings(request)
            spec = registry.get(request.path_params["name"]).spec
            try:
                parsed = await dataplane.off_loop(
                    len(raw) > dataplane.LARGE_BODY_BYTES,
                    _loads,
                    raw,
                    spec,
                    settings.max_request_rows,
                )
            except json.JSONDecodeError as exc:
                # Where and why, as the v2 routes say it (FastAPI's "JSON decode error" said
                # neither, and its loc gives only the character's offset).
                error = {
                    "type": "json_invalid",
                    "loc": ("body", exc.pos),
                    "msg": f"{exc.msg} at line {exc.lineno} column {exc.colno}",
                }
                raise RequestValidationError(
                    [{**error, "input": {}, "ctx": {"error": exc.msg}}], body=exc.doc
                ) from exc
            except ServiceError:  # too many keys or values (dataplane.check_*): it says so
                raise
            except RecursionError:  # json.loads recurses once per level
                raise HTTPException(400, "arrays or objects nested too deeply") from None
            except UnicodeDecodeError as exc:
                raise HTTPException(400, f"not UTF-8 (byte {exc.start}: {exc.reason})") from None
            except ValueError as exc:  # an integer of 5000 digits: Python's words, less its advice
                raise HTTPException(400, str(exc).split(";")[0]) from exc
            except Exception as exc:
                raise HTTPException(400, "There was an error parsing the body") from exc
            body, errors = field.validate(parsed, {}, loc=("body",))
            if errors:
                raise RequestValidationError(errors, body=parsed)
            return await endpoint(name=request.path_params["name"], body=body, request=request)

        return handler


def _loads(raw: bytes, spec: ModelSpec, max_rows: int) -> Any:
    dataplane.check_keys(raw)  # before parsing: a million unknown keys cost seconds
    dataplane.check_values(raw, spec, max_rows)  # and parsing 7 M numbers ~0.5 s, the GIL held
    return dataplane.loads(raw)


def _post_json(path: str, **kwargs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``router.post(path, **kwargs)`` with the :class:`_JsonBodyRoute` handler."""

    def register(endpoint: Callable[..., Any]) -> Callable[..., Any]:
        router.add_api_route(
            path, endpoint, methods=["POST"], route_class_override=_JsonBodyRoute, **kwargs
        )
        return endpoint

    return register


router = APIRouter()

# The statuses each route can answer besides 200, and nothing else (a route that cannot 422 must
# not list it). Once an API key can be required, every route but /health and /ready adds 401.
_STATUS_TEXT = {
    400: "the body is not valid JSON",
    404: "unknown model",
    413: "request body too large",
    415: "the body is not application/json, or is compressed (Content-Encoding)",
    408: "the request body did not arrive in time",
    422: "invalid inputs or options, a limit exceeded, outputs that are not finite, or inputs "
    "the model's own forward raised on (model_rejected_input: the message names the exception)",
    500: "the model cannot be sampled (model_error), or the server failed: out of memory, or an "
    "error of its own (internal_error; see the server log)",
    503: "the model is still loading or failed to load, its queue is full (see Retry-After), or "
    "the server is stopping",
    504: "the answer was not ready within the request deadline",
}


#: The ``name`` path parameter, for routes that read it from the path rather than declare it.
NAME_PARAMETER = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {s: {"model": schemas.ErrorResponse, "description": _STATUS_TEXT[s]} for s in statuses}


def _get(path: str, **kwargs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``router.get(path, **kwargs)`` that also answers HEAD (:func:`dataplane.get_and_head`)."""
    return dataplane.get_and_head(router, path, **kwargs)


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


async def require_identity(request: Request) -> None:
    """415 for a compressed body (Content-Encoding): the native routes do not inflate (only the
    Open Inference Protocol's infer takes gzip and deflate, as Triton's client sends them), so
    gzip bytes are refused as such rather than read as JSON. ``identity`` passes, in any case."""
    encoding = header_lines(request, "content-encoding")  # (a coding on a second line too)
    if encoding is None or encoding.strip().lower() in ("", "identity"):
        return
    raise UnsupportedMediaTypeError(
        f"Content-Encoding {echo(encoding)} is not supported on this route; send the body "
        "uncompressed (only the /v2 infer routes take gzip or deflate)",
        headers={"Accept-Encoding": "identity"},  # RFC 9110 §12.5.3: the codings it does take
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
    return schemas.ModelList(
        models=[_info(registry.get(s.name), settings) for s in registry.ready_specs()]
    )


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
    return _info(registry.get(request.path_params["name"]), settings)


def _info(handle: ModelHandle, settings: Settings) -> schemas.ModelInfo:
    spec = handle.spec
    return convert.model_info(
        spec,
        max_n_samples=settings.max_n_samples,
        max_request_rows=settings.max_request_rows,
        default_n_samples=dataplane.default_n_samples(spec, settings),
        calibrated=handle.predictor.model.calibration,
    )


def _render(body: dict[str, Any], limit: int) -> Response:
    """A response body built by :mod:`service.convert` as JSON bytes, refused if larger than
    ``limit`` (written by pydantic-core, as a response model's ``model_dump_json``)."""
    content = pydantic_core.to_json(body)
    dataplane.check_response_bytes(len(content), limit)
    return Response(content, media_type="application/json")


async def _tensor(
    body: schemas.PredictRequest, handle: ModelHandle, request: Request, registry: Registry
) -> torch.Tensor:
    large = len(body.inputs) * math.prod(handle.spec.input_shape) > dataplane.LARGE_INPUT_VALUES
    x = await dataplane.off_loop(large, convert.to_tensor, body.inputs, handle.predictor)
    registry.arrivals.settle(request.scope)  # read and valid: its job queues now
    return x


_INFERENCE_ERRORS = _errors(400, 404, 408, 413, 415, 422, 500, 503, 504)


@_post_json(
    "/models/{name}/predict",
    response_model=schemas.PredictResponse,
    tags=[INFERENCE_TAG],
    responses=_INFERENCE_ERRORS,
)
async def predict(name: str, body: schemas.PredictRequest, request: Request) -> Response:
    """Deterministic prediction (dropout off): probabilities and label, or the value in original
    units."""
    registry, settings = registry_and_settings(request)
    handle = registry.get(name)
    rows, k = len(body.inputs), handle.spec.n_outputs
    dataplane.check_rows(rows, settings)
    dataplane.check_response_size(rows, 2 * k, settings.max_response_bytes)
    x = await _tensor(body, handle, request, registry)
    prediction = await handle.predict(x, gone=dataplane.disconnected(request))
    large = rows * k > dataplane.LARGE_RESPONSE_VALUES
    # The body checks this request's outputs finite (its rows only, not a merged batch's).
    response = await dataplane.off_loop(large, convert.predict_body, handle.predictor, prediction)
    return await dataplane.off_loop(large, _render, response, settings.max_response_bytes)


@_post_json(
    "/models/{name}/uncertainty",
    response_model=schemas.UncertaintyResponse,
    response_model_exclude_none=True,
    tags=[INFERENCE_TAG],
    responses=_INFERENCE_ERRORS,
)
async def uncertainty(name: str, body: schemas.UncertaintyRequest, request: Request) -> Response:
    """MC-dropout uncertainty: ``n_samples`` stochastic passes per row, summarised (mean,
    variance, std; entropy, mutual information, variation ratio for classifiers; interval and
    epistemic/aleatoric split for regressors). With ``n_samples: "auto"`` each row samples until
    its MC standard error is within ``tolerance`` (or it has ``max_n_samples``), and each result
    says how many samples it used."""
    registry, settings = registry_and_settings(request)
    handle = registry.get(name)
    rows, k = len(body.inputs), handle.spec.n_outputs
    dataplane.check_rows(rows, settings)
    options = dataplane.mc_options(
        rows,
        body.n_samples,
        body.level,
        body.return_samples,
        handle,
        settings,
        tolerance=body.tolerance,
        max_n_samples=body.max_n_samples,
    )
    decision = dataplane.decision_request(
        handle,
        reject_rate=body.reject_rate,
        reject_threshold=body.reject_threshold,
        reject_score=body.reject_score,
        coverage=body.coverage,
    )
    auto = options.tolerance is not None
    # A result's lists of K: a classifier's probabilities, mean, variance and std, and its
    # prediction set (labels, as long as a number or less, else the rendered size refuses);
    # a regressor's mean, variance, std, two variances, two bounds, and two conformal ones.
    classifier = handle.spec.task == "classification"
    lists = (4 if classifier else 7) + (0 if decision.coverage is None else 1 + (not classifier))
    values = lists * k + (options.n_samples * k if body.return_samples else 0)
    dataplane.check_response_size(rows, values, settings.max_response_bytes)
    x = await _tensor(body, handle, request, registry)
    seed = fresh_seed() if body.seed is None else body.seed
    summary, samples = await handle.uncertainty(
        x, options, seed=seed, gone=dataplane.disconnected(request)
    )
    large = rows * values > dataplane.LARGE_RESPONSE_VALUES
    # The body checks this request's statistics and samples finite.
    response = await dataplane.off_loop(
        large,
        convert.uncertainty_body,
        handle.predictor,
        summary,
        samples,
        seed=seed,
        level=body.level,
        tolerance=options.tolerance,
        max_n_samples=options.n_samples if auto else None,
        decision=decision,
    )
    return await dataplane.off_loop(large, _render, response, settings.max_response_bytes)
