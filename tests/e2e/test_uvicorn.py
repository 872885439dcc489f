"""End to end: `mcdrop serve` as a real uvicorn process, talked to by the client over TCP."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
from sklearn.datasets import load_digits

from service.client import (
    AsyncClient,
    BadRequestError,
    Client,
    InvalidRequestError,
    NotFoundError,
    ServiceUnavailableError,
    TransportError,
)
from tests.conftest import MODELS, ROOT, save_tokens
from tests.e2e.server import free_port, serve

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with serve(tmp_path_factory.mktemp("serve"), MCDROP_MAX_ROW_SAMPLES="5000000") as server:
        yield server.url


def test_uncertainty_over_http(url: str) -> None:
    rows = load_digits().data[:3].tolist()
    with Client(url) as client:
        first = client.uncertainty("digits", rows, n_samples=100, seed=7)
        again = client.uncertainty("digits", rows, n_samples=100, seed=7)
        other = client.uncertainty("digits", rows, n_samples=100, seed=8)
    assert first == again
    assert first.results != other.results
    for row in first.results:
        assert abs(sum(row.probabilities) - 1) < 1e-5
        assert sum(row.variance) > 0
        assert row.mutual_information >= 0
        assert row.entropy >= row.mutual_information


def test_auto_n_samples_over_http(url: str) -> None:
    """Adaptive answers over TCP: each row's count, the same answer again, and the same result
    as a fixed request with that count."""
    data = load_digits().data
    rows = [data[0].tolist(), ((data[1] + data[7]) / 2).tolist()]  # a clear 0; half 1, half 7
    with Client(url) as client:
        auto = client.uncertainty("digits", rows, n_samples="auto", tolerance=0.01, seed=7)
        assert client.uncertainty("digits", rows, n_samples="auto", tolerance=0.01, seed=7) == auto
        used = [row.n_samples for row in auto.results]
        assert used[0] == 16
        assert (used[1] or 0) > 16
        for row, result in zip(rows, auto.results, strict=True):
            fixed = client.uncertainty("digits", [row], n_samples=result.n_samples, seed=7)
            got, want = result.probabilities, fixed.results[0].probabilities
            assert all(abs(a - b) < 1e-6 for a, b in zip(got, want, strict=True))


def test_bad_input_then_still_serving(url: str) -> None:
    with Client(url) as client:
        with pytest.raises(InvalidRequestError, match="JSON"):
            client.predict("digits", [[float("nan")] * 64])
        with pytest.raises(BadRequestError, match="64"):
            client.predict("digits", [[0.0] * 63])
        with pytest.raises(NotFoundError):
            client.predict("nope", [[0.0] * 64])
        assert client.predict("digits", [[0.0] * 64]).predictions[0].label


def test_health_answers_while_a_large_request_computes(url: str) -> None:
    rows = [[float(i % 17)] * 64 for i in range(500)]
    done = threading.Event()
    result: dict[str, object] = {}

    def heavy() -> None:
        with Client(url, timeout=300) as client:
            started = time.monotonic()
            result["response"] = client.uncertainty("digits", rows, n_samples=1000, seed=0)
            result["seconds"] = time.monotonic() - started
        done.set()

    thread = threading.Thread(target=heavy)
    thread.start()
    time.sleep(0.5)
    latencies = []
    with Client(url, timeout=10) as client:
        while not done.is_set() and len(latencies) < 20:
            started = time.monotonic()
            assert client.health().status == "ok"
            latencies.append(time.monotonic() - started)
            time.sleep(0.05)
    thread.join()
    assert latencies, "the heavy request finished before /health could be timed"
    assert max(latencies) < 2.0, latencies
    assert float(result["seconds"]) > max(latencies)  # type: ignore[arg-type]


def test_async_client_concurrency(url: str) -> None:
    async def run() -> list[int]:
        async with AsyncClient(url) as client:
            results = await asyncio.gather(
                *[
                    client.uncertainty(
                        "diabetes",
                        [[50, 1, 25, 90, 180, 100, 50, 4, 4.5, 90]],
                        n_samples=50,
                        seed=s,
                    )
                    for s in range(8)
                ]
            )
        return [r.seed for r in results]

    assert asyncio.run(run()) == list(range(8))


def _executions(http: httpx2.Client) -> float:
    """The digits model's executions so far (merged batches count once), from /metrics."""
    for line in http.get("/metrics").text.splitlines():
        if line.startswith('nv_inference_exec_count_total{model="digits"}'):
            return float(line.split()[-1])
    return 0.0


