"""Running the app under uvicorn, with the timeouts a public server needs.

uvicorn times out idle keep-alive connections but not a client that trickles its request
headers (one byte a second holds a connection, and a worker, forever), and any byte resets its
keep-alive timer, even the blank lines a client may send between requests (which begin no
request). :class:`TimedHttpProtocol` closes a connection whose headers are not complete within
``header_timeout_s`` of its first byte (or of the connection opening), and an idle keep-alive
connection uvicorn's keep-alive timeout after its last response unless a new request begins, so
that neither a trickle of header bytes nor one of blank lines holds a connection open. The body's
own deadline is :class:`service.app.BodyLimit`'s. On SIGTERM, requests in flight get
``shutdown_timeout_s`` to finish, then the server exits.
"""

from __future__ import annotations

import asyncio
from functools import partial
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service import logs
from service.app import create_app
from service.config import Settings


class TimedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline on each request's headers, and one on an
    idle keep-alive connection that only the start of a new request lifts."""

    def __init__(self, *args: Any, header_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout_s = header_timeout_s
        self.header_timer: asyncio.TimerHandle | None = None
        self.idle_timer: asyncio.TimerHandle | None = None

    def _arm(self) -> None:
        if self.header_timer is None:
            self.header_timer = self.loop.call_later(self.header_timeout_s, self._headers_late)

    def _disarm(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def _headers_late(self) -> None:
        self.header_timer = None
        if not self.transport.is_closing():
            self.logger.info("closing a connection whose request headers came too slowly")
            self.transport.close()

    def _idle_too_long(self) -> None:
        self.idle_timer = None
        if not self.transport.is_closing():
            self.logger.info("closing a keep-alive connection that began no new request")
            self.transport.close()

    def _wake(self) -> None:
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None

    # uvicorn's signature, which narrows asyncio.Protocol's BaseTransport to a Transport (and
    # ignores the same override error).
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()  # a connection that never sends a byte is cut too

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._wake()
        self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        self._wake()  # a request pipelined before the last response ended: it runs now
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._disarm()
        self._wake()
        # uvicorn armed its keep-alive timer (no pipelined request runs next), but any byte
        # cancels that one, blank lines too: ours only a new request's first byte does.
        if self.timeout_keep_alive_task is not None:
            self.idle_timer = self.loop.call_later(self.timeout_keep_alive, self._idle_too_long)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._wake()
        super().connection_lost(exc)


def config(settings: Settings, **overrides: Any) -> uvicorn.Config:
    """The uvicorn configuration of ``mcdrop serve`` for ``settings``."""
    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "workers": 1,
        "log_level": settings.log_level,
        "log_config": logs.config(settings.log_level, settings.log_format),
        "http": partial(TimedHttpProtocol, header_timeout_s=settings.header_timeout_s),
        "timeout_graceful_shutdown": settings.shutdown_timeout_s,
        **overrides,
    }
    return uvicorn.Config(create_app(settings), **options)


def run(settings: Settings) -> None:
    """Serve until SIGINT/SIGTERM."""
    uvicorn.Server(config(settings)).run()
