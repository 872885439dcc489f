"""Requests on their way: how many per model are being read and validated, not yet queued.

A batcher that has work queued waits (briefly) for these, so requests that arrive together share
one forward pass. The count follows the routes themselves: every route tagged
:data:`INFERENCE_TAG` whose path names a model (its ``name`` path parameter) counts its requests
in when they start and out when they queue their job (the route calls :meth:`Arrivals.settle`)
or end without one (the middleware). All of it runs on the event loop.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from fastapi.routing import APIRoute
from starlette._utils import get_route_path
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Receive, Scope, Send

#: Routes with this tag run model work; their ``name`` path parameter is the model.
INFERENCE_TAG = "inference"


class Arrivals:
    """Per model, the requests being read and validated; a change re-checks the model's
    batcher (its listener)."""

    SCOPE_KEY = "mcdrop.arriving"

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.listeners: dict[str, Callable[[], None]] = {}

    def __call__(self, model: str) -> int:
        return self.counts.get(model, 0)

    def enter(self, scope: Scope, model: str) -> None:
        self.counts[model] = self(model) + 1
        scope[self.SCOPE_KEY] = model

    def settle(self, scope: Scope) -> None:
        """Count the request of ``scope`` out (once; later calls do nothing)."""
        model = scope.pop(self.SCOPE_KEY, None)
        if model is None:
            return
        self.counts[model] -= 1
        if not self.counts[model]:
            del self.counts[model]  # no key kept per name: any name may arrive, known or not
        listener = self.listeners.get(model)
        if listener is not None:
            listener()


class InferenceRoutes:
    """The app's inference routes: which model, if any, a request's path names."""

    def __init__(self, routes: Sequence[BaseRoute]) -> None:
        self.routes = [r for r in routes if isinstance(r, APIRoute) and INFERENCE_TAG in r.tags]
        # What Route.matches reads, taken once: a request tried against every inference route
        # costs a regex match each (~0.5 µs) rather than a full match (~5 µs).
        self._patterns = [
            (r.path_regex, r.methods or set(), r.param_convertors.get("name")) for r in self.routes
        ]

    SCOPE_KEY = "mcdrop.inference_model"

    def model(self, scope: Scope) -> str | None:
        """The ``name`` path parameter of the inference route ``scope`` matches, else None
        (matched once per request: the metrics and the arrival count both ask)."""
        if scope["type"] != "http":
            return None
        if self.SCOPE_KEY in scope:
            return scope[self.SCOPE_KEY]  # set below: a str or None
        model = None
        path, method = get_route_path(scope), scope["method"]
        for regex, methods, convertor in self._patterns:
            found = regex.match(path)
            if found is not None and method in methods:  # Route.matches' Match.FULL
                name = found.groupdict().get("name")
                model = name if convertor is None or name is None else convertor.convert(name)
                break
        scope[self.SCOPE_KEY] = model
        return model


class CountArrivals:
    """ASGI middleware: counts each request to an inference route in while it is read and
    validated (the route counts it out when it queues its job; this, if it never does)."""

    def __init__(self, app: ASGIApp, arrivals: Arrivals, routes: InferenceRoutes) -> None:
        self.app = app
        self.arrivals = arrivals
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        model = self.routes.model(scope)
        if model is None:
            await self.app(scope, receive, send)
            return
        self.arrivals.enter(scope, model)
        try:
            await self.app(scope, receive, send)
        finally:
            self.arrivals.settle(scope)
