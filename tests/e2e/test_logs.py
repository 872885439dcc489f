"""Request IDs and JSON-lines logs, through real uvicorn."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx2
import pytest

from tests.e2e.server import serve

pytestmark = pytest.mark.slow


def test_request_ids_are_echoed_and_logged_as_json_lines(tmp_path: Path) -> None:
    with serve(tmp_path, MCDROP_LOG_FORMAT="json", MCDROP_LOG_LEVEL="info") as server:
        with httpx2.Client(base_url=server.url, timeout=30) as http:
            mine = http.get("/models", headers={"X-Request-ID": "abc-123"})
            assert mine.headers["x-request-id"] == "abc-123"
            fresh = http.post("/models/digits/predict", json={"inputs": [[0.0]]})
            assert fresh.status_code == 422
            generated = fresh.headers["x-request-id"]
            assert re.fullmatch(r"[0-9a-f]{32}", generated)
            assert fresh.json()["error"]["request_id"] == generated
            # An ID that could forge log lines or bloat them is replaced, not echoed.
            odd = http.get("/health", headers={"X-Request-ID": "a b\tc" + "x" * 200})
            assert re.fullmatch(r"[0-9a-f]{32}", odd.headers["x-request-id"])
        server.proc.terminate()
        server.proc.wait(timeout=30)
    lines = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    access = [e for e in lines if e["logger"] == "mcdrop.access"]
    assert {"abc-123", generated} <= {e["request_id"] for e in access}
    failed = next(e for e in access if e["request_id"] == generated)
    assert failed["status"] == 422
    assert failed["path"] == "/models/digits/predict"
    assert failed["duration_ms"] >= 0
    assert all({"time", "level", "message"} <= set(e) for e in lines)
    # Every line is JSON: uvicorn's own records go through the same formatter.
    text = [line for line in server.log().splitlines() if line and not line.startswith("{")]
    assert not text, text
