"""Typed Python client of the mcdrop service, sync and async, on httpx2.

Importing it loads neither torch nor FastAPI. Every failure is one of these errors::

    ClientError                     base: catch this for any failure of the client
    ├── InvalidURLError             the base URL is not an http(s) URL, or holds a password;
    │                               a proxy or certificate file of the environment that cannot
    │                               be used (ValueError)
    ├── InvalidRequestError         refused before sending: NaN or non-numbers in the inputs, a
    │                               model name that is not one path segment, inputs nested too
    │                               deeply, a timeout or max_response_bytes out of range
    │                               (ValueError)
    ├── TransportError              no complete HTTP answer, the message says which: no
    │   │                           connection (refused, DNS, ...: "cannot reach"), or one
    │   │                           that broke (reset, closed mid-answer: "connected, but")
    │   └── RequestTimeoutError     no answer within the timeout (says which, connected or
    │                               not, and how long)
    ├── DecodingError               an answer that is not the mcdrop protocol: not JSON, or JSON
    │                               of the wrong shape (status_code, snippet)
    ├── ResponseTooLargeError       an answer above max_response_bytes, refused unread or
    │                               unfinished (status_code, limit)
    └── APIError                    the service answered with an error (status_code, code,
        │                           message, details)
        ├── BadRequestError         400 / 422: inputs or options to fix
        ├── AuthenticationError     401: no API key or a wrong one
        ├── NotFoundError           404
        ├── PayloadTooLargeError    413
        ├── ServiceUnavailableError 503: model still loading, or the service is overloaded
        │                           (retry_after: the seconds its Retry-After asks to wait)
        └── ServerError             other 5xx (504: the request ran past the server's deadline)

Example::

    with Client("http://localhost:8000") as mc:
        result = mc.uncertainty("digits", rows, n_samples=100, seed=7)
        print(result.results[0].mutual_information)

``timeout`` bounds the whole request, as one deadline: looking up the host name, connecting,
sending the body and reading the complete answer (a server that trickles its answer cannot keep
a caller waiting longer); ``timeout=None`` (or ``math.inf``) waits without limit, as in httpx.
``max_response_bytes`` bounds the answer's size after decoding (gzip included): an answer above
it is refused before it is read when its Content-Length says so, else as soon as it passes the
limit.

The API key (for a service started with ``MCDROP_API_KEY``) is ``api_key=``, or else read from
the ``MCDROP_API_KEY`` environment variable. Tests can pass a ``starlette.testclient.TestClient``
(an ``httpx2.Client``) as ``http=`` to talk to an app in process.
"""

from __future__ import annotations

import ipaddress
import json
import math
import operator
import os
import re
import socket
import threading
import time
from collections.abc import Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Literal, Self, SupportsFloat, SupportsIndex, TypeVar
from urllib.parse import quote, urlsplit

import anyio
import httpcore2
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
#: The longest finite timeout, in seconds: a year. Sockets take at most 2**63 ns (292 years;
#: past it OverflowError at the first request); ``None`` is the way to wait without limit.
MAX_TIMEOUT = 365 * 24 * 3600.0
#: Largest answer the client reads, in bytes after decoding: 4 times the server's own default
#: limit on a response (``MCDROP_MAX_RESPONSE_BYTES``, 16 MiB), so a server configured for larger
#: answers (e.g. ``return_samples`` on many rows) still fits, while a hostile or broken server
#: cannot make the caller buffer gigabytes.
DEFAULT_MAX_RESPONSE_BYTES = 64 * 1024 * 1024
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
    "ResponseTooLargeError",
    "ServerError",
    "ServiceUnavailableError",
    "TransportError",
]

T = TypeVar("T", bound=BaseModel)


class ClientError(Exception):
    """Base of the client's errors. Each one pickles with the arguments it was made with (a
    process pool sends a worker's error back pickled; one it could not rebuild broke the pool)."""


class InvalidURLError(ClientError, ValueError):
    """The base URL is not an ``http://`` or ``https://`` URL with a host, or it holds a user name
    or password (``user:password@``: the API key is ``api_key=``); or a proxy or certificate
    setting of the environment (``HTTPS_PROXY``, ``SSL_CERT_FILE``, ...) cannot be used."""


