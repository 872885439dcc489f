"""The sockets the workers of ``mcdrop serve --workers N`` listen on.

This module imports neither torch nor the app: a worker process unpickles its socket (and its
uvicorn configuration, :mod:`service.protocol`) before it starts the thread that answers the
supervisor's health check.
"""

from __future__ import annotations

import logging
import socket
import sys
from typing import Any, cast

import uvicorn
from uvicorn.config import STARTUP_FAILURE

__all__ = ["listeners"]


def listeners(server_config: uvicorn.Config) -> tuple[socket.socket, list[socket.socket]]:
    """The socket the parent holds for the workers, and what each worker is handed to listen on.

    On Linux, every worker listens on a socket of its own, bound to the same address with
    ``SO_REUSEPORT`` (:class:`_OwnSocket`), and the kernel spreads new connections across them by
    their addresses. On one shared socket, a burst of connections opened at once went to the
    worker that woke first (asyncio accepts up to 100 in one go): 8 or 32 keep-alive clients that
    connect together left the second worker idle (benchmarks/README.md § Workers). The parent
    binds the address first, and holds it without listening (the kernel hands connections to
    listening sockets only): that finds a port for ``--port 0``, and an address in use fails at
    once, as with one socket, for a second ``mcdrop serve --workers`` of the same user too
    (:func:`_hold`). Elsewhere (no ``SO_REUSEPORT`` that balances) the workers share
    the parent's socket, as uvicorn's own workers do."""
    if sys.platform != "linux" or not hasattr(socket, "SO_REUSEPORT"):
        shared = server_config.bind_socket()
        return shared, [shared]
    host, port = server_config.host, server_config.port
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        held = _hold(family, (host, port))
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


def _hold(family: socket.AddressFamily, address: tuple[Any, ...]) -> socket.socket:
    """The parent's socket: bound to ``address`` (``SO_REUSEPORT``, not listening) where no other
    socket is, and from then on letting only sockets with ``SO_REUSEPORT`` (the workers') bind
    there.

    ``SO_REUSEPORT`` alone lets any socket of the same user that sets it bind the address too: a
    second ``mcdrop serve --workers`` on the port started, and its workers took a share of the
    first's connections. So the address is first bound as one server's socket is
    (``SO_REUSEADDR`` only: that fails where any socket listens, or where another server's
    parent holds the address), and the parent's own socket then drops ``SO_REUSEADDR``, which
    leaves no socket without ``SO_REUSEPORT`` a way to bind beside it, another server's first
    bind included. (Two servers whose first binds come within the same few microseconds could
    still both pass: no step between them is exclusive.)"""
    with socket.socket(family, socket.SOCK_STREAM) as alone:
        alone.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        alone.bind(address)
        address = alone.getsockname()  # the port chosen for port 0
    held = _bind_reusable(family, address)
    # (set for the bind, past the TIME_WAIT connections of an earlier server on the port)
    held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 0)
    return held


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
    with ``SO_REUSEPORT``, once unpickled in the worker (:func:`listeners`)."""

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
