"""Optional API key: with ``MCDROP_API_KEY`` set, every route but the probes needs
``Authorization: Bearer <key>``, else a 401 JSON error with ``WWW-Authenticate: Bearer``.

The probes stay open so an orchestrator's health checks need no secret. ``/docs`` and
``/openapi.json`` are protected like everything else: the safe default (the schema is in the
repository for whoever needs it).
"""

from __future__ import annotations

import hmac
from typing import Any

from fastapi import FastAPI
from pydantic import SecretStr

from service import errors

#: Paths anyone may call: liveness and readiness probes.
PUBLIC_PATHS = frozenset({"/health", "/ready"})
#: Path prefixes anyone may call: the Open Inference Protocol's probes (``/v2/health/live``, ...).
PUBLIC_PREFIXES = ("/v2/health/",)

Scope = dict[str, Any]


def is_public(path: str) -> bool:
    """Whether ``path`` is served without a key."""
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


def _bearer(scope: Scope) -> bytes | None:
    """The token of the request's ``Authorization: Bearer <token>`` header, if it has one."""
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            return (token.strip() or None) if scheme.lower() == b"bearer" else None
    return None


class BearerAuth:
    """ASGI middleware: answers 401 unless the request carries the key (or is a probe).

    It runs before the body is read, so a client without the key costs no body buffering.
    """

    def __init__(self, app: Any, api_key: SecretStr) -> None:
        self.app = app
        self._key = api_key.get_secret_value().encode()

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        # Lifespan passes; the service has no websocket routes, and http is checked here.
        if scope["type"] != "http" or is_public(scope.get("path", "")):
            await self.app(scope, receive, send)
            return
        token = _bearer(scope)
        # Constant time, so the answer's timing says nothing about how much of a guess matched.
        if token is not None and hmac.compare_digest(token, self._key):
            await self.app(scope, receive, send)
            return
        if token is None:
            message = "this service needs an API key: send the header 'Authorization: Bearer <key>'"
            challenge = "Bearer"
        else:
            message = "the API key is not valid: send the key the service was started with"
            challenge = 'Bearer error="invalid_token"'
        response = errors.error_response(
            401, errors.ErrorCode.UNAUTHORIZED, message, path=scope.get("path", "")
        )
        response.headers["WWW-Authenticate"] = challenge
        await response(scope, receive, send)


def install(app: FastAPI, api_key: SecretStr | None) -> None:
    """Require ``api_key`` on ``app``'s non-public routes; no-op without a key. Call it after the
    other middleware, so it runs first."""
    if api_key is not None:
        app.add_middleware(BearerAuth, api_key=api_key)