class InvalidRequestError(ClientError, ValueError):
    """The request cannot be sent: inputs JSON cannot carry (NaN, infinity, non-numbers, nesting
    too deep), a model name that cannot be one URL path segment, or a client option out of range
    (``timeout``, ``max_response_bytes``, ``api_key``)."""


class TransportError(ClientError):
    """The request did not get a complete HTTP answer: no connection was made (refused, a host
    name that does not resolve, ...; the message starts "cannot reach"), or the connection broke
    before the answer was complete (reset, closed; the message starts "connected to")."""


class RequestTimeoutError(TransportError):
    """No answer within the client's timeout; ``timeout`` is the limit in seconds."""

    def __init__(self, message: str, timeout: float | None) -> None:
        super().__init__(message)
        self.timeout = timeout

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (str(self), self.timeout), self.__dict__


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

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (str(self), self.status_code, self.snippet), self.__dict__


class ResponseTooLargeError(ClientError):
    """The answer is larger than the client's ``max_response_bytes`` (``limit``); it was refused
    unread (its Content-Length said so) or abandoned once past the limit."""

    def __init__(self, message: str, status_code: int, limit: int) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.limit = limit

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (str(self), self.status_code, self.limit), self.__dict__


class APIError(ClientError):
    """The service answered with an error status; ``message`` is the server's explanation, and
    ``retry_after`` the seconds its ``Retry-After`` header asks to wait before sending again
    (a 503 ``overloaded``), else None."""

    def __init__(
        self,
        status_code: int,
        code: str,
        message: str,
        details: list[Any],
        retry_after: int | None = None,
    ) -> None:
        super().__init__(f"{status_code} {code}: {message}")
        self.status_code = status_code
        self.code = code
        self.message = message
        self.details = details
        self.retry_after = retry_after

    def __reduce__(self) -> tuple[Any, ...]:
        arguments = (self.status_code, self.code, self.message, self.details, self.retry_after)
        return type(self), arguments, self.__dict__


class BadRequestError(APIError):
    """400/422: the request needs fixing (the message says what)."""


class AuthenticationError(APIError):
    """401: the service needs an API key (``api_key=`` or ``MCDROP_API_KEY``), or it is wrong."""


class NotFoundError(APIError):
    """404: no such model (or path)."""


class PayloadTooLargeError(APIError):
    """413: the body is above the server's size limit."""


class ServiceUnavailableError(APIError):
    """503: the model is still loading (retry), failed to load, or the service is overloaded
    (retry after ``retry_after`` seconds)."""


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
# A URL with a user name or password before its host ("http://user:password@host").
_USERINFO = re.compile(r"[^/?#]*//[^/?#]*@")
# How a service URL starts (not urlsplit's scheme: it skips leading blanks, which httpx2 keeps).
_SCHEME = re.compile(r"https?://", re.IGNORECASE)


def _check_url(base_url: str) -> str:
    """``base_url`` if it is an http(s) URL with a host, else :class:`InvalidURLError`."""
    hint = "give the service's address, e.g. http://localhost:8000"
    # httpx2 would send a user:password@ as Basic authentication, replacing the API key's header,
    # and every error message quotes the URL: refused first, and never quoted.
    if isinstance(base_url, str) and _USERINFO.match(base_url):
        raise InvalidURLError(
            "invalid service URL: it holds a user name or password (user:password@), which "
            "would be sent in place of the API key and shown in error messages; remove it, and "
            f"give the service's key as api_key= (or {API_KEY_ENV})"
        )
    try:
        parts = urlsplit(base_url)
        parts.port  # noqa: B018 (raises ValueError for a port out of range or not a number)
    except (ValueError, TypeError, AttributeError) as exc:
        raise InvalidURLError(f"invalid service URL {base_url!r}: {exc}; {hint}") from None
    if not isinstance(base_url, str) or not _SCHEME.match(base_url):
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


def _check_timeout(timeout: float | None) -> float | None:
    """``timeout`` in seconds, None for no limit (``None`` or infinity, as httpx reads None)."""
    if timeout is None or (isinstance(timeout, float) and timeout == math.inf):
        return None
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not 0 < timeout <= MAX_TIMEOUT
    ):
        # `not 0 < timeout` also catches NaN; 0 would make every socket non-blocking.
        raise InvalidRequestError(
            f"invalid timeout {timeout!r}: give the seconds a request may take as a number > 0 "
            f"and at most {MAX_TIMEOUT:g} (a year), or None for no limit"
        )
    return float(timeout)


