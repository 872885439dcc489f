"""End to end: `mcdrop serve` as a real uvicorn process, talked to by the client over TCP."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import pytest
from sklearn.datasets import load_digits

from service.client import (
    AsyncClient,
    BadRequestError,
    Client,
    InvalidRequestError,
    NotFoundError,
)
from tests.e2e.conftest import serve

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
