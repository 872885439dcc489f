"""Dynamic batching merges concurrent requests without changing any seeded answer."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from sklearn.datasets import load_digits

import mcdrop
from mcdrop import checkpoint
from mcdrop.checking import PROBED_BATCH_ROWS
from mcdrop.exceptions import InvalidInputError
from mcdrop.predictor import Predictor
from service.app import create_app
from service.arrivals import Arrivals
from service.batching import Batcher, CostModel, Job, MCOptions
from service.config import Settings
from tests import factories
from tests.conftest import MODELS
from tests.service.conftest import wait_ready

ROWS = load_digits().data[:12].tolist()
BLEND = [(a + b) / 2 for a, b in zip(ROWS[1], ROWS[7], strict=True)]  # half 1, half 7


def _concurrently(http: TestClient, requests: list[tuple[str, dict[str, Any]]]) -> list[Any]:
    results: list[Any] = [None] * len(requests)
    barrier = threading.Barrier(len(requests))

    def call(i: int) -> None:
        path, body = requests[i]
        barrier.wait()
        results[i] = http.post(path, json=body).json()

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


REQUESTS = (
    [
        ("/models/digits/uncertainty", {"inputs": ROWS[i : i + 2], "n_samples": 40, "seed": i})
        for i in range(0, 10, 2)
    ]
    + [
        (
            "/models/digits/uncertainty",
            {"inputs": ROWS[:1], "n_samples": 40, "seed": 3, "return_samples": True},
        ),
        ("/models/digits/uncertainty", {"inputs": ROWS[5:7], "n_samples": 25, "seed": 3}),
        ("/models/digits/predict", {"inputs": ROWS[:3]}),
        ("/models/digits/predict", {"inputs": ROWS[3:4]}),
        ("/models/diabetes/predict", {"inputs": [[59, 2, 32.1, 101, 157, 93.2, 38, 4, 4.86, 87]]}),
    ]
    + [
        # Adaptive: two that merge (equal tolerance), one with samples and a cap of its own.
        (
            "/models/digits/uncertainty",
            {"inputs": [ROWS[i], BLEND], "n_samples": "auto", "tolerance": 0.02, "seed": i},
        )
        for i in (0, 1)
    ]
    + [
        (
            "/models/digits/uncertainty",
            {
                "inputs": [BLEND, ROWS[2]],
                "n_samples": "auto",
                "max_n_samples": 64,
                "seed": 4,
                "return_samples": True,
            },
        ),
    ]
)


@pytest.fixture(scope="module")
def used(only: Callable[..., Path]) -> Path:
    """The models :data:`REQUESTS` use."""
    return only("digits", "diabetes")


@pytest.fixture(scope="module")
def unbatched(used: Path) -> list[Any]:
    with TestClient(create_app(Settings(model_dir=used, batching=False))) as http:
        wait_ready(http)
        return [http.post(path, json=body).json() for path, body in REQUESTS]


def test_batched_answers_equal_unbatched(unbatched: list[Any], used: Path) -> None:
    # Work off the event loop and one worker: requests that arrive while a batch computes must
    # queue and merge, whatever the warm-up timings on a busy machine say.
    settings = Settings(
        model_dir=used,
        batching=True,
        batch_max_wait_ms=200,
        inline_max_ms=0.0,
        max_concurrency=1,
        short_work_ms=0.0,
    )
    with TestClient(create_app(settings)) as http:
        wait_ready(http)
        batched = _concurrently(http, REQUESTS)
        batcher = http.app.state.registry.get("digits").batcher
        digits_jobs = sum("digits" in path for path, _ in REQUESTS)
        assert batcher.batches < digits_jobs  # requests really were merged
    for got, want in zip(batched, unbatched, strict=True):
        assert _rounded(got) == _rounded(want)


def _rounded(value: Any) -> Any:
    """Float results agree to float32 rounding (batch size changes the BLAS blocking)."""
    if isinstance(value, float):
        return round(value, 5)
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return value


def test_errors_reach_only_their_request(only: Callable[..., Path]) -> None:
    with TestClient(create_app(Settings(model_dir=only("diabetes"), batch_max_wait_ms=50))) as http:
        wait_ready(http)
        good, bad = _concurrently(
            http,
            [
                ("/models/diabetes/predict", {"inputs": [[1.0] * 10]}),
                ("/models/diabetes/predict", {"inputs": [[1.0] * 9]}),
            ],
        )
        assert "predictions" in good
        assert bad["error"]["code"] == "invalid_input"


# -- the batcher itself, on the real digits model ------------------------------------------------


@pytest.fixture(scope="module")
def digits() -> Predictor:
    return Predictor(checkpoint.load(MODELS / "digits"))


def _jobs() -> list[Job]:
    x = torch.tensor(ROWS, dtype=torch.float32)
    return [Job(x[i : i + 2], MCOptions(30, 0.9, False), seed=i) for i in range(0, 8, 2)] + [
        Job(x[8:11], None),
        Job(x[11:12], MCOptions(30, 0.9, True), seed=5),
    ]


def _submit_all(batcher: Batcher, jobs: list[Job]) -> list[Any]:
    async def main() -> list[Any]:
        return await asyncio.gather(*(batcher.submit(job) for job in jobs))

    return asyncio.run(main())


@pytest.mark.parametrize("batching", [False, True])
@pytest.mark.parametrize("inline_ms", [0.0, 1e6], ids=["threaded", "inline"])
def test_batcher_answers_equal_direct_calls(
    digits: Predictor, batching: bool, inline_ms: float
) -> None:
    jobs = _jobs()
    with ThreadPoolExecutor(2) as pool:
        batcher = Batcher(
            digits, executor=pool, cost=CostModel(), batching=batching, inline_ms=inline_ms
        )
        got = _submit_all(batcher, jobs)
    # Jobs submitted in one event-loop iteration merge: one pass per distinct options.
    assert batcher.batches == (3 if batching else len(jobs))
    assert batcher.inline_batches == (batcher.batches if inline_ms else 0)
    for job, result in zip(jobs, got, strict=True):
        if job.options is None:
            want = digits.predict(job.x)
            assert torch.allclose(result.probabilities, want.probabilities, atol=1e-6)
            continue
        summary, samples = digits.uncertainty(
            job.x,
            job.options.n_samples,
            seed=job.seed,
            level=job.options.level,
            return_samples=job.options.return_samples,
        )
        assert torch.allclose(result[0].probabilities, summary.probabilities, atol=1e-6)
        assert torch.allclose(result[0].mutual_information, summary.mutual_information, atol=1e-5)
        assert (result[1] is None) == (samples is None)
        if samples is not None:
            assert torch.allclose(result[1], samples, atol=1e-6)


def test_lone_request_does_not_wait(digits: Predictor) -> None:
    # max_wait is a minute: a flush that waited would time the test out.
    with ThreadPoolExecutor(1) as pool:
        batcher = Batcher(digits, executor=pool, cost=CostModel(), max_wait_ms=60_000)
        job = _jobs()[0]
        asyncio.run(asyncio.wait_for(batcher.submit(job), timeout=30))


def _waiting_batcher(
    digits: Predictor, pool: ThreadPoolExecutor, arrivals: Arrivals, **options: Any
) -> Batcher:
    """A digits batcher that waits up to a minute for requests ``arrivals`` counts as arriving."""
    batcher = Batcher(
        digits,
        executor=pool,
        cost=CostModel(),
        max_wait_ms=60_000,
        arriving=lambda: arrivals("digits"),
        **options,
    )
    arrivals.listeners["digits"] = batcher.recheck
    return batcher


def test_flush_waits_for_arriving_requests_then_goes_when_they_queue(digits: Predictor) -> None:
    first, second = _jobs()[:2]
    arrivals = Arrivals()
    with ThreadPoolExecutor(1) as pool:
        batcher = _waiting_batcher(digits, pool, arrivals)

        async def arrive_and_submit(scope: dict[str, Any], job: Job) -> Any:
            arrivals.settle(scope)  # as the route does, right before it queues its job
            return await batcher.submit(job)

        async def main() -> None:
            a: dict[str, Any] = {}
            b: dict[str, Any] = {}
            arrivals.enter(a, "digits")
            arrivals.enter(b, "digits")
            arrivals.enter({}, "fashion")  # another model's request: not company for digits
            # The first job waits for the second request (up to a minute)...
            waiting = asyncio.ensure_future(arrive_and_submit(a, first))
            await asyncio.sleep(0.05)
            assert not waiting.done()
            # ...and the flush goes the moment the second queues.
            both = asyncio.gather(waiting, arrive_and_submit(b, second))
            await asyncio.wait_for(both, timeout=30)

        asyncio.run(main())
    assert batcher.batches == 1


def test_a_request_that_fails_validation_releases_the_wait(digits: Predictor) -> None:
    arrivals = Arrivals()
    with ThreadPoolExecutor(1) as pool:
        batcher = _waiting_batcher(digits, pool, arrivals)

        async def main() -> None:
            doomed: dict[str, Any] = {}
            arrivals.enter(doomed, "digits")
            waiting = asyncio.ensure_future(batcher.submit(_jobs()[0]))
            await asyncio.sleep(0.05)
            assert not waiting.done()
            arrivals.settle(doomed)  # the middleware, when that request ends without a job
            await asyncio.wait_for(waiting, timeout=30)

        asyncio.run(main())


@pytest.mark.parametrize("most", [max(PROBED_BATCH_ROWS) - 1, max(PROBED_BATCH_ROWS)])
def test_the_timings_run_no_batch_larger_than_save_probes(most: int) -> None:
    """A server's warm-up finds a model failing on batches of up to max(PROBED_BATCH_ROWS) rows
    (checking.batch_problem, as mcdrop check does); the timings' largest pass (16 samples of 32
    rows, a residual across the dropout: replicated at the input) is that large, no larger."""
    spec = checkpoint.ModelSpec(
        name="sized", task="regression", input_shape=[3], labels=["y"],
        architecture={"factory": "tests.factories:MaxBatch", "params": {"most": most}}, tau=1.0,
    )  # fmt: skip
    torch.manual_seed(0)
    predictor = Predictor(checkpoint.LoadedModel(spec, factories.MaxBatch(most), Path("sized")))
    x = torch.zeros(1, 3)
    if most < max(PROBED_BATCH_ROWS):
        with pytest.raises(ValueError, match=f"at most {most} rows a batch, got {most + 1}"):
            CostModel.measure(predictor, x, repeats=1)
    else:
        CostModel.measure(predictor, x, repeats=1)


def test_a_small_job_does_not_wait_behind_a_large_one(digits: Predictor) -> None:
    x = torch.tensor(ROWS, dtype=torch.float32)
    cost = CostModel.measure(digits, x[:1])
    # 60 rows × 2000 samples: a worker thread, some 100× the small job's work.
    large = Job(x.repeat(5, 1), MCOptions(2000, 0.9, False), seed=1)
    small = Job(x[:1], None)  # one-row prediction: inline
    with ThreadPoolExecutor(2) as pool:
        batcher = Batcher(digits, executor=pool, cost=cost, inline_ms=50, max_parallel=1)

        async def main() -> None:
            slow = asyncio.ensure_future(batcher.submit(large))
            await asyncio.sleep(0.01)
            await asyncio.wait_for(batcher.submit(small), timeout=30)
            assert not slow.done()
            await slow

        asyncio.run(main())


def test_inline_budget_counts_every_group_of_a_flush(digits: Predictor) -> None:
    x = torch.tensor(ROWS[:1], dtype=torch.float32)
    jobs = [Job(x, MCOptions(10, level, False), seed=0) for level in (0.5, 0.6, 0.7, 0.8, 0.9)]
    with ThreadPoolExecutor(1) as pool:
        # Each group costs 1 ms by this model; 2.5 ms of inline work per flush fits two.
        batcher = Batcher(digits, executor=pool, cost=CostModel(fixed=1e-3), inline_ms=2.5)
        _submit_all(batcher, jobs)
    assert batcher.batches == 5
    assert batcher.inline_batches == 2


def test_merged_batches_stop_at_their_estimated_cost(digits: Predictor) -> None:
    x = torch.tensor(ROWS[:1], dtype=torch.float32)
    jobs = [Job(x, None) for _ in range(6)]
    with ThreadPoolExecutor(1) as pool:
        # 10 ms per row by this model, batches up to 25 ms: two jobs per batch.
        batcher = Batcher(
            digits, executor=pool, cost=CostModel(per_row=10e-3), inline_ms=0.0, max_batch_ms=25
        )
        _submit_all(batcher, jobs)
    assert batcher.batches == 3


def test_cancelled_and_refused_work_never_hangs(digits: Predictor) -> None:
    arrivals = Arrivals()
    pool = ThreadPoolExecutor(1)
    batcher = _waiting_batcher(digits, pool, arrivals, inline_ms=0.0)

    async def main() -> None:
        # A client that goes away while its job waits: the job is dropped, nothing breaks.
        scope: dict[str, Any] = {}
        arrivals.enter(scope, "digits")
        gone = asyncio.ensure_future(batcher.submit(_jobs()[0]))
        await asyncio.sleep(0.01)
        gone.cancel()
        arrivals.settle(scope)
        await asyncio.sleep(0.01)
        assert batcher.batches == 0
        # After shutdown the worker pool refuses work: the request gets an error, not a hang.
        pool.shutdown()
        with pytest.raises(RuntimeError):
            await asyncio.wait_for(batcher.submit(_jobs()[1]), timeout=30)

    asyncio.run(main())


def test_a_failing_batch_fails_only_its_jobs(digits: Predictor) -> None:
    good = _jobs()[0]
    bad = Job(torch.zeros(1, 3), None)  # wrong width: the predictor refuses it
    with ThreadPoolExecutor(1) as pool:
        batcher = Batcher(digits, executor=pool, cost=CostModel(), inline_ms=0.0)

        async def main() -> list[Any]:
            return await asyncio.gather(
                batcher.submit(good), batcher.submit(bad), return_exceptions=True
            )

        ok, failed = asyncio.run(main())
    assert ok[0].probabilities.shape == (2, 10)
    assert isinstance(failed, InvalidInputError)


@pytest.fixture(scope="module")
def picky(tmp_path_factory: pytest.TempPathFactory) -> Predictor:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("picky") / "picky"
    loaded = mcdrop.save(
        factories.Picky(), folder, task="regression", input_shape=[3], labels=["y"],
        factory="tests.factories:Picky", tau=1.0,
    )  # fmt: skip
    return Predictor(loaded)


@pytest.mark.parametrize("options", [None, MCOptions(8), MCOptions(64, tolerance=0.05)])
@pytest.mark.parametrize("inline_ms", [0.0, 1e6], ids=["threaded", "inline"])
def test_rows_the_model_refuses_fail_only_their_request(
    picky: Predictor, options: MCOptions | None, inline_ms: float
) -> None:
    # The model raises on one request's rows: merged with others, its error must reach only
    # that request (merging changes no answer), and the others get what they get alone.
    x = torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.0, -1.0]])
    jobs = [Job(x, options, seed=1), Job(torch.full((1, 3), 1e3), options), Job(x[1:], options)]
    with ThreadPoolExecutor(1) as pool:
        batcher = Batcher(picky, executor=pool, cost=CostModel(), inline_ms=inline_ms)

        async def main() -> list[Any]:
            return await asyncio.gather(*(batcher.submit(j) for j in jobs), return_exceptions=True)

        first, failed, last = asyncio.run(main())
    assert isinstance(failed, ValueError)
    for job, got in ((jobs[0], first), (jobs[2], last)):
        assert not isinstance(got, BaseException), f"a request the model accepts failed: {got!r}"
        if options is None:
            assert torch.equal(got.mean, picky.predict(job.x).mean)
            continue
        n = "auto" if options.tolerance else options.n_samples
        alone, _ = picky.uncertainty(
            job.x, n, tolerance=options.tolerance, max_n_samples=64 if options.tolerance else None,
            seed=job.seed,
        )  # fmt: skip
        assert torch.equal(got[0].mean, alone.mean)


def test_cost_model_scales_with_rows_and_samples(digits: Predictor) -> None:
    cost = CostModel.measure(digits, torch.tensor(ROWS[:1], dtype=torch.float32))
    assert cost.fixed > 0
    assert cost.seconds(64, MCOptions(100)) > cost.seconds(1, MCOptions(100))
    assert cost.seconds(1, MCOptions(1000)) > cost.seconds(1, MCOptions(10))


def test_the_short_lane_keeps_small_jobs_apart_from_large_ones(digits: Predictor) -> None:
    x = torch.tensor(ROWS, dtype=torch.float32)
    # Timings that call everything free: the large job must still go to the long lane (its size
    # is far past what the timings were taken on), so the short lane stays free for the small.
    cost = CostModel()
    # 60 rows × 2000 samples each: 20× past the timed sizes, some 100× the small job's work.
    large = [Job(x.repeat(5, 1), MCOptions(2000), seed=s) for s in range(2)]
    small = Job(x[:1], MCOptions(50), seed=3)
    with ThreadPoolExecutor(2) as long_pool, ThreadPoolExecutor(1) as short_pool:
        batcher = Batcher(
            digits,
            executor=long_pool,
            cost=cost,
            inline_ms=0.0,
            max_parallel=2,
            short_executor=short_pool,
        )

        async def main() -> None:
            slow = [asyncio.ensure_future(batcher.submit(job)) for job in large]
            await asyncio.sleep(0.01)
            await asyncio.wait_for(batcher.submit(small), timeout=30)
            assert not any(task.done() for task in slow)
            await asyncio.gather(*slow)

        asyncio.run(main())


def test_adaptive_jobs_merge_by_tolerance_and_keep_their_counts(digits: Predictor) -> None:
    x = torch.tensor(ROWS, dtype=torch.float32)
    hard = (x[:4] + x[4:8]) / 2  # blends of two digits: rows that need more samples
    auto = MCOptions(200, 0.95, True, tolerance=0.01)
    jobs = [
        Job(torch.cat([x[:2], hard[:2]]), auto, seed=1),
        Job(hard[2:], auto, seed=2),  # merges with the first
        Job(x[2:4], MCOptions(200, 0.95, True, tolerance=0.05), seed=1),  # another tolerance
        Job(x[4:6], MCOptions(200, 0.95, True), seed=1),  # fixed: never merged with auto
    ]
    with ThreadPoolExecutor(2) as pool:
        batcher = Batcher(digits, executor=pool, cost=CostModel(), inline_ms=0.0)
        got = _submit_all(batcher, jobs)
    assert batcher.batches == 3
    for job, (summary, samples) in zip(jobs, got, strict=True):
        assert job.options is not None
        tolerance = job.options.tolerance
        want, want_samples = digits.uncertainty(
            job.x,
            "auto" if tolerance is not None else job.options.n_samples,
            seed=job.seed,
            tolerance=tolerance,
            max_n_samples=job.options.n_samples if tolerance is not None else None,
            return_samples=True,
        )
        assert want_samples is not None
        assert torch.equal(summary.row_n_samples, want.row_n_samples)
        assert torch.allclose(summary.probabilities, want.probabilities, atol=1e-6)
        # A merged job's samples are padded to the batch's most used samples.
        own = want_samples.shape[0]
        assert torch.allclose(samples[:own], want_samples, atol=1e-6, equal_nan=True)
        assert bool(samples[own:].isnan().all())
    assert int(got[0][0].row_n_samples.max()) > int(got[0][0].row_n_samples.min())
