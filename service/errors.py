"""The one place where errors become HTTP responses.

Every error response is JSON: ``{"error": {"code": ..., "message": ..., "details": [...],
"request_id": ...}}`` (the ID also travels in the ``X-Request-ID`` header) on the native routes,
and ``{"error": "<message>"}`` on the Open Inference Protocol's (paths under ``/v2``), whose
statuses differ only as :data:`V2_STATUS` says (it has no 422: a request it cannot run is a
400), with the same codes behind them.
The codes, each with its status and what raises it, are all of :class:`ErrorCode` (a test holds
this table and the enum to each other, and every error response to the enum)::

    code                    status  raised by
    invalid_json            400     a body that is not JSON (or not UTF-8, or unparseable), or
                                    MalformedRequestError: a v2 body that cannot be split or
                                    inflated (binary framing, Content-Encoding)
    model_not_found         404     ModelNotFoundError: unknown model name
    not_found               404     a path no route serves; one that is served less a trailing
                                    slash too (no redirect): the message says to remove it
    method_not_allowed      405     a method the path does not serve (``Allow`` lists those it does)
    body_too_large          413     app.BodyLimit: request body above the size limit (or
                                    BodyTooLargeError: a v2 body above it once inflated)
    unsupported_media_type  415     UnsupportedMediaTypeError: a body that is not application/json,
                                    or compressed (Content-Encoding) on a native route
    invalid_request         422     RequestValidationError: fields of the wrong type or range
    invalid_input           422     mcdrop.InvalidInputError: inputs of the wrong shape, NaN/inf
    non_finite_output       422     mcdrop.NonFiniteOutputError: outputs overflow (rows named)
    invalid_argument        422     mcdrop.InvalidArgumentError
    decision_unavailable    422     mcdrop.DecisionUnavailableError: a decision the model cannot
                                    make: reject_rate or coverage without calibration.json
                                    (``mcdrop calibrate``), a coverage beyond its calibration, a
                                    reject_score its task does not have
    limit_exceeded          422     LimitExceededError: too many rows, samples, returned samples,
                                    or response bytes; a body of too many keys or values
                                    (dataplane.check_keys, check_values), before it is parsed
    model_rejected_input    422     ModelRejectedInputError: the model's own forward raised on
                                    the request's inputs (mcdrop.model_errors.raised_by_model: a
                                    token id past its vocabulary, a ValueError of its code);
                                    the message names the exception and echoes its text; logged
                                    with its traceback as a warning
    unauthorized            401     an API key is set and the request lacks it (service.auth)
    request_timeout         408     app.BodyLimit: the body did not arrive in time
    client_closed_request   499     ClientDisconnectedError: the client left (nobody reads it)
    overloaded              503     OverloadedError: the model's queue is full (``Retry-After``)
    shutting_down           503     mcdrop.SamplingStoppedError: the server is stopping
    deadline_exceeded       504     DeadlineExceededError: no answer within request_timeout_s (or
                                    a v2 request's shorter ``timeout``)
    model_not_ready         503     ModelNotReadyError: the model is still loading, or failed to
    model_error             500     any other mcdrop.McDropError: the model cannot be sampled
    internal_error          500     anything unexpected (logged with its traceback; answered
                                    inside logs.RequestIds, so it carries the request's ID): an
                                    error of mcdrop's or the service's own code, or of the
                                    machine (out of memory, a CUDA error), even inside the model
    http_error              4xx     another status raised by Starlette itself, or app.BodyLimit's
                                    400 for a Content-Length that is not a byte count, or
                                    protocol.TimedHttpProtocol's 431 for request headers above
                                    max_header_bytes and 400 for bytes that are not HTTP/1.1

Error bodies echo the offending value only as far as JSON can carry it: a NaN or ±inf becomes
its string, and long values are cut (see :func:`jsonable`); rendering an error never raises.
Messages echo client data (names, shapes, header values) only through :func:`echo` and
:func:`echo_list`, cut to :data:`MAX_ECHO_CHARS` characters and :data:`MAX_ECHO_ITEMS` items;
the server's own words, which say what to fix, are never cut (a message is bounded as a whole
only past :data:`MAX_MESSAGE_CHARS`, its start and end kept: a safety net for an echo that
escaped the helpers).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from mcdrop.exceptions import (
    DecisionUnavailableError,
    InvalidArgumentError,
    InvalidInputError,
    McDropError,
    NonFiniteOutputError,
    SamplingStoppedError,
)
from mcdrop.model_errors import cause, raised_by_model
from service.logs import current_request_id
from service.schemas import ErrorCode

log = logging.getLogger("mcdrop.service")

__all__ = [
    "MAX_ECHO_CHARS",
    "MAX_ECHO_ITEMS",
    "MAX_MESSAGE_CHARS",
    "V2_STATUS",
    "ClientDisconnectedError",
    "DeadlineExceededError",
    "ErrorCode",
    "LimitExceededError",
    "MalformedRequestError",
    "ModelNotFoundError",
    "ModelNotReadyError",
    "ModelRejectedInputError",
    "OverloadedError",
    "ServiceError",
    "UnsupportedMediaTypeError",
    "bounded",
    "echo",
    "echo_list",
    "error_response",
    "first_line",
    "install",
    "is_v2",
    "jsonable",
    "model_rejected",
    "public_message",
    "rejected_message",
    "summary",
    "unexpected",
    "validation_details",
]

#: Longest echo of a value in an error body (characters of its text).
MAX_ECHO_CHARS = 100
#: Most items of a list (names, a shape) a message echoes, then "... and N more".
MAX_ECHO_ITEMS = 10
#: Past this length a message is cut in its middle: no message of the server's own comes near
#: it, so only an unbounded echo of client data is (a 15 MB input name stays out of the answer).
MAX_MESSAGE_CHARS = 2000
#: Most validation errors an error body details (the message summarises the first few).
MAX_DETAILS = 20


class ServiceError(Exception):
    """An error of the service layer with its HTTP status and error code."""

    status_code = 500
    code = ErrorCode.INTERNAL_ERROR

    def __init__(
        self,
        message: str,
        details: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or []
        self.headers = headers


class MalformedRequestError(ServiceError):
    status_code = 400
    code = ErrorCode.INVALID_JSON


class ModelNotFoundError(ServiceError):
    status_code = 404
    code = ErrorCode.MODEL_NOT_FOUND


class ModelNotReadyError(ServiceError):
    status_code = 503
    code = ErrorCode.MODEL_NOT_READY


class LimitExceededError(ServiceError):
    status_code = 422
    code = ErrorCode.LIMIT_EXCEEDED


class BodyTooLargeError(ServiceError):
    status_code = 413
    code = ErrorCode.BODY_TOO_LARGE


class UnsupportedMediaTypeError(ServiceError):
    status_code = 415
    code = ErrorCode.UNSUPPORTED_MEDIA_TYPE


class OverloadedError(ServiceError):
    status_code = 503
    code = ErrorCode.OVERLOADED

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after)})


class DeadlineExceededError(ServiceError):
    status_code = 504
    code = ErrorCode.DEADLINE_EXCEEDED


class ClientDisconnectedError(ServiceError):
    status_code = 499  # nginx's "client closed request": logged, never read by anyone
    code = ErrorCode.CLIENT_CLOSED_REQUEST


class ModelRejectedInputError(ServiceError):
    """The model's own forward raised on a request's inputs (see :func:`model_rejected`)."""

    status_code = 422
    code = ErrorCode.MODEL_REJECTED_INPUT


#: An absolute path of two or more components (``/srv/models/x/model.json``); group 1 is its
#: last component.
_ABSOLUTE_PATH = re.compile(r"(?<![\w.~/-])(?:/[^\s'\"/:,;()\[\]{}<>]+)+/([^\s'\"/:,;()\[\]{}<>]+)")


def public_message(message: str, model_dir: Path) -> str:
    """``message`` fit for a response: paths under ``model_dir`` relative to it
    (``diabetes/model.json``), and any other absolute path cut to its last component, so that no
    response reveals the server's file layout."""
    roots = {str(model_dir), str(model_dir.absolute()), str(model_dir.resolve())}
    for root in sorted(roots, key=len, reverse=True):  # the longest first: it contains the others
        prefix = re.escape(root.rstrip("/") + "/")
        message = re.sub(rf"(?<![\w.~/-]){prefix}", "", message)
    return _ABSOLUTE_PATH.sub(r"\1", message)


