"""The real app over the bundled models, through Starlette's TestClient (an httpx2.Client)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.config import Settings
from tests.conftest import MODELS


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
        wait_ready(client)
        yield client