def _check_max_bytes(max_response_bytes: int | None) -> int | None:
    if max_response_bytes is None:
        return None
    if (
        isinstance(max_response_bytes, bool)
        or not isinstance(max_response_bytes, int)
        or max_response_bytes < 1
    ):
        raise InvalidRequestError(
            f"invalid max_response_bytes {max_response_bytes!r}: give a whole number of bytes "
            f">= 1 (default {DEFAULT_MAX_RESPONSE_BYTES}), or None for no limit"
        )
    return max_response_bytes


def _timeout(timeout: float | None) -> httpx2.Timeout:
    if timeout is None:
        return httpx2.Timeout(None)
    return httpx2.Timeout(timeout, connect=min(timeout, DEFAULT_CONNECT_TIMEOUT))


def _number(value: Any) -> int | float:
    """json.dumps's ``default``: a number json does not know (NumPy's ``np.int64`` or
    ``np.float32``, a 0-d array or tensor) as the Python int or float it holds, found by its
    ``item()``, ``__index__`` or ``__float__`` (no NumPy import); anything else, booleans among
    them (JSON's true is no number to the service), TypeError, as json's own."""
    if getattr(value, "ndim", 0) == 0:  # not an array of several numbers
        item = value.item() if callable(getattr(value, "item", None)) else value
        if not isinstance(item, bool | str | bytes):  # np.bool_.item() is a bool
            if hasattr(type(item), "__index__"):
                return operator.index(item)
            if hasattr(type(item), "__float__"):
                return float(item)
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def _encode(body: dict[str, Any]) -> bytes:
    """The JSON body; NaN and infinity are refused here, since JSON cannot carry them."""
    try:
        return json.dumps(body, allow_nan=False, default=_number).encode()
    except ValueError as exc:
        fields = [name for name, value in body.items() if not _finite(value)]
        if not fields:
            raise InvalidRequestError(f"cannot encode the request as JSON: {exc}") from None
        raise InvalidRequestError(
            f"cannot encode the request as JSON: {' and '.join(fields)} "
            f"{'holds' if len(fields) == 1 else 'hold'} NaN or infinity, which JSON cannot "
            "carry; send finite numbers"
        ) from None
    except TypeError as exc:
        raise InvalidRequestError(f"cannot encode the request as JSON: {exc}") from None
    except RecursionError:
        raise InvalidRequestError(
            "cannot encode the request as JSON: the inputs are nested too deeply; give rows of "
            "numbers (or of nested lists as deep as the model's input_shape)"
        ) from None


