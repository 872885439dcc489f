"""Typed Python client of the mcdrop service, sync and async, on httpx2.

Importing it loads neither torch nor FastAPI. Every failure is one of these errors::

    ClientError                     base: catch this for any failure of the client
    ├── InvalidURLError             the base URL is not an http(s) URL (ValueError)
    ├── InvalidRequestError         refused before sending: NaN or non-numbers in the inputs, a
    │                               model name that is not one path segment (ValueError)
    ├── TransportError              no HTTP answer: connection refused, reset, DNS, ...
    │   └── RequestTimeoutError     no answer within the timeout (says which and how long)
    ├── DecodingError               an answer that is not the mcdrop protocol: not JSON, or JSON
    │                               of the wrong shape (status_code, snippet)
    └── APIError                    the service answered with an error (status_code, code,
        │                           message, details)
        ├── BadRequestError         400 / 422: inputs or options to fix
        ├── AuthenticationError     401: no API key or a wrong one
        ├── NotFoundError           404
        ├── PayloadTooLargeError    413
        ├── ServiceUnavailableError 503: model still loading, or the service is overloaded
        └── ServerError             other 5xx (504: the request ran past the server's deadline)

Example::

    with Client("http://localhost:8000") as mc:
        result = mc.uncertainty("digits", rows, n_samples=100, seed=7)
        print(result.results[0].mutual_information)

The API key (for a service started with ``MCDROP_API_KEY``) is ``api_key=``, or else read from
the ``MCDROP_API_KEY`` environment variable. Tests can pass a ``starlette.testclient.TestClient``
(an ``httpx2.Client``) as ``http=`` to talk to an app in process.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from typing import Any, Literal, Self, TypeVar
from urllib.parse import quote, urlsplit

import httpx2
from pydantic import BaseModel, ValidationError

from mcdrop_client.schemas import (
    Health,
    ModelInfo,
    ModelList,
    PredictResponse,
    Readiness,
    UncertaintyResponse,
)

DEFAULT_URL = "http://localhost:8000"
#: Seconds to wait for an answer. The server gives up on a computation after its
#: ``MCDROP_REQUEST_TIMEOUT_S`` (60 s by default) and answers 504; waiting 15 s longer lets that
#: answer, which says what to change, arrive before the client gives up on its own.
DEFAULT_TIMEOUT = 75.0
#: Seconds to wait for a connection: an unreachable host should not take the full read timeout.
DEFAULT_CONNECT_TIMEOUT = 10.0
#: The environment variable the client reads the API key from (the server's own setting).
API_KEY_ENV = "MCDROP_API_KEY"
#: Characters of an unexpected answer quoted in a :class:`DecodingError`.
SNIPPET_CHARS = 200

__all__ = [
    "APIError",
    "AsyncClient",
    "AuthenticationError",
    "BadRequestError",
    "Client",
    "ClientError",
    "DecodingError",
    "InvalidRequestError",
    "InvalidURLError",
    "NotFoundError",
    "PayloadTooLargeError",
    "RequestTimeoutError",
    "ServerError",
    "ServiceUnavailableError",
    "TransportError",
]

T = TypeVar("T", bound=BaseModel)


class ClientError(Exception):
    """Base of the client's errors."""


class InvalidURLError(ClientError, ValueError):
    """The base URL is not an ``http://`` or ``https://`` URL with a host."""


class InvalidRequestError(ClientError, ValueError):
    """The request cannot be sent: inputs JSON cannot carry (NaN, infinity, non-numbers), or a
    model name that cannot be one URL path segment."""


class TransportError(ClientError):
    """The request did not get an HTTP answer (connection refused, reset, ...)."""


class RequestTimeoutError(TransportError):
    """No answer within the client's timeout; ``timeout`` is the limit in seconds."""

    def __init__(self, message: str, timeout: float | None) -> None:
        super().__init__(message)
        self.timeout = timeout


class DecodingError(ClientError):
    """The service answered, but not with the mcdrop protocol: a body that is not JSON, or JSON
    that does not match the response schema (e.g. a proxy's HTML page, a different service).

    ``status_code`` is the HTTP status (None if the body could not even be read) and ``snippet``
    the start of the body.
    """

    def __init__(self, message: str, status_code: int | None, snippet: str) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.snippet = snippet


class APIError(ClientError):
    """The service answered with an error status; ``message`` is the server's explanation."""

    def __init__(self, status_code: int, code: str, message: str, details: list[Any]) -> None:
        super().__init__(f"{status_code} {code}: {message}")
        self.status_code = status_code
        self.code = code
        self.message = message
        self.details = details


class BadRequestError(APIError):
    """400/422: the request needs fixing (the message says what)."""


class AuthenticationError(APIError):
    """401: the service needs an API key (``api_key=`` or ``MCDROP_API_KEY``), or it is wrong."""


