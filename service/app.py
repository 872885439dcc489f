"""``create_app(settings)``: the FastAPI application, with models loaded in the lifespan."""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import torch
from fastapi import FastAPI

from service import auth, errors
from service.batching import Arrivals
from service.config import Settings
from service.registry import Registry
from service.routes import router

log = logging.getLogger("mcdrop.service")

Scope = dict[str, Any]


class BodyLimit:
    """ASGI middleware: reads at most ``max_bytes`` of a request body, else answers 413.

    The body is buffered (bounded by the limit) before the app sees it, so an oversized or
    endlessly chunked upload is cut off without being parsed.
    """

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._reject(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
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
            "body_too_large",
            f"request body is larger than the limit of {self.max_bytes} bytes; send fewer rows",
        )
        await response(scope, receive, send)


class CountArrivals:
    """ASGI middleware: counts each inference request in with :class:`Arrivals` while it is read
    and validated (the route counts it out when it queues its job; this, if it never does)."""

    def __init__(self, app: Any, arrivals: Arrivals) -> None:
        self.app = app
        self.arrivals = arrivals

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        model = _inference_model(scope) if scope["type"] == "http" else None
        if model is None:
            await self.app(scope, receive, send)
            return
        self.arrivals.enter(scope, model)
        try:
            await self.app(scope, receive, send)
        finally:
            self.arrivals.settle(scope)


def _inference_model(scope: Scope) -> str | None:
    """``name`` for ``POST /models/{name}/predict`` or ``/uncertainty``, else None."""
    if scope.get("method") != "POST":
        return None
    parts = scope.get("path", "").split("/")
    if len(parts) == 4 and parts[1] == "models" and parts[3] in ("predict", "uncertainty"):
        return parts[2]
    return None


def create_app(settings: Settings | None = None) -> FastAPI:
    """The service for ``settings`` (read from ``MCDROP_*`` environment variables if None)."""
    settings = settings or Settings()
    arrivals = Arrivals()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        registry = Registry(settings, arrivals)
        app.state.registry = registry
        # Load in the background: /health answers at once, /ready turns 200 when loaded.
        loader = threading.Thread(target=registry.load_all, name="mcdrop-loader", daemon=True)
        loader.start()
        app.state.loader = loader
        yield
        registry.close()

    app = FastAPI(
        title="mcdrop",
        summary="MC-dropout uncertainty for trained PyTorch models",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    errors.install(app)
    app.include_router(router)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(CountArrivals, arrivals=arrivals)
    auth.install(app, settings.api_key)  # last added runs first: no key, no body read
    return app
