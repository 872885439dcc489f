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

uvicorn's httptools protocol buffers request headers without limit (500 MB of them were read
into memory, and answered): :class:`TimedHttpProtocol` answers a request whose head (request
line and headers) passes ``max_header_bytes`` with a JSON 431 and closes the connection, having
held at most that much of it (and one read of the socket, 256 KiB, past it). Nor does uvicorn
bound how long a response may wait for a client that reads none of it (each such connection held
its response, 7.4 MB, indefinitely): a connection whose unsent response has not shrunk for
``send_timeout_s`` is dropped.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shutil
import socket
import sys
import tempfile
from functools import partial
from pathlib import Path
from typing import Any, cast

import uvicorn
from fastapi import FastAPI
from uvicorn.config import STARTUP_FAILURE
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.supervisors import Multiprocess

from service import errors, logs
from service.app import create_app
from service.config import Settings
from service.replicas import ReplicaHeader

#: How long a connection refused with a 431 stays open for the client to read the answer.
_LINGER_S = 1.0

#: The environment variable that hands ``mcdrop serve``'s settings to its worker processes.
_WORKER_SETTINGS = "MCDROP_SERVE_WORKER_SETTINGS"


class TimedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline on each request's headers, and one on an
    idle keep-alive connection that only the start of a new request lifts."""

    def __init__(
        self,
        *args: Any,
        header_timeout_s: float,
        max_header_bytes: int = 64 * 1024,
        send_timeout_s: float = 30.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout_s = header_timeout_s
        self.header_timer: asyncio.TimerHandle | None = None
        self.idle_timer: asyncio.TimerHandle | None = None
        self.max_header_bytes = max_header_bytes
        #: Bytes of the request head received so far; None between a request's headers and the
        #: next request's first byte.
        self.header_bytes: int | None = 0
        self.heads = 0  # requests whose headers are complete, on this connection
        self.refused = False  # a 431 is sent: what the client still sends is read and dropped
        self.send_timeout_s = send_timeout_s
        self.send_timer: asyncio.TimerHandle | None = None

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

    def data_received(self, data: bytes) -> None:
        if self.refused:
            return
        if self.header_bytes is None:  # a body, or a request's first bytes after a response
            super().data_received(data)
            return
        room = self.max_header_bytes - self.header_bytes
        if len(data) <= room:
            self.header_bytes += len(data)
            super().data_received(data)
            return
        # The headers must end within ``room`` bytes: the rest may be the body.
        heads = self.heads
        if room:
            super().data_received(data[:room])
        if self.transport.is_closing():
            return
        if self.heads == heads:
            self._header_too_large()
            return
        super().data_received(data[room:])

    def _header_too_large(self) -> None:
        self.logger.info("refusing a request whose headers exceed %d bytes", self.max_header_bytes)
        self.refused = True
        self._disarm()
        path = self.url.split(b"?", 1)[0].decode("latin-1") if self.url else ""
        response = errors.error_response(
            431,
            errors.ErrorCode.HTTP_ERROR,
            f"the request line and headers are larger than the limit of {self.max_header_bytes} "
            "bytes (max_header_bytes); send fewer or shorter headers",
            path=path,
        )
        head = [b"HTTP/1.1 431 Request Header Fields Too Large\r\n"]
        head += [b"%s: %s\r\n" % (k, v) for k, v in response.raw_headers]
        self.transport.write(b"".join([*head, b"connection: close\r\n\r\n", response.body]))
        # Close once the client has had time to read the answer: closing while its headers
        # still arrive would reset the connection, and the answer with it.
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(_LINGER_S, self.transport.close)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._wake()
        self._arm()
        if self.header_bytes is None:
            self.header_bytes = 0

    def on_headers_complete(self) -> None:
        self._disarm()
        self._wake()  # a request pipelined before the last response ended: it runs now
        self.header_bytes = None
        self.heads += 1
        super().on_headers_complete()

    def pause_writing(self) -> None:
        super().pause_writing()
        self._watch_send(self.transport.get_write_buffer_size())

    def resume_writing(self) -> None:
        super().resume_writing()
        if self.send_timer is not None:
            self.send_timer.cancel()
            self.send_timer = None

    def _watch_send(self, unsent: int) -> None:
        """Drop the connection unless the client reads some of the ``unsent`` bytes within
        ``send_timeout_s`` (the write buffer, full now, has shrunk by then)."""
        self.send_timer = self.loop.call_later(self.send_timeout_s, self._send_stalled, unsent)

    def _send_stalled(self, unsent: int) -> None:
        self.send_timer = None
        if self.transport.is_closing() or not self.flow.write_paused:
            return
        now = self.transport.get_write_buffer_size()
        if now < unsent:  # the client reads, slowly
            self._watch_send(now)
            return
        self.logger.info(
            "dropping a connection whose client read nothing for %g s", self.send_timeout_s
        )
        self.transport.abort()  # frees the unsent response; the app sees a disconnect

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._disarm()
        self._wake()
        self.header_bytes = None  # counted again from the next request's first byte
        # uvicorn armed its keep-alive timer (no pipelined request runs next), but any byte
        # cancels that one, blank lines too: ours only a new request's first byte does.
        if self.timeout_keep_alive_task is not None:
            self.idle_timer = self.loop.call_later(self.timeout_keep_alive, self._idle_too_long)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._wake()
        if self.send_timer is not None:
            self.send_timer.cancel()
            self.send_timer = None
        super().connection_lost(exc)


def config(settings: Settings, **overrides: Any) -> uvicorn.Config:
    """The uvicorn configuration of ``mcdrop serve`` for ``settings``: the app itself for one
    worker; for more, the factory each worker process calls (:func:`worker_app`)."""
    app: Any
    if settings.workers == 1:
        app = create_app(settings)
    else:
        # Workers are spawned processes, which import the app: it is named, not handed over,
        # and the settings reach them in the environment they inherit.
        app = "service.server:worker_app"
        key = settings.api_key
        if key is not None and os.environ.get("MCDROP_API_KEY") != key.get_secret_value():
            # the workers would serve without it, every route open
            raise ValueError(
                "the workers read the API key from the environment only: set MCDROP_API_KEY "
                "to the key given"
            )
        os.environ[_WORKER_SETTINGS] = settings.model_dump_json(exclude={"api_key"})
        overrides = {"factory": True, **overrides}
    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "workers": settings.workers,
        "log_level": settings.log_level,
        "log_config": logs.config(settings.log_level, settings.log_format),
        "http": partial(
            TimedHttpProtocol,
            header_timeout_s=settings.header_timeout_s,
            max_header_bytes=settings.max_header_bytes,
            send_timeout_s=settings.send_timeout_s,
        ),
        "timeout_graceful_shutdown": settings.shutdown_timeout_s,
        # uvicorn's 5 s killed workers still importing torch on a busy machine (5.7 s to import
        # the service at load 5 on 2 cores), again and again: `--workers 2` took minutes to start
        "timeout_worker_healthcheck": settings.worker_healthcheck_timeout_s,
        **overrides,
    }
    return uvicorn.Config(app, **options)


def worker_app() -> FastAPI:
    """The app of one worker process of ``mcdrop serve --workers N``: the parent's settings (the
    API key, never written there, from the environment as the parent read it), each worker with
    ``cores ÷ N`` torch threads unless ``torch_threads`` is set, so that the workers do not
    contend for the same cores. Its answers name it in ``x-mcdrop-replica: worker-<pid>``."""
    try:
        settings = Settings(**json.loads(os.environ[_WORKER_SETTINGS]))
        if settings.torch_threads is None:
            # the cores this process may run on (a container's or taskset's), not the machine's
            cores = (
                len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
            )
            threads = max(1, (cores or 1) // settings.workers)
            settings = settings.model_copy(update={"torch_threads": threads})
        app = create_app(settings)
    except Exception:
        # uvicorn's supervisor restarts a worker that exits 1, which would fail the same way
        # again, forever: a startup failure (3) stops the server, as one process would stop.
        logging.getLogger("uvicorn.error").exception("a worker could not make its app")
        raise SystemExit(STARTUP_FAILURE) from None
    app.add_middleware(ReplicaHeader, replica=f"worker-{os.getpid()}")
    return app


#: The files prometheus_client's multiprocess mode writes: one per kind of metric and process.
_METRIC_FILE = re.compile(r"(counter|gauge_[a-z]+|histogram|summary)_\d+\.db")


def _wipe_metric_files(folder: str) -> None:
    """An earlier run's metric files out of ``folder``, a ``PROMETHEUS_MULTIPROC_DIR`` the
    environment names: their counts would add into this run's (prometheus_client asks for the
    folder to be wiped between runs). Other files are left alone."""
    for path in Path(folder).iterdir():
        if _METRIC_FILE.fullmatch(path.name):
            path.unlink(missing_ok=True)


def run(settings: Settings) -> None:
    """Serve until SIGINT/SIGTERM: one process, or ``settings.workers`` worker processes on one
    port under uvicorn's supervisor (which restarts a worker that dies), each listening on a
    socket of its own where the kernel balances them (:func:`_listeners`)."""
    given = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if given is not None and os.path.isdir(given):
        _wipe_metric_files(given)  # before any metric of this run is made
    server_config = config(settings)
    if settings.workers == 1:
        uvicorn.Server(server_config).run()
        return
    # The workers' metrics in files of a folder they share (service.metrics), one made for this
    # run unless the environment names one; the workers import prometheus_client after this.
    made = None
    if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        made = os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="mcdrop-metrics-")
    held, sockets = _listeners(server_config)
    supervisor = Multiprocess(server_config, sockets=sockets)
    try:
        supervisor.run()
    finally:
        held.close()
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
    # A worker that failed to start (a model that does not load, with exit_on_error) stops the
    # supervisor: exit as one process would then (uvicorn's status 3), not 0.
    if any(worker.exitcode == STARTUP_FAILURE for worker in supervisor.processes):
        raise SystemExit(STARTUP_FAILURE)


def _listeners(server_config: uvicorn.Config) -> tuple[socket.socket, list[socket.socket]]:
    """The socket the parent holds for the workers, and what each worker is handed to listen on.

    On Linux, every worker listens on a socket of its own, bound to the same address with
    ``SO_REUSEPORT`` (:class:`_OwnSocket`), and the kernel spreads new connections across them by
    their addresses. On one shared socket, a burst of connections opened at once went to the
    worker that woke first (asyncio accepts up to 100 in one go): 8 or 32 keep-alive clients that
    connect together left the second worker idle (benchmarks/README.md § Workers). The parent
    binds the address first, and holds it without listening (the kernel hands connections to
    listening sockets only): that finds a port for ``--port 0``, and an address in use fails at
    once, as with one socket. Elsewhere (no ``SO_REUSEPORT`` that balances) the workers share
    the parent's socket, as uvicorn's own workers do."""
    if sys.platform != "linux" or not hasattr(socket, "SO_REUSEPORT"):
        shared = server_config.bind_socket()
        return shared, [shared]
    host, port = server_config.host, server_config.port
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        held = _bind_reusable(family, (host, port))
    except OSError as error:
        logging.getLogger("uvicorn.error").error(error)
        raise SystemExit(STARTUP_FAILURE) from None
    address = held.getsockname()
    url = (
        f"http://[{host}]:{address[1]}"
        if family == socket.AF_INET6
        else f"http://{host}:{address[1]}"
    )
    # uvicorn's own line (bind_socket's), which users and scripts look for
    logging.getLogger("uvicorn.error").info("Uvicorn running on %s (Press CTRL+C to quit)", url)
    # (uvicorn's supervisor types its sockets; each worker unpickles a real one)
    return held, [cast(socket.socket, _OwnSocket(family, address))]


def _bind_reusable(family: socket.AddressFamily, address: tuple[Any, ...]) -> socket.socket:
    """A TCP socket bound to ``address`` that other sockets of this user may bind as well
    (``SO_REUSEPORT``), not yet listening."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


class _OwnSocket:
    """A worker's listening socket, as the supervisor hands it to each worker it starts (or
    restarts): pickled as the address alone, it is a socket of the worker's own, bound there
    with ``SO_REUSEPORT``, once unpickled in the worker (:func:`_listeners`)."""

    def __init__(self, family: socket.AddressFamily, address: tuple[Any, ...]) -> None:
        self.family = family
        self.address = address

    def __reduce__(self) -> tuple[Any, tuple[socket.AddressFamily, tuple[Any, ...]]]:
        return _worker_socket, (self.family, self.address)


def _worker_socket(family: socket.AddressFamily, address: tuple[Any, ...]) -> socket.socket:
    """A worker's own socket at the parent's address (unpickling an :class:`_OwnSocket`). Where
    it cannot be bound, the worker exits as one that failed to start (status 3), which stops
    the server: a restart would fail the same way."""
    try:
        return _bind_reusable(family, address)
    except OSError as error:
        print(f"a worker could not bind {address}: {error}", file=sys.stderr)  # (no logging yet)
        raise SystemExit(STARTUP_FAILURE) from None
