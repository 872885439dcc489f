"""A model whose own forward raises on a request's inputs (a token id past its vocabulary),
served by a real ``mcdrop serve`` (uvicorn): a clear 422 (400 on v2) naming the error, only for
that request, and the server serves on."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import httpx2
import pytest

from service.client import BadRequestError, Client
from tests import factories
from tests.e2e.server import Server, serve

pytestmark = pytest.mark.slow

GOOD = [[1, 2, 3, 4], [0, 9, 9, 0]]
PAST = [[1, 2, 300, 4]]  # an id past the vocabulary of 10
NEGATIVE = [[1, -2, 3, 4]]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The token model, its work off the event loop on one worker: requests that arrive
    together wait (up to 200 ms) and merge."""
    models = tmp_path_factory.mktemp("models")
    factories.save_tokens(models / "tokens")
    with serve(
        tmp_path_factory.mktemp("serve"),
        model_dir=models,
        MCDROP_ALLOWED_FACTORIES="tests.factories",
        MCDROP_BATCH_MAX_WAIT_MS="200",
        MCDROP_INLINE_MAX_MS="0",
        MCDROP_MAX_CONCURRENCY="1",
        MCDROP_SHORT_WORK_MS="0",
    ) as server:
        yield server


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


def test_the_typed_client_reads_the_code(server: Server) -> None:
    with Client(server.url) as client, pytest.raises(BadRequestError) as bad:
        client.predict("tokens", PAST)
    assert (bad.value.status_code, bad.value.code) == (422, "model_rejected_input")
    assert "IndexError" in bad.value.message


def test_only_the_request_whose_ids_the_model_refuses_fails(server: Server) -> None:
    requests = [[[i % 10, 1, 2, 3]] for i in range(6)]
    requests.insert(3, PAST)
    path = "/models/tokens/uncertainty"
    responses: list[Any] = [None] * len(requests)
    barrier = threading.Barrier(len(requests))

    def call(i: int) -> None:
        with httpx2.Client(base_url=server.url, timeout=30) as http:
            barrier.wait()
            body = {"inputs": requests[i], "n_samples": 20, "seed": 5}
            responses[i] = http.post(path, json=body)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with httpx2.Client(base_url=server.url, timeout=30) as http:
        # Seeded: each request's answer alone is the one it got with the others.
        alone = [
            http.post(path, json={"inputs": rows, "n_samples": 20, "seed": 5}) for rows in requests
        ]
        # The server serves on.
        assert http.get("/health").status_code == 200
        assert http.post("/models/tokens/predict", json={"inputs": GOOD}).status_code == 200
    for i, (got, want) in enumerate(zip(responses, alone, strict=True)):
        if i == 3:
            _rejected(got)
            _rejected(want)
        else:
            assert got.status_code == 200, got.text
            assert got.json() == want.json()
    assert server.proc.poll() is None
    # Logged as a warning, with its traceback, for whoever reads the request's ID.
    log = server.log()
    assert "model 'tokens' raised IndexError on a request's inputs" in log
    assert "IndexError: index out of range in self" in log
