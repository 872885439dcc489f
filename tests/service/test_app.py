"""The app's own middleware: the declared Content-Length, before any body is read."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from service.config import Settings

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
