"""Dynamic batching: concurrent requests for one model share forward passes.

Each model gets a worker thread. A request puts its rows on the model's queue and waits; the
worker takes the first waiting request, gathers more for up to ``max_wait_ms`` (or until
``max_rows`` rows), merges requests that ask for the same computation, runs them as one batch,
and hands every request its own rows back.

Merging cannot change an answer: MC masks are keyed by each row's contents and its own request's
seed (passed per row), so a seeded request gets the same result batched or alone.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from mcdrop.predictor import Predictor


@dataclass
class Job:
    """One request's work: ``x (n, *input_shape)``; ``options`` None for a deterministic
    prediction, else ``(n_samples, level, return_samples)``."""

    x: Tensor
    options: tuple[int, float, bool] | None
    seed: int = 0
    future: Future[Any] = field(default_factory=Future)


def _split(result: Any, sizes: list[int]) -> list[Any]:
    """Cut a batched result (dataclass of ``(N, ...)`` tensors) into per-request results."""
    parts: list[dict[str, Any]] = [{} for _ in sizes]
    for name, value in vars(result).items():
        if isinstance(value, Tensor) and value.dim() > 0:
            for part, chunk in zip(parts, value.split(sizes), strict=True):
                part[name] = chunk
        else:
            for part in parts:
                part[name] = value
    return [type(result)(**part) for part in parts]


class Batcher:
    """Batches the jobs of one model.

    Args:
        predictor: the model.
        max_rows: most rows merged into one batch.
        max_wait_ms: how long the first job of a batch waits for company.
        slots: bounds concurrent model computations across models.
    """

    def __init__(
        self,
        predictor: Predictor,
        *,
        max_rows: int,
        max_wait_ms: float,
        slots: threading.BoundedSemaphore,
    ) -> None:
        self.predictor = predictor
        self.max_rows = max_rows
        self.max_wait = max_wait_ms / 1000.0
        self.slots = slots
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.batches = 0  # merged computations run, for tests and metrics
        self.thread = threading.Thread(
            target=self._run, name=f"batcher-{predictor.spec.name}", daemon=True
        )
        self.thread.start()

    def submit(self, job: Job) -> Any:
        """Queue ``job`` and wait for its result (raises what the computation raised)."""
        self.jobs.put(job)
        return job.future.result()

    def close(self) -> None:
        self.jobs.put(None)

    def _gather(self, first: Job) -> list[Job]:
        batch, rows = [first], first.x.shape[0]
        deadline = time.monotonic() + self.max_wait
        while rows < self.max_rows:
            timeout = deadline - time.monotonic()
            if timeout <= 0:
                break
            try:
                job = self.jobs.get(timeout=timeout)
            except queue.Empty:
                break
            if job is None:
                self.jobs.put(None)  # keep the stop signal for the run loop
                break
            batch.append(job)
            rows += job.x.shape[0]
        return batch

    def _run(self) -> None:
        while True:
            first = self.jobs.get()
            if first is None:
                return
            groups: dict[Any, list[Job]] = {}
            for job in self._gather(first):
                groups.setdefault(job.options, []).append(job)
            for options, jobs in groups.items():
                self._execute(options, jobs)

    def _execute(self, options: tuple[int, float, bool] | None, jobs: list[Job]) -> None:
        self.batches += 1
        sizes = [job.x.shape[0] for job in jobs]
        try:
            x = torch.cat([job.x for job in jobs]) if len(jobs) > 1 else jobs[0].x
            with self.slots:
                if options is None:
                    results = _split(self.predictor.predict(x), sizes)
                else:
                    n_samples, level, return_samples = options
                    seeds = torch.cat(
                        [
                            torch.full((n,), job.seed, dtype=torch.int64)
                            for job, n in zip(jobs, sizes, strict=True)
                        ]
                    )
                    summary, samples = self.predictor.uncertainty(
                        x, n_samples, seed=seeds, level=level, return_samples=return_samples
                    )
                    parts = _split(summary, sizes)
                    chunks = [None] * len(jobs) if samples is None else samples.split(sizes, 1)
                    results = list(zip(parts, chunks, strict=True))
        except Exception as exc:  # every waiting request gets the error, the worker lives on
            for job in jobs:
                job.future.set_exception(exc)
            return
        for job, result in zip(jobs, results, strict=True):
            job.future.set_result(result)
