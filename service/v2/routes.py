"""The Open Inference Protocol's REST endpoints (KServe V2, Triton's HTTP API), beside the native
ones and over the same models: the same :class:`~service.registry.ModelHandle` (so the same
batching, queues, deadlines and seeds) and the same limits (:mod:`service.dataplane`). Only the
encoding differs (:mod:`service.v2.codec`), and the error shape, which :mod:`service.errors`
picks for paths under ``/v2``.

Each model has one version, its manifest's ``version``; naming another is a 404.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from mcdrop import fresh_seed
from mcdrop.calibration import DecisionRequest
from mcdrop.predictor import Prediction, Summary
from service import dataplane
from service.arrivals import INFERENCE_TAG
from service.config import Settings
from service.deps import RegistryDep, header_lines, registry_and_settings
from service.errors import ModelNotFoundError, echo
from service.registry import ModelHandle, Registry
from service.v2 import codec, outputs, schemas

router = APIRouter(prefix="/v2", tags=["open inference protocol"])

PLATFORM = "pytorch_mcdrop"
#: The input's name in the metadata (a request's one input may have any name).
INPUT = "inputs"
EXTENSIONS = ["binary_tensor_data"]

# The statuses each route can answer besides 200, and nothing else (the protocol has no 422).
_STATUS_TEXT = {
    400: "a malformed request or tensor, an unknown parameter or output, a limit exceeded, or "
    "inputs the model's own forward raised on (the message names the exception)",
    404: "unknown model or version",
    408: "the request body did not arrive in time",
    413: "request body too large",
    500: "the model cannot be sampled, or the server failed: out of memory, or an error of its "
    "own (see the server log)",
    503: "the model is still loading or failed to load, its queue is full (see Retry-After), or "
    "the server is stopping",
    504: "the answer was not ready within the request deadline",
}


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {s: {"model": schemas.ErrorResponse, "description": _STATUS_TEXT[s]} for s in statuses}


def _path_parameters(*names: str) -> dict[str, Any]:
    """Path parameters read from the path rather than declared: FastAPI documents a 422 for
    every route with a declared parameter, and no name or version can fail validation here."""
    parameters = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        for name in names
    ]
    return {"parameters": parameters}


def _inline(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` with its ``$defs`` written in place of each ``$ref`` (the request body is read
    as bytes, so FastAPI does not list its models among the components)."""
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return resolve(defs[node["$ref"].rsplit("/", 1)[1]])
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    return resolve(schema)


_INFER_BODY = {
    "requestBody": {
        "required": True,
        "description": "an $inference_request; with binary tensor data, the JSON then the "
        "tensors' bytes, Inference-Header-Content-Length giving the JSON's length",
        "content": {
            "application/json": {"schema": _inline(schemas.InferenceRequest.model_json_schema())}
        },
    }
}


