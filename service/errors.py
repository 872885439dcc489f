"""The one place where errors become HTTP responses.

Every error response is JSON: ``{"error": {"code": ..., "message": ..., "details": [...]}}``.

    ServiceError                 status
    ├── ModelNotFoundError       404  unknown model name
    ├── ModelNotReadyError       503  the model is still loading, or failed to load
    └── LimitExceededError       422  too many rows, samples, or returned samples

    mcdrop.InvalidInputError     422  inputs of the wrong shape, non-numeric, NaN/inf
    mcdrop.InvalidArgumentError  422
    mcdrop.McDropError (other)   500  the model itself cannot be sampled
    RequestValidationError       400  invalid JSON; 422 for fields of the wrong type or range
    (a body over the limit)      413  answered by app.BodyLimit before the app reads it
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from mcdrop.exceptions import InvalidArgumentError, InvalidInputError, McDropError

log = logging.getLogger("mcdrop.service")


class ServiceError(Exception):
    """An error of the service layer with its HTTP status and error code."""

    status_code = 500
    code = "internal_error"

    def __init__(self, message: str, details: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or []


class ModelNotFoundError(ServiceError):
    status_code = 404
    code = "model_not_found"


class ModelNotReadyError(ServiceError):
    status_code = 503
    code = "model_not_ready"


class LimitExceededError(ServiceError):
    status_code = 422
    code = "limit_exceeded"


def error_response(
    status_code: int, code: str, message: str, details: list[dict[str, Any]] | None = None
) -> JSONResponse:
    return JSONResponse(
        status_code=status_code,
        content={"error": {"code": code, "message": message, "details": details or []}},
    )


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
        return error_response(exc.status_code, exc.code, exc.message, exc.details)

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
