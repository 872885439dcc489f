"""Dynamic batching: concurrent requests for one model share forward passes.

Leader/follower: the first request to arrive while no batch is collecting becomes the leader.
If another batch of the model is already computing (the service is under concurrent load), the
leader waits up to ``max_wait_ms`` (or until ``max_rows`` rows) for followers; otherwise it
starts at once, so a lone client pays no latency. It then runs the merged batch on its own
thread and hands every follower its rows. No extra thread means no GIL handoff to a worker.

Merging cannot change an answer: MC masks are keyed by each row's contents and its own request's
seed (passed per row), so a seeded request gets the same result batched or alone.
"""

from __future__ import annotations

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
        max_wait_ms: how long a leader under load waits for company.
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
        self.changed = threading.Condition()
        self.pending: list[Job] = []
        self.pending_rows = 0
        self.collecting = False  # a leader is gathering followers
        self.computing = 0  # batches running now
        self.batches = 0  # merged computations run, for tests and metrics

    def submit(self, job: Job) -> Any:
        """Run ``job`` (merged with concurrent ones) and return its result."""
        with self.changed:
            self.pending.append(job)
            self.pending_rows += job.x.shape[0]
            if self.collecting:
                self.changed.notify_all()
                leader = False
            else:
                self.collecting = leader = True
            if leader:
                if self.computing:
                    deadline = time.monotonic() + self.max_wait
                    while self.pending_rows < self.max_rows:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            break
                        self.changed.wait(left)
                batch, self.pending, self.pending_rows = self.pending, [], 0
                self.collecting = False
                self.computing += 1
        if leader:
            try:
                groups: dict[Any, list[Job]] = {}
                for queued in batch:
                    groups.setdefault(queued.options, []).append(queued)
                for options, jobs in groups.items():
                    self._execute(options, jobs)
            finally:
                with self.changed:
                    self.computing -= 1
        return job.future.result()

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
        except Exception as exc:  # every merged request gets the error
            for job in jobs:
                job.future.set_exception(exc)
            return
        for job, result in zip(jobs, results, strict=True):
            job.future.set_result(result)
