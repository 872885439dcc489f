"""Malformed requests and HTTP semantics over a real socket: what uvicorn itself sends."""

from __future__ import annotations

import gzip
import json
import socket
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx2
import pytest

from service.schemas import ErrorCode
from tests.e2e.server import serve

pytestmark = pytest.mark.slow

ROW = ",".join(["0"] * 10)


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with serve(tmp_path_factory.mktemp("serve")) as server:
        base = server.url
        yield base


@pytest.mark.parametrize(
    "body",
    [
        f'{{"inputs": [[{ROW}]], "level": NaN}}',
        f'{{"inputs": [[{ROW}]], "n_samples": Infinity}}',
        f'{{"inputs": [[{ROW}]], "seed": -Infinity}}',
        f'{{"inputs": [[{ROW}]], "return_samples": NaN}}',
        f'{{"inputs": [[{ROW}]], "seed": 1{"0" * 400}}}',
        '{"inputs": [[0, 0, 0, 0, 0, 0, 0, 0, 0, 1e400]]}',
        '{"inputs": NaN}',
    ],
)
def test_non_finite_fields_are_a_422_over_the_wire(url: str, body: str) -> None:
    response = httpx2.post(
        f"{url}/models/diabetes/uncertainty",
        content=body,
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] in set(ErrorCode)


def test_overflowing_outputs_are_a_422_naming_the_rows(url: str) -> None:
    rows = [[1.0] * 64, [3e38] * 64, [2.0] * 64, [-3e38] * 64]
    response = httpx2.post(f"{url}/models/digits/predict", json={"inputs": rows})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "non_finite_output"
    assert error["details"] == [{"field": "inputs", "rows": [1, 3]}]


