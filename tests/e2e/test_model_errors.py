"""A model whose own forward raises on a request's inputs (a token id past its vocabulary),
served by a real ``mcdrop serve`` (uvicorn): a clear 422 (400 on v2) naming the error, only for
that request, and the server serves on."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.cli import main
from service.client import BadRequestError, Client
from tests import factories
from tests.conftest import only_the_bad_one_rejected, wait_for
from tests.e2e.server import Server, serve

pytestmark = pytest.mark.slow

GOOD = [[1, 2, 3, 4], [0, 9, 9, 0]]
PAST = [[1, 2, 300, 4]]  # an id past the vocabulary of 10
NEGATIVE = [[1, -2, 3, 4]]
TRUSTED = ["--allowed-factories", "tests.factories"]


@dataclass
class Served:
    server: Server
    #: The file whose creation releases a request of factories.HOLD_ROWS rows.
    gate: Path


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """The token model, its work off the event loop on one worker, held by a request of
    ``factories.HOLD_ROWS`` rows until ``gate`` exists."""
    root = tmp_path_factory.mktemp("tokens")
    gate = root / "released"
    factories.save_gated_tokens(root / "models" / "tokens", hold=str(gate))
    with serve(
        tmp_path_factory.mktemp("serve"),
        model_dir=root / "models",
        MCDROP_ALLOWED_FACTORIES="tests.factories",
        MCDROP_INLINE_MAX_MS="0",
        MCDROP_MAX_CONCURRENCY="1",
        MCDROP_SHORT_WORK_MS="0",
    ) as server:
        try:
            yield Served(server, gate)
        finally:
            gate.touch()  # a held request ends before the server stops


@pytest.fixture(scope="module")
def server(served: Served) -> Server:
    return served.server


def _rejected(response: httpx2.Response) -> str:
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "model_rejected_input"
    assert error["request_id"] == response.headers["x-request-id"]
    message: str = error["message"]
    assert message.startswith(
        "the model raised IndexError on this request's inputs: index out of range in self"
    )
    return message


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/models/tokens/predict", {"inputs": PAST}),
        ("/models/tokens/uncertainty", {"inputs": GOOD + NEGATIVE, "n_samples": 20}),
        ("/models/tokens/uncertainty", {"inputs": PAST, "n_samples": "auto"}),
    ],
    ids=["predict", "uncertainty", "auto"],
)
def test_ids_the_model_refuses_are_a_422_naming_its_error(
    server: Server, path: str, body: dict[str, Any]
) -> None:
    with httpx2.Client(base_url=server.url, timeout=30) as http:
        message = _rejected(http.post(path, json=body))
        assert "token ids within its vocabulary" in message
        assert http.post(path, json={**body, "inputs": GOOD}).status_code == 200


@pytest.mark.parametrize("mode", ["predict", "uncertainty"])
def test_v2_ids_the_model_refuses_are_a_400_naming_its_error(server: Server, mode: str) -> None:
    tensor = {"name": "inputs", "shape": [1, 4], "datatype": "FP32", "data": PAST[0]}
    body = {"inputs": [tensor], "parameters": {"mode": mode}}
    with httpx2.Client(base_url=server.url, timeout=30) as http:
        response = http.post("/v2/models/tokens/infer", json=body)
    assert response.status_code == 400, response.text
    [message] = response.json().values()
    assert message.startswith("the model raised IndexError on this request's inputs: index out")


def test_the_cli_says_what_it_says_of_the_same_model_run_locally(
    served: Served, capsys: pytest.CaptureFixture[str]
) -> None:
    """mcdrop predict through --url and with --model-dir: the same words and exit status 2 (the
    service's 422 exited 1, a local model's refusal 2)."""
    argv = ["predict", "tokens", "--inputs", json.dumps(PAST)]
    assert main([*argv, "--url", served.server.url]) == 2
    remote = capsys.readouterr()
    assert main([*argv, "--model-dir", str(served.gate.parent / "models"), *TRUSTED]) == 2
    local = capsys.readouterr()
    assert remote.out == local.out == ""
    said = (
        "the model raised IndexError on {}: index out of range in self (check that the values "
        "are within what the model takes, e.g. token ids within its vocabulary)\n"
    )
    assert remote.err == "mcdrop predict: error: 422 model_rejected_input: " + said.format(
        "this request's inputs"
    )
    assert local.err == "mcdrop predict: error: " + said.format("these inputs")


def test_the_typed_client_reads_the_code(server: Server) -> None:
    with Client(server.url) as client, pytest.raises(BadRequestError) as bad:
        client.predict("tokens", PAST)
    assert (bad.value.status_code, bad.value.code) == (422, "model_rejected_input")
    assert "IndexError" in bad.value.message


def _metric(http: httpx2.Client, name: str) -> float:
    """The token model's sample ``name`` of the server's /metrics."""
    for family in text_string_to_metric_families(http.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name and sample.labels == {"model": "tokens"}:
                return sample.value
    raise AssertionError(f"no {name} for the token model")


def test_only_the_request_whose_ids_the_model_refuses_fails(served: Served) -> None:
    # The one worker is held by a large request while the others queue: released, they run as
    # one merged batch (all of them queued, none computing: the flush takes them all, as
    # tests/service/test_errors.py counts), the bad request among the good ones. That batch
    # fails, and each request runs again alone.
    server = served.server
    path = "/models/tokens/uncertainty"
    requests = [[[i % 10, 1, 2, 3]] for i in range(6)]
    requests.insert(3, PAST)
    responses: list[Any] = [None] * len(requests)

    def hold() -> None:
        with httpx2.Client(base_url=server.url, timeout=60) as http:
            rows = [GOOD[0]] * factories.HOLD_ROWS
            assert http.post("/models/tokens/predict", json={"inputs": rows}).status_code == 200

    def call(i: int) -> None:
        with httpx2.Client(base_url=server.url, timeout=60) as http:
            body = {"inputs": requests[i], "n_samples": 20, "seed": 5}
            responses[i] = http.post(path, json=body)

    with httpx2.Client(base_url=server.url, timeout=30) as http:
        started = "nv_inference_queue_duration_seconds_count"  # jobs whose computation started
        before = _metric(http, started)
        holder = threading.Thread(target=hold)
        holder.start()
        wait_for(lambda: _metric(http, started) == before + 1)
        threads = [threading.Thread(target=call, args=(i,)) for i in range(len(requests))]
        for t in threads:
            t.start()
        wait_for(lambda: _metric(http, "nv_inference_pending_request_count") == len(requests))
        assert holder.is_alive()
        served.gate.touch()
        for t in [holder, *threads]:
            t.join()
        # Seeded: each request's answer alone is the one it got with the others.
        alone = [
            http.post(path, json={"inputs": rows, "n_samples": 20, "seed": 5}) for rows in requests
        ]
        # The server serves on.
        assert http.get("/health").status_code == 200
        assert http.post("/models/tokens/predict", json={"inputs": GOOD}).status_code == 200
    only_the_bad_one_rejected(responses, alone, 3, _rejected)
    assert server.proc.poll() is None
    # Logged as a warning, with its traceback, for whoever reads the request's ID.
    log = server.log()
    assert "model 'tokens' raised IndexError on a request's inputs" in log
    assert "IndexError: index out of range in self" in log
