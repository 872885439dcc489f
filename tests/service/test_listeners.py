"""The sockets of ``mcdrop serve --workers N`` (:func:`service.listeners.listeners`): real
sockets on free ports, no server."""

from __future__ import annotations

import pickle
import socket
import sys
from collections.abc import Iterator
from contextlib import ExitStack

import pytest
import uvicorn
from uvicorn.config import STARTUP_FAILURE

from service.listeners import listeners

pytestmark = pytest.mark.skipif(
    sys.platform != "linux", reason="a socket per worker (SO_REUSEPORT) on Linux only"
)


def _config(port: int, host: str = "127.0.0.1") -> uvicorn.Config:
    return uvicorn.Config("service.app:create_app", host=host, port=port)


@pytest.fixture
def stack() -> Iterator[ExitStack]:
    with ExitStack() as sockets:
        yield sockets


def _start(stack: ExitStack, port: int, workers: int, host: str = "127.0.0.1") -> int:
    """A server's sockets as ``mcdrop serve`` makes them: the parent's, and ``workers`` workers'
    own (each unpickled, as a spawned worker does), listening; the port."""
    held, (handed,) = listeners(_config(port, host))
    stack.enter_context(held)
    for _ in range(workers):
        own = stack.enter_context(pickle.loads(pickle.dumps(handed)))
        own.listen()
    return held.getsockname()[1]


@pytest.mark.parametrize("workers", [0, 2], ids=["starting", "serving"])
def test_a_second_server_on_the_port_of_a_first_fails_to_start(
    stack: ExitStack, workers: int
) -> None:
    # With SO_REUSEPORT alone, a second server's sockets joined the first's, and the kernel
    # handed it a share of the first's connections. "starting": the first's workers are not
    # listening yet (they load their models first), only its parent holds the address.
    port = _start(stack, 0, workers)
    with pytest.raises(SystemExit) as refused:
        _start(stack, port, 2)
    assert refused.value.code == STARTUP_FAILURE


def test_a_port_another_socket_listens_on_fails_to_start(stack: ExitStack) -> None:
    other = stack.enter_context(socket.socket())
    other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    other.bind(("127.0.0.1", 0))
    other.listen()
    with pytest.raises(SystemExit) as refused:
        _start(stack, other.getsockname()[1], 1)
    assert refused.value.code == STARTUP_FAILURE


def test_workers_bind_beside_their_parent_again_after_a_restart(stack: ExitStack) -> None:
    held, (handed,) = listeners(_config(0))
    stack.enter_context(held)
    port = held.getsockname()[1]
    first = pickle.loads(pickle.dumps(handed))
    first.listen()
    first.close()  # a worker that died: the supervisor starts another
    again = stack.enter_context(pickle.loads(pickle.dumps(handed)))
    again.listen()
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        accepted, _ = again.accept()
        accepted.close()


def test_an_ipv6_host_gets_its_own_sockets_and_uvicorns_line(
    stack: ExitStack, capfd: pytest.CaptureFixture[str]
) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no ::1")
    port = _start(stack, 0, 1, host="::1")
    line = f"Uvicorn running on http://[::1]:{port} (Press CTRL+C to quit)"
    assert line in capfd.readouterr().err  # (uvicorn's logging, which its Config set up)
    with pytest.raises(SystemExit):
        _start(stack, port, 1, host="::1")
