"""Dynamic batching merges concurrent requests without changing any seeded answer."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sklearn.datasets import load_digits

from service.app import create_app
from service.config import Settings
from tests.conftest import MODELS
from tests.service.conftest import wait_ready

ROWS = load_digits().data[:12].tolist()


def _concurrently(http: TestClient, requests: list[tuple[str, dict[str, Any]]]) -> list[Any]:
    results: list[Any] = [None] * len(requests)
    barrier = threading.Barrier(len(requests))

    def call(i: int) -> None:
        path, body = requests[i]
        barrier.wait()
        results[i] = http.post(path, json=body).json()

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


REQUESTS = [
    ("/models/digits/uncertainty", {"inputs": ROWS[i : i + 2], "n_samples": 40, "seed": i})
    for i in range(0, 10, 2)
] + [
    (
        "/models/digits/uncertainty",
        {"inputs": ROWS[:1], "n_samples": 40, "seed": 3, "return_samples": True},
    ),
    ("/models/digits/uncertainty", {"inputs": ROWS[5:7], "n_samples": 25, "seed": 3}),
    ("/models/digits/predict", {"inputs": ROWS[:3]}),
    ("/models/digits/predict", {"inputs": ROWS[3:4]}),
    ("/models/diabetes/predict", {"inputs": [[59, 2, 32.1, 101, 157, 93.2, 38, 4, 4.86, 87]]}),
]


@pytest.fixture(scope="module")
def unbatched() -> list[Any]:
    with TestClient(create_app(Settings(model_dir=MODELS, batching=False))) as http:
        wait_ready(http)
        return [http.post(path, json=body).json() for path, body in REQUESTS]


def test_batched_answers_equal_unbatched(unbatched: list[Any]) -> None:
    settings = Settings(model_dir=MODELS, batching=True, batch_max_wait_ms=200)
    with TestClient(create_app(settings)) as http:
        wait_ready(http)
        batched = _concurrently(http, REQUESTS)
        batcher = http.app.state.registry.entries["digits"].batcher
        digits_jobs = sum("digits" in path for path, _ in REQUESTS)
        assert batcher.batches < digits_jobs  # requests really were merged
    for got, want in zip(batched, unbatched, strict=True):
        assert _rounded(got) == _rounded(want)


def _rounded(value: Any) -> Any:
    """Float results agree to float32 rounding (batch size changes the BLAS blocking)."""
    if isinstance(value, float):
        return round(value, 5)
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return value


def test_errors_reach_only_their_request() -> None:
    with TestClient(create_app(Settings(model_dir=MODELS, batch_max_wait_ms=50))) as http:
        wait_ready(http)
        good, bad = _concurrently(
            http,
            [
                ("/models/diabetes/predict", {"inputs": [[1.0] * 10]}),
                ("/models/diabetes/predict", {"inputs": [[1.0] * 9]}),
            ],
        )
        assert "predictions" in good
        assert bad["error"]["code"] == "invalid_input"