def _cut(text: str) -> str:
    if len(text) <= MAX_ECHO_CHARS:
        return text
    return f"{text[:MAX_ECHO_CHARS]}... ({len(text)} characters)"


def echo(value: Any) -> str:
    """``value``, a piece of client data, as a message quotes it: its ``repr`` (a string in
    quotes, a list in brackets), cut to :data:`MAX_ECHO_CHARS` characters and
    :data:`MAX_ECHO_ITEMS` items; never raises."""
    if isinstance(value, str) and len(value) > MAX_ECHO_CHARS:
        # repr of the head only: the whole of a 15 MB name is never copied.
        return f"{value[:MAX_ECHO_CHARS]!r}... ({len(value)} characters)"
    if isinstance(value, list | tuple):
        return echo_list(value)
    if isinstance(value, int) and not isinstance(value, bool):
        shown = jsonable(value)
        return shown if isinstance(shown, str) else str(shown)
    try:
        return _cut(repr(value))
    except Exception:  # a repr that raises: name its type instead
        return type(value).__name__


def echo_list(values: Any) -> str:
    """A list of client data (input names, a shape) as a message quotes it: its first
    :data:`MAX_ECHO_ITEMS` items, each as :func:`echo` gives it, then "... and N more"."""
    items = list(values[: MAX_ECHO_ITEMS + 1])
    shown = ", ".join(echo(v) for v in items[:MAX_ECHO_ITEMS])
    if len(values) > MAX_ECHO_ITEMS:
        shown += f", ... and {len(values) - MAX_ECHO_ITEMS} more"
    return f"[{shown}]"


