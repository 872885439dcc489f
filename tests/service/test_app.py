"""The app's own middleware: the declared Content-Length, before any body is read; the body's
byte and time limits, however it arrives."""

from __future__ import annotations

import asyncio
import functools
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.app import BodyLimit
from service.config import Settings
from tests.conftest import MODELS

BODY = json.dumps({"inputs": [[0.0] * 10]}).encode()
JSON = {"content-type": "application/json"}


@pytest.mark.parametrize(
    "declared",
    [str(len(BODY)), "0" * 5000 + str(len(BODY)), "0" + str(len(BODY))],
    ids=["plain", "5000 leading zeros", "one leading zero"],
)
def test_a_content_length_with_leading_zeros_is_its_value(http: TestClient, declared: str) -> None:
    # 1*DIGIT (RFC 9110 section 8.6): zeros in front change nothing; int() alone refuses the
    # 5000-digit form.
    response = http.post(
        "/models/diabetes/predict", content=BODY, headers={**JSON, "content-length": declared}
    )
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    "declared",
    ["9" * 5000, "0" * 5000 + "9" * 30, "LIMIT+1"],
    ids=["5000 digits", "zeros then 30 digits", "limit + 1"],
)
def test_a_content_length_above_the_limit_is_a_413(
    http: TestClient, settings: Settings, declared: str
) -> None:
    declared = declared.replace("LIMIT+1", str(settings.max_body_bytes + 1))
    response = http.post(
        "/models/diabetes/predict", content=BODY, headers={**JSON, "content-length": declared}
    )
    assert response.status_code == 413, response.text
    error = response.json()["error"]
    assert error["code"] == "body_too_large"
    assert str(settings.max_body_bytes) in error["message"]


@pytest.mark.parametrize("declared", ["5x", "-1", "1e3", "0x10", " "])
def test_a_content_length_that_is_no_byte_count_is_a_400(http: TestClient, declared: str) -> None:
    response = http.post(
        "/models/diabetes/predict", content=BODY, headers={**JSON, "content-length": declared}
    )
    assert response.status_code == 400, response.text
    assert response.headers["connection"] == "close"
    error = response.json()["error"]
    assert error["code"] == "http_error"
    assert "Content-Length must be a byte count" in error["message"]


async def _through_body_limit(
    messages: list[tuple[float, dict[str, Any]]], max_bytes: int = 100, timeout_s: float = 0.5
) -> tuple[int | None, bytes]:
    """What :class:`BodyLimit` (over an app that echoes the body it is given) answers to the
    ``(delay_s, message)`` a client sends: the status (None: no answer), and the body the app saw
    (or the error)."""

    async def echo(scope: dict[str, Any], receive: Any, send: Any) -> None:
        message = await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": message["body"]})

    queue = list(messages)

    async def receive() -> dict[str, Any]:
        if not queue:
            await asyncio.sleep(3600)  # the client sends nothing more
        delay, message = queue.pop(0)
        if delay:  # a message not in yet: the middleware waits for it
            await asyncio.sleep(delay)
        return message

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/models/digits/predict", "headers": []}
    await BodyLimit(echo, max_bytes=max_bytes, timeout_s=timeout_s)(scope, receive, send)
    if not sent:
        return None, b""
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


def _part(body: bytes, more: bool) -> dict[str, Any]:
    return {"type": "http.request", "body": body, "more_body": more}


@pytest.mark.parametrize(
    "messages",
    [
        [(0, _part(b"abc", False))],
        [(0, _part(b"a", True)), (0, _part(b"b", True)), (0, _part(b"c", False))],
        [(0.05, _part(b"abc", False))],
        [(0, _part(b"a", True)), (0.05, _part(b"bc", False))],
    ],
    ids=["in at once", "in at once, in parts", "arrives later", "its rest arrives later"],
)
def test_a_body_within_the_limits_is_read_whole(messages: list[Any]) -> None:
    assert asyncio.run(_through_body_limit(messages)) == (200, b"abc")


@pytest.mark.parametrize(
    "messages",
    [
        [(0, _part(b"x" * 101, False))],
        [(0, _part(b"x" * 60, True)), (0.05, _part(b"x" * 60, False))],
    ],
    ids=["in at once", "in parts"],
)
def test_a_body_past_the_byte_limit_is_a_413(messages: list[Any]) -> None:
    status, body = asyncio.run(_through_body_limit(messages))
    assert status == 413
    assert json.loads(body)["error"]["code"] == "body_too_large"


@pytest.mark.parametrize(
    "messages",
    [[], [(0, _part(b"a", True))], [(0, _part(b"a", True)), (2, _part(b"b", False))]],
    ids=["nothing", "a first part, then nothing", "the rest too late"],
)
def test_a_body_that_does_not_arrive_in_time_is_a_408(messages: list[Any]) -> None:
    status, body = asyncio.run(_through_body_limit(messages, timeout_s=0.2))
    assert status == 408
    assert json.loads(body)["error"]["code"] == "request_timeout"


@pytest.mark.parametrize(
    "messages",
    [
        [(0, {"type": "http.disconnect"})],
        [(0.05, {"type": "http.disconnect"})],
        [(0, _part(b"a", True)), (0, {"type": "http.disconnect"})],
    ],
    ids=["at once", "later", "after a first part"],
)
def test_a_client_gone_before_its_body_is_in_gets_no_answer(messages: list[Any]) -> None:
    assert asyncio.run(_through_body_limit(messages)) == (None, b"")


#: Serves one seeded uncertainty request with ``MCDROP_CPU_MASK_BACKEND`` from the environment,
#: then prints the answer and whether numba was ever imported.
_SERVE_ONE = """
import json, sys
from fastapi.testclient import TestClient
from service.app import create_app
from service.config import Settings
with TestClient(create_app(Settings(model_dir=sys.argv[1]))) as http:
    row = [[0.1 * i for i in range(10)]]
    answer = http.post(
        "/models/diabetes/uncertainty", json={"inputs": row, "n_samples": 50, "seed": 3}
    ).json()
print(json.dumps({"answer": answer, "numba": "numba" in sys.modules}))
"""


@functools.cache
def _serve_one(backend: str, models: Path) -> dict[str, Any]:
    env = {**os.environ, "MCDROP_CPU_MASK_BACKEND": backend}
    out = subprocess.run(
        [sys.executable, "-c", _SERVE_ONE, str(models)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


@pytest.fixture(scope="module")
def diabetes_only(tmp_path_factory: pytest.TempPathFactory) -> Path:
    models = tmp_path_factory.mktemp("models")
    (models / "diabetes").symlink_to(MODELS / "diabetes")
    return models


@pytest.mark.parametrize("backend", ["numpy", "torch", "numba"])
def test_the_cpu_mask_backend_gives_the_same_answers(backend: str, diabetes_only: Path) -> None:
    """``MCDROP_CPU_MASK_BACKEND``: the same masks, so the same seeded answer, from each; numba
    is loaded only where it makes them."""
    got, reference = _serve_one(backend, diabetes_only), _serve_one("numba", diabetes_only)
    assert got["answer"] == reference["answer"]
    assert got["answer"]["results"][0]["std"][0] > 0
    numba = importlib.util.find_spec("numba") is not None
    assert got["numba"] is (numba and backend == "numba")
