"""Dispatching model work from the event loop, with dynamic batching.

Each model has a :class:`Batcher`. Route handlers (``async``) submit a :class:`Job` and await its
result; the batcher decides where and with whom it runs:

- **Merging** (``batching`` on): jobs queue, and a flush on the next event-loop iteration takes
  everything queued (up to ``max_rows`` rows), so requests that arrive together share one
  forward pass. While a merged batch of the model computes in a worker thread, new jobs queue and
  go together as soon as it finishes. When other HTTP requests are in flight (being read and
  validated, not yet queued) a flush waits up to ``max_wait_ms`` for them, and goes as soon as
  they have all queued; a lone client pays no wait.
- **Inline or threaded.** Work whose estimated cost (from timings taken at warm-up, see
  :class:`CostModel`) is below ``inline_ms`` runs on the event loop itself: for a one-row request
  a thread handoff costs more than the model. Anything larger runs in a bounded pool of worker
  threads (``max_concurrency``), so the loop keeps serving (``/health`` included) meanwhile.

Merging cannot change an answer: MC masks are keyed by each row's contents and its own request's
seed (passed per row), so a seeded request gets the same result batched or alone.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from mcdrop.predictor import Predictor

#: ``None`` for a deterministic prediction, else ``(n_samples, level, return_samples)``.
Options = tuple[int, float, bool] | None


@dataclass
class Job:
    """One request's work: ``x (n, *input_shape)`` and its options and seed."""

    x: Tensor
    options: Options
    seed: int = 0
    future: asyncio.Future[Any] | None = field(default=None, repr=False)

    @property
    def rows(self) -> int:
        return self.x.shape[0]


