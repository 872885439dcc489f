"""`mcdrop serve` as a real uvicorn process on a free port, for tests about the wire."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx2

from tests.conftest import MODELS, ROOT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(log_path: Path, env: dict[str, str] | None = None, timeout: float = 90) -> Iterator[str]:
    """The base URL of a ready server over the bundled models, with ``env`` added to its
    environment (e.g. ``MCDROP_MAX_N_SAMPLES``); stopped on exit. Its output goes to
    ``log_path``, which a failure to start quotes."""
    port = free_port()
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "service.cli", "serve", "--model-dir", str(MODELS)),
                *("--port", str(port), "--log-level", "warning"),
            ],
            cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + timeout
            while True:
                with contextlib.suppress(httpx2.TransportError):
                    if httpx2.get(f"{base}/ready", timeout=5).status_code == 200:
                        break
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"service did not become ready:\n{log_path.read_text()}")
                time.sleep(0.2)
            yield base
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=20)
