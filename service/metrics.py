"""Prometheus metrics, named after Triton's where one exists (``nv_inference_*``).

Per model (label ``model``):

    nv_inference_request_success_total        requests answered 2xx
    nv_inference_request_failure_total        requests answered otherwise (label ``reason``: status)
    nv_inference_count_total                  rows inferred (Triton: inferences)
    nv_inference_exec_count_total             model executions (merged batches): rows ÷ this is
                                              the mean batch size
    nv_inference_pending_request_count        requests queued, waiting for the model
    mcdrop_inference_in_flight_requests       requests being read, queued or computed
    nv_inference_request_duration_seconds     histogram: a request's whole time in the server
    nv_inference_queue_duration_seconds       histogram: time a request's rows waited to run
    nv_inference_compute_infer_duration_seconds  histogram: time of one model execution
    mcdrop_row_samples                        histogram: rows × n_samples of uncertainty requests
                                              ("auto": the samples its rows used)

plus the process metrics of ``prometheus_client`` (CPU seconds, resident memory, open files,
...). Every app has its own registry, so apps in one process (tests) never mix their counts.

Under ``mcdrop serve --workers N`` each worker process records into files of its own in
``PROMETHEUS_MULTIPROC_DIR`` (``prometheus_client``'s multiprocess mode, set up by
:func:`service.server.run` before the workers start), and ``/metrics``, whichever worker answers
it, sums every worker's: the counts and histograms of the whole server, the gauges summed over
the live workers. The process metrics are then left out (they would be one worker's).
"""

from __future__ import annotations

import os
import time
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.process_collector import ProcessCollector

from service.arrivals import InferenceRoutes

#: Seconds: from a one-row pass on the event loop (~0.1 ms) to a request at its deadline (60 s).
SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
ROW_SAMPLES = (1, 10, 100, 1_000, 10_000, 100_000, 1_000_000)

#: The folder the worker processes of ``mcdrop serve --workers N`` share their values in (None:
#: one process), read when prometheus_client was, as it reads it.
SHARED_DIR = os.environ.get("PROMETHEUS_MULTIPROC_DIR")

Scope = dict[str, Any]


