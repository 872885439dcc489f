"""The Open Inference Protocol's REST endpoints (KServe V2, Triton's HTTP API), beside the native
ones and over the same models: the same :class:`~service.registry.ModelHandle` (so the same
batching, queues, deadlines and seeds) and the same limits (:mod:`service.dataplane`). Only the
encoding differs (:mod:`service.v2.codec`), and the error shape, which :mod:`service.errors`
picks for paths under ``/v2``.

Each model has one version, its manifest's ``version``; naming another is a 404.
"""

from __future__ import annotations

import math
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from mcdrop.masks import fresh_seed
from mcdrop.predictor import check_finite
from service import dataplane
from service.arrivals import INFERENCE_TAG
from service.config import Settings
from service.deps import RegistryDep, SettingsDep
from service.errors import ModelNotFoundError
from service.registry import ModelHandle, Registry
from service.v2 import codec, outputs, schemas

router = APIRouter(prefix="/v2", tags=["open inference protocol"])

PLATFORM = "pytorch_mcdrop"
#: The input's name in the metadata (a request's one input may have any name).
INPUT = "inputs"
EXTENSIONS = ["binary_tensor_data"]
#: Past this many body bytes, parsing the request runs in a worker thread, not on the loop.
LARGE_BODY_BYTES = 200_000

_ERRORS = dataplane.error_docs(
    schemas.ErrorResponse,
    {
        400: "malformed request or tensor, or a limit exceeded",
        404: "unknown model or version",
        413: "request body too large",
        503: "model still loading or failed to load, its queue is full, or shutting down",
        504: "the answer was not ready within the request deadline",
    },
)


# The infer routes first: FastAPI tries routes in order, and these take the traffic.
_INFER: dict[str, Any] = {
    "tags": [INFERENCE_TAG],
    "responses": {200: {"model": schemas.InferenceResponse}, **_ERRORS},
    "response_class": Response,
}


@router.post("/models/{name}/infer", **_INFER)
async def infer(name: str, request: Request, registry: RegistryDep, settings: SettingsDep) -> Any:
    """Inference: an ``$inference_request`` (JSON, or JSON then binary tensor data), answered
    with the named output tensors. ``parameters``: ``mode`` (``uncertainty``, the default, or
    ``predict``), ``n_samples``, ``seed``, ``level``, ``binary_data_output``, ``timeout`` (µs)."""
    return await _infer(name, None, request, registry, settings)


@router.post("/models/{name}/versions/{version}/infer", **_INFER)
async def infer_version(
    name: str, version: str, request: Request, registry: RegistryDep, settings: SettingsDep
) -> Any:
    """Inference on a model version (see ``/v2/models/{name}/infer``)."""
    return await _infer(name, version, request, registry, settings)


@router.get("", response_model=schemas.ServerMetadata)
async def server_metadata(request: Request) -> schemas.ServerMetadata:
    """Server metadata: name, version and the protocol extensions supported."""
    return schemas.ServerMetadata(name="mcdrop", version=request.app.version, extensions=EXTENSIONS)


@router.get("/health/live", response_model=schemas.ServerLive)
async def live() -> schemas.ServerLive:
    """Liveness: the process answers."""
    return schemas.ServerLive(live=True)


@router.get(
    "/health/ready",
    response_model=schemas.ServerReady,
    responses={503: {"model": schemas.ServerReady}},
)
async def ready(registry: RegistryDep) -> Any:
    """Readiness, as ``GET /ready``: 200 once the models serve (all, or with exit_on_error off
    all but those that failed to load); else 503."""
    status, _ = registry.readiness()
    if status in ("ready", "degraded"):
        return schemas.ServerReady(ready=True)
    return JSONResponse(status_code=503, content={"ready": False})


def _handle(registry: Registry, name: str, version: str | None) -> ModelHandle:
    handle = registry.get(name)
    if version is not None and version != handle.spec.version:
        raise ModelNotFoundError(
            f"model {name!r} has no version {version!r}; versions: [{handle.spec.version!r}]"
        )
    return handle


def _model_ready(registry: Registry, name: str, version: str | None) -> Any:
    state, reason = registry.model_readiness(name)
    if state == "ready":
        _handle(registry, name, version)
        return schemas.ModelReady(name=name, ready=True)
    error = "still loading" if state == "loading" else f"failed to load: {reason}"
    body = schemas.ModelReady(name=name, ready=False, error=f"model {name!r} {error}")
    return JSONResponse(status_code=503, content=body.model_dump())


_READY: dict[str, Any] = {
    "response_model": schemas.ModelReady,
    "response_model_exclude_none": True,
    "responses": {404: _ERRORS[404], 503: {"model": schemas.ModelReady}},
}


