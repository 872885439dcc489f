"""Dispatching model work from the event loop, with dynamic batching.

Each model has a :class:`Batcher`. Route handlers (``async``) submit a :class:`Job` and await its
result; the batcher decides where and with whom it runs:

- **Merging** (``batching`` on): jobs queue, and a flush on the next event-loop iteration takes
  everything queued (up to ``max_rows`` rows), so requests that arrive together share one
  forward pass. A model runs at most ``max_parallel`` batches in worker threads at once; jobs
  that arrive while they compute queue and go together when one finishes. While requests for the
  same model are still being read and validated (:class:`Arrivals`), a flush waits up to
  ``max_wait_ms`` for them and goes as soon as they have queued or failed; a lone client pays no
  wait.
- **Inline or threaded.** Work whose estimated cost (from timings taken at warm-up, see
  :class:`CostModel`) fits in ``inline_ms`` per flush runs on the event loop itself: for a
  one-row request a thread handoff costs more than the model. Anything larger, or outside the
  sizes the warm-up measured, runs in a bounded pool of worker threads (``max_concurrency``), so
  the loop keeps serving (``/health`` included) meanwhile, and a small request never waits
  behind a large one of the same model.

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


class Arrivals:
    """How many requests per model are being read and validated, not yet queued: the batchers'
    sign that company is on its way. The app's middleware counts a request in when it starts
    and :meth:`settle` counts it out when it queues its job or ends without one; each change
    re-checks that model's batcher (all on the event loop)."""

    SCOPE_KEY = "mcdrop.arriving"

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.listeners: dict[str, Callable[[], None]] = {}

    def __call__(self, model: str) -> int:
        return self.counts.get(model, 0)

    def enter(self, scope: dict[str, Any], model: str) -> None:
        self.counts[model] = self(model) + 1
        scope[self.SCOPE_KEY] = model

    def settle(self, scope: dict[str, Any]) -> None:
        """Count the request of ``scope`` out (once; later calls do nothing)."""
        model = scope.pop(self.SCOPE_KEY, None)
        if model is None:
            return
        self.counts[model] -= 1
        listener = self.listeners.get(model)
        if listener is not None:
            listener()


