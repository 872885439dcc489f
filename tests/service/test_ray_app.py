"""`python -m service.ray_app`: the app on two Ray Serve replicas of a local Ray cluster.

A local Ray cluster takes 20-40 s to start on two cores, so one cluster serves the tests that
need a running one; the test with a broken model, first, has its own, which stops by itself.
Under Ray the models load in each replica's background, and ``check_health`` must hold a replica
back until they have: the shared cluster runs with ``--no-exit-on-error``, the broken model with
the default, so both ways of judging a replica's models are exercised.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import pytest
from fastapi.testclient import TestClient

from tests.conftest import BUNDLED, MODELS, ROOT
from tests.e2e.server import clean_env, free_port

pytest.importorskip("ray", reason="Ray Serve is an extra: pip install -e '.[ray]'")

with warnings.catch_warnings():
    # Ray Serve's own pydantic models use Field arguments that pydantic 2 deprecates.
    warnings.simplefilter("ignore", DeprecationWarning)
    from service import ray_app
    from service.replicas import REPLICA_HEADER, ReplicaHeader

pytestmark = pytest.mark.slow

READY_LINE = re.compile(
    r"mcdrop replica (\w+) (ready|degraded) in [\d.]+ s: (\d+) model\(s\), torch threads (\d+)"
)
ROW = [59, 2, 32.1, 101, 157, 93.2, 38, 4, 4.8598, 87]


@dataclass
class RayServe:
    """A running `python -m service.ray_app`: its URL, process and log."""

    url: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def _command(model_dir: Path, port: int, *flags: str) -> list[str]:
    return [
        sys.executable,
        *("-m", "service.ray_app", "--replicas", "2", "--model-dir", str(model_dir)),
        *("--port", str(port), "--log-level", "warning", *flags),
    ]


def _start(model_dir: Path, log_path: Path, *flags: str) -> RayServe:
    port = free_port()
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            _command(model_dir, port, *flags),
            cwd=ROOT,
            # Ray folds similar log lines of different replicas into one; the tests read each.
            env=clean_env(RAY_DEDUP_LOGS="0"),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ray's own processes too, to kill them all if need be
        )
    return RayServe(f"http://127.0.0.1:{port}", proc, log_path)


def _stop(server: RayServe, timeout: float = 90.0) -> int:
    """SIGTERM, as an orchestrator sends it; Ray's processes are killed if it does not exit."""
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
    try:
        return server.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(server.proc.pid, signal.SIGKILL)
        server.proc.wait()
        raise AssertionError(f"no exit within {timeout} s of SIGTERM:\n{server.log()}") from None


def test_a_broken_model_stops_the_command_with_its_reason(tmp_path: Path) -> None:
    shutil.copytree(MODELS / "diabetes", tmp_path / "models" / "diabetes")
    (tmp_path / "models" / "broken").mkdir()
    (tmp_path / "models" / "broken" / "model.json").write_text("{nope")
    server = _start(tmp_path / "models", tmp_path / "ray.log")
    try:
        code = server.proc.wait(timeout=240)
    except subprocess.TimeoutExpired:
        _stop(server)
        raise AssertionError(f"still running with a broken model:\n{server.log()}") from None
    assert code == 3, server.log()
    tail = server.log()[server.log().index("mcdrop: error: the replicas did not start") :]
    assert "model 'broken': broken/model.json: not valid JSON" in tail, tail


@pytest.fixture(scope="module")
def ray_serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayServe]:
    server = _start(MODELS, tmp_path_factory.mktemp("ray") / "ray.log", "--no-exit-on-error")
    try:
        deadline = time.monotonic() + 240
        while "replica(s) ready" not in server.log():
            if server.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"not ready (exit code {server.proc.poll()}):\n{server.log()}")
            time.sleep(0.5)
        yield server
    finally:
        code = _stop(server)
    assert code == 0, server.log()


def _replies(url: str, path: str, body: dict | None, *, want: int = 2, most: int = 40) -> dict:
    """Replica id -> the bodies it gave, asking until ``want`` replicas answered (at most
    ``most`` requests: Ray picks the less busy of two random replicas, so two come quickly)."""
    seen: dict[str, list[dict]] = {}
    with httpx2.Client(base_url=url, timeout=30) as http:
        for _ in range(most):
            r = http.get(path) if body is None else http.post(path, json=body)
            seen.setdefault(r.headers[REPLICA_HEADER], []).append(
                {"status": r.status_code, "json": r.json()}
            )
            if len(seen) >= want:
                break
    return seen


def _differences(got: Any, want: Any, where: str = "") -> list[str]:
    """Where ``got`` and ``want`` differ, floats compared to float32 rounding of the regressor's
    values, which run to hundreds and thousands: ``lower = mean - z·std`` can be near 0 and
    still carry the mean's rounding (seen: 9e-5)."""
    if isinstance(want, float) and isinstance(got, float):
        close = math.isclose(got, want, rel_tol=1e-5, abs_tol=1e-3)
        return [] if close else [f"{where}: {got} != {want}"]
    if isinstance(want, list) and isinstance(got, list) and len(got) == len(want):
        return [
            d
            for i, (g, w) in enumerate(zip(got, want, strict=True))
            for d in _differences(g, w, f"{where}[{i}]")
        ]
    if isinstance(want, dict) and isinstance(got, dict) and got.keys() == want.keys():
        return [d for k in want for d in _differences(got[k], want[k], f"{where}.{k}")]
    return [] if got == want else [f"{where}: {got!r} != {want!r}"]


