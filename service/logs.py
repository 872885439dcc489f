"""Request IDs and logs: one ID per request, echoed and logged; text or JSON-lines logs.

Every request gets an ID: the client's ``X-Request-ID`` if it sent a sane one (1-128 of
``A-Z a-z 0-9 . _ : -``), else a fresh one. It is echoed in the ``X-Request-ID`` response header
and in every error body, and stamped on every log record written while the request runs, so a
user's report, the access log and an error's traceback meet on one string. With
``MCDROP_LOG_FORMAT=json`` each log record is one JSON object per line, for log pipelines.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

_VALID = re.compile(r"[A-Za-z0-9._:-]{1,128}")

_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "mcdrop_request_id", default=None
)

access_log = logging.getLogger("mcdrop.access")

Scope = dict[str, Any]


def current_request_id() -> str | None:
    """The ID of the request being handled (None outside a request)."""
    return _request_id.get()


def _incoming(scope: Scope) -> str | None:
    for name, value in scope.get("headers", []):
        if name == b"x-request-id":
            text = value.decode("latin-1")
            return text if _VALID.fullmatch(text) else None
    return None


#: An ASGI application: what answers a request (``scope, receive, send``).
Answer = Callable[[Scope, Any, Any], Awaitable[None]]


class RequestIds:
    """ASGI middleware: the request's ID (see the module docstring), and one access-log line
    per request (method, path, status, milliseconds, ID).

    ``on_error(scope, exc)`` answers an exception that escapes the app before its response
    starts: inside this middleware, so that a 500 carries the ID as every answer does (Starlette's
    last-resort handler runs outside every middleware, after the ID is gone).
    """

    def __init__(
        self, app: Any, on_error: Callable[[Scope, Exception], Answer] | None = None
    ) -> None:
        self.app = app
        self.on_error = on_error

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # 32 random hex digits, as uuid4().hex but without building a UUID (a few µs).
        request_id = _incoming(scope) or os.urandom(16).hex()
        token = _request_id.set(request_id)
        status = 500  # unless a response starts
        responded = False
        started = time.perf_counter()

        async def send_with_id(message: dict[str, Any]) -> None:
            nonlocal status, responded
            if message["type"] == "http.response.start":
                status, responded = message["status"], True
                headers = [(k, v) for k, v in message.get("headers", []) if k != b"x-request-id"]
                headers.append((b"x-request-id", request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:
            if responded or self.on_error is None:  # too late to answer: the server cuts it
                raise
            await self.on_error(scope, exc)(scope, receive, send_with_id)
        finally:
            if access_log.isEnabledFor(logging.INFO):  # else skip building the record's fields
                self._log(scope, status, started)
            _request_id.reset(token)

    @staticmethod
    def _log(scope: Scope, status: int, started: float) -> None:
        elapsed_ms = (time.perf_counter() - started) * 1e3
        method, path = scope.get("method", ""), scope.get("path", "")
        access_log.info(
            "%s %s %d %.1f ms",
            method,
            path,
            status,
            elapsed_ms,
            extra={
                "method": method,
                "path": path,
                "status": status,
                "duration_ms": round(elapsed_ms, 3),
                "client": (scope.get("client") or ("", 0))[0],
            },
        )


class _StampRequestId(logging.Filter):
    """Adds ``request_id`` to every record (None outside a request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = current_request_id()
        return True


class _StartupSummary(logging.Filter):
    """When start-up fails, Starlette hands uvicorn the lifespan's traceback to log. A
    ``StartupError`` is already the summary (one line per failed model, each logged before it):
    keep its message, drop the traceback that only shows where the lifespan raised it."""

    _TRACEBACK = "Traceback (most recent call last):"
    _MARK = "StartupError: "  # by name: service.app imports this module

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.msg
        if isinstance(text, str) and text.startswith(self._TRACEBACK) and self._MARK in text:
            record.msg, record.args = text.rpartition(self._MARK)[2].rstrip(), ()
        return True


#: Attributes every LogRecord has: what is left over came from ``extra=``. Less uvicorn's
#: ``color_message``, the message again with terminal colour codes, no use in a JSON line.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "color_message",
}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, request_id, the record's extra
    fields, and the traceback if any."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    """``LEVEL:     [request id] logger: message``, ``[-]`` outside a request."""

    def __init__(self) -> None:
        super().__init__("%(levelname)s:     [%(request_id)s] %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        if getattr(record, "request_id", None) is None:  # it read "[None]"
            record = logging.makeLogRecord({**vars(record), "request_id": "-"})
        return super().format(record)


def config(level: str, fmt: str) -> dict[str, Any]:
    """A ``logging.config.dictConfig`` for uvicorn and mcdrop: our access log replaces
    uvicorn's (which knows no request IDs)."""
    formatter = {"()": JsonFormatter} if fmt == "json" else {"()": TextFormatter}
    handler = {
        "class": "logging.StreamHandler",
        "formatter": "default",
        "filters": ["request_id", "startup_summary"],
        "stream": "ext://sys.stderr",
    }
    level = level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {
            "request_id": {"()": _StampRequestId},
            "startup_summary": {"()": _StartupSummary},
        },
        "formatters": {"default": formatter},
        "handlers": {"default": handler},
        "loggers": {
            "uvicorn": {"handlers": ["default"], "level": level, "propagate": False},
            "uvicorn.access": {"handlers": [], "level": "CRITICAL", "propagate": False},
            "mcdrop": {"handlers": ["default"], "level": level, "propagate": False},
        },
    }
