"""Service throughput under load, batching on and off, against the library in process.

Starts ``mcdrop serve`` (a real uvicorn process) on the bundled models and drives it at 1, 8 and
32 concurrent clients against ``/predict`` and ``/uncertainty`` (one row per request; 100
samples) of the ``digits`` MLP and the ``fashion`` CNN, reporting requests/s, p50, p99, errors
and the server's CPU time per request. The same requests run through the library in process,
one at a time, give the baseline, so the HTTP overhead is a measured ratio.

Two load generators (``--generator``), both asyncio with one keep-alive connection per client:

- ``raw`` (default): pre-encoded HTTP/1.1 requests over asyncio streams. It costs the shared
  2-core machine little, so the figures are the server's.
- ``httpx2``: ``httpx2.AsyncClient``, what a Python caller would use; its own CPU cost competes
  with the server's on the same cores.

:func:`protocols` compares, on the same server and in the same run, one-row requests to the
native endpoints with the same requests over the Open Inference Protocol (``/v2/.../infer``,
JSON and binary tensor data).

:func:`overhead` measures the framework's own floor beside the service: a bare FastAPI route
(:func:`bare_app`) under ``mcdrop serve``'s uvicorn settings (:func:`service.server.config`), fed
the same JSON bodies and answering JSON bodies of the same size, plus the model's own CPU time in
process; the service's CPU per one-row request is reported as a ratio to their sum, and to the
same bare route running the model in the request.

:func:`against` compares this tree's server CPU per one-row request with another checkout's,
both servers running at once.

Run: ``python -m benchmarks.service_load [--quick] [--generator raw|httpx2] [--only
load|protocols|arrival|overhead] [--against DIR]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import numpy as np
import torch
from sklearn.datasets import load_digits

from benchmarks.timing import machine, table
from mcdrop import checkpoint
from mcdrop.predictor import Predictor
from mcdrop.recipes.datasets import DatasetNotFoundError, fashion_mnist_arrays
from service.replicas import REPLICA_HEADER

ROOT = Path(__file__).resolve().parents[1]
N_SAMPLES = 100
GENERATORS = ("raw", "httpx2")


def _rows() -> dict[str, list[Any]]:
    """64 real input rows per benchmarked model (fashion only where its data is installed)."""
    rows: dict[str, list[Any]] = {"digits": load_digits().data[:64].tolist()}
    with contextlib.suppress(DatasetNotFoundError):
        rows["fashion"] = fashion_mnist_arrays()["x_test"][:64].astype(float).tolist()
    return rows


def _body(endpoint: str, row: Any, i: int) -> dict[str, Any]:
    if endpoint == "predict":
        return {"inputs": [row]}
    return {"inputs": [row], "n_samples": N_SAMPLES, "seed": i}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``mcdrop serve`` (one torch thread) in a subprocess, stopped on exit (``command``: another
    server module's command line, given ``--port``)."""

    def __init__(
        self,
        *,
        batching: bool,
        command: Sequence[str] = ("-m", "service.cli", "serve"),
        **settings: str,
    ) -> None:
        self.port = _free_port()
        self.settings = settings
        env = {
            **os.environ,
            "MCDROP_BATCHING": str(batching).lower(),
            "MCDROP_MODEL_DIR": str(ROOT / "models"),
            "MCDROP_LOG_LEVEL": "warning",
            "MCDROP_TORCH_THREADS": "1",
            **settings,
        }
        self.proc = subprocess.Popen(
            [sys.executable, *command, "--port", str(self.port)],
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
                ready = httpx2.get(self.url + "/ready", timeout=2).status_code == 200
                if ready and self._every_worker_answers():
                    return self
            except httpx2.TransportError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError("mcdrop serve exited")
            time.sleep(0.2)
        self.__exit__()  # no server left behind
        raise RuntimeError("mcdrop serve did not become ready")

    def _every_worker_answers(self) -> bool:
        """Whether every worker process (``MCDROP_WORKERS``) answers, on fresh connections (at
        most 50): ``/ready`` is the first worker's answer, and a load that connects before the
        others listen keeps its connections on that one."""
        wanted = int(self.settings.get("MCDROP_WORKERS", "1"))
        seen: set[str | None] = set()
        for _ in range(50 if wanted > 1 else 0):
            with httpx2.Client(base_url=self.url) as http:
                seen.add(http.get("/health", timeout=2).headers.get(REPLICA_HEADER))
            if len(seen) == wanted:
                break
        return wanted == 1 or len(seen) == wanted

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process so far (all its threads), and of its
        worker processes (``MCDROP_WORKERS``)."""
        return sum(map(_cpu_seconds, _process_tree(self.proc.pid)))


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far (0 where it has exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants now (Linux ``/proc``)."""
    found, queue = [], [pid]
    while queue:
        pid = queue.pop()
        found.append(pid)
        try:
            with open(f"/proc/{pid}/task/{pid}/children") as f:
                queue += [int(child) for child in f.read().split()]
        except FileNotFoundError:
            pass
    return found


# A client sends a request, awaits the answer, and repeats: ``(path, body) -> ok``.
Call = Callable[[str, bytes], Any]
JSON_HEADERS = {"Content-Type": "application/json"}


async def _raw_client(port: int, headers: dict[str, str]) -> tuple[Call, Callable[[], None]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    extra = "".join(f"{name}: {value}\r\n" for name, value in headers.items())

    async def call(path: str, body: bytes) -> bool:
        head = f"POST {path} HTTP/1.1\r\nHost: bench\r\n{extra}Content-Length: {len(body)}\r\n\r\n"
        writer.write(head.encode() + body)
        status = await reader.readline()
        length = 0
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        await reader.readexactly(length)
        return status.split(b" ", 2)[1] == b"200"

    return call, writer.close


@dataclass
class Cell:
    rps: float
    p50: float
    p99: float
    errors: int
    requests: int
    cpu_ms: float


async def _load(
    server: Server,
    generator: str,
    path: str,
    bodies: list[bytes],
    clients: int,
    seconds: float,
    headers: dict[str, str] = JSON_HEADERS,
) -> Cell:
    latencies: list[float] = []
    errors = 0
    limits = httpx2.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx2.AsyncClient(base_url=server.url, timeout=60, limits=limits) as http:

        async def worker(k: int, deadline: float) -> None:
            nonlocal errors
            if generator == "raw":
                call, close = await _raw_client(server.port, headers)
            else:

                async def call(path: str, body: bytes) -> bool:
                    r = await http.post(path, content=body, headers=headers)
                    return r.status_code == 200

                close = lambda: None  # noqa: E731 (the shared client closes itself)
            i = k
            try:
                while time.perf_counter() < deadline:
                    started = time.perf_counter()
                    try:
                        ok = await call(path, bodies[i % len(bodies)])
                    except (OSError, asyncio.IncompleteReadError, httpx2.HTTPError):
                        ok = False
                    latencies.append(time.perf_counter() - started)
                    errors += not ok
                    i += clients
            finally:
                close()

        cpu0, started = server.cpu_seconds(), time.perf_counter()
        deadline = started + seconds
        await asyncio.gather(*(worker(k, deadline) for k in range(clients)))
        elapsed, cpu = time.perf_counter() - started, server.cpu_seconds() - cpu0
    cuts = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else latencies * 99
    return Cell(
        rps=len(latencies) / elapsed,
        p50=cuts[49] * 1e3,
        p99=cuts[98] * 1e3,
        errors=errors,
        requests=len(latencies),
        cpu_ms=cpu / max(1, len(latencies)) * 1e3,
    )


def uncertainty_bodies(quick: bool) -> dict[str, list[bytes]]:
    """The one-row ``/uncertainty`` bodies of digits, and of fashion where its data is here
    (not when ``quick``), per model."""
    data = _rows()
    models = ["digits"] + (["fashion"] if "fashion" in data and not quick else [])
    return {
        m: [json.dumps(_body("uncertainty", r, i)).encode() for i, r in enumerate(data[m])]
        for m in models
    }


def workers(quick: bool = False, generator: str = "raw") -> str:
    """Throughput of ``mcdrop serve --workers N`` for N = 1 and 2 (one torch thread per worker),
    and of one process with two torch threads (the same cores as two workers), on one-row
    uncertainty requests (100 samples) from 1, 8 and 32 closed-loop clients."""
    seconds = 0.5 if quick else 6.0
    clients = (8,) if quick else (1, 8, 32)
    bodies = uncertainty_bodies(quick)
    models = list(bodies)
    servers = [
        ("1 worker, 1 torch thread", {"MCDROP_WORKERS": "1"}),
        ("1 worker, 2 torch threads", {"MCDROP_WORKERS": "1", "MCDROP_TORCH_THREADS": "2"}),
        ("2 workers, 1 torch thread each", {"MCDROP_WORKERS": "2"}),
    ]
    rows = []
    for name, settings in servers[:1] + servers[2:] if quick else servers:
        with Server(batching=True, **settings) as server:
            for m in models:
                for c in clients:
                    path = f"/models/{m}/uncertainty"
                    cell = asyncio.run(_load(server, generator, path, bodies[m], c, seconds))
                    rows.append(
                        [
                            name,
                            m,
                            c,
                            f"{cell.rps:.0f}",
                            f"{cell.p50:.1f}",
                            f"{cell.p99:.1f}",
                            f"{cell.errors}/{cell.requests}",
                            f"{cell.cpu_ms:.2f}",
                        ]
                    )
    header = ["server", "model", "clients", "req/s", "p50 ms", "p99 ms", "errors", "CPU ms/req"]
    return (
        f"### Workers ({machine()}; uncertainty, 1 row × {N_SAMPLES} samples)\n\n"
        f"{table(header, rows)}\n"
    )


def in_process(model: str, endpoint: str, rows: list[Any], seconds: float) -> float:
    """Requests per second of the same work through the library, one at a time (one torch
    thread, like the server)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        predictor = Predictor(checkpoint.load(ROOT / "models" / model))
        count, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            body = _body(endpoint, rows[count % len(rows)], count)
            x = torch.tensor(body["inputs"], dtype=torch.float32)
            if endpoint == "predict":
                predictor.predict(x)
            else:
                predictor.uncertainty(x, N_SAMPLES, seed=count)
            count += 1
        return count / (time.perf_counter() - started)
    finally:
        torch.set_num_threads(threads)


def run(quick: bool = False, generator: str = "raw") -> str:
    seconds = 0.5 if quick else 5.0
    concurrency = (1, 8) if quick else (1, 8, 32)
    data = _rows()
    if quick:
        data = {"digits": data["digits"]}
    cases = [(m, e) for m in data for e in ("predict", "uncertainty")]
    baseline = {(m, e): in_process(m, e, data[m], seconds) for m, e in cases}
    bodies = {
        (m, e): [json.dumps(_body(e, row, i)).encode() for i, row in enumerate(data[m])]
        for m, e in cases
    }
    cells: dict[tuple[str, str, bool, int], Cell] = {}
    # Both servers run for the whole benchmark, and each cell is measured with batching off and
    # then on, back to back: the shared machine drifts over minutes, and a cell's on/off ratio
    # should not absorb that drift.
    with Server(batching=False) as off, Server(batching=True) as on:
        for model, endpoint in cases:
            path = f"/models/{model}/{endpoint}"
            for clients in concurrency:
                for batching, server in ((False, off), (True, on)):
                    cells[(model, endpoint, batching, clients)] = asyncio.run(
                        _load(server, generator, path, bodies[(model, endpoint)], clients, seconds)
                    )
    rows = [
        [
            model,
            endpoint,
            "on" if batching else "off",
            clients,
            f"{c.rps:.0f}",
            f"{c.p50:.1f}",
            f"{c.p99:.1f}",
            f"{c.errors}/{c.requests}",
            f"{c.cpu_ms:.2f}",
            f"{c.rps / baseline[(model, endpoint)]:.2f}",
        ]
        for (model, endpoint, batching, clients), c in sorted(
            cells.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2], kv[0][3])
        )
    ]
    header = [
        "model",
        "endpoint",
        "batching",
        "clients",
        "req/s",
        "p50 ms",
        "p99 ms",
        "errors",
        "server CPU ms/req",
        "÷ in-process",
    ]
    top = concurrency[-1]
    gains = ", ".join(
        f"{m} {e} {cells[(m, e, True, top)].rps / cells[(m, e, False, top)].rps:.2f}×"
        for m, e in cases
    )
    base = ", ".join(f"{m} {e} {v:.0f} req/s" for (m, e), v in baseline.items())
    missing = "" if "fashion" in data or quick else " (fashion skipped: its data is not installed)"
    return (
        f"### Service load ({machine()}; generator: {generator}){missing}\n\n"
        f"{table(header, rows)}\n\n"
        f"In-process library, one request at a time: {base}. "
        f"Batching on ÷ off at {top} clients: {gains}.\n"
    )


def arrival_wait(quick: bool = False, generator: str = "raw") -> str:
    """Batching on, with the wait for requests still being read (``MCDROP_BATCH_MAX_WAIT_MS``,
    2 ms by default) against none: does the wait pay for itself? One-row digits requests,
    the two servers measured back to back in each cell."""
    seconds = 0.5 if quick else 5.0
    concurrency = (8,) if quick else (8, 32)
    rows = _rows()["digits"]
    cells: dict[tuple[str, int, str], Cell] = {}
    with Server(batching=True) as waits, Server(batching=True, MCDROP_BATCH_MAX_WAIT_MS="0") as no:
        for endpoint in ("predict", "uncertainty"):
            bodies = [json.dumps(_body(endpoint, row, i)).encode() for i, row in enumerate(rows)]
            path = f"/models/digits/{endpoint}"
            for clients in concurrency:
                for name, server in (("2 ms", waits), ("none", no)):
                    cells[(endpoint, clients, name)] = asyncio.run(
                        _load(server, generator, path, bodies, clients, seconds)
                    )
    header = ["endpoint", "clients", "wait", "req/s", "p50 ms", "p99 ms", "errors", "CPU ms/req"]
    lines = [
        [
            e,
            k,
            w,
            f"{c.rps:.0f}",
            f"{c.p50:.1f}",
            f"{c.p99:.1f}",
            f"{c.errors}/{c.requests}",
            f"{c.cpu_ms:.2f}",
        ]
        for (e, k, w), c in cells.items()
    ]
    ratios = ", ".join(
        f"{e} at {k} clients {cells[(e, k, '2 ms')].rps / cells[(e, k, 'none')].rps:.2f}×"
        for e in ("predict", "uncertainty")
        for k in concurrency
    )
    return (
        f"### The arrival wait ({machine()}; generator: {generator})\n\n"
        f"{table(header, lines)}\n\nThroughput with the wait ÷ without: {ratios}.\n"
    )


#: How a request is encoded: the native JSON, and the Open Inference Protocol's JSON and binary
#: tensor data.
PROTOCOLS = ("native", "v2 json", "v2 binary")


def _v2_bodies(endpoint: str, rows: list[Any], binary: bool) -> tuple[list[bytes], dict[str, str]]:
    """``/v2/models/{m}/infer`` bodies of one row each, and the headers they share (binary JSON
    headers are padded to one length, so that one Inference-Header-Content-Length fits all)."""
    heads, blobs = [], []
    for i, row in enumerate(rows):
        x = np.asarray(row, dtype=np.float32)[None]
        parameters: dict[str, Any] = (
            {"mode": "predict"} if endpoint == "predict" else {"n_samples": N_SAMPLES, "seed": i}
        )
        tensor: dict[str, Any] = {"name": "inputs", "shape": list(x.shape), "datatype": "FP32"}
        if binary:
            tensor["parameters"] = {"binary_data_size": x.nbytes}
            blobs.append(x.tobytes())
        else:
            tensor["data"] = x.ravel().tolist()
            blobs.append(b"")
        heads.append(json.dumps({"inputs": [tensor], "parameters": parameters}).encode())
    if not binary:
        return heads, JSON_HEADERS
    width = max(len(h) for h in heads)
    headers = {
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": str(width),
    }
    return [h.ljust(width) + b for h, b in zip(heads, blobs, strict=True)], headers


def protocols(quick: bool = False, generator: str = "raw") -> str:
    """One-row requests to the native endpoints and to the Open Inference Protocol's ``infer``
    (JSON and binary inputs), one client, on one server: each round measures the three back to
    back, and the ratios are the median over rounds of each round's v2 ÷ native."""
    seconds, rounds = (0.5, 1) if quick else (2.0, 5)
    data = _rows()
    if quick:
        data = {"digits": data["digits"]}
    cases = [(m, e) for m in data for e in ("predict", "uncertainty")]
    requests: dict[tuple[str, str, str], tuple[str, list[bytes], dict[str, str]]] = {}
    for model, endpoint in cases:
        native = [json.dumps(_body(endpoint, row, i)).encode() for i, row in enumerate(data[model])]
        requests[(model, endpoint, "native")] = (
            f"/models/{model}/{endpoint}",
            native,
            JSON_HEADERS,
        )
        for protocol, binary in (("v2 json", False), ("v2 binary", True)):
            bodies, headers = _v2_bodies(endpoint, data[model], binary)
            requests[(model, endpoint, protocol)] = (f"/v2/models/{model}/infer", bodies, headers)
    cells: dict[tuple[str, str, str], list[Cell]] = {key: [] for key in requests}
    with Server(batching=True) as server:
        for model, endpoint in cases:
            for _ in range(rounds):
                for protocol in PROTOCOLS:
                    path, bodies, headers = requests[(model, endpoint, protocol)]
                    cells[(model, endpoint, protocol)].append(
                        asyncio.run(_load(server, generator, path, bodies, 1, seconds, headers))
                    )

    def ratio(model: str, endpoint: str, protocol: str, of: Callable[[Cell], float]) -> float:
        pairs = zip(
            cells[(model, endpoint, protocol)], cells[(model, endpoint, "native")], strict=True
        )
        return statistics.median(of(c) / of(n) for c, n in pairs)

    rows, worst = [], 0.0
    for (model, endpoint, protocol), measured in cells.items():
        cpu = ratio(model, endpoint, protocol, lambda c: c.cpu_ms)
        if protocol != "native":
            worst = max(worst, cpu)
        rows.append(
            [
                model,
                endpoint,
                protocol,
                f"{statistics.mean(c.rps for c in measured):.0f}",
                f"{statistics.median(c.p50 for c in measured):.2f}",
                f"{sum(c.errors for c in measured)}/{sum(c.requests for c in measured)}",
                f"{statistics.median(c.cpu_ms for c in measured):.3f}",
                f"{cpu:.2f}",
                f"{ratio(model, endpoint, protocol, lambda c: c.p50):.2f}",
            ]
        )
    header = [
        "model",
        "endpoint",
        "protocol",
        "req/s",
        "p50 ms",
        "errors",
        "server CPU ms/req",
        "CPU ÷ native",
        "p50 ÷ native",
    ]
    verdict = "met" if worst <= 1.2 else "not met"
    return (
        f"### Open Inference Protocol vs native ({machine()}; generator: {generator}; "
        f"{rounds} round(s) of {seconds:g} s per cell)\n\n{table(header, rows)}\n\n"
        f"Largest v2 ÷ native server CPU per request: {worst:.2f}× (target ≤ 1.2×: {verdict}).\n"
    )


def bare_app(responses: dict[str, Any], predictor: Predictor | None = None) -> Any:
    """The framework's floor: a FastAPI app whose one route, ``POST /bare/{case}``, parses the
    JSON body as any FastAPI route with a ``dict`` body does and answers ``responses[case]`` (a
    JSON body the size of the service's answer), with nothing else: no model, middleware,
    dependencies or response model (``GET /ready`` answers ``{}``).

    With a ``predictor``, ``POST /bare-model/{case}`` is that route running the case's model
    work on the body's row as well (``predict``, or ``uncertainty`` with :data:`N_SAMPLES`
    samples: what :func:`_model_cpu_ms` times alone): the floor of any route that runs the model
    in the request, which pays for the model and the framework sharing one core's caches."""
    from fastapi import Body, FastAPI
    from fastapi.responses import JSONResponse

    app = FastAPI()

    @app.post("/bare/{case}")
    async def bare(case: str, body: dict[str, Any] = Body(...)) -> JSONResponse:  # noqa: B008
        return JSONResponse(responses[case])

    if predictor is not None:

        @app.post("/bare-model/{case}")
        async def bare_model(
            case: str,
            body: dict[str, Any] = Body(...),  # noqa: B008
        ) -> JSONResponse:
            inputs = body["inputs"]
            row = inputs[0]["data"] if isinstance(inputs[0], dict) else inputs[0]  # v2 or native
            x = torch.from_numpy(np.array([row], dtype=np.float32))
            if case.endswith("uncertainty"):
                predictor.uncertainty(x, N_SAMPLES, seed=0)
            else:
                predictor.predict(x)
            return JSONResponse(responses[case])

    @app.get("/ready")  # for Server's wait (after the measured route: routes match in order)
    async def ready() -> dict[str, str]:
        return {}

    return app


def serve_bare(responses_file: str, port: int) -> None:
    """Serve :func:`bare_app` on ``port`` with ``mcdrop serve``'s uvicorn settings (the same
    protocol class, event loop, logging and timeouts; settings from ``MCDROP_*``)."""
    import uvicorn

    from service import server
    from service.config import Settings

    settings = Settings(port=port)
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    predictor = Predictor(checkpoint.load(ROOT / "models" / "digits"))
    predictor.warm_up(torch.zeros(1, *predictor.spec.input_shape))
    config = server.config(settings)
    config.app = bare_app(json.loads(Path(responses_file).read_text()), predictor)
    uvicorn.Server(config).run()


#: One-row digits requests whose overhead :func:`overhead` measures: (case, endpoint, protocol).
OVERHEAD_CASES = (
    ("native predict", "predict", "native"),
    ("native uncertainty", "uncertainty", "native"),
    ("v2 predict", "predict", "v2 json"),
    ("v2 uncertainty", "uncertainty", "v2 json"),
)


def _model_cpu_ms(model: str, endpoint: str, rows: list[Any], count: int) -> float:
    """CPU milliseconds of the model's own work per one-row request, in process (the predictor's
    ``predict`` or ``uncertainty`` on a ready tensor, one torch thread as the server)."""
    predictor = _predictors.get(model)
    if predictor is None:
        predictor = _predictors[model] = Predictor(checkpoint.load(ROOT / "models" / model))
    xs = [torch.tensor([row], dtype=torch.float32) for row in rows]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        started = time.process_time()
        for i in range(count):
            if endpoint == "predict":
                predictor.predict(xs[i % len(xs)])
            else:
                predictor.uncertainty(xs[i % len(xs)], N_SAMPLES, seed=i)
        return (time.process_time() - started) / count * 1e3
    finally:
        torch.set_num_threads(threads)


_predictors: dict[str, Predictor] = {}


def _overhead_requests() -> dict[str, tuple[str, list[bytes], dict[str, str]]]:
    """Each :data:`OVERHEAD_CASES` case's path, one-row digits bodies and headers."""
    rows = _rows()["digits"]
    requests: dict[str, tuple[str, list[bytes], dict[str, str]]] = {}
    for case, endpoint, protocol in OVERHEAD_CASES:
        if protocol == "native":
            bodies = [json.dumps(_body(endpoint, row, i)).encode() for i, row in enumerate(rows)]
            requests[case] = (f"/models/digits/{endpoint}", bodies, JSON_HEADERS)
        else:
            bodies, headers = _v2_bodies(endpoint, rows, binary=False)
            requests[case] = ("/v2/models/digits/infer", bodies, headers)
    return requests


def overhead(quick: bool = False, generator: str = "raw") -> str:
    """Server CPU per one-row digits request against the framework's floor, measured in the same
    run: each round measures, back to back for each case, the service (batching on, as
    deployed), the bare route of :func:`bare_app` on the same uvicorn settings with the same
    bodies, and the model's own CPU time in process; the ratio is the median over rounds of
    service ÷ (bare + model). Target (issue 14): at most 1.5. Beside it, the same bare route
    running the model in the request (``/bare-model``, see :func:`bare_app`), and the service
    ÷ that: what the service costs beyond any route that runs this model (the model and the
    framework share a core's caches, which neither pays when measured alone)."""
    seconds, rounds, calls = (0.5, 1, 50) if quick else (2.0, 5, 400)
    rows = _rows()["digits"]
    requests = _overhead_requests()
    service: dict[str, list[Cell]] = {case: [] for case in requests}
    bare: dict[str, list[Cell]] = {case: [] for case in requests}
    bare_model: dict[str, list[Cell]] = {case: [] for case in requests}
    model: dict[str, list[float]] = {case: [] for case in requests}
    with Server(batching=True) as server:
        # The bare route answers each case with a body of the size of the service's answer.
        responses = {
            case.replace(" ", "-"): httpx2.post(
                server.url + path, content=bodies[0], headers=headers
            ).json()
            for case, (path, bodies, headers) in requests.items()
        }
        with contextlib.ExitStack() as stack:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            (folder / "responses.json").write_text(json.dumps(responses))
            command = (
                "-m",
                "benchmarks.service_load",
                "--serve-bare",
                str(folder / "responses.json"),
            )
            floor = stack.enter_context(Server(batching=True, command=command))
            for _ in range(rounds):
                for case, endpoint, _protocol in OVERHEAD_CASES:
                    path, bodies, headers = requests[case]
                    service[case].append(
                        asyncio.run(_load(server, generator, path, bodies, 1, seconds, headers))
                    )
                    name = case.replace(" ", "-")
                    for cells, route in ((bare, "/bare/"), (bare_model, "/bare-model/")):
                        cells[case].append(
                            asyncio.run(
                                _load(floor, generator, route + name, bodies, 1, seconds, headers)
                            )
                        )
                    model[case].append(_model_cpu_ms("digits", endpoint, rows, calls))
    lines, worst = [], 0.0
    for case, *_ in OVERHEAD_CASES:
        ratios = [
            s.cpu_ms / (b.cpu_ms + m)
            for s, b, m in zip(service[case], bare[case], model[case], strict=True)
        ]
        ratio = statistics.median(ratios)
        worst = max(worst, ratio)
        in_route = statistics.median(
            s.cpu_ms / b.cpu_ms for s, b in zip(service[case], bare_model[case], strict=True)
        )
        cells = service[case] + bare[case] + bare_model[case]
        lines.append(
            [
                case,
                f"{statistics.median(c.cpu_ms for c in service[case]):.3f}",
                f"{statistics.median(c.cpu_ms for c in bare[case]):.3f}",
                f"{statistics.median(model[case]):.3f}",
                f"{ratio:.2f}",
                "met" if ratio <= 1.5 else "not met",
                f"{statistics.median(c.cpu_ms for c in bare_model[case]):.3f}",
                f"{in_route:.2f}",
                f"{statistics.mean(c.rps for c in service[case]):.0f}",
                f"{statistics.mean(c.rps for c in bare[case]):.0f}",
                f"{sum(c.errors for c in cells)}/{sum(c.requests for c in cells)}",
            ]
        )
    header = [
        "request",
        "server CPU ms/req",
        "bare route CPU ms/req",
        "model CPU ms (in process)",
        "server ÷ (bare + model)",
        "target ≤ 1.5",
        "bare route running the model CPU ms/req",
        "server ÷ that",
        "req/s",
        "bare req/s",
        "errors",
    ]
    return (
        f"### HTTP overhead against a bare FastAPI route ({machine()}; generator: {generator}; "
        f"{rounds} round(s) of {seconds:g} s per cell; one client)\n\n{table(header, lines)}\n\n"
        f"Largest server ÷ (bare route + model): {worst:.2f}× "
        f"(target ≤ 1.5×: {'met' if worst <= 1.5 else 'not met'}).\n"
    )


def against(root: str, rounds: int = 12, seconds: float = 1.0) -> str:
    """Server CPU per one-row digits request (the :func:`overhead` cases) of this tree's service
    against the one in ``root`` (a checkout of another commit, e.g. ``git worktree add``): both
    servers run at once and each round measures the two back to back, in turn first; the ratio
    is the median over rounds of this ÷ that, so the machine's drift falls out."""

    def serve_from(folder: str) -> Server:
        code = (
            f"import runpy, sys; sys.path.insert(0, {folder!r}); "
            "sys.argv = ['mcdrop', 'serve', *sys.argv[1:]]; "
            "runpy.run_module('service.cli', run_name='__main__')"
        )
        return Server(batching=True, command=("-c", code))

    requests = _overhead_requests()
    cpu: dict[tuple[str, str], list[float]] = {
        (c, w): [] for c in requests for w in ("this", "that")
    }
    errors = 0
    with serve_from(str(Path(root).resolve())) as that, serve_from(str(ROOT)) as this:
        for i in range(rounds):
            for case, (path, bodies, headers) in requests.items():
                servers = [("this", this), ("that", that)]
                for who, server in servers if i % 2 == 0 else servers[::-1]:
                    cell = asyncio.run(_load(server, "raw", path, bodies, 1, seconds, headers))
                    cpu[(case, who)].append(cell.cpu_ms)
                    errors += cell.errors
    lines = []
    for case in requests:
        mine, theirs = cpu[(case, "this")], cpu[(case, "that")]
        ratio = statistics.median(a / b for a, b in zip(mine, theirs, strict=True))
        lines.append(
            [
                case,
                f"{statistics.median(theirs):.3f}",
                f"{statistics.median(mine):.3f}",
                f"{ratio:.2f}",
            ]
        )
    header = ["request", f"{root}: server CPU ms/req", "this tree", "this ÷ that"]
    return (
        f"### Server CPU per one-row request against {root} ({machine()}; {rounds} rounds of "
        f"{seconds:g} s per cell, alternating; {errors} errors)\n\n{table(header, lines)}\n"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for the test suite")
    parser.add_argument("--generator", choices=GENERATORS, default="raw")
    parser.add_argument(
        "--only",
        choices=("load", "protocols", "arrival", "overhead", "workers"),
        help="only the load table, the v2 vs native comparison, the arrival wait's, the "
        "overhead against a bare route, or 1 vs 2 workers",
    )
    parser.add_argument(
        "--against",
        metavar="DIR",
        help="only the server CPU per one-row request against the service in DIR (a checkout "
        "of another commit), both servers running, cells alternating",
    )
    # Internal: the bare route's server process (see overhead()).
    parser.add_argument("--serve-bare", metavar="RESPONSES", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_bare:
        serve_bare(args.serve_bare, args.port)
        return 0
    if args.against:
        print(against(args.against), flush=True)
        return 0
    if args.only in (None, "load"):
        print(run(args.quick, args.generator), flush=True)
    if args.only in (None, "protocols"):
        print(protocols(args.quick, args.generator), flush=True)
    if args.only in (None, "arrival"):
        print(arrival_wait(args.quick, args.generator), flush=True)
    if args.only in (None, "overhead"):
        print(overhead(args.quick, args.generator), flush=True)
    if args.only in (None, "workers"):
        print(workers(args.quick, args.generator), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