def _finite(value: Any) -> bool:
    """Whether no float in ``value`` (nested lists and dicts, walked without recursion: it may
    be deep) is NaN or infinite."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, list | tuple):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif not isinstance(item, float | int | str | None):
            try:  # a number of another type (np.float32('nan')), as _encode sends it
                item = _number(item)
            except (TypeError, ValueError, OverflowError):
                continue
        if isinstance(item, float) and not math.isfinite(item):
            return False
    return True


def _rows(inputs: Sequence[Any]) -> list[Any]:
    """Rows as plain lists: arrays and tensors (the whole batch or each row) via ``tolist``."""
    tolist = getattr(inputs, "tolist", None)
    if callable(tolist):
        return tolist()
    return [row.tolist() if callable(getattr(row, "tolist", None)) else row for row in inputs]


# The synchronous client's whole-request deadline (time.monotonic()), None: no limit. httpx2
# bounds each read and write, not a request: a server trickling a byte a second would never
# time out. The sockets of a Client's pool read it (see _DeadlineBackend), so the same pool
# serves any number of threads, each with its own deadline. The async client needs none of
# this: it cancels the whole request with anyio.fail_after.
_DEADLINE: ContextVar[float | None] = ContextVar("mcdrop_client_deadline", default=None)


def _left(timeout: float | None, expired: type[Exception]) -> float | None:
    """``timeout`` cut to what is left until the deadline; ``expired`` raised once it passed."""
    deadline = _DEADLINE.get()
    if deadline is None:
        return timeout
    left = deadline - time.monotonic()
    if left <= 0:
        raise expired("the request's deadline has passed")
    return left if timeout is None else min(timeout, left)


class _DeadlineStream(httpcore2.NetworkStream):
    """A socket whose every read and write ends by the request's deadline."""

    def __init__(self, stream: httpcore2.NetworkStream) -> None:
        self._stream = stream

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._stream.read(max_bytes, _left(timeout, httpcore2.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._stream.write(buffer, _left(timeout, httpcore2.WriteTimeout))

    def close(self) -> None:
        self._stream.close()

    def start_tls(
        self, ssl_context: Any, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore2.NetworkStream:
        left = _left(timeout, httpcore2.ConnectTimeout)
        return _DeadlineStream(self._stream.start_tls(ssl_context, server_hostname, left))

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


def _is_address(host: str) -> bool:
    """Whether ``host`` is an IP address, which needs no lookup."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _resolve(host: str, port: int, timeout: float | None) -> list[str]:
    """The addresses of ``host``, looked up within ``timeout`` seconds (None: no limit), else
    httpcore2's ConnectTimeout (the lookup goes on in its own thread until the system's resolver
    gives up, and is then forgotten); a name that does not resolve is a ConnectError."""
    found: list[str] = []
    failed: list[OSError] = []
    done = threading.Event()

    def look_up() -> None:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            found.extend(dict.fromkeys(str(info[4][0]) for info in infos))
        except OSError as exc:  # socket.gaierror among them
            failed.append(exc)
        finally:
            done.set()

    threading.Thread(target=look_up, name=f"mcdrop-client lookup {host}", daemon=True).start()
    if not done.wait(timeout):
        raise httpcore2.ConnectTimeout(f"no address for {host!r} within {timeout:g} s")
    if failed or not found:
        raise httpcore2.ConnectError(str(failed[0]) if failed else f"no address for {host!r}")
    return found


class _DeadlineBackend(httpcore2.NetworkBackend):
    """httpcore2's network backend, with sockets that end by the request's deadline."""

    def __init__(self, backend: httpcore2.NetworkBackend) -> None:
        self._backend = backend

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Any = None,
    ) -> httpcore2.NetworkStream:
        if _DEADLINE.get() is None or _is_address(host):
            left = _left(timeout, httpcore2.ConnectTimeout)
            stream = self._backend.connect_tcp(host, port, left, local_address, socket_options)
            return _DeadlineStream(stream)
        # socket.create_connection would look the name up with no limit (getaddrinfo takes
        # none): looked up here within the deadline, then each address tried in turn, as it does.
        failure: Exception | None = None
        for address in _resolve(host, port, _left(timeout, httpcore2.ConnectTimeout)):
            left = _left(timeout, httpcore2.ConnectTimeout)
            try:
                stream = self._backend.connect_tcp(
                    address, port, left, local_address, socket_options
                )
            except (httpcore2.ConnectError, httpcore2.ConnectTimeout) as exc:
                failure = exc
                continue
            return _DeadlineStream(stream)
        assert failure is not None  # _resolve gives at least one address
        raise failure

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Any = None
    ) -> httpcore2.NetworkStream:
        left = _left(timeout, httpcore2.ConnectTimeout)
        return _DeadlineStream(self._backend.connect_unix_socket(path, left, socket_options))

    def sleep(self, seconds: float) -> None:
        self._backend.sleep(seconds)


def _bound_by_deadline(http: httpx2.Client) -> None:
    """Give the pools of a Client this module made (its transport, and the proxies' read from the
    environment) sockets that keep the deadline. httpx2 has no public hook for a network
    backend; tests/service/test_client.py checks that a trickling server is cut off in time."""
    transports = [getattr(http, "_transport", None), *getattr(http, "_mounts", {}).values()]
    for transport in transports:
        pool = getattr(transport, "_pool", None)
        backend = getattr(pool, "_network_backend", None)
        if isinstance(backend, httpcore2.NetworkBackend):
            pool._network_backend = _DeadlineBackend(backend)  # type: ignore[union-attr]


@dataclass(frozen=True)
class _Answer:
    """An HTTP answer read in full (within max_response_bytes)."""

    method: str
    url: str
    status_code: int
    reason: str
    headers: httpx2.Headers
    content: bytes

    @property
    def where(self) -> str:
        return f"{self.method} {self.url}"


def _too_large(
    request: httpx2.Request, response: httpx2.Response, limit: int, what: str
) -> ResponseTooLargeError:
    return ResponseTooLargeError(
        f"the answer to {request.method} {request.url} ({response.status_code}) is larger than "
        f"max_response_bytes={limit} ({what}); if such an answer is expected (e.g. "
        "return_samples on many rows), raise max_response_bytes= on the client, or ask for less",
        response.status_code,
        limit,
    )


def _check_length(request: httpx2.Request, response: httpx2.Response, limit: int | None) -> None:
    """Refuse an answer unread when its Content-Length is already above ``limit``."""
    length = response.headers.get("content-length", "")
    if limit is not None and length.isdigit() and int(length) > limit:
        raise _too_large(request, response, limit, f"its Content-Length is {length}")


class _Reader:
    """Collects a response's decoded bytes, refusing them once past ``limit`` (None: no limit)."""

    def __init__(
        self, request: httpx2.Request, response: httpx2.Response, limit: int | None
    ) -> None:
        self._request, self._response, self._limit = request, response, limit
        self._chunks: list[bytes] = []
        self._size = 0

    def add(self, chunk: bytes) -> None:
        self._size += len(chunk)
        if self._limit is not None and self._size > self._limit:
            what = f"more than {self._limit} bytes arrived, after decoding"
            raise _too_large(self._request, self._response, self._limit, what)
        self._chunks.append(chunk)

    def answer(self) -> _Answer:
        request, response = self._request, self._response
        return _Answer(
            request.method,
            str(request.url),
            response.status_code,
            response.reason_phrase,
            response.headers,
            b"".join(self._chunks),
        )


class _Sending:
    """Whether the request began to be sent on a connection, from httpcore2's ``trace``
    extension (an async client's deadline cancels the request wherever it waits, leaving no
    exception that says how far it got)."""

    def __init__(self) -> None:
        self.began = False

    async def trace(self, event: str, info: dict[str, Any]) -> None:
        # http11.send_request_headers.started (or http2's): connected, TLS done where any.
        if event.endswith(".send_request_headers.started"):
            self.began = True


def _deadline_error(
    where: str, timeout: float | None, connected: bool | None
) -> RequestTimeoutError:
    """The whole request ran past ``timeout``: ``connected`` or not to the service (a host name
    that does not resolve in time, a host that does not accept, is no connection); None: not
    known (a transport given as ``http=``)."""
    if connected is None:
        return RequestTimeoutError(
            f"no answer to {where} within {timeout:g} s (timeout= bounds the whole request: "
            "connecting, sending, and reading the complete answer); raise timeout= (seconds) if "
            "the service is busy or the request is large",
            timeout,
        )
    if not connected:
        return RequestTimeoutError(
            f"no connection for {where} within {timeout:g} s (timeout= bounds the whole "
            "request: looking up the host, connecting, sending, and reading the complete "
            "answer); is the service running, and the URL right?",
            timeout,
        )
    return RequestTimeoutError(
        f"connected, but no answer to {where} within {timeout:g} s (timeout= bounds the whole "
        "request: connecting, sending, and reading the complete answer); raise timeout= "
        "(seconds) if the service is busy or the request is large",
        timeout,
    )


# What each timeout means to a caller: the phase (a key of httpx2's timeout settings), and what
# to say about it.
_READ_TIMEOUT = (
    "read",
    "connected, but no answer to {where} within {after}; raise timeout= (seconds) if the "
    "service is busy or the request is large",
)
_TIMEOUTS: dict[type[Exception], tuple[str, str]] = {
    httpx2.ConnectTimeout: (
        "connect",
        "no connection for {where} within {after}; is the service running, and the URL right?",
    ),
    httpx2.WriteTimeout: (
        "write",
        "connected, but could not send {where} within {after}; raise timeout=",
    ),
    httpx2.PoolTimeout: (
        "pool",
        "no free connection for {where} within {after}; raise timeout= or send fewer requests "
        "at once",
    ),
}


# Failures before a connection to the service was made (so before any of the request was sent);
# every other transport failure came after (a read or write on the connection, the server's
# answer cut short), or is the client's own (an invalid header, ...).
_UNCONNECTED = (
    httpx2.ConnectError,
    httpx2.ConnectTimeout,
    httpx2.PoolTimeout,
    httpx2.ProxyError,
    httpx2.UnsupportedProtocol,
)
_CONNECTED = (httpx2.NetworkError, httpx2.RemoteProtocolError, httpx2.ReadTimeout)


def _reason(exc: BaseException) -> str:
    """What ``exc`` says, else what caused it says (an async reset is a ReadError without a
    message, from a ConnectionResetError with one), else its type's name: never empty."""
    seen: BaseException | None = exc
    for _ in range(8):  # a chain is short; a cycle would be endless
        if seen is None:
            break
        if str(seen).strip(" ."):
            return str(seen).strip(" .")
        seen = seen.__cause__ or seen.__context__
    return type(exc).__name__


def _transport_error(
    exc: httpx2.RequestError, timeout: float | None = None, deadline: float | None = None
) -> ClientError:
    """An httpx2 failure as a client error that says what happened, where, and after how long,
    and whether the service was reached (a connection made) or not; past the request's
    ``deadline`` (monotonic), a timeout names the whole ``timeout``."""
    try:
        request: httpx2.Request | None = exc.request
    except RuntimeError:  # raised by httpx2 when the error carries no request
        request = None
    where = f"{request.method} {request.url}" if request is not None else "the mcdrop service"
    service = (
        f"the mcdrop service at {request.url.scheme}://{request.url.netloc.decode()}"
        if request is not None
        else "the mcdrop service"
    )
    if not isinstance(exc, httpx2.TimeoutException):
        if isinstance(exc, httpx2.DecodingError):
            return DecodingError(f"cannot decode the answer to {where}: {exc}", None, "")
        if isinstance(exc, _UNCONNECTED):
            return TransportError(
                f"cannot reach {service}: no connection for {where} ({_reason(exc)}); is the "
                "service running, and the URL right?"
            )
        if isinstance(exc, _CONNECTED):
            return TransportError(
                f"connected to {service}, but {where} got no complete answer: the connection "
                f"broke ({_reason(exc)}); the service may have stopped or restarted, or a proxy "
                "closed the connection"
            )
        return TransportError(f"cannot send {where}: {_reason(exc)}")
    if deadline is not None and time.monotonic() >= deadline:
        return _deadline_error(where, timeout, connected=not isinstance(exc, _UNCONNECTED))
    phase, message = _TIMEOUTS.get(type(exc), _READ_TIMEOUT)
    limits = request.extensions.get("timeout", {}) if request is not None else {}
    seconds = limits.get(phase)
    after = f"{seconds:g} s" if isinstance(seconds, int | float) else "the timeout"
    return RequestTimeoutError(message.format(where=where, after=after), seconds)


def _snippet(content: bytes) -> str:
    text = content[:SNIPPET_CHARS].decode("utf-8", "replace")
    return text + ("..." if len(content) > SNIPPET_CHARS else "")


def _status_message(answer: _Answer) -> str:
    """What an error status without the service's JSON error came with: a redirect's target, or
    the body's type and start (e.g. a proxy's page), so the message is never empty."""
    status = f"{answer.where} answered {answer.status_code} {answer.reason}".rstrip()
    location = answer.headers.get("location")
    if 300 <= answer.status_code < 400:
        target = f" to {_snippet(location.encode())!r}" if location else " without a Location"
        return (
            f"{status}: a redirect{target}, which the client does not follow; give the "
            "service's final address as the base URL"
        )
    if not answer.content:
        return f"{status} with an empty body"
    kind = answer.headers.get("content-type", "no content type")
    return (
        f"{status} with a body ({_snippet(kind.encode())}) that is not the service's JSON error; "
        f"it starts: {_snippet(answer.content)!r}"
    )


def _error(answer: _Answer) -> APIError:
    """An error status as the matching :class:`APIError`; a body that is not the service's error
    JSON (e.g. a proxy's page, a redirect) still gives the status's error, with a message that
    says what came instead."""
    status = answer.status_code
    try:
        body = json.loads(answer.content)["error"]
        code, message, details = body["code"], body["message"], body.get("details", [])
        if not (isinstance(code, str) and isinstance(message, str) and isinstance(details, list)):
            raise TypeError(body)
    except (ValueError, KeyError, TypeError, RecursionError):
        # RecursionError: JSON nested deeper than Python can parse is not the service's error.
        code, message, details = "http_error", _status_message(answer), []
    kind = _BY_STATUS.get(status, ServerError if status >= 500 else APIError)
    # Seconds, as the service sends it; an HTTP date (a proxy's) is left to the caller.
    wait = answer.headers.get("retry-after", "").strip()
    retry_after = int(wait) if wait.isascii() and wait.isdigit() else None
    return kind(status, code, message, details, retry_after)


def _parse(answer: _Answer, model: type[T], ok: Sequence[int] = (200,)) -> T:
    if answer.status_code not in ok:
        raise _error(answer)
    try:
        return model.model_validate_json(answer.content)
    except (ValidationError, RecursionError) as exc:
        if answer.status_code >= 400:  # e.g. a proxy's 503 page where /ready was expected
            raise _error(answer) from None
        # One line naming the first problem, not pydantic's multi-line report.
        if isinstance(exc, RecursionError):
            reason = "nested too deeply"
        else:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ())) or "body"
            reason = (
                "not JSON" if first.get("type") == "json_invalid" else f"{where}: {first['msg']}"
            )
        snippet = _snippet(answer.content)
        raise DecodingError(
            f"{answer.where} answered {answer.status_code} with a body that is not a "
            f"{model.__name__} ({reason}); is this an mcdrop service of the same version? The "
            f"body starts: {snippet!r}",
            answer.status_code,
            snippet,
        ) from None


