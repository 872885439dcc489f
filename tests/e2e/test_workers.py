"""End to end: ``mcdrop serve --workers N``, worker processes on one port, each with its own
models (:func:`service.server.run`)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path

import httpx2
import pytest

from service.replicas import REPLICA_HEADER
from tests.conftest import MODELS
from tests.e2e.server import Server, clean_env, serve

pytestmark = pytest.mark.slow

DIABETES_ROW = [0.01 * i for i in range(10)]


def _workers(server: Server) -> list[int]:
    """The pids of the server's worker processes (its children that multiprocessing spawned)."""
    pid = server.proc.pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [
        int(child)
        for child in children
        if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes()
    ]


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "State:\tZ" not in status  # (a zombie has exited)


def test_workers_share_the_port_with_the_settings_and_answers_of_one_process(
    tmp_path: Path,
) -> None:
    body = {"inputs": [DIABETES_ROW], "n_samples": 40, "seed": 11}
    with serve(tmp_path, MCDROP_WORKERS="1") as one, httpx2.Client(base_url=one.url) as http:
        expected = http.post("/models/diabetes/uncertainty", json=body).json()
    with serve(tmp_path, MCDROP_WORKERS="2", MCDROP_MAX_REQUEST_ROWS="3") as server:
        workers = _workers(server)
        assert len(workers) == 2
        # Fresh connections, which either worker may accept: each answers as one process does,
        # and each holds the settings given to the parent.
        for _ in range(12):
            with httpx2.Client(base_url=server.url) as http:
                assert http.post("/models/diabetes/uncertainty", json=body).json() == expected
                refused = http.post("/models/diabetes/predict", json={"inputs": [DIABETES_ROW] * 4})
                assert refused.status_code == 422
                assert "limit of 3 per request" in refused.text
    assert not any(map(_alive, workers))  # SIGTERM to the parent stops every worker


def test_workers_read_the_api_key_from_the_environment(tmp_path: Path) -> None:
    # The key is never written where the workers read the parent's settings: they read it from
    # the environment they inherit, as the parent did.
    with serve(tmp_path, MCDROP_WORKERS="2", MCDROP_API_KEY="s3cret-key") as server:
        for _ in range(6):
            with httpx2.Client(base_url=server.url) as http:
                url = "/models/diabetes/predict"
                body = {"inputs": [DIABETES_ROW]}
                assert http.post(url, json=body).status_code == 401
                ok = http.post(url, json=body, headers={"Authorization": "Bearer s3cret-key"})
                assert ok.status_code == 200


def test_workers_hold_settings_that_plain_json_cannot_write(tmp_path: Path) -> None:
    # An infinite timeout (no deadline) is a valid setting; JSON has no infinity of its own.
    timeouts = {"MCDROP_REQUEST_TIMEOUT_S": "inf", "MCDROP_SEND_TIMEOUT_S": "inf"}
    with serve(tmp_path, MCDROP_WORKERS="2", **timeouts) as server:
        body = {"inputs": [DIABETES_ROW], "n_samples": 10}
        _answer_from_each(server, lambda http: http.post("/models/diabetes/uncertainty", json=body))


def _count(metrics: str, name: str, model: str) -> float:
    """A sample's value in a text exposition (0 where it has none)."""
    for line in metrics.splitlines():
        if line.startswith(f'{name}{{model="{model}"}} '):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _answer_from_each(server: Server, request: Callable[[httpx2.Client], httpx2.Response]) -> int:
    """Send ``request`` on fresh connections until both workers have answered one (at most 200
    tries); the number sent."""
    seen: set[str] = set()
    sent = 0
    while len(seen) < 2 and sent < 200:
        with httpx2.Client(base_url=server.url) as http:
            response = request(http)
        assert response.status_code == 200, response.text
        seen.add(response.headers[REPLICA_HEADER])
        sent += 1
    assert seen == {f"worker-{pid}" for pid in _workers(server)}
    return sent