def _infer_route(path: str, *names: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``router.post(path)`` for an infer endpoint, which reads its own body: called with the
    request alone (:class:`~service.dataplane.RequestRoute`)."""

    def register(endpoint: Callable[..., Any]) -> Callable[..., Any]:
        router.add_api_route(
            path,
            endpoint,
            methods=["POST"],
            route_class_override=dataplane.RequestRoute,
            tags=[INFERENCE_TAG],
            response_class=Response,
            responses={
                200: {
                    "model": schemas.InferenceResponse,
                    "description": "the output tensors: JSON, or with binary outputs the JSON "
                    "then their bytes (application/octet-stream, Inference-Header-Content-Length)",
                    "content": {"application/octet-stream": {}},
                },
                **_errors(400, 404, 408, 413, 500, 503, 504),
            },
            openapi_extra={**_path_parameters(*names), **_INFER_BODY},
        )
        return endpoint

    return register


# The infer routes first: FastAPI tries routes in order, and these take the traffic.
@_infer_route("/models/{name}/infer", "name")
async def infer(request: Request) -> Response:
    """Inference: an ``$inference_request`` (JSON, or JSON then binary tensor data), answered
    with the named output tensors. ``parameters``: ``mode`` (``uncertainty``, the default, or
    ``predict``), ``n_samples`` (a count, or ``"auto"`` with ``tolerance`` and
    ``max_n_samples``: the ``n_samples`` output then says how many each row used), ``seed``,
    ``level``, ``binary_data_output``, ``timeout`` (µs); decisions: ``reject_rate`` or
    ``reject_threshold`` (and ``reject_score``) for a BOOL ``reject`` output, ``coverage`` for
    ``prediction_set`` or ``conformal_lower``/``_upper``."""
    return await _infer(request, *registry_and_settings(request))


@_infer_route("/models/{name}/versions/{version}/infer", "name", "version")
async def infer_version(request: Request) -> Response:
    """Inference on a model version (see ``/v2/models/{name}/infer``)."""
    return await _infer(request, *registry_and_settings(request))


def _get(path: str, **kwargs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return dataplane.get_and_head(router, path, **kwargs)


@_get("", response_model=schemas.ServerMetadata)
async def server_metadata(request: Request) -> schemas.ServerMetadata:
    """Server metadata: name, version and the protocol extensions supported."""
    return schemas.ServerMetadata(name="mcdrop", version=request.app.version, extensions=EXTENSIONS)


@_get("/health/live", response_model=schemas.ServerLive)
async def live() -> schemas.ServerLive:
    """Liveness: the process answers."""
    return schemas.ServerLive(live=True)


@_get(
    "/health/ready",
    response_model=schemas.ServerReady,
    responses={503: {"model": schemas.ServerReady, "description": "not every model is ready"}},
)
async def ready(registry: RegistryDep) -> Any:
    """Readiness, as ``GET /ready``: 200 once the models serve (all, or with exit_on_error off
    all but those that failed to load); else 503."""
    status, _ = registry.readiness()
    if status in ("ready", "degraded"):
        return schemas.ServerReady(ready=True)
    return JSONResponse(status_code=503, content={"ready": False})


def _handle(registry: Registry, request: Request) -> ModelHandle:
    """The model the path names, at the version it names (if it does)."""
    name, version = request.path_params["name"], request.path_params.get("version")
    handle = registry.get(name)
    if version is not None and version != handle.spec.version:
        raise ModelNotFoundError(
            f"model {name!r} has no version {echo(version)}; versions: [{handle.spec.version!r}]"
        )
    return handle


def _ready_route(path: str, *names: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return _get(
        path,
        response_model=schemas.ModelReady,
        response_model_exclude_none=True,
        responses={
            **_errors(404),
            503: {"model": schemas.ModelReady, "description": "loading, or failed to load"},
        },
        openapi_extra=_path_parameters(*names),
    )


@_ready_route("/models/{name}/ready", "name")
async def model_ready(request: Request, registry: RegistryDep) -> Any:
    """One model's readiness: 200 once loaded and warmed up; 503 while it loads or if it failed
    (``error`` says why)."""
    return _model_ready(registry, request)


@_ready_route("/models/{name}/versions/{version}/ready", "name", "version")
async def model_version_ready(request: Request, registry: RegistryDep) -> Any:
    """One model version's readiness."""
    return _model_ready(registry, request)


def _model_ready(registry: Registry, request: Request) -> Any:
    name = request.path_params["name"]
    state, reason = registry.model_readiness(name)
    if state == "ready":
        _handle(registry, request)  # 404 for another version
        return schemas.ModelReady(name=name, ready=True)
    error = "is still loading" if state == "loading" else f"failed to load: {reason}"
    body = schemas.ModelReady(name=name, ready=False, error=f"model {name!r} {error}")
    return JSONResponse(status_code=503, content=body.model_dump())


def _metadata_route(path: str, *names: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return _get(
        path,
        response_model=schemas.ModelMetadata,
        responses=_errors(404, 503),
        openapi_extra=_path_parameters(*names),
    )


@_metadata_route("/models/{name}", "name")
async def model_metadata(request: Request, registry: RegistryDep) -> schemas.ModelMetadata:
    """A model's input (one FP32 tensor, any name, shape [-1, *input_shape]) and outputs (every
    mode's; see the README; the decision outputs, ``reject``, ``prediction_set``,
    ``conformal_lower`` and ``conformal_upper``, come with their request parameters)."""
    return _metadata(_handle(registry, request))


@_metadata_route("/models/{name}/versions/{version}", "name", "version")
async def model_version_metadata(request: Request, registry: RegistryDep) -> schemas.ModelMetadata:
    """A model version's metadata."""
    return _metadata(_handle(registry, request))


def _metadata(handle: ModelHandle) -> schemas.ModelMetadata:
    spec = handle.spec
    return schemas.ModelMetadata(
        name=spec.name,
        versions=[spec.version],
        platform=PLATFORM,
        inputs=[schemas.MetadataTensor(name=INPUT, datatype="FP32", shape=[-1, *spec.input_shape])],
        # The decision outputs come only with their parameters (reject_rate, coverage, ...),
        # so they are documented there, not listed as outputs every request gets.
        outputs=[
            schemas.MetadataTensor(name=name, datatype=info.datatype, shape=info.shape)
            for name, info in outputs.catalog(spec).items()
            if name not in outputs.DECISIONS
        ],
    )


async def _infer(request: Request, registry: Registry, settings: Settings) -> Response:
    read_at = time.monotonic()  # the body is in: a timeout counts from here
    handle = _handle(registry, request)
    spec, predictor = handle.spec, handle.predictor
    raw, encoding = await request.body(), header_lines(request, "content-encoding")
    body = await dataplane.off_loop(
        codec.inflates_large(len(raw), encoding, settings.max_body_bytes),
        codec.decompress,
        raw,
        encoding,
        settings.max_body_bytes,
    )
    parsed = await dataplane.off_loop(
        len(body) > dataplane.LARGE_BODY_BYTES,
        codec.parse_request,
        body,
        header_lines(request, codec.HEADER_LENGTH),
        spec,
        settings.max_request_rows,
    )
    params = parsed.parameters
    tensor = codec.the_input(parsed.header, predictor)
    rows = codec.rows_of(tensor, predictor)
    dataplane.check_rows(rows, settings)
    # None named (no "outputs", or [] as Triton reads it): the default outputs.
    requested = (
        [(o.name, o.parameters.binary_data) for o in parsed.header.outputs]
        if parsed.header.outputs
        else None
    )
    auto = params.n_samples == "auto"
    decision = (
        dataplane.decision_request(
            handle,
            reject_rate=params.reject_rate,
            reject_threshold=params.reject_threshold,
            reject_score=params.reject_score,
            coverage=params.coverage,
        )
        if params.mode == outputs.UNCERTAINTY
        else None
    )
    selected = outputs.select(
        spec, params.mode, requested, params.binary_data_output, decision=decision, adaptive=auto
    )
    wants_samples = any(s.name == outputs.SAMPLES for s in selected)
    options = None
    if params.mode == outputs.UNCERTAINTY:
        level = 0.95 if params.level is None else params.level
        options = dataplane.mc_options(
            rows,
            params.n_samples,
            level,
            wants_samples,
            handle,
            settings,
            tolerance=params.tolerance,
            max_n_samples=params.max_n_samples,
        )
    n_samples = 0 if options is None else options.n_samples
    values, binary = outputs.values_per_row(selected, n_samples)
    dataplane.check_response_size(
        rows, values, settings.max_response_bytes, binary_values_per_row=binary
    )
    x = await dataplane.off_loop(
        rows * math.prod(spec.input_shape) > dataplane.LARGE_INPUT_VALUES,
        codec.decode_input,
        parsed,
        predictor,
    )
    registry.arrivals.settle(request.scope)  # read and valid: its job queues now
    deadline = dataplane.Deadline.of(params.timeout, read_at)
    header: dict[str, Any] = {"model_name": spec.name, "model_version": spec.version}
    if parsed.header.id is not None:
        header["id"] = parsed.header.id
    gone = dataplane.disconnected(request)
    samples, checked = None, False
    if options is None:
        prediction = await deadline.keep(
            lambda timeout_s: handle.predict(x, gone=gone, timeout_s=timeout_s)
        )
        result: Prediction | Summary = prediction
        tensors = outputs.predict_tensors(spec, prediction)
        header["parameters"] = {"mode": outputs.PREDICT}
    else:
        seed = fresh_seed() if params.seed is None else params.seed
        summary, samples = await deadline.keep(
            lambda timeout_s: handle.uncertainty(
                x, options, seed=seed, gone=gone, timeout_s=timeout_s
            )
        )
        result = summary
        tensors = outputs.uncertainty_tensors(spec, summary, samples)
        header["parameters"] = {"mode": outputs.UNCERTAINTY, "n_samples": options.n_samples}
        if auto:  # as the native response: "auto", its tolerance, and the most a row may use
            header["parameters"] |= {
                "n_samples": "auto",
                "tolerance": options.tolerance,
                "max_n_samples": options.n_samples,
            }
        header["parameters"] |= {"seed": seed, "level": options.level}
        if decision is not None and not decision.empty:
            # Decisions are made on a summary checked finite first.
            dataplane.check_finite(summary, samples)
            checked = True
            tensors |= outputs.decision_tensors(decision, summary)
            header["parameters"] |= _decision_parameters(decision)
    content, header_length, seen_finite = await dataplane.off_loop(
        rows * (values + binary) > dataplane.LARGE_RESPONSE_VALUES,
        _encode,
        header,
        selected,
        tensors,
    )
    # This request's rows only (not a merged batch's), as the native routes; the outputs the
    # encoder wrote as JSON were seen finite on the way (the default outputs are every
    # statistic), so only the others are checked here.
    if not checked:
        dataplane.check_finite(result, samples, seen_finite=seen_finite)
    dataplane.check_response_bytes(len(content), settings.max_response_bytes)
    if header_length is None:
        return Response(content, media_type=codec.JSON_TYPE)
    return Response(
        content,
        media_type=codec.BINARY_TYPE,
        headers={"Inference-Header-Content-Length": str(header_length)},
    )


def _encode(
    header: dict[str, Any], selected: list[outputs.Selected], tensors: outputs.Tensors
) -> tuple[bytes, int | None, set[str]]:
    return codec.encode_response(header, [(s, tensors[s.name]()) for s in selected])


def _decision_parameters(decision: DecisionRequest) -> dict[str, Any]:
    """What a response's ``parameters`` say of its decisions (those asked for)."""
    given = {
        "reject_score": decision.reject_score,
        "reject_threshold": decision.reject_threshold,
        "reject_rate": decision.reject_rate,
        "coverage": decision.coverage,
    }
    return {k: v for k, v in given.items() if v is not None}
