"""/metrics: the Prometheus scrape, parsed, counts what the service did."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from service.app import create_app
from service.config import Settings
from tests.service.conftest import wait_ready

DIGIT = [0.0] * 64


def _scrape(http: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


@pytest.fixture(scope="module")
def http(only: Callable[..., Path]) -> Iterator[TestClient]:
    # A fresh app: its own registry, so the counts are this test's alone.
    with TestClient(create_app(Settings(model_dir=only("digits"), batching=False))) as client:
        wait_ready(client)
        yield client


def test_every_per_model_series_is_there_from_the_models_load(
    only: Callable[..., Path],
) -> None:
    # The success count, the requests in flight and the request durations appeared only at a
    # model's first request: Prometheus' rate() and increase() missed that request (the other
    # series were there, at 0, from the load).
    with TestClient(create_app(Settings(model_dir=only("digits"), batching=False))) as http:
        wait_ready(http)
        m = _scrape(http)
    digits = (("model", "digits"),)
    for name in [
        "nv_inference_request_success_total",
        "nv_inference_count_total",
        "nv_inference_exec_count_total",
        "nv_inference_pending_request_count",
        "mcdrop_inference_in_flight_requests",
        "nv_inference_request_duration_seconds_count",
        "nv_inference_queue_duration_seconds_count",
        "nv_inference_compute_infer_duration_seconds_count",
        "mcdrop_row_samples_count",
    ]:
        assert m[(name, digits)] == 0, name


def test_scrape_counts_requests_rows_and_executions(http: TestClient) -> None:
    for i in range(3):
        body = {"inputs": [DIGIT] * 2, "n_samples": 10, "seed": i}
        assert http.post("/models/digits/uncertainty", json=body).status_code == 200
    assert http.post("/models/digits/predict", json={"inputs": [DIGIT]}).status_code == 200
    assert http.post("/models/digits/predict", json={"inputs": [[0.0]]}).status_code == 422
    assert http.post("/models/nope/predict", json={"inputs": [DIGIT]}).status_code == 404
    m = _scrape(http)
    digits = (("model", "digits"),)
    assert m[("nv_inference_request_success_total", digits)] == 4
    assert m[("nv_inference_request_failure_total", (("model", "digits"), ("reason", "422")))] == 1
    assert (
        m[("nv_inference_request_failure_total", (("model", "_unknown"), ("reason", "404")))] == 1
    )
    assert m[("nv_inference_count_total", digits)] == 3 * 2 + 1
    assert m[("nv_inference_exec_count_total", digits)] == 4  # batching off: one per request
    assert m[("nv_inference_request_duration_seconds_count", digits)] == 5
    assert m[("nv_inference_queue_duration_seconds_count", digits)] == 4
    assert m[("nv_inference_compute_infer_duration_seconds_count", digits)] == 4
    assert m[("mcdrop_row_samples_count", digits)] == 3
    assert m[("mcdrop_row_samples_sum", digits)] == 3 * 2 * 10
    assert m[("mcdrop_inference_in_flight_requests", digits)] == 0
    assert m[("nv_inference_pending_request_count", digits)] == 0
    assert m[("process_resident_memory_bytes", ())] > 0
    assert ("nv_inference_request_success_total", (("model", "nope"),)) not in m


def test_adaptive_requests_count_the_samples_their_rows_used(
    only: Callable[..., Path],
) -> None:
    # It counted rows × max_n_samples, the most they might use: 2 × 1000 for two rows that
    # stopped at 16 (a blank digit is certain) overstated the work 60-fold.
    with TestClient(create_app(Settings(model_dir=only("digits"), batching=False))) as http:
        wait_ready(http)
        body = {"inputs": [DIGIT] * 2, "n_samples": "auto", "seed": 1, "tolerance": 0.5}
        response = http.post("/models/digits/uncertainty", json=body)
        assert response.status_code == 200, response.text
        used = sum(row["n_samples"] for row in response.json()["results"])
        m = _scrape(http)
    digits = (("model", "digits"),)
    assert m[("mcdrop_row_samples_count", digits)] == 1
    assert m[("mcdrop_row_samples_sum", digits)] == used == 2 * 16


def test_apps_keep_their_own_counts(http: TestClient, only: Callable[..., Path]) -> None:
    with TestClient(create_app(Settings(model_dir=only("digits")))) as other:
        wait_ready(other)
        fresh = _scrape(other)
    # (the series is there from the load: at 0, not the module's app's count)
    assert fresh[("nv_inference_request_success_total", (("model", "digits"),))] == 0


def test_every_inference_route_is_followed(http: TestClient) -> None:
    # Arrival counting and these metrics follow the routes tagged "inference": each of them
    # must be found, or batching would silently stop waiting for arriving requests.
    paths = {r.path for r in http.app.state.inference.routes}
    assert {"/models/{name}/predict", "/models/{name}/uncertainty"} <= paths
    for path in paths:
        scope = {"type": "http", "method": "POST", "path": path.replace("{name}", "digits")}
        assert http.app.state.inference.model(scope) == "digits"