class NotFoundError(APIError):
    """404: no such model (or path)."""


class PayloadTooLargeError(APIError):
    """413: the body is above the server's size limit."""


class ServiceUnavailableError(APIError):
    """503: the model is still loading (retry), failed to load, or the service is overloaded."""


class ServerError(APIError):
    """5xx: the server failed, or (504) the request ran past its deadline."""


_BY_STATUS: dict[int, type[APIError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    404: NotFoundError,
    413: PayloadTooLargeError,
    422: BadRequestError,
    503: ServiceUnavailableError,
}

_JSON = {"content-type": "application/json"}

# What an API key may be made of: what an HTTP header carries unchanged (the server's rule too).
_TOKEN = re.compile(r"[\x21-\x7e]+")
# What a host may be made of: names, IPv4, and IPv6 (urlsplit drops its brackets).
_HOST = re.compile(r"[A-Za-z0-9._~:-]+")


def _check_url(base_url: str) -> str:
    """``base_url`` if it is an http(s) URL with a host, else :class:`InvalidURLError`."""
    hint = "give the service's address, e.g. http://localhost:8000"
    try:
        parts = urlsplit(base_url)
        parts.port  # noqa: B018 (raises ValueError for a port out of range or not a number)
    except (ValueError, TypeError, AttributeError) as exc:
        raise InvalidURLError(f"invalid service URL {base_url!r}: {exc}; {hint}") from None
    if parts.scheme not in ("http", "https"):
        raise InvalidURLError(
            f"invalid service URL {base_url!r}: it must start with http:// or https://; {hint}"
        )
    if not parts.hostname or not _HOST.fullmatch(parts.hostname):
        raise InvalidURLError(f"invalid service URL {base_url!r}: no valid host name; {hint}")
    if parts.query or parts.fragment:
        raise InvalidURLError(f"invalid service URL {base_url!r}: remove the ?query or #fragment")
    return base_url


def _segment(name: str) -> str:
    """``name`` escaped as one URL path segment, so no name can reach another route."""
    if not isinstance(name, str) or name in ("", ".", ".."):
        raise InvalidRequestError(
            f"invalid model name {name!r}: it must be a non-empty folder name, not '.' or '..'"
        )
    # Servers decode %2F back to "/" before routing, so escaping alone would not keep a "/" in
    # the name: "a/predict" would reach another route. Model names are folder names: no "/".
    if "/" in name:
        raise InvalidRequestError(f"invalid model name {name!r}: model names contain no '/'")
    return quote(name, safe="")


def _headers(api_key: str | None) -> dict[str, str]:
    """The ``Authorization`` header for ``api_key``, else for ``$MCDROP_API_KEY``, else none."""
    key = api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None
    if key is None:
        return {}
    if not _TOKEN.fullmatch(key):
        # Named without its value: the key is a secret.
        source = "api_key" if api_key is not None else API_KEY_ENV
        raise InvalidRequestError(
            f"invalid API key in {source}: only printable ASCII without spaces can be sent"
        )
    return {"Authorization": f"Bearer {key}"}


def _timeout(timeout: float) -> httpx2.Timeout:
    return httpx2.Timeout(timeout, connect=min(timeout, DEFAULT_CONNECT_TIMEOUT))


def _encode(body: dict[str, Any]) -> bytes:
    """The JSON body; NaN and infinity are refused here, since JSON cannot carry them."""
    try:
        return json.dumps(body, allow_nan=False).encode()
    except (ValueError, TypeError) as exc:
        raise InvalidRequestError(f"cannot encode the request as JSON: {exc}") from None


def _rows(inputs: Sequence[Any]) -> list[Any]:
    """Rows as plain lists: arrays and tensors (the whole batch or each row) via ``tolist``."""
    tolist = getattr(inputs, "tolist", None)
    if callable(tolist):
        return tolist()
    return [row.tolist() if callable(getattr(row, "tolist", None)) else row for row in inputs]


# What each timeout means to a caller: the phase (a key of httpx2's timeout settings), and what
# to say about it.
_READ_TIMEOUT = (
    "read",
    "no answer to {where} within {after}; raise timeout= (seconds) if the service is busy or "
    "the request is large",
)
_TIMEOUTS: dict[type[Exception], tuple[str, str]] = {
    httpx2.ConnectTimeout: (
        "connect",
        "no connection for {where} within {after}; is the service running, and the URL right?",
    ),
    httpx2.WriteTimeout: ("write", "could not send {where} within {after}; raise timeout="),
    httpx2.PoolTimeout: (
        "pool",
        "no free connection for {where} within {after}; raise timeout= or send fewer requests "
        "at once",
    ),
}


def _transport_error(exc: httpx2.RequestError) -> ClientError:
    """An httpx2 failure as a client error that says what happened, where, and after how long."""
    try:
        request: httpx2.Request | None = exc.request
    except RuntimeError:  # raised by httpx2 when the error carries no request
        request = None
    where = f"{request.method} {request.url}" if request is not None else "the mcdrop service"
    if not isinstance(exc, httpx2.TimeoutException):
        if isinstance(exc, httpx2.DecodingError):
            return DecodingError(f"cannot decode the answer to {where}: {exc}", None, "")
        return TransportError(f"cannot reach the mcdrop service ({where}): {exc}")
    phase, message = _TIMEOUTS.get(type(exc), _READ_TIMEOUT)
    limits = request.extensions.get("timeout", {}) if request is not None else {}
    seconds = limits.get(phase)
    after = f"{seconds:g} s" if isinstance(seconds, int | float) else "the timeout"
    return RequestTimeoutError(message.format(where=where, after=after), seconds)


def _snippet(response: httpx2.Response) -> str:
    text = response.content[:SNIPPET_CHARS].decode("utf-8", "replace")
    return text + ("..." if len(response.content) > SNIPPET_CHARS else "")


def _error(response: httpx2.Response) -> APIError:
    """An error status as the matching :class:`APIError`; a body that is not the service's error
    JSON (e.g. a proxy's page) still gives the status's error, with the body's start as message."""
    status = response.status_code
    try:
        body = response.json()["error"]
        code, message, details = body["code"], body["message"], body.get("details", [])
        if not (isinstance(code, str) and isinstance(message, str) and isinstance(details, list)):
            raise TypeError(body)
    except (ValueError, KeyError, TypeError):
        code, message, details = "http_error", _snippet(response), []
    kind = _BY_STATUS.get(status, ServerError if status >= 500 else APIError)
    return kind(status, code, message, details)


def _parse(response: httpx2.Response, model: type[T], ok: Sequence[int] = (200,)) -> T:
    if response.status_code not in ok:
        raise _error(response)
    try:
        return model.model_validate_json(response.content)
    except ValidationError as exc:
        if response.status_code >= 400:  # e.g. a proxy's 503 page where /ready was expected
            raise _error(response) from None
        # One line naming the first problem, not pydantic's multi-line report.
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "body"
        reason = "not JSON" if first.get("type") == "json_invalid" else f"{where}: {first['msg']}"
        snippet = _snippet(response)
        raise DecodingError(
            f"{response.request.method} {response.request.url} answered {response.status_code} "
            f"with a body that is not a {model.__name__} ({reason}); is this an mcdrop service "
            f"of the same version? The body starts: {snippet!r}",
            response.status_code,
            snippet,
        ) from None


def _uncertainty_body(
    inputs: Sequence[Any],
    n_samples: int | Literal["auto"] | None,
    seed: int | None,
    level: float,
    return_samples: bool,
    tolerance: float | None = None,
    max_n_samples: int | None = None,
    decisions: dict[str, Any] | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {"inputs": _rows(inputs), "level": level}
    body |= {k: v for k, v in (decisions or {}).items() if v is not None}
    if n_samples is not None:
        body["n_samples"] = n_samples
    if tolerance is not None:
        body["tolerance"] = tolerance
    if max_n_samples is not None:
        body["max_n_samples"] = max_n_samples
    if seed is not None:
        body["seed"] = seed
    if return_samples:
        body["return_samples"] = True
    return body


class Client:
    """Blocking client.

    Args:
        base_url: where the service runs (``http://`` or ``https://``, optionally with a path
            prefix); else :class:`InvalidURLError`.
        api_key: sent as ``Authorization: Bearer <key>``; default: the ``MCDROP_API_KEY``
            environment variable, if set.
        timeout: seconds to wait for an answer (connecting: at most 10 s). The default, 75 s,
            is above the server's own 60 s compute deadline, so a slow request ends with the
            server's 504 (a :class:`ServerError`) rather than a client-side timeout.
        http: an existing ``httpx2.Client`` to use instead (e.g. Starlette's TestClient).
    """

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        api_key: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        http: httpx2.Client | None = None,
    ) -> None:
        _check_url(base_url)
        self._headers = _headers(api_key)
        self._owns = http is None
        self._http = http or httpx2.Client(base_url=base_url, timeout=_timeout(timeout))

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._owns:
            self._http.close()

    def _request(
        self, method: str, path: str, body: dict[str, Any] | None = None
    ) -> httpx2.Response:
        content = None if body is None else _encode(body)
        headers = self._headers if body is None else {**self._headers, **_JSON}
        try:
            return self._http.request(method, path, content=content, headers=headers)
        except httpx2.RequestError as exc:
            raise _transport_error(exc) from exc

    def health(self) -> Health:
        return _parse(self._request("GET", "/health"), Health)

    def ready(self) -> Readiness:
        """Readiness (does not raise on 503: look at ``status``)."""
        return _parse(self._request("GET", "/ready"), Readiness, ok=(200, 503))

    def models(self) -> list[ModelInfo]:
        return _parse(self._request("GET", "/models"), ModelList).models

    def model(self, name: str) -> ModelInfo:
        return _parse(self._request("GET", f"/models/{_segment(name)}"), ModelInfo)

    def predict(self, name: str, inputs: Sequence[Any]) -> PredictResponse:
        """Deterministic prediction of rows ``inputs``."""
        path = f"/models/{_segment(name)}/predict"
        return _parse(self._request("POST", path, {"inputs": _rows(inputs)}), PredictResponse)

    def uncertainty(
        self,
        name: str,
        inputs: Sequence[Any],
        *,
        n_samples: int | Literal["auto"] | None = None,
        seed: int | None = None,
        level: float = 0.95,
        return_samples: bool = False,
        tolerance: float | None = None,
        max_n_samples: int | None = None,
        reject_rate: float | None = None,
        reject_threshold: float | None = None,
        reject_score: str | None = None,
        coverage: float | None = None,
    ) -> UncertaintyResponse:
        """MC-dropout uncertainty of rows ``inputs``. ``n_samples="auto"``: each row samples
        until its MC standard error is within ``tolerance`` or it has ``max_n_samples`` (both
        optional; the server's defaults are 0.01 and 1000), and each result's ``n_samples``
        says how many it used. Decisions (a calibrated model, ``mcdrop calibrate``):
        ``reject_rate`` (or an explicit ``reject_threshold``) on ``reject_score`` flags each
        result's ``reject``; ``coverage`` adds its conformal ``prediction_set`` (classifier) or
        ``conformal_lower``/``conformal_upper`` (regressor)."""
        path = f"/models/{_segment(name)}/uncertainty"
        body = _uncertainty_body(
            inputs,
            n_samples,
            seed,
            level,
            return_samples,
            tolerance,
            max_n_samples,
            decisions={
                "reject_rate": reject_rate,
                "reject_threshold": reject_threshold,
                "reject_score": reject_score,
                "coverage": coverage,
            },
        )
        return _parse(self._request("POST", path, body), UncertaintyResponse)


class AsyncClient:
    """Asynchronous client; same arguments and methods as :class:`Client`, awaited."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        api_key: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        http: httpx2.AsyncClient | None = None,
    ) -> None:
        _check_url(base_url)
        self._headers = _headers(api_key)
        self._owns = http is None
        self._http = http or httpx2.AsyncClient(base_url=base_url, timeout=_timeout(timeout))

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._owns:
            await self._http.aclose()

    async def _request(
        self, method: str, path: str, body: dict[str, Any] | None = None
    ) -> httpx2.Response:
        content = None if body is None else _encode(body)
        headers = self._headers if body is None else {**self._headers, **_JSON}
        try:
            return await self._http.request(method, path, content=content, headers=headers)
        except httpx2.RequestError as exc:
            raise _transport_error(exc) from exc

    async def health(self) -> Health:
        return _parse(await self._request("GET", "/health"), Health)

    async def ready(self) -> Readiness:
        return _parse(await self._request("GET", "/ready"), Readiness, ok=(200, 503))

    async def models(self) -> list[ModelInfo]:
        return _parse(await self._request("GET", "/models"), ModelList).models

    async def model(self, name: str) -> ModelInfo:
        return _parse(await self._request("GET", f"/models/{_segment(name)}"), ModelInfo)

    async def predict(self, name: str, inputs: Sequence[Any]) -> PredictResponse:
        path = f"/models/{_segment(name)}/predict"
        body = {"inputs": _rows(inputs)}
        return _parse(await self._request("POST", path, body), PredictResponse)

    async def uncertainty(
        self,
        name: str,
        inputs: Sequence[Any],
        *,
        n_samples: int | Literal["auto"] | None = None,
        seed: int | None = None,
        level: float = 0.95,
        return_samples: bool = False,
        tolerance: float | None = None,
        max_n_samples: int | None = None,
        reject_rate: float | None = None,
        reject_threshold: float | None = None,
        reject_score: str | None = None,
        coverage: float | None = None,
    ) -> UncertaintyResponse:
        path = f"/models/{_segment(name)}/uncertainty"
        body = _uncertainty_body(
            inputs,
            n_samples,
            seed,
            level,
            return_samples,
            tolerance,
            max_n_samples,
            decisions={
                "reject_rate": reject_rate,
                "reject_threshold": reject_threshold,
                "reject_score": reject_score,
                "coverage": coverage,
            },
        )
        return _parse(await self._request("POST", path, body), UncertaintyResponse)