def _build(
    http: httpx2.Client | httpx2.AsyncClient,
    headers: dict[str, str],
    method: str,
    path: str,
    body: dict[str, Any] | None,
) -> httpx2.Request:
    content = None if body is None else _encode(body)
    if body is not None:
        headers = {**headers, **_JSON}
    try:
        return http.build_request(method, path, content=content, headers=headers)
    except httpx2.InvalidURL as exc:  # e.g. a model name of 100,000 characters
        what = f"{method} {_snippet(path.encode())!r}"
        raise InvalidRequestError(f"cannot send {what}: {exc}") from None


def _uncertainty_body(
    inputs: Sequence[Any],
    n_samples: SupportsIndex | Literal["auto"] | None,
    seed: SupportsIndex | None,
    level: SupportsFloat,
    return_samples: bool,
    tolerance: SupportsFloat | None = None,
    max_n_samples: SupportsIndex | None = None,
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


_HTTP = TypeVar("_HTTP", httpx2.Client, httpx2.AsyncClient)
#: The environment variables httpx2 reads its proxies and certificates from (trust_env).
_ENVIRONMENT = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "SSL_CERT_FILE", "SSL_CERT_DIR")


def _new_http(kind: type[_HTTP], base_url: str, timeout: float | None) -> _HTTP:
    """An httpx2 client of ``kind`` for ``base_url``; an invalid URL, or settings of the
    environment it cannot use, are the client's own error."""
    try:
        return kind(base_url=base_url, timeout=_timeout(timeout))
    except httpx2.InvalidURL as exc:
        raise InvalidURLError(
            f"invalid service URL {_snippet(base_url.encode())!r}: {exc}"
        ) from None
    except (ValueError, ImportError, OSError) as exc:
        # httpx2 reads proxies and certificates from the environment: a proxy scheme it has no
        # transport for (ValueError), SOCKS without socksio (ImportError), a certificate file that
        # is not there (OSError, naming no file).
        raise InvalidURLError(
            f"cannot use the environment's settings ({', '.join(_ENVIRONMENT)}): "
            f"{str(exc).rstrip('.')}; correct or unset them"
        ) from None