class Metrics:
    """The service's metrics in their own registry; :meth:`model` gives one model's children."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        # Whether the values are in files shared by the workers: prometheus_client chose that
        # when it was imported, from the environment (see the module docstring).
        self.shared = SHARED_DIR
        if self.shared is None:
            ProcessCollector(registry=self.registry)
        r = self.registry
        self.success = Counter(
            "nv_inference_request_success", "Requests answered 2xx", ["model"], registry=r
        )
        self.failure = Counter(
            "nv_inference_request_failure",
            "Requests answered with an error (reason: HTTP status)",
            ["model", "reason"],
            registry=r,
        )
        self.rows = Counter("nv_inference_count", "Rows inferred", ["model"], registry=r)
        self.executions = Counter(
            "nv_inference_exec_count", "Model executions (merged batches)", ["model"], registry=r
        )
        self.pending = Gauge(
            "nv_inference_pending_request_count",
            "Requests queued, waiting for the model",
            ["model"],
            multiprocess_mode="livesum",
            registry=r,
        )
        self.in_flight = Gauge(
            "mcdrop_inference_in_flight_requests",
            "Requests being read, queued or computed",
            ["model"],
            multiprocess_mode="livesum",
            registry=r,
        )
        self.request_seconds = Histogram(
            "nv_inference_request_duration_seconds",
            "A request's time in the server",
            ["model"],
            buckets=SECONDS,
            registry=r,
        )
        self.queue_seconds = Histogram(
            "nv_inference_queue_duration_seconds",
            "Time a request waited before its model execution started",
            ["model"],
            buckets=SECONDS,
            registry=r,
        )
        self.compute_seconds = Histogram(
            "nv_inference_compute_infer_duration_seconds",
            "Time of one model execution",
            ["model"],
            buckets=SECONDS,
            registry=r,
        )
        self.row_samples = Histogram(
            "mcdrop_row_samples",
            "rows × n_samples of uncertainty requests",
            ["model"],
            buckets=ROW_SAMPLES,
            registry=r,
        )

    def model(self, name: str) -> ModelMetrics:
        # The series the request middleware records, made here too: every series of a model is
        # there, at 0, from its load (one first made at a request would hide that request from
        # Prometheus' rate() and increase()).
        for metric in (self.success, self.in_flight, self.request_seconds):
            metric.labels(name)
        return ModelMetrics(
            pending=self.pending.labels(name),
            rows=self.rows.labels(name),
            executions=self.executions.labels(name),
            queue_seconds=self.queue_seconds.labels(name),
            compute_seconds=self.compute_seconds.labels(name),
            row_samples=self.row_samples.labels(name),
        )

    def close(self) -> None:
        """A worker stopping: its gauges leave the sums (its counts stay in them)."""
        if self.shared is not None:
            mark_process_dead(os.getpid(), self.shared)

    def scrape(self) -> tuple[bytes, str]:
        """The text exposition and its content type: of every worker's values where the workers
        share them."""
        if self.shared is None:
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        # A worker killed (SIGKILL, the supervisor's kill of a hung one) never ran close(): its
        # gauges would stay in the sums for good (a request it was computing, in flight forever)
        for path in Path(self.shared).glob("gauge_live*_*.db"):
            pid = path.stem.rpartition("_")[2]
            if pid.isdigit() and not _running(int(pid)):
                with suppress(FileNotFoundError):  # (another worker's scrape removed it first)
                    mark_process_dead(int(pid), self.shared)
        every = CollectorRegistry()
        MultiProcessCollector(every, path=self.shared)
        return generate_latest(every), CONTENT_TYPE_LATEST


def _running(pid: int) -> bool:
    """Whether process ``pid`` is running: not gone, nor a zombie its parent has yet to reap."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # (another user's)
        return True
    try:
        return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:  # (no /proc here)
        return True


@dataclass(frozen=True)
class ModelMetrics:
    """One model's children of the metrics the batcher and the routes record."""

    pending: Any
    rows: Any
    executions: Any
    queue_seconds: Any
    compute_seconds: Any
    row_samples: Any

    def executed(self, rows: int, seconds: float) -> None:
        self.rows.inc(rows)
        self.executions.inc()
        self.compute_seconds.observe(seconds)


class RecordRequests:
    """ASGI middleware: per model, each inference request's outcome, duration and presence.

    The model comes from the matched inference route, as for :mod:`service.arrivals`; names the
    registry does not know are counted as ``_unknown``, so no request can add label values.
    """

    UNKNOWN = "_unknown"

    def __init__(self, app: Any, metrics: Metrics, routes: InferenceRoutes) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes
        # Per model, the children every request records (``labels()`` takes a lock and builds
        # a key each call); as many as the registry's models and ``_unknown``.
        self.children: dict[str, tuple[Any, Any, Any]] = {}

    def _children(self, model: str) -> tuple[Any, Any, Any]:
        children = self.children.get(model)
        if children is None:
            m = self.metrics
            children = self.children[model] = (
                m.in_flight.labels(model),
                m.request_seconds.labels(model),
                m.success.labels(model),
            )
        return children

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        model = self.routes.model(scope)
        if model is None:
            await self.app(scope, receive, send)
            return
        registry = getattr(scope["app"].state, "registry", None)
        if registry is None or model not in registry.entries:
            model = self.UNKNOWN
        status = 500  # unless a response starts
        in_flight, seconds, success = self._children(model)

        async def record_status(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        started = time.perf_counter()
        in_flight.inc()
        try:
            await self.app(scope, receive, record_status)
        finally:
            in_flight.dec()
            seconds.observe(time.perf_counter() - started)
            if 200 <= status < 300:
                success.inc()
            else:
                self.metrics.failure.labels(model, str(status)).inc()
