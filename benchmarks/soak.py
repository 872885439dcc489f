"""Soak: minutes of mixed traffic against a real ``mcdrop serve``, and small requests behind
large ones.

Two phases, one server (the defaults, one torch thread):

1. **Soak.** ``clients`` concurrent clients (httpx2, keep-alive) send a seeded random mix for
   ``minutes``: one-row and few-row ``/predict`` and ``/uncertainty`` on the three bundled
   models, raw samples, model listings, health checks, and bad requests (wrong shapes, NaN,
   unknown models, limits exceeded), which must get a 4xx. Reported per kind: requests, p50 and
   p99 latency, and *unexpected* answers (a 5xx, a transport error, a 4xx to a valid request or a
   2xx to a bad one), with the server's resident memory sampled through the run.
2. **Small behind large.** Two clients send the largest uncertainty request the default limits
   allow on the slowest model (``fashion``, rows × samples = ``max_row_samples``) while a third
   sends one-row requests one after another; reported: the one-row latencies (the target is a
   p99 under 1 s). The large requests are then abandoned, which stops their sampling.

Run: ``python -m benchmarks.soak [--minutes 3] [--clients 16] [--quick]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx2

from benchmarks.service_load import Server
from benchmarks.timing import machine, table
from service.config import Settings

DIGIT = [float(i % 17) for i in range(64)]
PATIENT = [59, 2, 32.1, 101, 157, 93.2, 38, 4, 4.8598, 87]
IMAGE = [[(i * j % 255) / 255 for j in range(28)] for i in range(28)]

#: (kind, method, path, body, valid, weight): what the soak clients send.
MIX: list[tuple[str, str, str, Any, bool, int]] = [
    ("digits predict", "POST", "/models/digits/predict", {"inputs": [DIGIT]}, True, 25),
    (
        "digits uncertainty ×4",
        "POST",
        "/models/digits/uncertainty",
        {"inputs": [DIGIT] * 4, "n_samples": 100},
        True,
        15,
    ),
    (
        "diabetes uncertainty",
        "POST",
        "/models/diabetes/uncertainty",
        {"inputs": [PATIENT], "n_samples": 200},
        True,
        10,
    ),
    (
        "fashion uncertainty",
        "POST",
        "/models/fashion/uncertainty",
        {"inputs": [IMAGE], "n_samples": 50},
        True,
        10,
    ),
    ("fashion predict ×4", "POST", "/models/fashion/predict", {"inputs": [IMAGE] * 4}, True, 5),
    (
        "raw samples",
        "POST",
        "/models/digits/uncertainty",
        {"inputs": [DIGIT], "n_samples": 100, "return_samples": True},
        True,
        5,
    ),
    ("list models", "GET", "/models", None, True, 5),
    ("health", "GET", "/health", None, True, 5),
    ("bad: wrong width", "POST", "/models/digits/predict", {"inputs": [DIGIT[:63]]}, False, 5),
    (
        "bad: NaN",
        "POST",
        "/models/diabetes/predict",
        '{"inputs": [[NaN, 2, 32.1, 101, 157, 93.2, 38, 4, 4.8598, 87]]}',
        False,
        5,
    ),
    ("bad: unknown model", "POST", "/models/nope/predict", {"inputs": [DIGIT]}, False, 5),
    (
        "bad: too many samples",
        "POST",
        "/models/digits/uncertainty",
        {"inputs": [DIGIT], "n_samples": 10**9},
        False,
        5,
    ),
]


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)
    unexpected: int = 0
    statuses: dict[int, int] = field(default_factory=dict)


def _quantile(values: list[float], q: int) -> float:
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=100)[q - 1]


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        line = next(line for line in f if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


async def _soak(server: Server, clients: int, seconds: float) -> tuple[dict[str, Tally], list]:
    tallies = {kind: Tally() for kind, *_ in MIX}
    weights = [w for *_, w in MIX]
    rss: list[tuple[float, float]] = []
    limits = httpx2.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx2.AsyncClient(base_url=server.url, timeout=120, limits=limits) as http:
        started = time.monotonic()
        deadline = started + seconds

        async def client(k: int) -> None:
            rng = random.Random(k)
            i = 0
            while time.monotonic() < deadline:
                kind, method, path, body, valid, _ = rng.choices(MIX, weights)[0]
                if isinstance(body, dict) and "n_samples" in body:
                    body = {**body, "seed": k * 1_000_000 + i}
                content = body if isinstance(body, str) else json.dumps(body)
                t0 = time.monotonic()
                try:
                    if method == "GET":
                        response = await http.get(path)
                    else:
                        headers = {"content-type": "application/json"}
                        response = await http.post(path, content=content, headers=headers)
                    status = response.status_code
                except httpx2.HTTPError:
                    status = 0
                tally = tallies[kind]
                tally.latencies.append(time.monotonic() - t0)
                tally.statuses[status] = tally.statuses.get(status, 0) + 1
                ok = status == 200 if valid else 400 <= status < 500
                tally.unexpected += not ok
                i += 1

        async def sample_rss() -> None:
            while time.monotonic() < deadline:
                rss.append((time.monotonic() - started, _rss_mib(server.proc.pid)))
                await asyncio.sleep(max(1.0, seconds / 20))
            rss.append((time.monotonic() - started, _rss_mib(server.proc.pid)))

        await asyncio.gather(sample_rss(), *(client(k) for k in range(clients)))
    return tallies, rss


async def _small_behind_large(server: Server, seconds: float) -> tuple[list[float], int]:
    """One-row latencies while two maximum-size requests run, and how many of them failed."""
    limit = Settings().max_row_samples
    n_samples = 1000
    big = {"inputs": [IMAGE] * (limit // n_samples), "n_samples": n_samples, "seed": 0}
    latencies: list[float] = []
    failures = 0
    async with httpx2.AsyncClient(base_url=server.url, timeout=120) as http:
        large = [
            asyncio.ensure_future(http.post("/models/fashion/uncertainty", json=big))
            for _ in range(2)
        ]
        await asyncio.sleep(1.0)  # both are computing
        deadline = time.monotonic() + seconds
        i = 0
        while time.monotonic() < deadline:
            body = {"inputs": [IMAGE], "n_samples": 50, "seed": i}
            t0 = time.monotonic()
            response = await http.post("/models/fashion/uncertainty", json=body)
            latencies.append(time.monotonic() - t0)
            failures += response.status_code != 200
            i += 1
        for task in large:
            task.cancel()  # the server stops their sampling at its next forward pass
        await asyncio.gather(*large, return_exceptions=True)
    return latencies, failures


def run(quick: bool = False, minutes: float = 3.0, clients: int = 16) -> str:
    soak_s = 6.0 if quick else minutes * 60
    clients = 4 if quick else clients
    behind_s = 3.0 if quick else 20.0
    with Server(batching=True) as server:
        tallies, rss = asyncio.run(_soak(server, clients, soak_s))
        latencies, failures = asyncio.run(_small_behind_large(server, behind_s))
        idle_rss = _rss_mib(server.proc.pid)
    rows = [
        [
            kind,
            len(t.latencies),
            f"{_quantile(t.latencies, 50) * 1e3:.1f}",
            f"{_quantile(t.latencies, 99) * 1e3:.1f}",
            t.unexpected,
            " ".join(f"{s}×{n}" for s, n in sorted(t.statuses.items())),
        ]
        for kind, t in tallies.items()
    ]
    total = sum(len(t.latencies) for t in tallies.values())
    unexpected = sum(t.unexpected for t in tallies.values())
    series = ", ".join(f"{m:.0f}" for _, m in rss)
    return (
        f"### Soak ({machine()}; {clients} clients, {soak_s:.0f} s)\n\n"
        + table(["kind", "requests", "p50 ms", "p99 ms", "unexpected", "statuses"], rows)
        + f"\n\n{total} requests ({total / soak_s:.0f}/s), {unexpected} unexpected answers. "
        f"Server RSS (MiB) every {max(1.0, soak_s / 20):.0f} s: {series}; "
        f"{idle_rss:.0f} after the next phase.\n\n"
        f"### Small behind large ({behind_s:.0f} s)\n\n"
        f"One-row fashion /uncertainty (50 samples) while two requests of rows × samples = "
        f"{Settings().max_row_samples} run: {len(latencies)} requests, "
        f"p50 {_quantile(latencies, 50) * 1e3:.0f} ms, p99 {_quantile(latencies, 99) * 1e3:.0f} "
        f"ms, max {max(latencies) * 1e3:.0f} ms, {failures} failed.\n"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="seconds, for the test suite")
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--clients", type=int, default=16)
    args = parser.parse_args(argv)
    print(run(args.quick, args.minutes, args.clients))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