def bounded(message: str) -> str:
    """``message`` as an error body carries it: whole up to :data:`MAX_MESSAGE_CHARS`, else its
    start and its end (which says what to fix) around a note of what was left out."""
    if len(message) <= MAX_MESSAGE_CHARS:
        return message
    head, tail = MAX_MESSAGE_CHARS // 2, MAX_MESSAGE_CHARS // 4
    left_out = len(message) - head - tail
    return f"{message[:head]} [... {left_out} characters left out ...] {message[-tail:]}"


def jsonable(value: Any) -> Any:
    """``value`` as something JSON can always render: non-finite floats as their string
    (``"nan"``, ``"inf"``), ints of more than :data:`MAX_ECHO_CHARS` digits and long strings cut,
    containers element by element, anything else as its cut ``repr``."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, int):
        # Above 4300 digits str(int) itself raises; far below that the echo is useless.
        if value.bit_length() > 3 * MAX_ECHO_CHARS:
            return f"an integer of about {int(value.bit_length() * math.log10(2))} digits"
        text = str(value)
        return value if len(text) <= MAX_ECHO_CHARS else _cut(text)
    if isinstance(value, str):
        return _cut(value)
    if isinstance(value, dict):
        return {_cut(str(k)): jsonable(v) for k, v in list(value.items())[:20]}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value[:20]]
    try:
        return _cut(repr(value))
    except Exception:  # a repr that raises: name its type instead
        return type(value).__name__


def _location(loc: tuple[Any, ...]) -> str:
    # A part may be a client's key (an unknown field's name): cut like any echo.
    parts = [_cut(str(p)) for p in loc if p != "body"]
    return ".".join(parts) if parts else "body"


def _message(error: dict[str, Any]) -> str:
    """pydantic's message, whole (it is the server's: a validator's or pydantic's own words),
    without the prefix pydantic puts before a validator's ValueError."""
    message = str(error.get("msg", ""))
    if error.get("type") == "value_error":
        message = message.removeprefix("Value error, ")
    return bounded(message)


def validation_details(errors: Any) -> list[dict[str, Any]]:
    """pydantic errors as ``{"field", "message", "type"[, "input"]}`` entries, the first
    :data:`MAX_DETAILS` of them; the input is echoed only when it is a scalar (see
    :func:`jsonable`), and a field named by the client cut as any echo."""
    return [
        {
            "field": _location(tuple(e.get("loc", ()))),
            "message": _message(e),
            "type": str(e.get("type", "")),
            **(
                {"input": jsonable(e["input"])}
                if "input" in e and not isinstance(e["input"], dict | list)
                else {}
            ),
        }
        for e in list(errors)[:MAX_DETAILS]
    ]


def summary(details: list[dict[str, Any]], total: int) -> str:
    """The first few ``details`` as one line, ``field: message; ...``, and how many more of
    ``total`` errors there are."""
    shown = "; ".join(f"{d['field']}: {d['message']}" for d in details[:5])
    return shown if total <= 5 else f"{shown}; and {total - 5} more"