@dataclass
class CostModel:
    """Seconds a model takes: ``fixed + per_row · rows`` for a prediction and ``fixed +
    per_sample_row · rows · n_samples`` for MC sampling (the replicated rows). Trusted only up to
    the sizes it was measured on (:meth:`measured`): timings on a busy machine are noisy."""

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

    #: The largest work :meth:`measure` times: 32 rows, and 32 rows × 16 samples.
    MEASURED_ROWS = 32
    MEASURED_SAMPLE_ROWS = 512

    def measured(self, rows: int, options: Options) -> bool:
        """Whether the work is within (twice) the sizes the timings came from."""
        if options is None:
            return rows <= 2 * self.MEASURED_ROWS
        return rows * options[0] <= 2 * self.MEASURED_SAMPLE_ROWS

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
        executor: worker threads for work that does not run inline (shared by all models: it
            bounds concurrent model computations).
        cost: the model's timings.
        batching: merge concurrent jobs.
        max_rows: most rows merged into one batch.
        max_wait_ms: longest wait for requests still arriving.
        inline_ms: estimated model work per flush that may run on the event loop (0: none).
        max_parallel: most batches of this model computing in worker threads at once.
        arriving: requests for this model being read and validated (see :class:`Arrivals`).
        max_batch_ms: estimated work past which a merged batch takes no more jobs (the rest
            wait for the next free worker).
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
        max_parallel: int = 1,
        arriving: Callable[[], int] = lambda: 0,
        max_batch_ms: float = 50.0,
    ) -> None:
        self.predictor = predictor
        self.executor = executor
        self.cost = cost
        self.batching = batching
        self.max_rows = max_rows
        self.max_wait = max_wait_ms / 1000.0
        self.inline = inline_ms / 1000.0
        self.max_parallel = max(1, max_parallel)
        self.max_batch = max_batch_ms / 1000.0
        self.arriving = arriving
        self.pending: list[Job] = []
        self.scheduled = False  # a flush is due
        self.timer: asyncio.TimerHandle | None = None  # a delayed flush waiting for company
        self.running = 0  # batches computing in worker threads
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

    def recheck(self) -> None:
        """Re-decide a waiting flush (a request for this model queued or went away)."""
        self._schedule(asyncio.get_running_loop())

    async def _run_alone(self, loop: asyncio.AbstractEventLoop, job: Job) -> Any:
        self.batches += 1
        if self._fits_inline(job.rows, job.options, self.inline):
            self.inline_batches += 1
            return self._compute(job.options, [job])[0]
        results = await loop.run_in_executor(self.executor, self._compute, job.options, [job])
        return results[0]

    def _fits_inline(self, rows: int, options: Options, budget: float) -> bool:
        return (
            self.inline > 0
            and self.cost.measured(rows, options)
            and self.cost.seconds(rows, options) <= budget
        )

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self.pending:
            return
        if self.running >= self.max_parallel and not any(
            self._fits_inline(job.rows, job.options, self.inline) for job in self.pending
        ):
            return  # nothing can run until a batch finishes, which re-schedules
        rows = sum(job.rows for job in self.pending)
        wait = self.arriving() > 0 and rows < self.max_rows and self.max_wait > 0
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

    def _take(self, inline_only: bool) -> list[Job]:
        """Queued jobs for one flush, in arrival order: up to ``max_rows`` rows (at least one job
        unless all were cancelled). With ``inline_only`` (no worker free for this model), only
        jobs that together fit the inline budget, so the flush can run all of them."""
        taken: list[Job] = []
        keep: list[Job] = []
        rows = 0
        group_rows: dict[Options, int] = {}
        spent: dict[Options, float] = {}
        for job in self.pending:
            if job.future is not None and job.future.cancelled():
                continue  # its client went away
            fits = not taken or rows + job.rows <= self.max_rows
            if fits and taken and not inline_only:
                # A batch estimated past max_batch leaves the rest for another worker: merging
                # saves little once per-row work dominates, and one huge batch would leave the
                # other workers idle (Fashion CNN, 100 samples: 25 ms per row).
                grown = group_rows.get(job.options, 0) + job.rows
                total = sum(
                    self.cost.seconds(group_rows[k] if k != job.options else grown, k)
                    for k in {*group_rows, job.options}
                )
                fits = total <= self.max_batch
            if fits and inline_only:
                grown = group_rows.get(job.options, 0) + job.rows
                cost = self.cost.seconds(grown, job.options)
                others = sum(v for k, v in spent.items() if k != job.options)
                fits = (
                    self.inline > 0
                    and self.cost.measured(grown, job.options)
                    and others + cost <= self.inline
                )
                if fits:
                    spent[job.options] = cost
            if fits:
                taken.append(job)
                rows += job.rows
                group_rows[job.options] = group_rows.get(job.options, 0) + job.rows
            else:
                keep.append(job)
        self.pending = keep
        return taken

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        self.scheduled = False
        self.timer = None
        can_thread = self.running < self.max_parallel
        groups: dict[Options, list[Job]] = {}
        for job in self._take(inline_only=not can_thread):
            groups.setdefault(job.options, []).append(job)
        budget = self.inline  # inline work per flush, over all its groups
        threaded: list[tuple[Options, list[Job]]] = []
        for options, group in groups.items():
            rows = sum(job.rows for job in group)
            if not can_thread or self._fits_inline(rows, options, budget):
                budget -= self.cost.seconds(rows, options)
                self.batches += 1
                self.inline_batches += 1
                self._deliver(group, self._outcome(options, group))
            else:
                threaded.append((options, group))
        if threaded:
            self._dispatch(loop, threaded)
        self._schedule(loop)

    def _dispatch(self, loop: asyncio.AbstractEventLoop, groups: list[tuple[Options, list[Job]]]):
        try:
            work = loop.run_in_executor(self.executor, self._compute_groups, groups)
        except RuntimeError as exc:  # the executor is shut down: the service is stopping
            for _, jobs in groups:
                self._deliver(jobs, exc)
            return
        self.running += 1
        self.batches += len(groups)
        work.add_done_callback(lambda done: self._finish(loop, groups, done))

    def _compute_groups(self, groups: list[tuple[Options, list[Job]]]) -> list[Any]:
        return [self._outcome(options, jobs) for options, jobs in groups]

    def _finish(
        self,
        loop: asyncio.AbstractEventLoop,
        groups: list[tuple[Options, list[Job]]],
        done: asyncio.Future[list[Any]],
    ) -> None:
        self.running -= 1
        if done.cancelled():
            failure: BaseException | None = RuntimeError("model work cancelled: shutting down")
        else:
            failure = done.exception()
        outcomes = [failure] * len(groups) if failure is not None else done.result()
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
        # Outputs are checked per request by the route (one request's overflowing rows must not
        # fail the others merged with it), so not here.
        if options is None:
            return _split(self.predictor.predict(x, check_outputs=False), sizes)
        n_samples, level, return_samples = options
        seeds = torch.cat([torch.full((job.rows,), job.seed, dtype=torch.int64) for job in jobs])
        summary, samples = self.predictor.uncertainty(
            x,
            n_samples,
            seed=seeds,
            level=level,
            return_samples=return_samples,
            check_outputs=False,
        )
        parts = _split(summary, sizes)
        chunks = [None] * len(jobs) if samples is None else samples.split(sizes, 1)
        return list(zip(parts, chunks, strict=True))
