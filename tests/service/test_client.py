"""The typed client against the real app (TestClient is an httpx2.Client: no mocks)."""

from __future__ import annotations

import httpx2
import pytest
from fastapi.testclient import TestClient

from service.client import (
    AsyncClient,
    BadRequestError,
    Client,
    NotFoundError,
    TransportError,
)
from service.schemas import ClassificationUncertainty, RegressionUncertainty
from tests.conftest import BUNDLED

PATIENT = [59, 2, 32.1, 101, 157, 93.2, 38, 4, 4.8598, 87]


@pytest.fixture
def client(http: TestClient) -> Client:
    return Client(http=http)


def test_typed_results(client: Client) -> None:
    assert client.health().status == "ok"
    assert client.ready().status == "ready"
    assert {m.name for m in client.models()} == BUNDLED
    info = client.model("diabetes")
    assert info.task == "regression"
    assert info.input_shape == [10]
    result = client.uncertainty("diabetes", [PATIENT], n_samples=50, seed=2)
    assert isinstance(result.results[0], RegressionUncertainty)
    assert result.results[0].epistemic_variance[0] > 0
    assert client.predict("diabetes", [PATIENT]).predictions[0].mean[0] > 0


def test_classifier_result(client: Client) -> None:
    result = client.uncertainty("digits", [[0.0] * 64], n_samples=10, seed=0, return_samples=True)
    row = result.results[0]
    assert isinstance(row, ClassificationUncertainty)
    assert row.samples is not None
    assert len(row.samples) == 10


def test_typed_errors_carry_the_server_message(client: Client) -> None:
    with pytest.raises(NotFoundError) as info:
        client.predict("nope", [PATIENT])
    assert info.value.status_code == 404
    assert "available" in info.value.message
    with pytest.raises(BadRequestError) as bad:
        client.predict("diabetes", [[1, 2]])
    assert bad.value.code == "invalid_input"
    assert "[10]" in bad.value.message


def test_transport_error() -> None:
    with Client("http://127.0.0.1:9", timeout=2) as client, pytest.raises(TransportError):
        client.health()


async def _async_round_trip(http: TestClient) -> None:
    transport = httpx2.ASGITransport(app=http.app)
    async with httpx2.AsyncClient(transport=transport, base_url="http://test") as raw:
        client = AsyncClient(http=raw)
        result = await client.uncertainty("diabetes", [PATIENT], n_samples=20, seed=2)
        assert result.seed == 2
        with pytest.raises(NotFoundError):
            await client.model("nope")


def test_async_client(http: TestClient) -> None:
    import asyncio

    asyncio.run(_async_round_trip(http))