@dataclass
class CostModel:
    """Seconds a model takes: ``fixed + per_row · rows`` for a prediction and ``fixed +
    per_sample_row · rows · n_samples`` for MC sampling (the replicated rows)."""

    fixed: float = 0.0
    per_row: float = 0.0
    per_sample_row: float = 0.0

    @classmethod
    def measure(cls, predictor: Predictor, x: Tensor, repeats: int = 5) -> CostModel:
        """Time one and 32 rows through ``predict`` and 16 samples of them through
        ``uncertainty`` (best of ``repeats``: the least-disturbed run)."""

        def best(fn: Callable[[], object]) -> float:
            times = []
            for _ in range(repeats):
                started = time.perf_counter()
                fn()
                times.append(time.perf_counter() - started)
            return min(times)

        one, many = x[:1], x[:1].expand(32, *x.shape[1:]).contiguous()
        t_one = best(lambda: predictor.predict(one))
        t_many = best(lambda: predictor.predict(many))
        t_mc = best(lambda: predictor.uncertainty(many, 16, seed=0))
        per_row = max(0.0, (t_many - t_one) / 31)
        return cls(fixed=t_one, per_row=per_row, per_sample_row=max(0.0, t_mc - t_one) / 512)

    def seconds(self, rows: int, options: Options) -> float:
        if options is None:
            return self.fixed + self.per_row * rows
        return self.fixed + self.per_sample_row * rows * options[0]


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
    """Runs the jobs of one model (see the module docstring).

    Args:
        predictor: the model.
        executor: worker threads for work above ``inline_ms`` (shared by all models: it bounds
            concurrent model computations).
        cost: the model's timings.
        batching: merge concurrent jobs.
        max_rows: most rows merged into one batch.
        max_wait_ms: how long a flush under load waits for company.
        inline_ms: work estimated below this runs on the event loop (0: never).
        in_flight: how many HTTP requests the service is handling now (all models), the signal
            that company is on its way.
    """

    def __init__(
        self,
        predictor: Predictor,
        *,
        executor: Executor,
        cost: CostModel,
        batching: bool = True,
        max_rows: int = 256,
        max_wait_ms: float = 2.0,
        inline_ms: float = 2.0,
        in_flight: Callable[[], int] = lambda: 0,
    ) -> None:
        self.predictor = predictor
        self.executor = executor
        self.cost = cost
        self.batching = batching
        self.max_rows = max_rows
        self.max_wait = max_wait_ms / 1000.0
        self.inline = inline_ms / 1000.0
        self.in_flight = in_flight
        self.pending: list[Job] = []
        self.scheduled = False  # a flush is due
        self.timer: asyncio.TimerHandle | None = None  # a delayed flush waiting for company
        self.running = 0  # jobs in the merged batch computing in a worker thread
        self.batches = 0  # computations run (merged or not), for tests and metrics
        self.inline_batches = 0

    async def submit(self, job: Job) -> Any:
        """Run ``job`` (merged with concurrent ones when batching) and return its result."""
        loop = asyncio.get_running_loop()
        if not self.batching:
            return await self._run_alone(loop, job)
        job.future = loop.create_future()
        self.pending.append(job)
        self._schedule(loop)
        return await job.future

    async def _run_alone(self, loop: asyncio.AbstractEventLoop, job: Job) -> Any:
        self.batches += 1
        if self._fits_inline(job.rows, job.options):
            self.inline_batches += 1
            return self._compute(job.options, [job])[0]
        results = await loop.run_in_executor(self.executor, self._compute, job.options, [job])
        return results[0]

    def _fits_inline(self, rows: int, options: Options) -> bool:
        return self.inline > 0 and self.cost.seconds(rows, options) <= self.inline

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.running or not self.pending:
            return  # the end of the running batch will take the queue
        rows = sum(job.rows for job in self.pending)
        # Requests in flight beyond those queued or computing here are still being read and
        # validated: worth a short wait, since they may be for this model.
        coming = self.in_flight() - len(self.pending) - self.running
        wait = coming > 0 and rows < self.max_rows and self.max_wait > 0
        if self.timer is not None:
            if wait:
                return  # keep waiting, up to the deadline already set
            self.timer.cancel()  # everyone has arrived, or the batch is full: go now
            self.timer = None
        elif self.scheduled:
            return
        self.scheduled = True
        if wait:
            self.timer = loop.call_later(self.max_wait, self._flush, loop)
        else:
            loop.call_soon(self._flush, loop)

    def _take(self) -> list[Job]:
        """The queued jobs that fit in one batch (always at least one)."""
        taken, rows = [], 0
        while self.pending and (not taken or rows + self.pending[0].rows <= self.max_rows):
            job = self.pending.pop(0)
            if job.future is not None and job.future.cancelled():
                continue  # its client went away
            taken.append(job)
            rows += job.rows
        return taken

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        self.scheduled = False
        self.timer = None
        jobs = self._take()
        groups: dict[Options, list[Job]] = {}
        for job in jobs:
            groups.setdefault(job.options, []).append(job)
        threaded = []
        for options, group in groups.items():
            self.batches += 1
            rows = sum(job.rows for job in group)
            if self._fits_inline(rows, options):
                self.inline_batches += 1
                self._deliver(group, self._outcome(options, group))
            else:
                threaded.append((options, group))
        if threaded:
            self.running = sum(len(group) for _, group in threaded)
            work = loop.run_in_executor(self.executor, self._compute_groups, threaded)
            work.add_done_callback(lambda done: self._finish(loop, threaded, done))
        else:
            self._schedule(loop)

    def _compute_groups(self, groups: list[tuple[Options, list[Job]]]) -> list[Any]:
        return [self._outcome(options, jobs) for options, jobs in groups]

    def _finish(
        self,
        loop: asyncio.AbstractEventLoop,
        groups: list[tuple[Options, list[Job]]],
        done: asyncio.Future[list[Any]],
    ) -> None:
        self.running = 0
        outcomes = done.result() if done.exception() is None else [done.exception()] * len(groups)
        for (_, jobs), outcome in zip(groups, outcomes, strict=True):
            self._deliver(jobs, outcome)
        self._schedule(loop)

    def _outcome(self, options: Options, jobs: list[Job]) -> list[Any] | BaseException:
        try:
            return self._compute(options, jobs)
        except Exception as exc:  # every merged request gets the error
            return exc

    @staticmethod
    def _deliver(jobs: list[Job], outcome: list[Any] | BaseException) -> None:
        for i, job in enumerate(jobs):
            if job.future is None or job.future.done():
                continue
            if isinstance(outcome, BaseException):
                job.future.set_exception(outcome)
            else:
                job.future.set_result(outcome[i])

    def _compute(self, options: Options, jobs: list[Job]) -> list[Any]:
        """The per-job results of one forward computation over the jobs' rows."""
        sizes = [job.rows for job in jobs]
        x = torch.cat([job.x for job in jobs]) if len(jobs) > 1 else jobs[0].x
        if options is None:
            return _split(self.predictor.predict(x), sizes)
        n_samples, level, return_samples = options
        seeds = torch.cat([torch.full((job.rows,), job.seed, dtype=torch.int64) for job in jobs])
        summary, samples = self.predictor.uncertainty(
            x, n_samples, seed=seeds, level=level, return_samples=return_samples
        )
        parts = _split(summary, sizes)
        chunks = [None] * len(jobs) if samples is None else samples.split(sizes, 1)
        return list(zip(parts, chunks, strict=True))