@router.get("/models/{name}/ready", **_READY)
async def model_ready(name: str, registry: RegistryDep) -> Any:
    """One model's readiness: 200 once loaded and warmed up; 503 while it loads or if it failed
    (``error`` says why)."""
    return _model_ready(registry, name, None)


@router.get("/models/{name}/versions/{version}/ready", **_READY)
async def model_version_ready(name: str, version: str, registry: RegistryDep) -> Any:
    """One model version's readiness."""
    return _model_ready(registry, name, version)


def _metadata(handle: ModelHandle) -> schemas.ModelMetadata:
    spec = handle.spec
    return schemas.ModelMetadata(
        name=spec.name,
        versions=[spec.version],
        platform=PLATFORM,
        inputs=[schemas.MetadataTensor(name=INPUT, datatype="FP32", shape=[-1, *spec.input_shape])],
        outputs=[
            schemas.MetadataTensor(name=name, datatype=info.datatype, shape=info.shape)
            for name, info in outputs.catalog(spec).items()
        ],
    )


@router.get("/models/{name}", response_model=schemas.ModelMetadata, responses=_ERRORS)
async def model_metadata(name: str, registry: RegistryDep) -> schemas.ModelMetadata:
    """A model's input (one FP32 tensor, any name, shape [-1, *input_shape]) and outputs (every
    mode's; see the README)."""
    return _metadata(_handle(registry, name, None))


@router.get(
    "/models/{name}/versions/{version}", response_model=schemas.ModelMetadata, responses=_ERRORS
)
async def model_version_metadata(
    name: str, version: str, registry: RegistryDep
) -> schemas.ModelMetadata:
    """A model version's metadata."""
    return _metadata(_handle(registry, name, version))


async def _infer(
    name: str, version: str | None, request: Request, registry: Registry, settings: Settings
) -> Response:
    handle = _handle(registry, name, version)
    spec, predictor = handle.spec, handle.predictor
    body = codec.decompress(
        await request.body(), request.headers.get("content-encoding"), settings.max_body_bytes
    )
    parsed = await dataplane.off_loop(
        len(body) > LARGE_BODY_BYTES,
        codec.parse_request,
        body,
        request.headers.get(codec.HEADER_LENGTH),
    )
    params = parsed.parameters
    tensor = codec.the_input(parsed.header, predictor)
    rows = codec.rows_of(tensor, predictor)
    dataplane.check_rows(rows, settings)
    requested = (
        None
        if parsed.header.outputs is None
        else [(o.name, o.parameters.binary_data) for o in parsed.header.outputs]
    )
    selected = outputs.select(spec, params.mode, requested, params.binary_data_output)
    wants_samples = any(s.name == outputs.SAMPLES for s in selected)
    options = None
    if params.mode == outputs.UNCERTAINTY:
        level = 0.95 if params.level is None else params.level
        options = dataplane.mc_options(
            rows, params.n_samples, level, wants_samples, handle, settings
        )
    n_samples = 0 if options is None else options.n_samples
    values = sum(s.info.values_per_row(n_samples) for s in selected if not s.binary)
    binary = sum(s.info.values_per_row(n_samples) for s in selected if s.binary)
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
    timeout_s = None if params.timeout is None else params.timeout / 1e6
    header: dict[str, Any] = {"model_name": spec.name, "model_version": spec.version}
    if parsed.header.id is not None:
        header["id"] = parsed.header.id
    gone = dataplane.disconnected(request)
    if options is None:
        prediction = await handle.predict(x, gone=gone, timeout_s=timeout_s)
        check_finite(prediction)  # this request's rows only, as the native routes
        tensors = outputs.predict_tensors(spec, prediction)
        header["parameters"] = {"mode": outputs.PREDICT}
    else:
        seed = fresh_seed() if params.seed is None else params.seed
        summary, samples = await handle.uncertainty(
            x, options, seed=seed, gone=gone, timeout_s=timeout_s
        )
        check_finite(summary, samples)
        tensors = outputs.uncertainty_tensors(spec, summary, samples)
        header["parameters"] = {
            "mode": outputs.UNCERTAINTY,
            "n_samples": options.n_samples,
            "seed": seed,
            "level": options.level,
        }
    content, header_length = await dataplane.off_loop(
        rows * (values + binary) > dataplane.LARGE_RESPONSE_VALUES,
        _encode,
        header,
        selected,
        tensors,
    )
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
) -> tuple[bytes, int | None]:
    return codec.encode_response(header, [(s, tensors[s.name]()) for s in selected])
