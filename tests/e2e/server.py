"""A real ``mcdrop serve`` process on a free port, for tests about the wire."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx2

from tests.conftest import MODELS, ROOT

SERVE = [sys.executable, "-m", "service.cli", "serve"]


@dataclass(frozen=True)
class Server:
    url: str
    port: int
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without any ``MCDROP_*`` variable of the caller's shell, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCDROP_")}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


@contextmanager
def serve(
    log: Path,
    env: Mapping[str, str] | None = None,
    args: tuple[str, ...] = (),
    timeout: float = 90.0,
) -> Iterator[Server]:
    """``mcdrop serve`` of the bundled models until ``/ready`` answers 200; stopped on exit.

    Args:
        log: file that receives the server's stdout and stderr.
        env: the server's environment (default: :func:`clean_env`).
        args: more ``mcdrop serve`` flags.
        timeout: seconds to wait for readiness.
    """
    port = free_port()
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [*SERVE, "--model-dir", str(MODELS), "--port", str(port), *args],
            cwd=ROOT,
            env=dict(env) if env is not None else clean_env(),
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_ready(url, proc, log, timeout)
            yield Server(url, port, log)
        finally:
            proc.terminate()
            proc.wait(timeout=20)


def _wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    with httpx2.Client(base_url=url, timeout=5) as http:
        while time.monotonic() < deadline:
            try:
                if http.get("/ready").status_code == 200:
                    return
            except httpx2.TransportError:
                pass
            if proc.poll() is not None:
                raise AssertionError(f"mcdrop serve exited:\n{log.read_text()}")
            time.sleep(0.2)
    raise AssertionError(f"mcdrop serve did not become ready in {timeout} s:\n{log.read_text()}")
