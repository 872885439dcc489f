"""The real app over the bundled models, through Starlette's TestClient (an httpx2.Client)."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx2
import pytest
import torch
from fastapi.testclient import TestClient

import mcdrop
from service.app import create_app
from service.config import Settings
from service.errors import V2_STATUS, is_v2
from service.schemas import ErrorCode
from tests import factories
from tests.conftest import MODELS


def check_error_body(response: httpx2.Response) -> None:
    """Every error response is JSON ``{"error": {"code", "message", "details"}}`` with a code of
    the one vocabulary, :class:`ErrorCode` (a response hook on the test clients); under ``/v2``,
    the Open Inference Protocol's ``{"error": "<message>"}``, never a status it does not use.
    ``/ready``'s 503 is its readiness report, not an error (``/v2/health/ready``'s too)."""
    path = response.request.url.path
    if (
        response.status_code < 400
        or response.request.method == "HEAD"
        or path in ("/ready", "/v2/health/ready")
    ):
        return
    response.read()
    if is_v2(path):
        assert isinstance(response.json()["error"], str), response.text
        assert response.status_code not in V2_STATUS, response.status_code
        return
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
        max_request_rows=50,
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


@dataclass
class Loading:
    """An app whose one model, ``diabetes``, is still loading until ``gate`` is set."""

    client: TestClient
    gate: threading.Event


@pytest.fixture
def loading(tmp_path: Path) -> Iterator[Loading]:
    # The bundled diabetes model built by a factory that waits for the gate (tests.factories).
    shutil.copytree(MODELS / "diabetes", tmp_path / "diabetes")
    manifest = tmp_path / "diabetes" / "model.json"
    spec = json.loads(manifest.read_text())
    gate = factories.GATES[str(tmp_path)] = threading.Event()
    params = {"gate": str(tmp_path), **spec["architecture"]["params"]}
    spec["architecture"] = {"factory": "tests.factories:gated_mlp", "params": params}
    manifest.write_text(json.dumps(spec))
    settings = Settings(
        model_dir=tmp_path, exit_on_error=False, allowed_factories=("tests.factories",)
    )
    with TestClient(create_app(settings)) as client:
        try:
            yield Loading(client, gate)
        finally:
            gate.set()  # the loader thread ends whatever the test did


#: The rows :func:`always_drops` serves are asked about, and what its model's twin (the same
#: weights, its dropout off in eval mode) answers for them: ``(N, 2)`` probabilities.
ALWAYS_DROPS_ROWS = [[0.5, -1.0, 2.0], [1.5, 0.3, -0.7]]


def always_drops_twin() -> torch.Tensor:
    torch.manual_seed(0)
    twin = factories.AlwaysDrops(always=False).eval()
    with torch.no_grad():
        return torch.softmax(twin(torch.tensor(ALWAYS_DROPS_ROWS)), -1)


@pytest.fixture(scope="package")
def always_drops(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """An app serving ``mc`` from a model directory: a classifier whose ``forward`` drops in
    eval mode too (``F.dropout(h, p, training=True)``, MC-dropout style); and ``mc_batches``,
    the same (the same weights) dropping so for batches of two rows or more only (its warm-up
    predicts one row)."""
    folder = tmp_path_factory.mktemp("always_drops")
    for name, params in (("mc", {}), ("mc_batches", {"min_rows": 2})):
        torch.manual_seed(0)
        mcdrop.save(
            factories.AlwaysDrops(**params),
            folder / name,
            factory="tests.factories:AlwaysDrops",
            params=params,
            task="classification",
            input_shape=[3],
            labels=["a", "b"],
        )
    settings = Settings(
        model_dir=folder, exit_on_error=False, allowed_factories=("tests.factories",)
    )
    with TestClient(create_app(settings)) as client:
        client.event_hooks["response"].append(check_error_body)
        wait_ready(client)
        yield client
