"""The one place where errors become HTTP responses.

Every error response is JSON: ``{"error": {"code": ..., "message": ..., "details": [...]}}``.

    ServiceError                 status
    ├── ModelNotFoundError       404  unknown model name
    ├── ModelNotReadyError       503  the model is still loading, or failed to load
    ├── OverloadedError          503  the model's queue is full (with Retry-After)
    ├── LimitExceededError       422  too many rows, samples, returned samples or response bytes,
    │                                 or more work than fits in the request deadline
    ├── DeadlineExceededError    504  the answer was not ready within request_timeout_s
    └── ClientDisconnectedError  499  the client went away (nobody reads this answer)

    mcdrop.InvalidInputError     422  inputs of the wrong shape, non-numeric, NaN/inf
    mcdrop.InvalidArgumentError  422
    mcdrop.SamplingStoppedError  503  sampling stopped: the service is shutting down
    mcdrop.McDropError (other)   500  the model itself cannot be sampled
    RequestValidationError       400  invalid JSON; 422 for fields of the wrong type or range
    (a body over the limit)      413  answered by app.BodyLimit before the app reads it
    (a body too slow to arrive)  408  the same middleware, when the body does not arrive in time
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from mcdrop.exceptions import (
    InvalidArgumentError,
    InvalidInputError,
    McDropError,
    SamplingStoppedError,
)

log = logging.getLogger("mcdrop.service")


class ServiceError(Exception):
    """An error of the service layer with its HTTP status and error code."""

    status_code = 500
    code = "internal_error"

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


class ModelNotFoundError(ServiceError):
    status_code = 404
    code = "model_not_found"


class ModelNotReadyError(ServiceError):
    status_code = 503
    code = "model_not_ready"


class LimitExceededError(ServiceError):
    status_code = 422
    code = "limit_exceeded"


class OverloadedError(ServiceError):
    status_code = 503
    code = "overloaded"

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after)})


class DeadlineExceededError(ServiceError):
    status_code = 504
    code = "deadline_exceeded"


class ClientDisconnectedError(ServiceError):
    status_code = 499  # nginx's "client closed request": logged, never read by anyone
    code = "client_closed_request"


def error_response(
    status_code: int,
    code: str,
    message: str,
    details: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(
        status_code=status_code,
        content={"error": {"code": code, "message": message, "details": details or []}},
        headers=headers,
    )


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


def _location(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) if parts else "body"


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)
    return value


def validation_details(errors: Any) -> list[dict[str, Any]]:
    """pydantic errors as ``{"field", "message", "type"}`` entries."""
    return [
        {
            "field": _location(tuple(e.get("loc", ()))),
            "message": e.get("msg", ""),
            "type": e.get("type", ""),
            **(
                {"input": _jsonable(e["input"])}
                if "input" in e and not isinstance(e["input"], dict | list)
                else {}
            ),
        }
        for e in errors
    ]


def install(app: FastAPI) -> None:
    """Register every exception handler on ``app``."""

    @app.exception_handler(ServiceError)
    async def _service(_: Request, exc: ServiceError) -> JSONResponse:
        return error_response(exc.status_code, exc.code, exc.message, exc.details, exc.headers)

    @app.exception_handler(SamplingStoppedError)
    async def _interrupted(_: Request, exc: SamplingStoppedError) -> JSONResponse:
        return error_response(503, "shutting_down", str(exc), headers={"Retry-After": "1"})

    @app.exception_handler(InvalidInputError)
    async def _input(_: Request, exc: InvalidInputError) -> JSONResponse:
        return error_response(422, "invalid_input", str(exc))

    @app.exception_handler(InvalidArgumentError)
    async def _argument(_: Request, exc: InvalidArgumentError) -> JSONResponse:
        return error_response(422, "invalid_argument", str(exc))

    @app.exception_handler(McDropError)
    async def _model(_: Request, exc: McDropError) -> JSONResponse:
        log.error("model error: %s", exc)
        return error_response(500, "model_error", str(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        details = validation_details(exc.errors())
        if any(d["type"] == "json_invalid" for d in details):
            return error_response(
                400,
                "invalid_json",
                "the request body is not valid JSON: " + details[0]["message"],
                details,
            )
        summary = "; ".join(f"{d['field']}: {d['message']}" for d in details[:5])
        return error_response(422, "invalid_request", f"invalid request: {summary}", details)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed"}
        return error_response(
            exc.status_code, codes.get(exc.status_code, "http_error"), str(exc.detail)
        )

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return error_response(500, "internal_error", "internal server error; see the server log")
