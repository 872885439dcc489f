"""Slow, vanished and greedy clients cost the server nothing lasting: through real uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest

from service.config import Settings
from service.server import config
from tests.e2e.server import Server, serve

pytestmark = pytest.mark.slow

IMAGE = [[0.5] * 28] * 28  # one fashion row
#: A request of the largest size the limits below allow, on the slowest bundled model.
BIG = {"inputs": [IMAGE] * 30, "n_samples": 10_000, "seed": 0}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    settings = {
        "MCDROP_MAX_ROW_SAMPLES": "300000",
        "MCDROP_HEADER_TIMEOUT_S": "1",
        "MCDROP_BODY_TIMEOUT_S": "1",
        "MCDROP_MAX_RESPONSE_BYTES": "200000",
        "MCDROP_MAX_HEADER_BYTES": "16384",
    }
    with serve(tmp_path_factory.mktemp("serve"), **settings) as running:
        yield running


def _idle_cpu(server: Server, seconds: float = 2.0) -> float:
    """Share of a core the server uses over ``seconds`` with no request of ours running."""
    before = server.cpu_seconds()
    time.sleep(seconds)
    return (server.cpu_seconds() - before) / seconds


def test_a_vanished_client_stops_its_sampling(server: Server) -> None:
    # Two clients send the largest request and give up after a second.
    def give_up() -> None:
        with (
            httpx2.Client(base_url=server.url, timeout=1.0) as http,
            pytest.raises(httpx2.ReadTimeout),
        ):
            http.post("/models/fashion/uncertainty", json=BIG)

    threads = [threading.Thread(target=give_up) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Each stops at its next forward pass: soon the server is idle (they would take ~20 s).
    time.sleep(1.0)
    assert _idle_cpu(server) < 0.3
    with httpx2.Client(base_url=server.url, timeout=10) as http:
        started = time.monotonic()
        one = http.post("/models/fashion/uncertainty", json={"inputs": [IMAGE], "seed": 1})
        assert one.status_code == 200
        assert time.monotonic() - started < 5


def test_a_small_request_does_not_wait_behind_large_ones(server: Server) -> None:
    latencies: list[float] = []

    async def main() -> None:
        async with httpx2.AsyncClient(base_url=server.url, timeout=120) as http:
            big = [
                asyncio.ensure_future(http.post("/models/fashion/uncertainty", json=BIG))
                for _ in range(2)
            ]
            await asyncio.sleep(1.0)  # both are computing
            for i in range(10):
                started = time.monotonic()
                one = {"inputs": [IMAGE], "n_samples": 50, "seed": i}
                response = await http.post("/models/fashion/uncertainty", json=one)
                assert response.status_code == 200
                latencies.append(time.monotonic() - started)
            for task in big:
                task.cancel()  # and the server stops their sampling
            await asyncio.gather(*big, return_exceptions=True)

    asyncio.run(main())
    # Alone it takes ~15 ms; the target on a quiet machine is p99 < 1 s. The bound here is
    # loose because the test machine is shared; benchmarks/ records the measured figure.
    assert max(latencies) < 3.0, latencies


def test_deadline_ends_with_504_and_stops_the_work(tmp_path: Path) -> None:
    with (
        serve(tmp_path, MCDROP_REQUEST_TIMEOUT_S="1") as server,
        httpx2.Client(base_url=server.url, timeout=60) as http,
    ):
        started = time.monotonic()
        response = http.post("/models/fashion/uncertainty", json=BIG)
        took = time.monotonic() - started
        assert response.status_code == 504
        assert response.json()["error"]["code"] == "deadline_exceeded"
        assert took < 10
        time.sleep(1.0)
        assert _idle_cpu(server) < 0.3
        assert http.get("/health").status_code == 200


def test_a_full_queue_answers_503_with_retry_after(tmp_path: Path) -> None:
    settings = {"MCDROP_MAX_QUEUED_REQUESTS": "1", "MCDROP_MAX_CONCURRENCY": "1"}
    with serve(tmp_path, **settings) as server:

        async def main() -> list[httpx2.Response]:
            async with httpx2.AsyncClient(base_url=server.url, timeout=120) as http:
                body = {"inputs": [IMAGE] * 4, "n_samples": 1000, "seed": 0}
                tasks = [http.post("/models/fashion/uncertainty", json=body) for _ in range(6)]
                done = await asyncio.wait_for(asyncio.gather(*tasks), timeout=120)
                return list(done)

        responses = asyncio.run(main())
        statuses = [r.status_code for r in responses]
        refused = [r for r in responses if r.status_code == 503]
        assert 503 in statuses, statuses
        assert 200 in statuses, statuses
        for response in refused:
            assert response.json()["error"]["code"] == "overloaded"
            assert int(response.headers["retry-after"]) >= 1


def _connect(server: Server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=10)


def _closed_within(sock: socket.socket, seconds: float) -> tuple[bool, bytes]:
    """Whether the server closes ``sock`` within ``seconds``, and what it sent."""
    sock.settimeout(seconds)
    received = b""
    try:
        while chunk := sock.recv(4096):
            received += chunk
    except TimeoutError:
        return False, received
    return True, received


def test_trickled_headers_are_cut_off(server: Server) -> None:
    with _connect(server) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        for _ in range(3):  # a byte now and then, never the end of the headers
            time.sleep(0.4)
            try:
                sock.sendall(b"X")
            except OSError:
                break
        closed, _ = _closed_within(sock, 5)
        assert closed
        assert time.monotonic() - started < 5
    with _connect(server) as silent:  # a connection that sends nothing
        assert _closed_within(silent, 5)[0]


def _health(sock: socket.socket) -> bytes:
    """GET /health on ``sock``; the whole response (headers, then Content-Length bytes)."""
    return _response(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", sock)


def _response(request: bytes, sock: socket.socket) -> bytes:
    """The whole response (headers, then Content-Length bytes) to ``request`` sent on
    ``sock``."""
    sock.sendall(request)
    received = b""
    while b"\r\n\r\n" not in received:
        received += sock.recv(4096)
    head, body = received.split(b"\r\n\r\n", 1)
    length = int(next(v for k, v in _fields(head) if k == b"content-length"))
    while len(body) < length:
        body += sock.recv(4096)
    return received


def _fields(head: bytes) -> list[tuple[bytes, bytes]]:
    lines = head.split(b"\r\n")[1:]
    return [(k.strip().lower(), v.strip()) for k, _, v in (line.partition(b":") for line in lines)]


def _blank_lines_until_closed(sock: socket.socket, seconds: float) -> float | None:
    """Sends a blank line every 0.5 s until the server closes ``sock`` (then the seconds it
    took) or ``seconds`` pass (then None)."""
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        try:
            sock.sendall(b"\r\n")
            closed, _ = _closed_within(sock, 0.5)
        except OSError:  # reset: the server closed it while we wrote
            closed = True
        if closed:
            return time.monotonic() - started
    return None


def test_blank_lines_after_a_request_do_not_hold_the_connection(server: Server) -> None:
    # Blank lines begin no request (RFC 9112 section 2.2): they must not reset the keep-alive
    # deadline, else a client holds a connection, and a file descriptor, forever.
    keep_alive_s = config(Settings()).timeout_keep_alive
    with _connect(server) as sock:
        assert _health(sock).startswith(b"HTTP/1.1 200")
        took = _blank_lines_until_closed(sock, keep_alive_s + 10)
        assert took is not None, "still open"
        assert took < keep_alive_s + 2


def test_blank_lines_between_requests_are_ignored(server: Server) -> None:
    with _connect(server) as sock:
        for _ in range(2):
            assert _health(sock).startswith(b"HTTP/1.1 200")
            sock.sendall(b"\r\n\r\n")  # a request may follow blank lines on a live connection
        # Past the header timeout (1 s) after the blank lines: the keep-alive deadline rules.
        time.sleep(1.5)
        assert _health(sock).startswith(b"HTTP/1.1 200")


def test_a_body_that_never_arrives_gets_408(server: Server) -> None:
    with _connect(server) as sock:
        sock.sendall(
            b"POST /models/diabetes/predict HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n" + b'{"inputs": '
        )
        closed, received = _closed_within(sock, 5)
        assert closed
        assert received.startswith(b"HTTP/1.1 408")
        assert b"request_timeout" in received


def test_a_response_over_the_byte_limit_is_refused_before_work(server: Server) -> None:
    with httpx2.Client(base_url=server.url, timeout=30) as http:
        body = {"inputs": [[0.0] * 64] * 10, "n_samples": 2000, "return_samples": True}
        response = http.post("/models/digits/uncertainty", json=body)
        assert response.status_code == 422
        error = response.json()["error"]
        assert error["code"] == "limit_exceeded"
        assert "max_response_bytes" in error["message"]
        small = {"inputs": [[0.0] * 64], "n_samples": 10, "return_samples": True}
        assert http.post("/models/digits/uncertainty", json=small).status_code == 200


def test_sigterm_lets_requests_finish_then_exits_within_the_limit(tmp_path: Path) -> None:
    with serve(tmp_path, MCDROP_SHUTDOWN_TIMEOUT_S="2") as server:
        hold = _connect(server)  # a client that trickles a body and never finishes
        hold.sendall(
            b"POST /models/diabetes/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"
        )
        results: list[int] = []

        def in_flight() -> None:
            with httpx2.Client(base_url=server.url, timeout=60) as http:
                body = {"inputs": [[0.0] * 64], "n_samples": 100, "seed": 0}
                results.append(http.post("/models/digits/uncertainty", json=body).status_code)

        thread = threading.Thread(target=in_flight)
        thread.start()
        time.sleep(0.2)
        started = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        server.proc.wait(timeout=30)
        thread.join()
        hold.close()
        assert time.monotonic() - started < 10
        # uvicorn re-raises the signal once it has shut down: the exit status says SIGTERM.
        assert server.proc.returncode in (0, -signal.SIGTERM), server.log()
        assert results == [200]


def test_health_stays_fast_while_large_bodies_are_parsed(server: Server) -> None:
    body = json.dumps({"inputs": [IMAGE] * 200}).encode()
    assert len(body) > 500_000  # parsed off the loop
    latencies: list[float] = []

    async def main() -> None:
        async with httpx2.AsyncClient(base_url=server.url, timeout=120) as http:
            headers = {"content-type": "application/json"}
            uploads = [
                asyncio.ensure_future(
                    http.post("/models/fashion/predict", content=body, headers=headers)
                )
                for _ in range(4)
            ]
            while not all(task.done() for task in uploads):
                started = time.monotonic()
                assert (await http.get("/health")).status_code == 200
                latencies.append(time.monotonic() - started)
                await asyncio.sleep(0.01)
            assert all(task.result().status_code == 200 for task in uploads)

    asyncio.run(main())
    assert latencies
    assert max(latencies) < 2.0, latencies  # loose: a shared machine; parsing is off the loop


def _head(size: int) -> bytes:
    """A GET /health request line and headers of about ``size`` bytes, not yet ended."""
    line = b"X-Pad: " + b"a" * 1000 + b"\r\n"
    return b"GET /health HTTP/1.1\r\nHost: x\r\n" + line * (size // len(line))


def test_oversized_headers_get_431_and_the_connection_closes(server: Server) -> None:
    with _connect(server) as sock:
        started = time.monotonic()
        sock.sendall(_head(1_000_000) + b"\r\n")  # 1 MB of headers, 16 KiB allowed
        closed, received = _closed_within(sock, 5)
        assert closed
        assert time.monotonic() - started < 5
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431 ")
    assert (b"content-type", b"application/json") in _fields(head)
    assert {b"date", b"server"} <= dict(_fields(head)).keys()  # (as every response of uvicorn's)
    error = json.loads(body)["error"]
    assert error["code"] == "http_error"
    assert "max_header_bytes" in error["message"]


MALFORMED = {
    "both length headers": b"POST /models/diabetes/predict HTTP/1.1\r\nHost: x\r\n"
    b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "a header without a colon": b"GET /health HTTP/1.1\r\nHost x\r\n\r\n",
    "no HTTP at all": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64,
    "a bad chunk size": b"POST /v2/models/diabetes/infer HTTP/1.1\r\nHost: x\r\n"
    b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
}


@pytest.mark.parametrize("case", MALFORMED)
def test_bytes_that_are_not_http_get_a_json_400_and_the_server_serves_on(
    server: Server, case: str
) -> None:
    with _connect(server) as sock:
        sock.sendall(MALFORMED[case])
        closed, received = _closed_within(sock, 5)
        assert closed
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 "), received[:200]
    assert (b"content-type", b"application/json") in _fields(head)
    assert {b"date", b"server"} <= dict(_fields(head)).keys()  # (as every response of uvicorn's)
    error = json.loads(body)["error"]
    message = error if isinstance(error, str) else error["message"]  # (v2: a string)
    assert "not valid HTTP/1.1" in message
    if case == "a bad chunk size":
        assert isinstance(error, str)
    else:
        assert error["code"] == "http_error"
    with httpx2.Client(base_url=server.url, timeout=10) as http:
        assert http.get("/health").status_code == 200


def _responses(received: bytes) -> list[tuple[bytes, bytes]]:
    """Each response's status line and body in ``received``, in order (each body framed by its
    Content-Length)."""
    found = []
    while received:
        head, ended, rest = received.partition(b"\r\n\r\n")
        assert ended, received[:200]
        length = int(dict(_fields(head))[b"content-length"])
        found.append((head.split(b"\r\n", 1)[0], rest[:length]))
        received = rest[length:]
    return found


@pytest.mark.parametrize("refused", ["400", "431"])
def test_a_refused_request_pipelined_after_good_ones_is_answered_after_them(
    server: Server, refused: str
) -> None:
    """HTTP/1.1 answers pipelined requests in order (RFC 9112 section 9.3.2): the refusal of a
    malformed or oversized request comes after the answers of those before it, which arrive
    whole (it was written at once, before them, and the connection closed under them)."""
    body = json.dumps({"inputs": [[0.0] * 10], "n_samples": 3000, "seed": 1}).encode()
    slow = (
        b"POST /models/diabetes/uncertainty HTTP/1.1\r\nHost: x\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
    ) + body
    health = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    bad = MALFORMED["a header without a colon"] if refused == "400" else _head(1_000_000)
    with _connect(server) as sock:
        # (the 431: the connection may be reset while the rest of its headers are sent)
        with contextlib.suppress(OSError):
            sock.sendall(slow + health + bad)
        closed, received = _closed_within(sock, 10)
    assert closed
    answers = _responses(received)
    assert [line.split(b" ")[1] for line, _ in answers] == [b"200", b"200", refused.encode()]
    assert json.loads(answers[0][1])["n_samples"] == 3000
    assert json.loads(answers[1][1])["status"] == "ok"


def test_endless_headers_are_cut_off_soon(server: Server) -> None:
    # Only the header size ends it: the header timeout (1 s) is reset by no byte, but this
    # client would send 500 MB within it. The server holds 16 KiB of it and closes.
    chunk = _head(1_000_000)[40:]
    with _connect(server) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\n")
        started, sent, cut = time.monotonic(), 0, False
        while not cut and time.monotonic() - started < 10:
            try:
                sock.sendall(chunk)
                sent += len(chunk)
            except OSError:
                cut = True
        assert cut
        assert time.monotonic() - started < 5, sent


def test_headers_within_the_limit_and_a_body_in_one_write_are_served(server: Server) -> None:
    with _connect(server) as sock:
        sock.sendall(_head(12_000) + b"\r\n")
        assert _response(b"", sock).startswith(b"HTTP/1.1 200")
        # Headers and a body past the header limit in one write: the body is no header.
        body = json.dumps({"inputs": [[0.0] * 10]}).encode() + b" " * 200_000
        sock.sendall(
            b"POST /models/diabetes/predict HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body
        )
        assert _response(b"", sock).startswith(b"HTTP/1.1 200")


def test_a_client_that_never_reads_its_response_is_dropped(tmp_path: Path) -> None:
    # ~5 MB of samples; the client's small receive buffer keeps most of it in the server's.
    body = {"inputs": [[0.0] * 64] * 10, "n_samples": 2000, "return_samples": True, "seed": 0}
    request = json.dumps(body).encode()
    with serve(tmp_path, MCDROP_SEND_TIMEOUT_S="1") as server:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", server.port))
        with sock:
            sock.sendall(
                b"POST /models/digits/uncertainty HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                % len(request)
                + request
            )
            time.sleep(4)  # computed by ~1 s, then read by nobody past send_timeout_s
            try:
                closed, received = _closed_within(sock, 5)
            except ConnectionResetError:  # dropped: what it had sent is lost
                closed, received = True, b""
            assert closed, "still open"
            assert len(received) < 4_000_000, "the whole response was kept for the client"
        with httpx2.Client(base_url=server.url, timeout=60) as http:  # a reading client is served
            response = http.post("/models/digits/uncertainty", json=body)
            assert response.status_code == 200
            assert len(response.content) > 4_000_000
