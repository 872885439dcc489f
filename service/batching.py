"""Dispatching model work from the event loop: dynamic batching, size lanes, deadlines.

Each model has a :class:`Batcher`. A route submits a :class:`Job` and awaits its result; the
batcher decides where and with whom it runs:

- **Merging** (``batching`` on): jobs queue, and a flush on the next event-loop iteration takes
  everything queued, so requests that arrive together share one forward pass (up to
  ``max_batch_rows`` rows and an estimated ``max_batch_ms`` of work per merged batch). While
  requests for the same model are still being read and validated (:mod:`service.arrivals`), a
  flush waits up to ``max_wait_ms`` for them and goes as soon as they have queued or failed; a
  lone client pays no wait.
- **Inline, short lane or long lane.** Work whose estimated cost (timings taken at warm-up, see
  :class:`CostModel`) fits in ``inline_ms`` per flush runs on the event loop itself: for a
  one-row request a thread handoff costs more than the model. Work estimated under ``short_ms``
  runs in the *short lane*, a worker thread that large work never occupies, so a small request
  never waits behind large ones; the rest runs in the *long lane* (``max_parallel`` batches of
  this model at once, in a pool shared by all models). Meanwhile the loop keeps serving
  (``/health`` included).
- **Bounded.** At most ``max_queue`` jobs wait per model: past it a request is refused at once
  (503 with ``Retry-After``) instead of waiting without bound. A job carries a deadline: its
  request ends with a 504 when it passes. A job whose client went away or whose deadline passed
  is *abandoned*: it is dropped from the queue, and a computation all of whose jobs are
  abandoned stops at its next forward pass.

Merging cannot change an answer: MC masks are keyed by each row's contents and its own request's
seed (passed per row), so a seeded request gets the same result batched or alone; and a merged
computation that fails runs again job by job, so an error reaches only the requests whose own
rows raise it.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from mcdrop.exceptions import SamplingStoppedError
from mcdrop.predictor import Predictor
from service.errors import ClientDisconnectedError, DeadlineExceededError, OverloadedError
from service.metrics import ModelMetrics


@dataclass(frozen=True)
class MCOptions:
    """The MC-dropout options of an uncertainty job (jobs with equal options can merge).

    ``tolerance`` set: an adaptive job (``n_samples: "auto"``) whose rows stop once their MC
    standard error is within it, and ``n_samples`` is the most a row may use (the cost model
    counts that: an estimate from above).
    """

    n_samples: int
    level: float = 0.95
    return_samples: bool = False
    tolerance: float | None = None


#: ``None`` for a deterministic prediction.
Options = MCOptions | None


@dataclass(eq=False)
class Job:
    """One request's work: ``x (n, *input_shape)``, its options and seed, and the
    ``time.monotonic()`` by which its answer is due. Every value of ``x`` is finite in float32:
    the protocols check each value as they decode a request, so the model does not scan them
    again (it still checks the shape)."""

    x: Tensor
    options: Options
    seed: int = 0
    deadline: float = math.inf
    queued_at: float = 0.0  # time.monotonic() when submitted
    future: asyncio.Future[Any] | None = field(default=None, repr=False)
    #: Nobody waits for the answer any more (client gone, deadline passed, shutting down).
    #: Written on the event loop, read by worker threads between forward passes.
    abandoned: bool = False

    @property
    def rows(self) -> int:
        return self.x.shape[0]


@dataclass
class CostModel:
    """Seconds a model takes: ``fixed + per_row · rows`` for a prediction and ``fixed +
    per_sample_row · rows · n_samples`` for MC sampling (the replicated rows). Trusted to run
    work inline only up to the sizes it was measured on (:meth:`measured`): timings on a busy
    machine are noisy."""

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
        return rows * options.n_samples <= 2 * self.MEASURED_SAMPLE_ROWS

    def near_measured(self, rows: int, options: Options) -> bool:
        """Whether the work is within 10× the sizes the timings came from."""
        if options is None:
            return rows <= 10 * self.MEASURED_ROWS
        return rows * options.n_samples <= 10 * self.MEASURED_SAMPLE_ROWS

    def seconds(self, rows: int, options: Options) -> float:
        if options is None:
            return self.fixed + self.per_row * rows
        return self.fixed + self.per_sample_row * rows * options.n_samples


@dataclass
class Lane:
    """Worker threads for one size class of work, and how many batches of one model may run
    there at once."""

    executor: Executor
    limit: int
    running: int = 0

    @property
    def free(self) -> bool:
        return self.running < self.limit


def _split(result: Any, sizes: list[int]) -> list[Any]:
    """Cut a batched result (dataclass of ``(N, ...)`` tensors) into per-request results."""
    if len(sizes) == 1:
        return [result]  # one request's: nothing to cut (and no copy of every field to make)
    parts: list[dict[str, Any]] = [{} for _ in sizes]
    for name, value in vars(result).items():
        if isinstance(value, Tensor) and value.dim() > 0:
            for part, chunk in zip(parts, value.split(sizes), strict=True):
                part[name] = chunk
        else:
            for part in parts:
                part[name] = value
    return [type(result)(**part) for part in parts]


Group = tuple[Options, list[Job]]


class Batcher:
    """Runs the jobs of one model (see the module docstring).

    Args:
        predictor: the model.
        executor: worker threads of the long lane (shared by all models: it bounds concurrent
            large computations).
        cost: the model's timings.
        batching: merge concurrent jobs.
        max_batch_rows: most rows merged into one batch.
        max_wait_ms: longest wait for requests still arriving.
        inline_ms: estimated model work per flush that may run on the event loop (0: none).
        max_parallel: most batches of this model computing in the long lane at once.
        arriving: requests for this model being read and validated (:mod:`service.arrivals`).
        max_batch_ms: estimated work past which a merged batch takes no more jobs (the rest
            go in another batch).
        short_executor: worker threads of the short lane (None: no short lane).
        short_ms: estimated work up to which a batch runs in the short lane.
        max_queue: most jobs waiting for this model (None: unbounded).
        metrics: the model's Prometheus metrics (None: none recorded).
    """

    def __init__(
        self,
        predictor: Predictor,
        *,
        executor: Executor,
        cost: CostModel,
        batching: bool = True,
        max_batch_rows: int = 256,
        max_wait_ms: float = 2.0,
        inline_ms: float = 2.0,
        max_parallel: int = 1,
        arriving: Callable[[], int] = lambda: 0,
        max_batch_ms: float = 50.0,
        short_executor: Executor | None = None,
        short_ms: float = 200.0,
        max_queue: int | None = None,
        metrics: ModelMetrics | None = None,
    ) -> None:
        self.predictor = predictor
        self.cost = cost
        self.batching = batching
        self.max_batch_rows = max_batch_rows
        self.max_wait = max_wait_ms / 1000.0
        self.inline = inline_ms / 1000.0
        self.max_batch = max_batch_ms / 1000.0
        self.arriving = arriving
        self.long = Lane(executor, max(1, max_parallel))
        self.short = None if short_executor is None else Lane(short_executor, 1)
        self.short_s = short_ms / 1000.0
        self.max_queue = max_queue
        self.metrics = metrics
        self.pending: list[Job] = []
        self.scheduled = False  # a flush is due
        self.timer: asyncio.TimerHandle | None = None  # a delayed flush waiting for company
        self.closing = False
        self.batches = 0  # computations run (merged or not), for tests and metrics
        self.inline_batches = 0

    # -- submitting ------------------------------------------------------------------------------

    async def submit(self, job: Job, *, gone: Callable[[], Awaitable[Any]] | None = None) -> Any:
        """Run ``job`` (merged with concurrent ones when batching) and return its result.

        Args:
            job: the work; its ``deadline`` bounds the wait (then :class:`DeadlineExceededError`).
            gone: an awaitable factory that completes when the client has gone away (then the
                job is abandoned and :class:`ClientDisconnectedError` raised).
        """
        if self.closing:
            raise SamplingStoppedError("the service is shutting down")
        if self.max_queue is not None and len(self.pending) >= self.max_queue:
            raise OverloadedError(
                f"model {self.predictor.spec.name!r} has {len(self.pending)} requests queued, "
                "its limit; retry later",
                retry_after=self._queued_seconds(),
            )
        loop = asyncio.get_running_loop()
        job.future = loop.create_future()
        job.queued_at = time.monotonic()
        # An adaptive job is counted once computed: by the samples its rows used (_run).
        if self.metrics is not None and job.options is not None and job.options.tolerance is None:
            self.metrics.row_samples.observe(job.rows * job.options.n_samples)
        self.pending.append(job)
        self._schedule(loop)
        self._count_pending()
        if job.future.done():  # ran inline (no batching wait): no watcher needed
            return job.future.result()
        if self.scheduled and self.timer is None:
            # The flush is due on the loop's next turn, before this task resumes: small work
            # runs inline there, and its request needs no disconnect watcher and no timeout
            # (a task, a timer and a wait: ~50 µs, a third of a one-row digits prediction).
            try:
                await asyncio.sleep(0)
            except BaseException:  # the request itself was cancelled (server shutdown)
                self._abandon(job)
                raise
            if job.future.done():
                return job.future.result()
        watcher = asyncio.ensure_future(gone()) if gone is not None else None
        waits: set[asyncio.Future[Any]] = {job.future} | ({watcher} if watcher else set())
        timeout = None if math.isinf(job.deadline) else max(0.0, job.deadline - time.monotonic())
        try:
            done, _ = await asyncio.wait(
                waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        except BaseException:  # the request itself was cancelled (server shutdown)
            self._abandon(job)
            raise
        finally:
            if watcher is not None:
                watcher.cancel()
        if job.future in done:
            return job.future.result()
        self._abandon(job)
        if watcher is not None and watcher in done:
            raise ClientDisconnectedError("the client closed the connection")
        raise DeadlineExceededError(
            "the request did not finish within its deadline (request_timeout_s); send fewer "
            "rows or ask for fewer samples"
        )

    def _abandon(self, job: Job) -> None:
        job.abandoned = True
        if job.future is not None and not job.future.done():
            job.future.cancel()
        if job in self.pending:
            self.pending.remove(job)
            self._count_pending()

    def _count_pending(self) -> None:
        if self.metrics is not None:
            self.metrics.pending.set(len(self.pending))

    def _started(self, jobs: list[Job]) -> None:
        """The jobs' wait is over: their model execution starts now."""
        if self.metrics is not None:
            now = time.monotonic()
            for job in jobs:
                self.metrics.queue_seconds.observe(now - job.queued_at)

    def _queued_seconds(self) -> int:
        """A guess at when the queue will have room: its estimated work over the long lane."""
        work = sum(self.cost.seconds(job.rows, job.options) for job in self.pending)
        return max(1, math.ceil(work / self.long.limit))

    def recheck(self) -> None:
        """Re-decide a waiting flush (a request for this model queued or went away)."""
        self._schedule(asyncio.get_running_loop())

    def close(self) -> None:
        """Shutting down: queued jobs are refused, and running computations stop at their next
        forward pass."""
        self.closing = True
        for job in self.pending:
            job.abandoned = True
            if job.future is not None and not job.future.done():
                job.future.set_exception(SamplingStoppedError("the service is shutting down"))
        self.pending = []

    # -- scheduling ------------------------------------------------------------------------------

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self.pending:
            return
        rows = sum(job.rows for job in self.pending)
        wait = (
            self.batching
            and self.arriving() > 0
            and rows < self.max_batch_rows
            and self.max_wait > 0
        )
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
        elif not self.batching and len(self.pending) == 1:
            self._flush(loop)  # nothing to merge with: no event-loop turn to wait for
        else:
            loop.call_soon(self._flush, loop)

    def _batches(self, jobs: list[Job]) -> list[Group]:
        """``jobs`` (in arrival order) as batches of equal options, each up to ``max_batch_rows``
        rows and an estimated ``max_batch`` seconds (its first job always fits)."""
        open_groups: dict[Options, list[Job]] = {}
        batches: list[Group] = []
        for job in jobs:
            group = open_groups.get(job.options)
            if group is not None and self.batching:
                # A batch estimated past max_batch leaves the rest for another: merging saves
                # little once per-row work dominates, and one huge batch would leave the other
                # workers idle (Fashion CNN, 100 samples: 25 ms per row).
                rows = sum(j.rows for j in group) + job.rows
                if (
                    rows <= self.max_batch_rows
                    and self.cost.seconds(rows, job.options) <= self.max_batch
                ):
                    group.append(job)
                    continue
            group = open_groups[job.options] = [job]
            batches.append((job.options, group))
        return batches

    def _fits_inline(self, rows: int, options: Options, budget: float) -> bool:
        return (
            self.inline > 0
            and self.cost.measured(rows, options)
            and self.cost.seconds(rows, options) <= budget
        )

    def _lane(self, rows: int, options: Options) -> Lane:
        """The short lane for work estimated under ``short_s`` *and* near the sizes the timings
        were taken on (where the estimate can be trusted: a timing on a busy machine can be
        far off, and one large request misjudged as short would hold the short lane)."""
        if (
            self.short is not None
            and self.cost.near_measured(rows, options)
            and self.cost.seconds(rows, options) <= self.short_s
        ):
            return self.short
        return self.long

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        self.scheduled = False
        self.timer = None
        live = [job for job in self.pending if not job.abandoned]
        self.pending = []
        budget = self.inline  # inline work per flush, over all its batches
        lanes: dict[int, tuple[Lane, list[Group]]] = {}
        for options, group in self._batches(live):
            rows = sum(job.rows for job in group)
            if self._fits_inline(rows, options, budget):
                budget -= self.cost.seconds(rows, options)
                self.batches += 1
                self.inline_batches += 1
                self._deliver(group, self._outcome(options, group))
                continue
            lane = self._lane(rows, options)
            if lane.free:
                lanes.setdefault(id(lane), (lane, []))[1].append((options, group))
            else:
                self.pending.extend(group)  # waits for a worker of its lane to finish
        for lane, groups in lanes.values():
            self._dispatch(loop, lane, groups)
        self._count_pending()

    def _dispatch(self, loop: asyncio.AbstractEventLoop, lane: Lane, groups: list[Group]) -> None:
        try:
            work = loop.run_in_executor(lane.executor, self._compute_groups, groups)
        except RuntimeError as exc:  # the executor is shut down: the service is stopping
            for _, jobs in groups:
                self._deliver(jobs, exc)
            return
        lane.running += 1
        self.batches += len(groups)
        work.add_done_callback(lambda done: self._finish(loop, lane, groups, done))

    def _compute_groups(self, groups: list[Group]) -> list[Any]:
        return [self._outcome(options, jobs) for options, jobs in groups]

    def _finish(
        self,
        loop: asyncio.AbstractEventLoop,
        lane: Lane,
        groups: list[Group],
        done: asyncio.Future[list[Any]],
    ) -> None:
        lane.running -= 1
        if done.cancelled():
            failure: BaseException | None = SamplingStoppedError(
                "model work cancelled: shutting down"
            )
        else:
            failure = done.exception()
        outcomes = [failure] * len(groups) if failure is not None else done.result()
        for (_, jobs), outcome in zip(groups, outcomes, strict=True):
            self._deliver(jobs, outcome)
        self._schedule(loop)

    def _outcome(self, options: Options, jobs: list[Job]) -> list[Any] | BaseException:
        """The jobs' results, or the error of them all; a job's result may be an error of its own
        (a merged computation that failed, run again job by job)."""
        try:
            return self._compute(options, jobs)
        except SamplingStoppedError as exc:  # stopped, not failed: nothing to run again
            return exc
        except (SystemExit, GeneratorExit) as exc:  # a model's own: not the server's to obey
            return _failure(exc)
        except Exception as exc:
            if len(jobs) == 1:
                return exc
            # One request's rows may be what failed (a forward that raises on inputs its own
            # code refuses, as a token id past the vocabulary): each job runs alone, so that
            # the error reaches only the requests whose rows raise it. Merging changes no
            # answer, and no request fails for the rows of another.
            return [self._alone(options, job) for job in jobs]

    def _alone(self, options: Options, job: Job) -> Any:
        """``job``'s result computed by itself, or the error it raised."""
        if self.closing or job.abandoned:
            return SamplingStoppedError("nobody waits for this work any more")
        started = time.perf_counter()
        try:
            (result,) = self._run(options, [job])
        except (SystemExit, GeneratorExit) as exc:  # as in _outcome
            return _failure(exc)
        except Exception as exc:
            return exc
        if self.metrics is not None:
            self.metrics.executed(job.rows, time.perf_counter() - started)
        return result

    @staticmethod
    def _deliver(jobs: list[Job], outcome: list[Any] | BaseException) -> None:
        for i, job in enumerate(jobs):
            if job.future is None or job.future.done():
                continue
            # (a result is never an exception: one in the list is that job's own error)
            result = outcome if isinstance(outcome, BaseException) else outcome[i]
            if isinstance(result, BaseException):
                job.future.set_exception(_failure(result))
            else:
                job.future.set_result(result)

    def _compute(self, options: Options, jobs: list[Job]) -> list[Any]:
        """The per-job results of one forward computation over the jobs' rows."""
        if self.closing or all(job.abandoned for job in jobs):
            raise SamplingStoppedError("nobody waits for this work any more")
        self._started(jobs)
        started = time.perf_counter()
        results = self._run(options, jobs)
        if self.metrics is not None:
            self.metrics.executed(sum(job.rows for job in jobs), time.perf_counter() - started)
        return results

    def _run(self, options: Options, jobs: list[Job]) -> list[Any]:
        sizes = [job.rows for job in jobs]
        x = torch.cat([job.x for job in jobs]) if len(jobs) > 1 else jobs[0].x
        # Outputs are checked per request by the route (one request's overflowing rows must not
        # fail the others merged with it), so not here.
        if options is None:
            prediction = self.predictor.predict(x, check_outputs=False, check_finite_inputs=False)
            return _split(prediction, sizes)
        # One seed for all the rows when the jobs share it (a lone job): the same keys as a
        # per-row seed of that value, without building the (N,) tensor.
        seed: int | Tensor = jobs[0].seed
        if any(job.seed != seed for job in jobs):
            seed = torch.cat([torch.full((job.rows,), job.seed, dtype=torch.int64) for job in jobs])
        auto = options.tolerance is not None
        summary, samples = self.predictor.uncertainty(
            x,
            "auto" if auto else options.n_samples,
            tolerance=options.tolerance,
            max_n_samples=options.n_samples if auto else None,
            seed=seed,
            level=options.level,
            return_samples=options.return_samples,
            stop=lambda: self.closing or all(job.abandoned for job in jobs),
            check_outputs=False,
            check_finite_inputs=False,
        )
        parts = _split(summary, sizes)
        if auto and self.metrics is not None:  # what each job's rows used, not the most
            for part in parts:
                self.metrics.row_samples.observe(int(part.row_n_samples.sum()))
        chunks = [None] * len(jobs) if samples is None else samples.split(sizes, 1)
        return list(zip(parts, chunks, strict=True))


def _failure(exc: BaseException) -> BaseException:
    """``exc`` as a request's future may hold it: a ``StopIteration`` (which a future refuses:
    the request then waited out its deadline), or an exit the model's code raised
    (``SystemExit``: the server would stop), as a ``RuntimeError`` whose cause it is
    (:func:`mcdrop.model_errors.raised_by_model` reads a ``StopIteration`` through it)."""
    if isinstance(exc, StopIteration | StopAsyncIteration) or not isinstance(exc, Exception):
        wrapped = RuntimeError(f"the model's computation raised {type(exc).__name__}")
        wrapped.__cause__ = exc
        return wrapped
    return exc