def _raw(url: str, request: bytes) -> bytes:
    """``request`` sent as is; everything the server answers until it closes."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.parametrize("path", ["/health", "/ready", "/models", "/models/digits"])
def test_head_sends_headers_only(url: str, path: str) -> None:
    get = httpx2.get(f"{url}{path}")
    answer = _raw(url, f"HEAD {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert f"content-length: {len(get.content)}".encode() in head.lower()
    assert body == b""


def test_405_allow_and_415_over_the_wire(url: str) -> None:
    response = httpx2.delete(f"{url}/models/digits/predict")
    assert response.status_code == 405
    assert response.headers["allow"] == "POST"
    assert httpx2.post(f"{url}/health").headers["allow"] == "GET, HEAD"
    # What `curl -d` sends when not told the content type.
    response = httpx2.post(
        f"{url}/models/diabetes/predict",
        content=f'{{"inputs": [[{ROW}]]}}',
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert response.status_code == 415
    assert "application/json" in response.json()["error"]["message"]


V2_BODY = b'{"inputs": [{"name": "x", "shape": [1, 10], "datatype": "FP32", "data": [%s]}]}' % (
    ROW.encode()
)


@pytest.mark.parametrize(
    "length",
    [b"\xb2", b"\xb9\xb2", b"1\xb3", b"0" * 5000 + b"5", b"9" * 30],
    ids=["superscript 2", "superscript 12", "1 and superscript 3", "5000 digits", "30 digits"],
)
def test_a_header_length_that_is_no_byte_count_is_a_400(url: str, length: bytes) -> None:
    """Latin-1 superscripts are digits to str.isdigit but no number to int; 5000 digits are too
    many for int: both were 500s."""
    answer = _raw(
        url,
        b"POST /v2/models/diabetes/infer HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Content-Type: application/json\r\nInference-Header-Content-Length: %s\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (length, len(V2_BODY), V2_BODY),
    )
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), answer[:300]
    assert b"Inference-Header-Content-Length must be a byte count" in body
    assert len(body) < 500


def test_a_timeout_past_int64_is_a_400_over_the_wire(url: str) -> None:
    body = V2_BODY[:-1] + b', "parameters": {"timeout": 1%s}}' % (b"0" * 400)
    response = httpx2.post(f"{url}/v2/models/diabetes/infer", content=body)
    assert response.status_code == 400, response.text
    assert "from 0 (none: the server's deadline) to 2**63 - 1" in response.json()["error"]


def test_gzip_on_a_native_route_is_a_415_over_the_wire(url: str) -> None:
    response = httpx2.post(
        f"{url}/models/diabetes/predict",
        content=gzip.compress(f'{{"inputs": [[{ROW}]]}}'.encode()),
        headers={"content-type": "application/json", "content-encoding": "gzip"},
    )
    assert response.status_code == 415
    assert "Content-Encoding 'gzip' is not supported" in response.json()["error"]["message"]


def test_v2_errors_stay_small_whatever_the_client_sent(url: str) -> None:
    """An error quoting a 4 MB input name, or 100,000 input names, is a few hundred bytes."""
    tensor = b'{"name": "%s", "shape": [1, 9], "datatype": "FP32", "data": []}'
    for inputs in (tensor % (b"n" * 4_000_000), b", ".join([tensor % (b"n" * 40)] * 100_000)):
        body = b'{"inputs": [%s]}' % inputs
        response = httpx2.post(f"{url}/v2/models/diabetes/infer", content=body, timeout=60)
        assert response.status_code == 400, response.text[:300]
        assert len(response.content) < 1000


def test_a_15_mb_id_is_a_400_naming_the_limit_not_echoed(url: str) -> None:
    body = b'{"id": "%s", ' % (b"i" * 15_000_000) + V2_BODY[1:]
    response = httpx2.post(f"{url}/v2/models/diabetes/infer", content=body, timeout=60)
    assert response.status_code == 400, response.text[:300]
    assert response.json() == {
        "error": "invalid request: id: String should have at most 256 characters"
    }


def test_a_content_length_with_5000_leading_zeros_is_its_value(url: str) -> None:
    # httptools accepts it (1*DIGIT); the body limit's check once answered 500.
    body = f'{{"inputs": [[{ROW}]]}}'.encode()
    answer = _raw(
        url,
        b"POST /models/diabetes/predict HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Content-Type: application/json\r\n"
        b"Content-Length: " + b"0" * 5000 + str(len(body)).encode() + b"\r\n\r\n" + body,
    )
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/models/diabetes/predict/", f'{{"inputs": [[{ROW}]]}}'.encode()),
        ("POST", "/v2/models/diabetes/infer/", V2_BODY),
        ("GET", "/health/", b""),
        ("GET", "/v2/health/ready/", b""),
    ],
)
def test_a_trailing_slash_is_a_json_404_not_a_redirect(
    url: str, method: str, path: str, body: bytes
) -> None:
    """Starlette answered a 307 with no body, which a client following it may resend as a GET
    (or resend the body to wherever Location points)."""
    answer = _raw(
        url,
        f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body,
    )
    head, _, content = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 404"), answer[:300]
    assert b"location:" not in head.lower()
    error = json.loads(content)["error"]
    message = error if path.startswith("/v2/") else error["message"]
    assert message.startswith(f"no route serves {path}; remove the trailing slash: ")
    assert message.endswith(f" {path.rstrip('/')}")


def test_a_row_of_7_million_values_is_refused_before_it_is_parsed(url: str) -> None:
    """14 MB, within the body limit: parsing it holds the GIL (~0.5 s, in a worker thread too),
    and each value was then validated on the event loop before the row's shape was refused:
    /health waited 1.2-1.7 s."""
    body = b'{"inputs": [[' + b",".join([b"0"] * 7_000_000) + b"]]}"
    response = httpx2.post(
        f"{url}/models/diabetes/predict",
        content=body,
        headers={"content-type": "application/json"},
        timeout=60,
    )
    assert response.status_code == 422, response.text[:300]
    error = response.json()["error"]
    assert error["code"] == "limit_exceeded"
    assert error["message"].startswith("the request body holds 7000000 or more JSON values")
    assert "at most 1000 rows (the server's max_request_rows) of 10 values" in error["message"]
