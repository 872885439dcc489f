"""The client's limits against a real, hostile HTTP server on a local socket: a whole-request
deadline, a response size cap, and errors (never a RecursionError or an empty message)."""

from __future__ import annotations

import asyncio
import gzip
import math
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from mcdrop_client import (
    APIError,
    AsyncClient,
    BadRequestError,
    Client,
    InvalidRequestError,
    InvalidURLError,
    RequestTimeoutError,
    ResponseTooLargeError,
    TransportError,
)
from mcdrop_client import client as client_module
from service.config import Settings

#: The longest any handler of the hostile server keeps a connection (so no test can hang).
CAP_S = 5.0
HEALTH = b'{"status": "ok"}'


def _head(status: str, *headers: str) -> bytes:
    return ("\r\n".join([f"HTTP/1.1 {status}", *headers]) + "\r\n\r\n").encode()


def _trickle_body(conn: socket.socket) -> None:
    conn.sendall(_head("200 OK", "Content-Type: application/json", "Content-Length: 1000"))
    _drip(conn, b" ")


def _trickle_headers(conn: socket.socket) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\n")
    _drip(conn, b"X-A: b\r\n")


def _drip(conn: socket.socket, piece: bytes) -> None:
    """``piece`` every 0.1 s until the cap: each read gets data, the answer never completes."""
    end = time.monotonic() + CAP_S
    while time.monotonic() < end:
        conn.sendall(piece)
        time.sleep(0.1)


def _huge_length(conn: socket.socket) -> None:
    """Announces 8 GB, then sends nothing: only a client that refuses it unread ends early."""
    conn.sendall(_head("200 OK", "Content-Type: application/json", "Content-Length: 8000000000"))
    time.sleep(CAP_S)


def _chunked(conn: socket.socket) -> None:
    """100 KiB in 1 KiB chunks, then stalls without ending the answer."""
    conn.sendall(_head("503 Service Unavailable", "Transfer-Encoding: chunked"))
    for _ in range(100):
        conn.sendall(b"400\r\n" + b"<" * 1024 + b"\r\n")
    time.sleep(CAP_S)


def _gzip_bomb(conn: socket.socket) -> None:
    body = gzip.compress(b" " * (8 << 20))  # 8 MiB of spaces in about 8 KiB
    conn.sendall(
        _head(
            "200 OK",
            "Content-Type: application/json",
            "Content-Encoding: gzip",
            f"Content-Length: {len(body)}",
        )
        + body
    )


def _canned(status: str, body: bytes, *headers: str) -> Callable[[socket.socket], None]:
    def handle(conn: socket.socket) -> None:
        conn.sendall(_head(status, *headers, f"Content-Length: {len(body)}") + body)

    return handle


def _late_health(conn: socket.socket) -> None:
    time.sleep(0.3)
    _canned("200 OK", HEALTH, "Content-Type: application/json")(conn)


def _drop(conn: socket.socket) -> None:
    """Reads the request, then closes the connection without a byte of answer."""


def _cut(conn: socket.socket) -> None:
    """5 bytes of an answer of 100, then closes the connection."""
    conn.sendall(_head("200 OK", "Content-Type: application/json", "Content-Length: 100"))
    conn.sendall(HEALTH[:5])


def _reset(conn: socket.socket) -> None:
    """Resets the connection (RST, not a close) once the request is read."""
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


DEEP = b"[" * 200_000 + b"]" * 200_000
HANDLERS: dict[str, Callable[[socket.socket], None]] = {
    "trickle": _trickle_body,
    "tricklehead": _trickle_headers,
    "huge": _huge_length,
    "chunked": _chunked,
    "gzbomb": _gzip_bomb,
    "deeperr": _canned(
        "400 Bad Request",
        b'{"error": {"code": "x", "message": "m", "details": ' + DEEP + b"}}",
        "Content-Type: application/json",
    ),
    "redirect": _canned("302 Found", b"", "Location: http://169.254.169.254/"),
    "html": _canned("502 Bad Gateway", b"<html>bad gateway</html>", "Content-Type: text/html"),
    "empty": _canned("500 Internal Server Error", b""),
    "late": _late_health,
    "drop": _drop,
    "cut": _cut,
    "reset": _reset,
}