def _replicas_of_a_burst(port: int, connections: int) -> list[str]:
    """Open ``connections`` keep-alive connections at once (every handshake done before any
    request is sent), then send one ``/health`` request on each: the replica header of each
    answer."""
    socks = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(connections)]
    try:
        for sock in socks:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: test\r\n\r\n")
        replicas = []
        for sock in socks:
            head = b""
            while b"\r\n\r\n" not in head:
                data = sock.recv(65536)
                assert data, "the server closed a connection without an answer"
                head += data
            lines = head.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
            assert lines[0].startswith("HTTP/1.1 200"), lines[0]
            headers = dict(line.split(": ", 1) for line in lines[1:])
            replicas.append({k.lower(): v for k, v in headers.items()}[REPLICA_HEADER])
        return replicas
    finally:
        for sock in socks:
            sock.close()


def test_a_burst_of_connections_is_spread_across_the_workers(tmp_path: Path) -> None:
    # Clients that connect together (a load balancer's pool, a benchmark's clients): on one
    # shared socket the first worker awake accepted them all and the other idled. Each worker
    # has a socket of its own, and the kernel spreads connections by address: 64 connections
    # split as a fair coin would, so each gets 16 or more but once in ~30,000 runs.
    with serve(tmp_path, MCDROP_WORKERS="2") as server:
        # (ready is one worker's answer: until both listen, every connection goes to one)
        _answer_from_each(server, lambda http: http.get("/health"))
        workers = {f"worker-{pid}" for pid in _workers(server)}
        replicas = _replicas_of_a_burst(server.port, 64)
    assert set(replicas) == workers
    assert min(replicas.count(w) for w in workers) >= 16, sorted(replicas)


def test_workers_on_port_0_share_the_port_the_parent_found(tmp_path: Path) -> None:
    # the parent binds the port (the kernel picks one) and the workers bind that same port
    port_file = tmp_path / "log"
    env = clean_env(MCDROP_WORKERS="2", MCDROP_MODEL_DIR=str(MODELS))
    with port_file.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--port", "0"],
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        port = None
        for _ in range(600):
            found = re.search(
                r"Uvicorn running on http://127\.0\.0\.1:(\d+)", port_file.read_text()
            )
            if found:
                port = int(found.group(1))
                with suppress(httpx2.TransportError):
                    if httpx2.get(f"http://127.0.0.1:{port}/ready").status_code == 200:
                        break
            time.sleep(0.1)
        assert port is not None, port_file.read_text()
        seen: set[str] = set()
        for _ in range(20):  # until both workers listen (then 32 connections reach both)
            seen = set(_replicas_of_a_burst(port, 32))
            if len(seen) == 2:
                break
            time.sleep(0.5)
        assert len(seen) == 2, seen
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    assert proc.returncode == 0, port_file.read_text()