#: What a client whose inputs the model's forward refused should check: the values, and where
#: the error is an index out of range (an ``nn.Embedding``'s), its ids.
_CHECK_VALUES = "check that the values are within what the model takes"
_CHECK_IDS = f"{_CHECK_VALUES}, e.g. token ids within its vocabulary"
_INDEX_OUT_OF_RANGE = re.compile(r"\bindex\b.*\bout of (range|bounds)\b", re.IGNORECASE)


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s text as a message quotes it: absolute paths cut to their
    last component, the whole cut to :data:`MAX_ECHO_CHARS` ("" for none); never raises."""
    try:
        text = str(exc)
    except Exception:  # a __str__ that raises: the exception's name says enough
        return ""
    line = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return _cut(_ABSOLUTE_PATH.sub(r"\1", line))


def rejected_message(exc: BaseException, inputs: str = "this request's inputs") -> str:
    """What ``model_rejected_input`` says of ``exc``, raised by a model's own forward on
    ``inputs`` (the service's and ``mcdrop predict --model-dir``'s words): the exception's name,
    the first line of its text (:func:`first_line`), never its traceback, and what to check,
    token ids only where it says an index is out of range (an ``nn.Embedding``'s)."""
    exc = cause(exc)  # (a StopIteration named as itself)
    said = first_line(exc)
    index = isinstance(exc, IndexError) or _INDEX_OUT_OF_RANGE.search(said)
    return (
        f"the model raised {type(exc).__name__} on {inputs}{': ' + said if said else ''} "
        f"({_CHECK_IDS if index else _CHECK_VALUES})"
    )


def model_rejected(exc: BaseException, model: str) -> ModelRejectedInputError | None:
    """:class:`ModelRejectedInputError` for ``exc``, an exception that running ``model`` on one
    request raised, when it came from the model's own forward
    (:func:`mcdrop.model_errors.raised_by_model`), logged with its traceback as a warning; None
    for any other (mcdrop's errors, the machine's, a bug of mcdrop's or the service's code).

    The service has checked the inputs' shape, dtype and finiteness, and the model has run on
    rows of its own at load: what its forward refuses now is almost always a value outside what
    it takes (a token id past its vocabulary). The message is :func:`rejected_message`'s."""
    if not raised_by_model(exc):
        return None
    exc = cause(exc)  # (a StopIteration named as itself)
    name = type(exc).__name__
    log.warning(
        "model %r raised %s on a request's inputs: answered model_rejected_input",
        model,
        name,
        exc_info=exc,
    )
    return ModelRejectedInputError(rejected_message(exc), [{"field": "inputs", "type": name}])


#: Native status -> the Open Inference Protocol's, where they differ.
V2_STATUS = {422: 400}


def is_v2(path: str) -> bool:
    """Whether ``path`` is a route of the Open Inference Protocol (``/v2``, ``/v2/...``)."""
    return path == "/v2" or path.startswith("/v2/")


def error_response(
    status_code: int,
    code: ErrorCode,
    message: str,
    details: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
    *,
    path: str = "",
) -> JSONResponse:
    """The JSON error answer to a request for ``path``, in the shape of that path's protocol;
    never raises (details JSON cannot carry are dropped)."""
    message = bounded(message)
    if is_v2(path):
        return JSONResponse(
            status_code=V2_STATUS.get(status_code, status_code),
            content={"error": message},
            headers=headers,
        )
    content = {
        "error": {
            "code": str(code),
            "message": message,
            "details": details or [],
            "request_id": current_request_id(),
        }
    }
    try:
        return JSONResponse(status_code=status_code, content=content, headers=headers)
    except (TypeError, ValueError):  # a detail JSON cannot carry: the message still goes out
        log.warning("error details not serialisable: %r", details)
        content["error"]["details"] = []
        return JSONResponse(status_code=status_code, content=content, headers=headers)


#: The methods a 405's ``Allow`` may list, in the order it lists them.
_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def _allowed_methods(request: Request, path: str | None = None) -> str:
    """The methods some route serves at the request's path (or at ``path``), for a 405's
    ``Allow``. (Starlette's own lists only the first matching route's, and a GET route's HEAD
    twin is a route of its own.) Probed through each route's public ``matches``, so nested
    routers count too: once with any method, for the routes whose pattern takes the path at all
    (PARTIAL: another method), and only those once per method (each try reads the whole path,
    up to the 64 KB of max_header_bytes, on the event loop)."""
    scope = request.scope if path is None else {**request.scope, "path": path}
    routes = [
        route
        for route in request.app.router.routes
        if route.matches({**scope, "method": "GET"})[0] != Match.NONE
    ]
    allowed = [
        method
        for method in _METHODS
        if any(route.matches({**scope, "method": method})[0] == Match.FULL for route in routes)
    ]
    return ", ".join(allowed)


def _slash_hint(request: Request) -> str:
    """What a 404 adds when the path less its trailing slashes is served: to remove them, and
    the methods and path that are served (the app does not redirect: see create_app)."""
    path = _path(request)
    stripped = path.rstrip("/")
    if not stripped or stripped == path:
        return ""
    allowed = _allowed_methods(request, stripped)
    if not allowed:
        return ""
    return f"; remove the trailing slash: {allowed} {_cut(stripped)}"


def _path(request: Request) -> str:
    return request.scope.get("path", "")


def install(app: FastAPI) -> None:
    """Register every exception handler on ``app``."""

    @app.exception_handler(ServiceError)
    async def _service(request: Request, exc: ServiceError) -> JSONResponse:
        return error_response(
            exc.status_code, exc.code, exc.message, exc.details, exc.headers, path=_path(request)
        )

    @app.exception_handler(SamplingStoppedError)
    async def _stopped(request: Request, exc: SamplingStoppedError) -> JSONResponse:
        headers = {"Retry-After": "1"}
        return error_response(
            503, ErrorCode.SHUTTING_DOWN, str(exc), headers=headers, path=_path(request)
        )

    @app.exception_handler(NonFiniteOutputError)
    async def _non_finite(request: Request, exc: NonFiniteOutputError) -> JSONResponse:
        return error_response(
            422,
            ErrorCode.NON_FINITE_OUTPUT,
            str(exc),
            [{"field": "inputs", "rows": exc.rows}],
            path=_path(request),
        )

    @app.exception_handler(InvalidInputError)
    async def _input(request: Request, exc: InvalidInputError) -> JSONResponse:
        return error_response(422, ErrorCode.INVALID_INPUT, str(exc), path=_path(request))

    @app.exception_handler(DecisionUnavailableError)
    async def _decision(request: Request, exc: DecisionUnavailableError) -> JSONResponse:
        return error_response(422, ErrorCode.DECISION_UNAVAILABLE, str(exc), path=_path(request))

    @app.exception_handler(InvalidArgumentError)
    async def _argument(request: Request, exc: InvalidArgumentError) -> JSONResponse:
        return error_response(422, ErrorCode.INVALID_ARGUMENT, str(exc), path=_path(request))

    @app.exception_handler(McDropError)
    async def _model(request: Request, exc: McDropError) -> JSONResponse:
        log.error("model error: %s", exc)
        return error_response(500, ErrorCode.MODEL_ERROR, str(exc), path=_path(request))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        details = validation_details(errors)
        if any(d["type"] == "json_invalid" for d in details):
            return error_response(
                400,
                ErrorCode.INVALID_JSON,
                "the request body is not valid JSON: " + details[0]["message"],
                details,
                path=_path(request),
            )
        return error_response(
            422,
            ErrorCode.INVALID_REQUEST,
            f"invalid request: {summary(details, len(errors))}",
            details,
            path=_path(request),
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(exc.headers or {})
        # The path and method are the client's: cut; the rest is the server's words, whole.
        path = _cut(request.url.path)
        if exc.status_code == 404:
            code, message = ErrorCode.NOT_FOUND, f"no route serves {path}{_slash_hint(request)}"
        elif exc.status_code == 405:
            allowed = _allowed_methods(request) or headers.get("Allow", "")
            headers["Allow"] = allowed
            code = ErrorCode.METHOD_NOT_ALLOWED
            message = f"{_cut(request.method)} is not allowed on {path}; use {allowed}"
        elif exc.status_code == 400:
            # FastAPI's "error parsing the body": e.g. an integer of more than 4300 digits.
            code = ErrorCode.INVALID_JSON
            message = f"the request body could not be parsed as JSON: {_cut(str(exc.detail))}"
        else:
            code, message = ErrorCode.HTTP_ERROR, _cut(str(exc.detail))
        return error_response(exc.status_code, code, message, headers=headers, path=_path(request))

    # Starlette's last resort, outside every middleware: logs.RequestIds answers the rest
    # with unexpected() (and the request's ID), so only an error of its own gets here.
    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return unexpected(request.scope, exc)


def unexpected(scope: Mapping[str, Any], exc: Exception) -> JSONResponse:
    """The 500 ``internal_error`` answer to ``exc``, an exception no handler took, logged with
    its traceback; the message reveals nothing of it (for :class:`service.logs.RequestIds`, which
    gives it the request's ID)."""
    log.exception("unhandled error", exc_info=exc)
    return error_response(
        500,
        ErrorCode.INTERNAL_ERROR,
        "internal server error; see the server log",
        path=scope.get("path", ""),
    )