def test_every_replica_is_ready_when_the_command_says_so(ray_serve: RayServe) -> None:
    # The command reports ready once Serve routes to both replicas, and a replica passes its
    # first health check only when its models have loaded: /ready is never "loading" here,
    # although the models load in the background (--no-exit-on-error).
    replies = _replies(ray_serve.url, "/ready", None)
    assert len(replies) == 2
    for answers in replies.values():
        for answer in answers:
            assert answer == {
                "status": 200,
                "json": {"status": "ready", "models": dict.fromkeys(sorted(BUNDLED), "ready")},
            }
    # Each replica reported itself ready with one torch thread (one CPU each by default).
    reported = {m[1]: m for m in READY_LINE.finditer(ray_serve.log())}
    assert set(reported) == set(replies)
    for match in reported.values():
        assert match[2] == "ready"
        assert int(match[3]) == len(BUNDLED)
        assert match[4] == "1"


def test_a_seeded_answer_is_the_same_from_both_replicas(
    ray_serve: RayServe, http: TestClient
) -> None:
    body = {"inputs": [ROW], "n_samples": 100, "seed": 7}
    replies = _replies(ray_serve.url, "/models/diabetes/uncertainty", body)
    assert len(replies) == 2, "both replicas should have answered"
    # ... and the same as the app in process (tests/service/conftest.py) gives.
    expected = http.post("/models/diabetes/uncertainty", json=body).json()
    for answers in replies.values():
        for answer in answers:
            assert answer == {"status": 200, "json": expected}


def test_concurrent_seeded_requests_match_alone(ray_serve: RayServe, http: TestClient) -> None:
    # Requests that reach a replica together are batched there; seeds still decide the answer
    # (to float32 rounding: the batch size changes the BLAS blocking, as without Ray).
    rows = [[float(i + j) for j in range(10)] for i in range(24)]
    bodies = [{"inputs": [row], "n_samples": 50, "seed": i} for i, row in enumerate(rows)]
    expected = [http.post("/models/diabetes/uncertainty", json=b).json() for b in bodies]

    async def all_at_once() -> list[httpx2.Response]:
        async with httpx2.AsyncClient(base_url=ray_serve.url, timeout=60) as client:
            return await asyncio.gather(
                *(client.post("/models/diabetes/uncertainty", json=b) for b in bodies)
            )

    responses = asyncio.run(all_at_once())
    differences = [
        d for r, w in zip(responses, expected, strict=True) for d in _differences(r.json(), w)
    ]
    assert not differences
    assert len({r.headers[REPLICA_HEADER] for r in responses}) == 2


def test_bad_input_is_a_clear_4xx_and_the_replicas_keep_serving(ray_serve: RayServe) -> None:
    with httpx2.Client(base_url=ray_serve.url, timeout=30) as client:
        short = client.post("/models/diabetes/predict", json={"inputs": [[1.0] * 9]})
        unknown = client.post("/models/nope/predict", json={"inputs": [ROW]})
        not_json = client.post(
            "/models/diabetes/predict",
            content=b"{nope",
            headers={"content-type": "application/json"},
        )
        assert (short.status_code, unknown.status_code, not_json.status_code) == (422, 404, 400)
        assert "10" in short.json()["error"]["message"]
        assert client.post("/models/diabetes/predict", json={"inputs": [ROW]}).status_code == 200


def test_replica_header_is_added_to_http_responses_only() -> None:
    start = {"type": "http.response.start", "status": 200, "headers": [(b"a", b"1")]}
    body = {"type": "http.response.body", "body": b"{}"}
    lifespan = {"type": "lifespan.startup.complete"}

    async def app(scope: dict, receive: object, send: Any) -> None:
        for message in (start, body) if scope["type"] == "http" else (lifespan,):
            await send(message)

    async def run(scope_type: str) -> list[dict]:
        sent: list[dict] = []

        async def send(message: dict) -> None:
            sent.append(message)

        await ReplicaHeader(app, "r1")({"type": scope_type}, None, send)  # type: ignore[arg-type]
        return sent

    http_sent = asyncio.run(run("http"))
    assert http_sent == [{**start, "headers": [(b"a", b"1"), (b"x-mcdrop-replica", b"r1")]}, body]
    assert asyncio.run(run("lifespan")) == [lifespan]


def test_ray_app_refuses_workers_for_replicas() -> None:
    # --workers is a setting, so a flag of this command too: refused before any cluster starts
    with pytest.raises(SystemExit, match="give --replicas instead"):
        ray_app.main(["--workers", "2", "--model-dir", str(MODELS)])