class Client:
    """Blocking client.

    Args:
        base_url: where the service runs (``http://`` or ``https://``, optionally with a path
            prefix); else :class:`InvalidURLError`.
        api_key: sent as ``Authorization: Bearer <key>``; default: the ``MCDROP_API_KEY``
            environment variable, if set.
        timeout: seconds one request may take in all: looking up the host name and
            connecting (at most 10 s of it), sending, and reading the complete answer; past
            it, :class:`RequestTimeoutError`. ``None`` (or ``math.inf``): no limit, as in
            httpx. The default, 75 s, is above the server's own 60 s compute deadline, so a
            slow request ends with the server's 504 (a :class:`ServerError`) rather than a
            client-side timeout. Not a number > 0 and at most :data:`MAX_TIMEOUT` (a year):
            :class:`InvalidRequestError`.
        max_response_bytes: the largest answer read, in bytes after decoding (default 64 MiB,
            4 times the server's own default response limit); a larger one is
            :class:`ResponseTooLargeError`, refused before reading when its Content-Length says
            so. ``None``: no limit (only for a server you trust).
        http: an existing ``httpx2.Client`` to use instead (e.g. Starlette's TestClient); its
            own timeouts apply to each read, and the whole-request deadline is checked between
            the chunks of the answer.
    """

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        api_key: str | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        max_response_bytes: int | None = DEFAULT_MAX_RESPONSE_BYTES,
        http: httpx2.Client | None = None,
    ) -> None:
        _check_url(base_url)
        self._headers = _headers(api_key)
        self._timeout = _check_timeout(timeout)
        self._max_bytes = _check_max_bytes(max_response_bytes)
        self._owns = http is None
        if http is None:
            http = _new_http(httpx2.Client, base_url, self._timeout)
            _bound_by_deadline(http)
        self._http = http

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._owns:
            self._http.close()

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> _Answer:
        request = _build(self._http, self._headers, method, path, body)
        deadline = None if self._timeout is None else time.monotonic() + self._timeout
        token = _DEADLINE.set(deadline)
        try:
            response = self._http.send(request, stream=True)
            try:
                _check_length(request, response, self._max_bytes)
                reader = _Reader(request, response, self._max_bytes)
                for chunk in response.iter_bytes():
                    reader.add(chunk)
                    # Also a client given as http=, whose sockets do not keep the deadline.
                    if deadline is not None and time.monotonic() > deadline:
                        where = f"{request.method} {request.url}"
                        raise _deadline_error(where, self._timeout, connected=True)
                return reader.answer()
            finally:
                response.close()
        except httpx2.RequestError as exc:
            raise _transport_error(exc, self._timeout, deadline) from exc
        finally:
            _DEADLINE.reset(token)

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
        n_samples: SupportsIndex | Literal["auto"] | None = None,
        seed: SupportsIndex | None = None,
        level: SupportsFloat = 0.95,
        return_samples: bool = False,
        tolerance: SupportsFloat | None = None,
        max_n_samples: SupportsIndex | None = None,
        reject_rate: SupportsFloat | None = None,
        reject_threshold: SupportsFloat | None = None,
        reject_score: str | None = None,
        coverage: SupportsFloat | None = None,
    ) -> UncertaintyResponse:
        """MC-dropout uncertainty of rows ``inputs``. ``n_samples="auto"``: each row samples
        until its MC standard error is within ``tolerance`` or it has ``max_n_samples`` (both
        optional; the server's defaults are 0.01 for a classifier, in probability, 0.05 for a
        regressor, in units of its predictive std, and 1000), and each result's ``n_samples``
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
        timeout: float | None = DEFAULT_TIMEOUT,
        max_response_bytes: int | None = DEFAULT_MAX_RESPONSE_BYTES,
        http: httpx2.AsyncClient | None = None,
    ) -> None:
        _check_url(base_url)
        self._headers = _headers(api_key)
        self._timeout = _check_timeout(timeout)
        self._max_bytes = _check_max_bytes(max_response_bytes)
        self._owns = http is None
        self._http = (
            _new_http(httpx2.AsyncClient, base_url, self._timeout) if http is None else http
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._owns:
            await self._http.aclose()

    async def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> _Answer:
        request = _build(self._http, self._headers, method, path, body)
        sending = _Sending()
        if self._owns:  # a transport given as http= may trace nothing: then it is not known
            request.extensions["trace"] = sending.trace
        try:
            # One deadline for the whole request: cancelled wherever it waits.
            with anyio.fail_after(self._timeout):
                response = await self._http.send(request, stream=True)
                try:
                    _check_length(request, response, self._max_bytes)
                    reader = _Reader(request, response, self._max_bytes)
                    async for chunk in response.aiter_bytes():
                        reader.add(chunk)
                    return reader.answer()
                finally:
                    await response.aclose()
        except TimeoutError:
            where, connected = f"{request.method} {request.url}", sending.began
            raise _deadline_error(where, self._timeout, connected if self._owns else None) from None
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
        n_samples: SupportsIndex | Literal["auto"] | None = None,
        seed: SupportsIndex | None = None,
        level: SupportsFloat = 0.95,
        return_samples: bool = False,
        tolerance: SupportsFloat | None = None,
        max_n_samples: SupportsIndex | None = None,
        reject_rate: SupportsFloat | None = None,
        reject_threshold: SupportsFloat | None = None,
        reject_score: str | None = None,
        coverage: SupportsFloat | None = None,
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
