"""``create_app(settings)``: the FastAPI application, with models loaded in the lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Coroutine, Generator
from contextlib import asynccontextmanager
from typing import Any

import torch
from fastapi import FastAPI
from starlette.routing import BaseRoute

from mcdrop import masks
from service import auth, errors, logs
from service.arrivals import Arrivals, CountArrivals, InferenceRoutes
from service.config import Settings
from service.metrics import Metrics, RecordRequests
from service.registry import Registry
from service.routes import router
from service.v2.routes import router as v2_router

log = logging.getLogger("mcdrop.service")

Scope = dict[str, Any]


class StartupError(RuntimeError):
    """Models failed to load, or ``model_dir`` has none to load (``problem``), and
    ``exit_on_error`` is on: the server does not start."""

    def __init__(self, failures: dict[str, str], problem: str | None = None) -> None:
        if problem is not None:
            super().__init__(
                f"{problem}, so the server does not start (set MCDROP_MODEL_DIR or --model-dir "
                "to a folder of model directories)"
            )
            return
        lines = "".join(f"\n  model {name!r}: {reason}" for name, reason in failures.items())
        super().__init__(
            f"{len(failures)} model(s) failed to load, so the server does not start "
            f"(MCDROP_EXIT_ON_ERROR=false or --no-exit-on-error serves the others):{lines}"
        )


class BodyLimit:
    """ASGI middleware: reads at most ``max_bytes`` of a request body within ``timeout_s``,
    else answers 413 (too large) or 408 (too slow, and closes the connection).

    The body is buffered (bounded by the limit) before the app sees it, so an oversized,
    endlessly chunked or trickled upload is cut off without being parsed.
    """

    def __init__(self, app: Any, max_bytes: int, timeout_s: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = next((v for k, v in scope.get("headers", ()) if k == b"content-length"), None)
        if declared is not None:
            if not declared.isdigit():  # bytes.isdigit: ASCII digits only
                response = errors.error_response(
                    400,
                    errors.ErrorCode.HTTP_ERROR,
                    f"Content-Length must be a byte count (digits only), got "
                    f"{errors.jsonable(declared.decode('latin-1'))!r}",
                    headers={"Connection": "close"},  # where the body ends is unknown
                    path=scope["path"],
                )
                await response(scope, receive, send)
                return
            # Leading zeros are legal (1*DIGIT) and int() refuses over 4300 digits: compare
            # the significant digits' count before converting.
            digits = declared.lstrip(b"0") or b"0"
            if len(digits) > len(str(self.max_bytes)) or int(digits) > self.max_bytes:
                await self._reject(scope, receive, send)
                return
        chunks: list[bytes] = []
        size = 0
        message, later = _now_or_later(receive)
        # A timer only to wait for what is not in yet (~4 µs: more than the rest of this).
        waits = message is None or message.get("more_body", False)
        try:
            async with asyncio.timeout(self.timeout_s) if waits else contextlib.nullcontext():
                while True:
                    if message is None:
                        message = await (receive() if later is None else later)
                        later = None
                    if message["type"] == "http.disconnect":
                        return
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > self.max_bytes:
                        await self._reject(scope, receive, send)
                        return
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        break
                    message = None
        except TimeoutError:
            response = errors.error_response(
                408,
                errors.ErrorCode.REQUEST_TIMEOUT,
                f"the request body did not arrive within {self.timeout_s:g} s (body_timeout_s)",
                headers={"Connection": "close"},  # the rest of the body may still come
                path=scope["path"],
            )
            await response(scope, receive, send)
            return
        body = b"".join(chunks)
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _reject(self, scope: Scope, receive: Any, send: Any) -> None:
        response = errors.error_response(
            413,
            errors.ErrorCode.BODY_TOO_LARGE,
            f"request body is larger than the limit of {self.max_bytes} bytes; send fewer rows",
            path=scope["path"],
        )
        await response(scope, receive, send)


class _Started:
    """The rest of a coroutine whose first step has run (and yielded ``yielded``), to await:
    what ``await coro`` would have done from there on (PEP 380's delegation: what the awaiting
    task sends or throws in goes to the coroutine, what it yields goes to the task)."""

    def __init__(self, coro: Coroutine[Any, Any, Any], yielded: Any) -> None:
        self.coro = coro
        self.yielded = yielded

    def __await__(self) -> Generator[Any, Any, Any]:
        coro, yielded = self.coro, self.yielded
        while True:
            try:
                sent = yield yielded
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:  # e.g. the timeout's cancellation
                try:
                    yielded = coro.throw(exc)
                except StopIteration as done:
                    return done.value
            else:
                try:
                    yielded = coro.send(sent)
                except StopIteration as done:
                    return done.value


def _now_or_later(receive: Any) -> tuple[dict[str, Any] | None, Awaitable[Any] | None]:
    """``receive()``'s message if it is in already (uvicorn has read a small body by the time
    the app runs), else None and what to await for it."""
    pending = receive()
    if not inspect.iscoroutine(pending):
        return None, pending
    try:
        step = pending.send(None)
    except StopIteration as done:
        return done.value, None
    return None, _Started(pending, step)


#: The inference paths most one-row predictions take (native predict, v2 infer).
_LIGHT_PATHS = frozenset({"/models/{name}/predict", "/v2/models/{name}/infer"})


def _inference_routes_first(app: FastAPI, inference: InferenceRoutes) -> None:
    """Match the inference routes first: the router tries routes in order, and every route
    tried before a one-row prediction's costs it ~2 µs (a dozen probes and status routes
    precede it). No path is served by two routes, so the order changes no answer; the OpenAPI
    schema keeps the routes' own order (the documented one). Among them, the two that take
    one-row predictions (native and v2) come first: an uncertainty request's ~1 ms of model work
    hides the probes it pays."""
    routes = app.router.routes
    documented = list(routes)

    def rank(route: BaseRoute) -> tuple[bool, bool]:
        light = getattr(route, "path", None) in _LIGHT_PATHS
        return route not in inference.routes, not light

    routes.sort(key=rank)  # stable: in order otherwise
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        matched = list(routes)
        routes[:] = documented
        try:
            return generate()
        finally:
            routes[:] = matched

    app.openapi = openapi  # type: ignore[method-assign]


def configure_process(settings: Settings) -> None:
    """The settings that hold for the whole process, set before any model loads: torch's
    threads, and what makes the masks on the CPU."""
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    masks.CPU_BACKEND = settings.cpu_mask_backend


def create_app(settings: Settings | None = None) -> FastAPI:
    """The service for ``settings`` (read from ``MCDROP_*`` environment variables if None)."""
    settings = settings or Settings()
    arrivals = Arrivals()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        configure_process(settings)
        registry = Registry(settings, arrivals, metrics)
        app.state.registry = registry
        if settings.exit_on_error:
            # As Triton's --exit-on-error: load everything before serving, and refuse to start
            # if a model fails, so a broken deployment fails at once and says why. Raising here
            # makes uvicorn exit with status 3.
            if registry.problem is not None:  # a wrong or empty model_dir: nothing could serve
                registry.close()
                raise StartupError({}, registry.problem)
            await asyncio.to_thread(registry.load_all)
            failures = registry.failures()
            if failures:
                registry.close()
                raise StartupError(failures)
        else:
            # Load in the background: /health answers at once, /ready turns 200 when loaded.
            loader = threading.Thread(target=registry.load_all, name="mcdrop-loader", daemon=True)
            loader.start()
            app.state.loader = loader
        yield
        registry.close()
        metrics.close()

    app = FastAPI(
        title="mcdrop",
        summary="MC-dropout uncertainty for trained PyTorch models",
        version="0.1.0",
        lifespan=lifespan,
        # A path with a trailing slash is a 404 that says to remove it (errors.install), as
        # Triton answers any path its patterns do not match in full: Starlette's 307 to the
        # path without it has no body, and a client that follows it may resend a POST as a GET.
        redirect_slashes=False,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    errors.install(app)
    routers = [router, v2_router]
    for api in routers:
        # The routes themselves, not app.include_router: FastAPI matches a request through an
        # included router twice (to pick the router, then its route), ~40 µs per request. The
        # routers set no prefix, tags or dependencies at inclusion, so the routes and the
        # OpenAPI schema are the same.
        app.router.routes.extend(api.routes)
    app.add_middleware(
        BodyLimit, max_bytes=settings.max_body_bytes, timeout_s=settings.body_timeout_s
    )
    inference = InferenceRoutes([r for api in routers for r in api.routes])
    app.state.inference = inference
    _inference_routes_first(app, inference)
    app.add_middleware(CountArrivals, arrivals=arrivals, routes=inference)
    app.add_middleware(RecordRequests, metrics=metrics, routes=inference)
    auth.install(app, settings.api_key)  # before the body is read: no key, no body read
    # Outermost: every answer, a 401 or an unexpected error's 500 too, has its ID.
    app.add_middleware(logs.RequestIds, on_error=errors.unexpected)
    return app
