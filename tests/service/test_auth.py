"""Which paths the API key guards (the requests themselves: tests/e2e/test_client_over_http.py)."""

from __future__ import annotations

import pytest

from service.auth import is_public


@pytest.mark.parametrize("path", ["/health", "/ready", "/v2/health/live", "/v2/health/ready"])
def test_probes_are_public(path: str) -> None:
    assert is_public(path)


@pytest.mark.parametrize(
    "path",
    ["/models", "/models/digits", "/docs", "/openapi.json", "/healthz", "/health/x", "/ready/",
     "/v2/models/digits/infer", "/v2/health", "/", ""],
)  # fmt: skip
def test_everything_else_needs_the_key(path: str) -> None:
    assert not is_public(path)
