"""A real ``mcdrop serve`` (uvicorn) process on a free port, for tests about the wire."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx2

from tests.conftest import MODELS, ROOT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without any ``MCDROP_*`` variable of the caller's shell, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCDROP_")}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


@dataclass
class Server:
    """A running `mcdrop serve`: its URL, process and log."""

    url: str
    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def cpu_seconds(self) -> float:
        """User + system CPU time the server process has used so far (Linux /proc)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def serve(
    tmp: Path, *, model_dir: Path = MODELS, wait_ready: bool = True, **env: str
) -> Iterator[Server]:
    """`mcdrop serve` on the models of ``model_dir`` until ``/ready`` answers 200 (unless not
    ``wait_ready``); stopped with SIGTERM on exit.

    Args:
        tmp: folder for the server's log (stdout and stderr), ``serve-<port>.log``.
        model_dir: the models to serve.
        wait_ready: whether to wait (at most 90 s) for ``/ready`` to answer 200.
        env: ``MCDROP_*`` settings, the server's whole configuration: the caller's own
            ``MCDROP_*`` variables are left out (:func:`clean_env`). Logs at level warning
            unless ``MCDROP_LOG_LEVEL`` says otherwise.
    """
    port = free_port()
    command = [sys.executable, "-m", "service.cli", "serve", "--model-dir", str(model_dir)]
    log_path = tmp / f"serve-{port}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [*command, "--port", str(port)],
            cwd=ROOT,
            env=clean_env(**{"MCDROP_LOG_LEVEL": "warning", **env}),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    server = Server(f"http://127.0.0.1:{port}", port, proc, log_path)
    try:
        if wait_ready:
            _wait_ready(server)
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_ready(server: Server, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    with httpx2.Client(base_url=server.url, timeout=5) as http:
        while time.monotonic() < deadline:
            if server.proc.poll() is not None:
                raise AssertionError(f"the server exited:\n{server.log()}")
            try:
                if http.get("/ready").status_code == 200:
                    return
            except httpx2.TransportError:
                pass
            time.sleep(0.2)
    raise AssertionError(f"service did not become ready in {timeout} s:\n{server.log()}")
