"""Ray Serve scale-out: time to ready, memory per replica, throughput of 1 vs 2 replicas.

Starts ``python -m service.ray_app --replicas N`` (a local Ray cluster; one CPU and one torch
thread per replica) for N = 1 and 2, and ``mcdrop serve`` (one torch thread) as the reference,
then drives each with the same closed-loop load as :mod:`benchmarks.service_load` (raw HTTP/1.1,
one keep-alive connection per client, one row per request, 100 samples). Reports time from
start to ready, the resident memory of each replica and of Ray's own processes, requests/s, p50,
p99, errors and server CPU per request (replicas and proxy for Ray).

Needs the extra: ``pip install -e '.[ray]'``. Run: ``python -m benchmarks.ray_serve [--quick]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from benchmarks.service_load import ROOT, Cell, Server, _free_port, _load, uncertainty_bodies
from benchmarks.timing import machine, table

READY = re.compile(r"replica\(s\) ready in ([\d.]+) s")
REPLICA = re.compile(r"mcdrop replica (\w+) ready in ([\d.]+) s: .* pid (\d+)")
PROXY = re.compile(r"ProxyActor pid=(\d+)")


def _proc(pid: int, field: str) -> int:
    """A ``/proc/<pid>/status`` field in kB (VmRSS, VmHWM)."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _ray_processes() -> list[int]:
    """Every Ray process on the machine (actors, agents, raylet, GCS): for Ray's overhead."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                command = (entry / "cmdline").read_bytes().split(b"\0")[0]
            except OSError:
                continue
            if command.startswith(b"ray::") or command.endswith((b"/raylet", b"/gcs_server")):
                pids.append(int(entry.name))
    return pids


class RayServer:
    """``python -m service.ray_app`` in its own session; SIGTERM on exit (then SIGKILL)."""

    def __init__(self, replicas: int, log: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log
        self.started = time.monotonic()
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [
                    *(sys.executable, "-m", "service.ray_app", "--replicas", str(replicas)),
                    *("--model-dir", str(ROOT / "models"), "--port", str(self.port)),
                    *("--log-level", "warning"),
                ],
                cwd=ROOT,
                env={**os.environ, "RAY_DEDUP_LOGS": "0", "PYTHONUNBUFFERED": "1"},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 300
        while not READY.search(self.log()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"ray_app did not become ready:\n{self.log()}")
            time.sleep(0.2)
        self.ready_s = time.monotonic() - self.started
        time.sleep(2)  # Ray forwards the replicas' log lines a moment later
        self.replicas = {m[1]: (float(m[2]), int(m[3])) for m in REPLICA.finditer(self.log())}
        self.proxy = [int(p) for p in PROXY.findall(self.log())][:1]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def cpu_seconds(self) -> float:
        """CPU time of the replicas and the HTTP proxy (the request path)."""
        pids = [pid for _, pid in self.replicas.values()] + self.proxy
        return sum(_cpu_seconds(pid) for pid in pids)

    def memory(self) -> tuple[list[int], int]:
        """Resident MiB of each replica, and of all Ray processes together."""
        replicas = [_proc(pid, "VmRSS") // 1024 for _, pid in self.replicas.values()]
        return replicas, sum(_proc(pid, "VmRSS") for pid in _ray_processes()) // 1024

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def run(quick: bool = False) -> str:
    torch.set_num_threads(1)  # as the servers: the header names it
    seconds = 1.0 if quick else 8.0
    clients = (8,) if quick else (1, 8, 32)
    bodies = uncertainty_bodies(quick)
    models = list(bodies)
    logs = Path(os.environ.get("TMPDIR", "/tmp"))
    results: dict[str, dict[tuple[str, int], Cell]] = {}
    notes: list[str] = []

    def drive(name: str, server: object) -> None:
        results[name] = {
            (m, c): asyncio.run(
                _load(server, "raw", f"/models/{m}/uncertainty", bodies[m], c, seconds)  # type: ignore[arg-type]
            )
            for m in models
            for c in clients
        }

    started = time.monotonic()
    with Server(batching=True) as reference:
        ready = time.monotonic() - started
        rss = _proc(reference.proc.pid, "VmRSS") // 1024
        drive("mcdrop serve", reference)
        notes.append(f"`mcdrop serve`: ready {ready:.1f} s after start, {rss} MiB resident")
    for replicas in (1, 2):
        server = RayServer(replicas, logs / f"mcdrop-ray-bench-{os.getpid()}-{replicas}.log")
        try:
            drive(f"Ray, {replicas} replica(s)", server)
            each, ray_total = server.memory()
            loads = ", ".join(f"{s:.1f}" for s, _ in server.replicas.values())
            notes.append(
                f"Ray, {replicas} replica(s): ready {server.ready_s:.1f} s after start "
                f"(each replica's models loaded {loads} s after its constructor); replicas "
                f"{', '.join(map(str, each))} MiB resident; all Ray processes {ray_total} MiB"
            )
        finally:
            server.close()
    rows = [
        [
            name,
            model,
            c,
            f"{cell.rps:.0f}",
            f"{cell.p50:.1f}",
            f"{cell.p99:.1f}",
            f"{cell.errors}/{cell.requests}",
            f"{cell.cpu_ms:.2f}",
        ]
        for name, cells in results.items()
        for (model, c), cell in cells.items()
    ]
    header = ["server", "model", "clients", "req/s", "p50 ms", "p99 ms", "errors", "CPU ms/req"]
    return (
        f"### Ray Serve ({machine()}; uncertainty, 1 row × 100 samples)\n\n"
        f"{table(header, rows)}\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes")
    args = parser.parse_args(argv)
    print(run(args.quick))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
