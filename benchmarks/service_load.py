"""Service throughput under load, batching on and off, against the library in process.

Starts ``mcdrop serve`` (a real uvicorn process) on the bundled models, drives it with an async
httpx2 load generator at 1, 8 and 32 concurrent clients against ``/predict`` and
``/uncertainty`` (one ``digits`` row per request; 100 samples), and reports requests/s, p50,
p99 and errors. The same requests run through the library in process give the baseline, so the
HTTP overhead is a measured ratio.

Run: ``python -m benchmarks.service_load [--quick]``.
"""

from __future__ import annotations

import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx2
import torch
from sklearn.datasets import load_digits

from benchmarks.timing import machine, run_main, table
from mcdrop import checkpoint
from mcdrop.predictor import Predictor

ROOT = Path(__file__).resolve().parents[1]
ROWS = load_digits().data[:64].tolist()
ENDPOINTS = {
    "predict": lambda i: {"inputs": [ROWS[i % 64]]},
    "uncertainty": lambda i: {"inputs": [ROWS[i % 64]], "n_samples": 100, "seed": i},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``mcdrop serve`` in a subprocess, stopped on exit."""

    def __init__(self, batching: bool) -> None:
        self.port = _free_port()
        env = {
            **os.environ,
            "MCDROP_BATCHING": str(batching).lower(),
            "MCDROP_MODEL_DIR": str(ROOT / "models"),
            "MCDROP_LOG_LEVEL": "warning",
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--port", str(self.port)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Server:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx2.get(self.url + "/ready", timeout=2).status_code == 200:
                    return self
            except httpx2.TransportError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError("mcdrop serve exited")
            time.sleep(0.2)
        raise RuntimeError("mcdrop serve did not become ready")

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


async def _load(url: str, endpoint: str, clients: int, seconds: float) -> dict[str, float]:
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds
    limits = httpx2.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx2.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def worker(k: int) -> None:
            nonlocal errors
            i = k
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                try:
                    r = await client.post(f"/models/digits/{endpoint}", json=ENDPOINTS[endpoint](i))
                    ok = r.status_code == 200
                except httpx2.HTTPError:
                    ok = False
                latencies.append(time.perf_counter() - started)
                errors += not ok
                i += clients

        started = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(clients)))
        elapsed = time.perf_counter() - started
    cuts = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else latencies * 99
    return {
        "rps": len(latencies) / elapsed,
        "p50": cuts[49] * 1e3,
        "p99": cuts[98] * 1e3,
        "errors": errors,
        "requests": len(latencies),
    }


def in_process(endpoint: str, seconds: float) -> float:
    """Requests per second of the same work through the library, one at a time."""
    predictor = Predictor(checkpoint.load(ROOT / "models" / "digits"))
    count, deadline = 0, time.perf_counter() + seconds
    started = time.perf_counter()
    while time.perf_counter() < deadline:
        x = torch.tensor(ENDPOINTS[endpoint](count)["inputs"], dtype=torch.float32)
        if endpoint == "predict":
            predictor.predict(x)
        else:
            predictor.uncertainty(x, 100, seed=count)
        count += 1
    return count / (time.perf_counter() - started)


def run(quick: bool = False) -> str:
    seconds = 0.5 if quick else 5.0
    concurrency = (1, 8) if quick else (1, 8, 32)
    baseline = {e: in_process(e, seconds) for e in ENDPOINTS}
    rows: list[list[Any]] = []
    measured: dict[tuple[str, bool, int], float] = {}
    for batching in (False, True):
        with Server(batching) as server:
            for endpoint in ENDPOINTS:
                for clients in concurrency:
                    r = asyncio.run(_load(server.url, endpoint, clients, seconds))
                    measured[(endpoint, batching, clients)] = r["rps"]
                    rows.append(
                        [
                            endpoint,
                            "on" if batching else "off",
                            clients,
                            f"{r['rps']:.0f}",
                            f"{r['p50']:.1f}",
                            f"{r['p99']:.1f}",
                            f"{int(r['errors'])}/{int(r['requests'])}",
                            f"{r['rps'] / baseline[endpoint]:.2f}",
                        ]
                    )
    header = [
        "endpoint",
        "batching",
        "clients",
        "req/s",
        "p50 ms",
        "p99 ms",
        "errors",
        "÷ in-process",
    ]
    top = concurrency[-1]
    gains = ", ".join(
        f"{e}: {measured[(e, True, top)] / measured[(e, False, top)]:.2f}×" for e in ENDPOINTS
    )
    base = ", ".join(f"{e} {v:.0f} req/s" for e, v in baseline.items())
    return (
        f"### Service load ({machine()})\n\n{table(header, rows)}\n\n"
        f"In-process library, one request at a time: {base}. "
        f"Batching on ÷ off at {top} clients: {gains}.\n"
    )


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(run, __doc__, argv)


if __name__ == "__main__":
    raise SystemExit(main())