def test_a_port_in_use_stops_the_server_with_status_3(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = clean_env(MCDROP_WORKERS="2", MCDROP_MODEL_DIR=str(MODELS))
        done = subprocess.run(
            [sys.executable, "-m", "service.cli", "serve", "--port", str(port)],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert done.returncode == 3, done.stderr
    assert "Address already in use" in done.stderr


def test_workers_that_start_slowly_are_not_killed_as_hung(tmp_path: Path) -> None:
    # A busy or small machine imports torch slowly: each worker here sleeps 8 s before it can
    # answer the supervisor's health check. uvicorn's own 5 s limit killed such workers as hung
    # and restarted them, over and over; the default limit lets them start.
    slow = tmp_path / "slow"
    slow.mkdir()
    (slow / "sitecustomize.py").write_text(
        "import sys, time\n"
        "if any('spawn_main' in arg for arg in sys.orig_argv):\n"
        "    time.sleep(8)\n"
    )
    started = time.monotonic()
    with serve(
        tmp_path,
        MCDROP_WORKERS="2",
        MCDROP_LOG_LEVEL="info",
        PYTHONPATH=os.pathsep.join([str(slow), os.environ.get("PYTHONPATH", "")]),
    ) as server:
        _answer_from_each(server, lambda http: http.get("/health"))
        assert time.monotonic() - started < 80
    assert "died" not in server.log()


def test_metrics_count_the_requests_of_every_worker(tmp_path: Path) -> None:
    before = set(Path(tempfile.gettempdir()).glob("mcdrop-metrics-*"))
    with serve(tmp_path, MCDROP_WORKERS="2") as server:
        shared = set(Path(tempfile.gettempdir()).glob("mcdrop-metrics-*")) - before
        assert len(shared) == 1
        body = {"inputs": [DIABETES_ROW] * 3}
        sent = _answer_from_each(
            server, lambda http: http.post("/models/diabetes/predict", json=body)
        )
        # whichever worker answers /metrics, it counts both workers' requests
        scrapes = []
        _answer_from_each(server, lambda http: scrapes.append(http.get("/metrics")) or scrapes[-1])
        for scrape in scrapes:
            metrics = scrape.text
            assert _count(metrics, "nv_inference_request_success_total", "diabetes") == sent
            assert _count(metrics, "nv_inference_count_total", "diabetes") == 3 * sent
            assert _count(metrics, "nv_inference_pending_request_count", "diabetes") == 0
    assert not any(d.exists() for d in shared)  # the folder the workers shared goes with them


def test_metrics_leave_out_the_gauges_of_a_killed_worker(tmp_path: Path) -> None:
    # A worker killed while it computes a request never stops as one that is told to: the
    # request it had in flight must not stay in the gauges' sum once it is gone.
    limits = {"MCDROP_MAX_REQUEST_ROWS": "1000", "MCDROP_MAX_ROW_SAMPLES": "100000000"}
    with serve(tmp_path, MCDROP_WORKERS="2", MCDROP_MAX_N_SAMPLES="100000", **limits) as server:
        body = {"inputs": [DIABETES_ROW] * 1000, "n_samples": 50_000}
        slow = threading.Thread(target=_post_until_cut, args=(server.url, body), daemon=True)
        slow.start()
        in_flight = 0.0
        for _ in range(100):  # (at most 10 s)
            with httpx2.Client(base_url=server.url) as http:
                metrics = http.get("/metrics").text
            in_flight = _count(metrics, "mcdrop_inference_in_flight_requests", "diabetes")
            if in_flight:
                break
            time.sleep(0.1)
        assert in_flight == 1
        killed = _workers(server)
        for pid in killed:
            os.kill(pid, signal.SIGKILL)
        slow.join(timeout=30)
        # The supervisor starts new workers: within seconds, though a worker still being torn
        # down when it looks is alive to it (it waited out its 60 s health check for that one)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and set(_workers(server)) & set(killed):
            time.sleep(0.2)
        metrics = ""  # (not the scrape before the kill)
        with httpx2.Client(base_url=server.url) as http:
            while time.monotonic() < deadline:
                try:
                    metrics = http.get("/metrics").text
                    break
                except httpx2.TransportError:
                    time.sleep(0.2)
        assert metrics, "no worker came back in time"
        assert _count(metrics, "mcdrop_inference_in_flight_requests", "diabetes") == 0
        assert _count(metrics, "nv_inference_pending_request_count", "diabetes") == 0


def _post_until_cut(url: str, body: dict[str, object]) -> None:
    """POST a long uncertainty request that a worker's death cuts off."""
    with httpx2.Client(base_url=url, timeout=60) as http, suppress(httpx2.TransportError):
        http.post("/models/diabetes/uncertainty", json=body)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_metrics_folder_given_starts_without_an_earlier_runs_counts(
    tmp_path: Path, workers: str
) -> None:
    # An earlier run's files in the folder the environment names (prometheus_client's
    # multiprocess mode) would add its counts into this run's; a file not of its kind stays.
    shared = tmp_path / "metrics"
    shared.mkdir()
    earlier = (
        "from prometheus_client import Counter; "
        "Counter('nv_inference_request_success', 'x', ['model']).labels('diabetes').inc(7)"
    )
    env = {**clean_env(), "PROMETHEUS_MULTIPROC_DIR": str(shared)}
    subprocess.run([sys.executable, "-c", earlier], env=env, check=True)
    assert [p.name for p in shared.iterdir() if p.name.startswith("counter_")]
    (shared / "notes.txt").write_text("mine")
    with serve(tmp_path, MCDROP_WORKERS=workers, PROMETHEUS_MULTIPROC_DIR=str(shared)) as server:
        with httpx2.Client(base_url=server.url) as http:
            body = {"inputs": [DIABETES_ROW]}
            assert http.post("/models/diabetes/predict", json=body).status_code == 200
            metrics = http.get("/metrics").text
        assert _count(metrics, "nv_inference_request_success_total", "diabetes") == 1
    assert (shared / "notes.txt").read_text() == "mine"
