"""The real app over the bundled models, through Starlette's TestClient (an httpx2.Client)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx2
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.config import Settings
from service.schemas import ErrorCode
from tests.conftest import MODELS


def check_error_body(response: httpx2.Response) -> None:
    """Every error response is JSON ``{"error": {"code", "message", "details"}}`` with a code of
    the one vocabulary, :class:`ErrorCode` (a response hook on the test clients). ``/ready``'s
    503 is its readiness report, not an error."""
    if (
        response.status_code < 400
        or response.request.method == "HEAD"
        or response.request.url.path == "/ready"
    ):
        return
    response.read()
    error = response.json()["error"]
    assert error["code"] in set(ErrorCode), error
    assert isinstance(error["message"], str)
    assert isinstance(error["details"], list)


def wait_ready(http: TestClient, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if http.get("/ready").status_code == 200:
            return
        time.sleep(0.05)
    raise AssertionError(f"service not ready: {http.get('/ready').json()}")


@pytest.fixture(scope="package")
def settings() -> Settings:
    return Settings(
        model_dir=MODELS,
        max_rows=50,
        max_n_samples=2000,
        max_row_samples=20_000,
        max_returned_samples=5_000,
        max_body_bytes=200_000,
    )


@pytest.fixture(scope="package")
def http(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as client:
        client.event_hooks["response"].append(check_error_body)
        wait_ready(client)
        yield client