def test_concurrent_requests_merge_and_each_gets_its_own_answer(url: str) -> None:
    """One-row requests sent at once share passes (fewer executions than requests), whether
    they share a seed or not, and each answer is the one it gets alone."""
    rows = load_digits().data[:8].tolist()
    seeds = [0, 0, 1, 2, 2, 3, 4, 4]  # some requests share a seed, some do not
    bodies = [
        {"inputs": [row], "n_samples": 30, "seed": s} for row, s in zip(rows, seeds, strict=True)
    ]
    path = "/models/digits/uncertainty"
    with httpx2.Client(base_url=url, timeout=60) as http:
        alone = [http.post(path, json=body).json()["results"][0] for body in bodies]

        async def burst() -> list[dict[str, Any]]:
            async with httpx2.AsyncClient(base_url=url, timeout=60) as client:
                answers = await asyncio.gather(*(client.post(path, json=b) for b in bodies))
            return [a.json()["results"][0] for a in answers]

        merged = False
        for _ in range(10):  # bounded: the requests' arrival is up to the OS
            before = _executions(http)
            together = asyncio.run(burst())
            merged = merged or _executions(http) - before < len(bodies)
            for got, want in zip(together, alone, strict=True):
                for name in ("probabilities", "variance", "entropy", "mutual_information"):
                    assert got[name] == pytest.approx(want[name], abs=1e-6), name
            if merged:
                break
    assert merged, "no burst of concurrent requests was merged"


def _serve(model_dir: Path, *flags: str) -> list[str]:
    """The command line of ``mcdrop serve`` on a free port."""
    command = [sys.executable, "-m", "service.cli", "serve", "--model-dir", str(model_dir)]
    return [*command, "--port", str(free_port()), "--log-level", "warning", *flags]


@pytest.fixture
def broken_folder(tmp_path: Path) -> Path:
    """diabetes, a manifest that is not JSON, and a model naming an untrusted factory."""
    shutil.copytree(MODELS / "diabetes", tmp_path / "diabetes")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "model.json").write_text("{nope")
    (tmp_path / "custom").mkdir()
    manifest = {
        "name": "custom",
        "task": "regression",
        "input_shape": [3],
        "labels": ["y"],
        "tau": 1.0,
        "architecture": {"factory": "tests.factories:build"},
    }
    (tmp_path / "custom" / "model.json").write_text(json.dumps(manifest))
    return tmp_path


@pytest.mark.parametrize("workers", [(), ("--workers", "2")], ids=["one process", "workers"])
def test_serve_refuses_to_start_with_a_broken_model(
    broken_folder: Path, workers: tuple[str, ...]
) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(
        _serve(broken_folder, *workers),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 3, done.stderr  # uvicorn's start-up failure
    assert "2 model(s) failed to load, so the server does not start" in done.stderr
    assert "model 'broken': broken/model.json: not valid JSON" in done.stderr
    assert "model 'custom': custom/model.json: factory 'tests.factories:build'" in done.stderr
    assert "--trust-model-code" in done.stderr


def test_serve_without_exit_on_error_serves_what_loaded(broken_folder: Path) -> None:
    proc = subprocess.Popen(
        _serve(broken_folder, "--no-exit-on-error"),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    port = proc.args[proc.args.index("--port") + 1]  # type: ignore[union-attr]
    try:
        with Client(f"http://127.0.0.1:{port}", timeout=5) as client:
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    ready = client.ready()
                    if ready.status != "loading":
                        break
                except TransportError:
                    pass
                time.sleep(0.2)
            else:
                raise AssertionError(f"not settled; exit code {proc.poll()}")
            assert ready.status == "degraded"
            assert ready.models["diabetes"] == "ready"
            assert ready.models["broken"].startswith("broken/model.json: not valid JSON")
            assert client.predict("diabetes", [[59, 2, 32.1, 101, 157, 93.2, 38, 4, 4.86, 87]])
            with pytest.raises(ServiceUnavailableError, match=r"custom/model\.json: factory"):
                client.predict("custom", [[1.0, 2.0, 3.0]])
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=20)
    assert str(broken_folder) in stderr  # the operator's log keeps the full path


def test_a_token_model_saved_with_example_rows_serves_over_http(tmp_path: Path) -> None:
    """A model of token ids (1 to 5; zeros and random rows are none): saved with rows of its
    own, it warms up on them and answers ids; a malformed examples file stops the server."""
    models = tmp_path / "models"
    save_tokens(models / "tokens")
    ids = [[1, 2, 3, 4, 5, 5], [3, 3, 3, 1, 1, 1]]
    with (
        serve(tmp_path, model_dir=models, MCDROP_ALLOWED_FACTORIES="tests.factories") as server,
        Client(server.url) as client,
    ):
        assert client.ready().models == {"tokens": "ready"}
        assert len(client.predict("tokens", ids).predictions) == 2
        first = client.uncertainty("tokens", ids, n_samples=50, seed=3)
        assert first == client.uncertainty("tokens", ids, n_samples=50, seed=3)
        assert all(row.label in ("negative", "positive") for row in first.results)
        assert sum(sum(row.variance) for row in first.results) > 0
    (models / "tokens" / "examples.safetensors").write_bytes(b"\x00" * 64)
    done = subprocess.run(
        _serve(models, "--allowed-factories", "tests.factories"),
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 3, done.stderr
    assert "model 'tokens': tokens/examples.safetensors: not a readable safetensors file" in (
        done.stderr
    )