def _serve(conn: socket.socket) -> None:
    with conn:
        conn.settimeout(CAP_S)
        try:
            head = b""
            while b"\r\n\r\n" not in head:
                data = conn.recv(65536)
                if not data:
                    return
                head += data
            mode = head.split(b" ", 2)[1].decode().strip("/").split("/")[0]
            HANDLERS[mode](conn)
        except OSError:  # the client hung up: what these tests expect of it
            pass


@pytest.fixture(scope="module")
def hostile() -> Iterator[str]:
    """The base URL of a server that answers ``/<mode>/...`` as ``HANDLERS[mode]`` does."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            threading.Thread(target=_serve, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    stop.set()
    thread.join()
    listener.close()


def _health(url: str, use_async: bool, **options: object) -> object:
    if not use_async:
        with Client(url, **options) as client:  # type: ignore[arg-type]
            return client.health()

    async def call() -> object:
        async with AsyncClient(url, **options) as client:  # type: ignore[arg-type]
            return await client.health()

    return asyncio.run(call())


both = pytest.mark.parametrize("use_async", [False, True], ids=["sync", "async"])


@both
@pytest.mark.parametrize("mode", ["trickle", "tricklehead"])
def test_timeout_bounds_the_whole_request(hostile: str, mode: str, use_async: bool) -> None:
    """Each read gets a byte well within the timeout, yet the answer never completes: the
    timeout is a deadline for the whole request, not for each read."""
    start = time.monotonic()
    with pytest.raises(RequestTimeoutError) as info:
        _health(f"{hostile}/{mode}", use_async, timeout=0.5)
    assert time.monotonic() - start < 0.5 + 2.0  # slack for a loaded machine; the cap is 5 s
    assert info.value.timeout == 0.5
    assert "within 0.5 s" in str(info.value)
    assert "whole request" in str(info.value)


@both
@pytest.mark.parametrize(
    ("mode", "says"),
    [
        ("drop", "Server disconnected without sending a response"),
        ("cut", "received 5 bytes, expected 100"),
        ("reset", "Connection reset by peer"),
    ],
)
def test_a_connection_that_breaks_says_the_service_was_reached(
    hostile: str, mode: str, says: str, use_async: bool
) -> None:
    """The service was connected to, and the connection broke before the answer was complete:
    said so, naming the URL (it was "cannot reach the mcdrop service", as for a service that is
    not running; the async reset's reason was empty)."""
    with pytest.raises(TransportError) as info:
        _health(f"{hostile}/{mode}", use_async)
    assert type(info.value) is TransportError
    message = str(info.value)
    assert message.startswith(
        f"connected to the mcdrop service at {hostile}, but GET {hostile}/{mode}/health got no "
        "complete answer: the connection broke ("
    )
    assert says in message
    assert "cannot reach" not in message


@both
def test_no_connection_says_the_service_was_not_reached(use_async: bool) -> None:
    with pytest.raises(TransportError) as info:
        _health("http://127.0.0.1:9", use_async)
    assert type(info.value) is TransportError
    message = str(info.value)
    assert message.startswith(
        "cannot reach the mcdrop service at http://127.0.0.1:9: no connection for GET "
        "http://127.0.0.1:9/health ("
    )
    assert message.endswith("); is the service running, and the URL right?")
    assert "()" not in message  # a reason, never an empty one


@pytest.fixture
def unconnectable() -> Iterator[str]:
    """The URL of a listener whose queue is full (it holds one connection, never accepted): the
    kernel drops further connection requests, so no connection is ever made to it."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        address = listener.getsockname()
        with socket.create_connection(address, timeout=CAP_S):
            yield f"http://127.0.0.1:{address[1]}"


@both
def test_a_timeout_says_whether_a_connection_was_made(
    hostile: str, unconnectable: str, use_async: bool
) -> None:
    with pytest.raises(RequestTimeoutError) as info:
        _health(unconnectable, use_async, timeout=0.3)
    assert str(info.value).startswith(f"no connection for GET {unconnectable}/health within 0.3 s")
    assert str(info.value).endswith("is the service running, and the URL right?")
    url = f"{hostile}/tricklehead"
    with pytest.raises(RequestTimeoutError) as info:
        _health(url, use_async, timeout=0.3)
    assert str(info.value).startswith(f"connected, but no answer to GET {url}/health within 0.3 s")


@pytest.fixture
def resolver(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """socket.getaddrinfo as a resolver would answer (there is no DNS here): ``slow.mcdrop.test``
    hangs until the event is set (at most CAP_S), then is unknown; ``two.mcdrop.test`` is
    127.0.0.2 (where nothing listens), then 127.0.0.1; other hosts as before."""
    getaddrinfo = socket.getaddrinfo
    release = threading.Event()

    def answer(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        host = host.decode() if isinstance(host, bytes) else host  # anyio's: IDNA bytes
        if host == "slow.mcdrop.test":
            release.wait(CAP_S)
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        if host == "two.mcdrop.test":
            return [
                *getaddrinfo("127.0.0.2", port, *args, **kwargs),
                *getaddrinfo("127.0.0.1", port, *args, **kwargs),
            ]
        return getaddrinfo(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", answer)
    yield release
    release.set()


@both
def test_a_host_name_lookup_is_bounded_by_the_timeout(
    resolver: threading.Event, use_async: bool
) -> None:
    """getaddrinfo takes no timeout: the synchronous client waited for a hanging lookup as long
    as it hung, past its whole-request deadline."""
    url = "http://slow.mcdrop.test:9"

    async def call() -> None:
        async with AsyncClient(url, timeout=0.5) as client:
            try:
                await client.health()
            finally:  # asyncio.run waits for the lookup's thread at its end
                resolver.set()

    def sync_call() -> None:
        with Client(url, timeout=0.5) as client:
            client.health()

    start = time.monotonic()
    with pytest.raises(RequestTimeoutError) as info:
        asyncio.run(call()) if use_async else sync_call()
    assert time.monotonic() - start < 0.5 + 2.0  # the lookup hangs for CAP_S
    assert str(info.value).startswith(f"no connection for GET {url}/health within 0.5 s")


@both
@pytest.mark.parametrize("timeout", [1.0, None])
def test_a_host_name_is_looked_up_and_each_address_tried(
    hostile: str, resolver: threading.Event, use_async: bool, timeout: float | None
) -> None:
    port = hostile.rsplit(":", 1)[1]
    url = f"http://two.mcdrop.test:{port}/late"
    assert _health(url, use_async, timeout=timeout).status == "ok"  # type: ignore[attr-defined]
    resolver.set()  # then a name it does not know
    with pytest.raises(TransportError, match="Name or service not known"):
        _health("http://slow.mcdrop.test:9", use_async, timeout=timeout)


@both
def test_no_timeout(hostile: str, use_async: bool) -> None:
    for timeout in (None, math.inf, client_module.MAX_TIMEOUT):
        assert _health(f"{hostile}/late", use_async, timeout=timeout).status == "ok"  # type: ignore[attr-defined]


@both
def test_a_content_length_above_the_limit_is_refused_unread(hostile: str, use_async: bool) -> None:
    start = time.monotonic()
    with pytest.raises(ResponseTooLargeError) as info:
        _health(f"{hostile}/huge", use_async, timeout=CAP_S + 5)
    assert time.monotonic() - start < CAP_S  # not waited for the body the server never sends
    error = info.value
    assert (error.status_code, error.limit) == (200, client_module.DEFAULT_MAX_RESPONSE_BYTES)
    assert "Content-Length is 8000000000" in str(error)
    assert "raise max_response_bytes=" in str(error)


@both
def test_a_chunked_answer_stops_at_the_limit(hostile: str, use_async: bool) -> None:
    """The server stalls after 100 KiB without ending: the client stops at 64 KiB."""
    with pytest.raises(ResponseTooLargeError) as info:
        _health(f"{hostile}/chunked", use_async, timeout=CAP_S + 5, max_response_bytes=64 << 10)
    assert (info.value.status_code, info.value.limit) == (503, 64 << 10)
    assert "max_response_bytes=65536" in str(info.value)


@both
def test_the_limit_counts_decoded_bytes(hostile: str, use_async: bool) -> None:
    with pytest.raises(ResponseTooLargeError, match="after decoding"):
        _health(f"{hostile}/gzbomb", use_async, max_response_bytes=1 << 20)


@both
def test_deeply_nested_error_json_is_the_status_error(hostile: str, use_async: bool) -> None:
    with pytest.raises(BadRequestError) as info:
        _health(f"{hostile}/deeperr", use_async)
    assert info.value.code == "http_error"
    assert "not the service's JSON error" in info.value.message


@both
def test_a_redirect_says_where_it_points(hostile: str, use_async: bool) -> None:
    with pytest.raises(APIError) as info:
        _health(f"{hostile}/redirect", use_async)
    assert info.value.status_code == 302
    assert "302 Found" in info.value.message
    assert "http://169.254.169.254/" in info.value.message
    assert "does not follow" in info.value.message


@pytest.mark.parametrize(
    ("mode", "says"),
    [("html", "502 Bad Gateway with a body (text/html)"), ("empty", "500 Internal Server Error")],
)
def test_other_answers_say_status_and_body(hostile: str, mode: str, says: str) -> None:
    with pytest.raises(APIError) as info:
        _health(f"{hostile}/{mode}", False)
    assert says in info.value.message
    assert info.value.message.startswith(f"GET {hostile}/{mode}/health answered")


def test_deeply_nested_inputs_are_refused_before_sending() -> None:
    deep: list[object] = []
    for _ in range(100_000):
        deep = [deep]
    with Client("http://127.0.0.1:9") as client, pytest.raises(InvalidRequestError, match="deep"):
        client.predict("m", deep)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("field", ["inputs", "tolerance", "level", "coverage"])
def test_a_value_json_cannot_carry_is_refused_naming_its_field(field: str, value: float) -> None:
    # It was "Out of range float values are not JSON compliant", whichever field held it.
    options: dict[str, Any] = {"n_samples": "auto"} | ({} if field == "inputs" else {field: value})
    rows = [[1.0, value]] if field == "inputs" else [[1.0, 2.0]]
    with Client("http://127.0.0.1:9") as client, pytest.raises(InvalidRequestError) as info:
        client.uncertainty("m", rows, **options)
    assert f"{field} holds NaN or infinity" in str(info.value)


# 1e10 s passed, then overflowed the sockets' clock at the first request: OverflowError.
@pytest.mark.parametrize("timeout", [-1, 0, 0.0, math.nan, -math.inf, "3", True, 1e10, 10**10])
def test_timeouts_out_of_range_are_refused(timeout: object) -> None:
    for kind in (Client, AsyncClient):
        with pytest.raises(InvalidRequestError, match="timeout") as info:
            kind(timeout=timeout)  # type: ignore[arg-type]
        assert isinstance(info.value, ValueError)
        assert "None for no limit" in str(info.value)


@pytest.mark.parametrize("limit", [0, -1, 1.5, True, "1"])
def test_limits_out_of_range_are_refused(limit: object) -> None:
    with pytest.raises(InvalidRequestError, match="max_response_bytes"):
        Client(max_response_bytes=limit)  # type: ignore[arg-type]


def test_the_default_limit_holds_the_servers_largest_response() -> None:
    field = Settings.model_fields["max_response_bytes"]
    assert int(field.default) <= client_module.DEFAULT_MAX_RESPONSE_BYTES


def test_urls_too_long_for_http_are_the_clients_errors() -> None:
    for kind in (Client, AsyncClient):
        with pytest.raises(InvalidURLError) as info:
            kind("http://x/" + "a" * 100_000)
        assert len(str(info.value)) < 1000
    with Client("http://127.0.0.1:9") as client, pytest.raises(InvalidRequestError):
        client.model("a" * 100_000)
