"""Sampling: shapes, seeds, row independence, chunking, the deterministic prefix, threads."""

from __future__ import annotations

import math
import subprocess
import sys
import threading
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from mcdrop import MAX_SEED, plan, plan_cache, planning, predict, sample, sample_chunks
from mcdrop.exceptions import InvalidArgumentError, InvalidInputError
from tests.factories import DROPS, AlwaysDrops, DropsFor, Watched, never


def test_shape_is_samples_first(mlp: nn.Module, x: Tensor) -> None:
    assert sample(mlp, x, 7, seed=0).shape == (7, 6, 3)


def test_seed_reproducible_and_distinct(mlp: nn.Module, x: Tensor) -> None:
    a = sample(mlp, x, 20, seed=1)
    assert torch.equal(a, sample(mlp, x, 20, seed=1))
    assert not torch.equal(a, sample(mlp, x, 20, seed=2))
    assert not torch.equal(a, sample(mlp, x, 20))  # no seed: fresh randomness


def test_global_rng_untouched(mlp: nn.Module, x: Tensor) -> None:
    state = torch.get_rng_state()
    sample(mlp, x, 20, seed=1)
    sample(mlp, x, 20)
    assert torch.equal(torch.get_rng_state(), state)


def test_row_samples_independent_of_batch(mlp: nn.Module, x: Tensor) -> None:
    full = sample(mlp, x, 30, seed=5)
    others = torch.cat([torch.randn(3, 4), x[2:3], torch.randn(2, 4)])
    mixed = sample(mlp, others, 30, seed=5)
    assert torch.allclose(mixed[:, 3], full[:, 2], atol=1e-6)
    assert torch.allclose(sample(mlp, x[4:5], 30, seed=5)[:, 0], full[:, 4], atol=1e-6)


@pytest.mark.parametrize("max_pass_rows", [1, 5, 7, 64, 10_000])
def test_chunking_does_not_change_samples(mlp: nn.Module, x: Tensor, max_pass_rows: int) -> None:
    reference = sample(mlp, x, 25, seed=3, max_pass_rows=10_000, prefix="off")
    assert torch.allclose(
        sample(mlp, x, 25, seed=3, max_pass_rows=max_pass_rows), reference, atol=1e-6
    )


def test_chunks_respect_the_row_budget(mlp: nn.Module, x: Tensor) -> None:
    chunks = list(sample_chunks(mlp, x, 50, seed=0, max_pass_rows=40))
    assert all(c.values.shape[0] * c.values.shape[1] <= 40 for c in chunks)
    covered = torch.zeros(50, 6, dtype=torch.int64)
    for c in chunks:
        covered[c.samples, c.rows] += 1
    assert torch.equal(covered, torch.ones_like(covered))


class Residual(nn.Module):
    """A residual connection across the first dropout: the prefix trick is invalid here."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: Tensor) -> Tensor:
        h = self.a(x)
        return h + self.drop(h)


class Conv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten())
        self.head = nn.Sequential(nn.Dropout(0.5), nn.Linear(4 * 6 * 6, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


@pytest.mark.parametrize(
    ("factory", "shape", "prefix_valid"),
    [
        (
            lambda: nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 2)),
            (5, 4),
            True,
        ),
        (Conv, (5, 1, 6, 6), True),
        (Residual, (5, 4), False),
        (
            lambda: nn.TransformerEncoderLayer(8, 2, 16, dropout=0.2, batch_first=True),
            (5, 3, 8),
            False,
        ),
    ],
)
def test_prefix_equals_full_replication(factory, shape, prefix_valid: bool) -> None:
    torch.manual_seed(0)
    model = factory().eval()
    x = torch.randn(*shape)
    full = sample(model, x, 16, seed=9, prefix="off")
    kept = plan(model, x)
    for given in (None, kept):  # a plan made for the call, and one kept from before
        assert torch.allclose(sample(model, x, 16, seed=9, plan=given), full, atol=1e-5)
    assert kept.prefix is prefix_valid


def _passes(model: nn.Module, x: Tensor, n_samples: int) -> list[int]:
    """Replicated rows of every pass that sampling ``x`` runs, with a plan made now (a plan
    kept from an earlier call keeps the activation budget of its time)."""
    chunks = sample_chunks(model, x, n_samples, seed=3, plan=plan(model, x))
    return [c.values.shape[0] * c.values.shape[1] for c in chunks]


def test_passes_are_cut_to_the_activation_budget_without_changing_samples(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A conv net whose first dropout is early: big replicated activations, a cheap prefix.
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.Dropout2d(0.2), nn.Flatten(), nn.Linear(8 * 36, 64)
    ).eval()
    x = torch.randn(4, 1, 6, 6)
    whole = sample(model, x, 50, seed=3)
    assert plan(model, x).row_bytes == 8 * 36 * 4
    monkeypatch.setattr(planning, "ACTIVATION_BUDGET", 10 * 8 * 36 * 4)
    passes = _passes(model, x, 50)
    assert max(passes) <= 10
    assert sum(passes) == 4 * 50
    assert torch.allclose(sample(model, x, 50, seed=3, plan=plan(model, x)), whole, atol=1e-6)
    # When the prefix is most of the work, passes are not cut (each would rerun it).
    heavy = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        *(nn.Conv2d(8, 8, 3, padding=1) for _ in range(3)),
        nn.Dropout2d(0.2),
        nn.Flatten(),
        nn.Linear(8 * 36, 3),
    ).eval()
    kept = plan(heavy, x)
    assert kept.prefix_flops > 10 * kept.rest_flops
    assert _passes(heavy, x, 50) == [4 * 50]


def test_single_row_probe_catches_a_residual_across_dropout() -> None:
    torch.manual_seed(0)
    model = Residual().eval()
    x = torch.randn(1, 4)
    first = sample(model, x, 8, seed=1)  # the plan probes with this one row
    assert plan(model, x).prefix is False
    assert torch.allclose(first, sample(model, x, 8, seed=1, prefix="off"), atol=1e-6)
    assert sample(model, torch.randn(3, 4), 8, seed=1).shape == (8, 3, 4)


def test_prefix_works_for_a_single_row() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.3), nn.Linear(8, 2)).eval()
    x = torch.randn(1, 4)
    assert torch.allclose(sample(model, x, 9, seed=0), sample(model, x, 9, seed=0, prefix="off"))


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"n_samples": 0}, InvalidArgumentError),
        ({"n_samples": True}, InvalidArgumentError),
        ({"n_samples": 2.5}, InvalidArgumentError),
        ({"n_samples": 4, "max_pass_rows": 0}, InvalidArgumentError),
        ({"n_samples": 4, "seed": -3}, InvalidArgumentError),
        ({"n_samples": 4, "prefix": "sometimes"}, InvalidArgumentError),
        ({"n_samples": 4, "seed": torch.tensor([1, 2])}, InvalidArgumentError),
    ],
)
def test_bad_arguments(mlp: nn.Module, x: Tensor, kwargs: dict, error: type) -> None:
    with pytest.raises(error):
        sample(mlp, x, **kwargs)


@pytest.mark.parametrize(
    "seeds",
    [
        lambda n: torch.full((n,), -1),  # an int seed must be in [0, 2**63 - 1]: so must each
        lambda n: torch.arange(n) - 1,
        lambda n: torch.ones(n),  # float
        lambda n: torch.ones(n, dtype=torch.bool),
    ],
)
@pytest.mark.parametrize("kept", [False, True])
def test_bad_per_row_seeds(
    mlp: nn.Module, x: Tensor, seeds: Callable[[int], Tensor], kept: bool
) -> None:
    kept_plan = plan(mlp, x) if kept else None
    with pytest.raises(InvalidArgumentError, match="seeds"):
        sample(mlp, x, 4, seed=seeds(x.shape[0]), plan=kept_plan)


@pytest.mark.parametrize("bad", [torch.empty(0, 4), torch.tensor([[float("nan")] * 4])])
def test_bad_inputs(mlp: nn.Module, bad: Tensor) -> None:
    with pytest.raises(InvalidInputError):
        sample(mlp, bad, 4, seed=0)
    with pytest.raises(InvalidInputError):
        predict(mlp, bad)


def test_concurrent_predict_and_sample_do_not_interfere(mlp: nn.Module) -> None:
    """The service runs requests in threads on one loaded model: a deterministic prediction must
    never see dropout switched on, and MC sampling must never see it off."""
    x = torch.randn(64, 4)
    modes = [m.training for m in mlp.modules()]
    assert _predict_beside_sample(mlp, x, predict(mlp, x), sample(mlp, x, 16, seed=4)) == []
    assert [m.training for m in mlp.modules()] == modes


def _predict_beside_sample(model: nn.Module, x: Tensor, want: Tensor, samples: Tensor) -> list[str]:
    """Two threads predicting ``x`` (150 times) beside two sampling it (16 samples, seed 4; 60
    times): what went wrong (a prediction other than ``want``, samples other than
    ``samples``)."""
    barrier = threading.Barrier(4)
    failures: list[str] = []

    def predictor() -> None:
        barrier.wait()
        for _ in range(150):
            if not torch.equal(predict(model, x), want):
                failures.append("a deterministic prediction saw dropout")
                return

    def sampler() -> None:
        barrier.wait()
        for _ in range(60):
            if not torch.equal(sample(model, x, 16, seed=4), samples):
                failures.append("MC samples changed beside deterministic predictions")
                return

    threads = [threading.Thread(target=f) for f in (predictor, predictor, sampler, sampler)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return failures


class InPlaceFirst(nn.Module):
    """A custom ``forward`` that writes into its input: ``(N, 4) -> (N, 2)``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)
        self.drop = nn.Dropout(0.2)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.drop(x.clamp_(min=0)))


@pytest.mark.parametrize(
    "factory",
    [
        lambda: nn.Sequential(nn.ReLU(inplace=True), nn.Dropout(0.2), nn.Linear(4, 2)),
        InPlaceFirst,
    ],
)
def test_predict_never_writes_into_the_callers_rows(factory: Callable[[], nn.Module]) -> None:
    # As sampling's passes: the model may write into its input, never into the caller's tensor.
    model = factory().eval()
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    before = x.clone()
    out = predict(model, x)
    assert torch.equal(x, before)
    assert torch.equal(out, model(before.clone()))


class DeepBatchNorm(nn.Module):
    """Thirty linear + BatchNorm layers before a dropout, in a custom ``forward``: ``(N, 8) ->
    (N, 2)``. Long passes with many flags to switch, so that concurrent calls overlap."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            *(m for _ in range(30) for m in (nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU()))
        )
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.drop(self.body(x)))


@pytest.mark.parametrize("chain", [False, True])  # a custom forward, or a plain layer chain
def test_concurrent_calls_leave_a_train_mode_model_as_it_was(chain: bool) -> None:
    """Each call switches a training model's modules to eval and back: another call at the same
    moment must not see them switched (and skip the switch), then run in training mode when the
    first restores them, updating BatchNorm's running statistics."""
    torch.manual_seed(0)
    model = DeepBatchNorm()
    net = nn.Sequential(*model.body, model.drop, model.head) if chain else model
    net.train()
    x = torch.randn(4, 8)
    kept = plan(net, x)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    expected = sample(net, x, 8, seed=1, plan=kept)
    barrier = threading.Barrier(4)
    failures: list[str] = []

    def call() -> None:
        barrier.wait()
        for _ in range(25):
            if not torch.allclose(sample(net, x, 8, seed=1, plan=kept), expected, atol=1e-5):
                failures.append("samples changed under concurrency")
            predict(net, x)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    assert all(m.training for m in net.modules())
    changed = [k for k, v in net.state_dict().items() if not torch.equal(v, state[k])]
    assert changed == []


def test_calls_inside_a_chunk_loop_on_a_train_mode_model_do_not_wait() -> None:
    """A ``sample_chunks`` loop holds a training model switched between its chunks: a call on
    the same model from inside the loop (the same thread) runs, rather than wait for the loop."""
    torch.manual_seed(0)
    model = DeepBatchNorm().train()
    x = torch.randn(3, 8)
    expected = predict(model, x)
    seen: list[Tensor] = []

    def loop() -> None:
        for _ in sample_chunks(model, x, 8, seed=1, max_pass_rows=6):
            seen.append(predict(model, x))
            seen.append(sample(model, x, 2, seed=1))

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive(), "a call inside the loop waited for the loop"
    assert len(seen) == 2 * 4
    assert all(torch.equal(p, expected) for p in seen[::2])
    assert all(m.training for m in model.modules())


MEMORY_SCRIPT = """
import torch
from torch import nn
from mcdrop.stats import RegressionAccumulator
from mcdrop.sampling import sample_chunks
torch.manual_seed(0)
torch.set_num_threads(1)  # steady under a loaded machine; memory is what is measured
model = nn.Sequential(nn.Linear(13, 50), nn.ReLU(), nn.Dropout(0.05), nn.Linear(50, 1)).eval()
x = torch.randn(1000, 13)
with open("/proc/self/clear_refs", "w") as f:  # reset the peak after imports (Linux >= 4.0)
    f.write("5")
acc = RegressionAccumulator(1000, 1, noise_variance=0.1)
for chunk in sample_chunks(model, x, 10_000, seed=0, max_pass_rows=65_536):
    acc.update(chunk.values, chunk.rows)
summary = acc.result()
assert summary.n_samples == 10_000 and bool((summary.epistemic_variance > 0).all())
with open("/proc/self/status") as f:
    print(next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) // 1024)
"""


@pytest.mark.slow
def test_ten_thousand_samples_of_a_thousand_rows_in_bounded_memory() -> None:
    """10M replicated rows would need ~2 GB of activations at once; chunks of 65,536 rows keep
    it to a few MB, and the statistics stream."""
    out = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT],
        capture_output=True,
        text=True,
        check=True,
        timeout=240,
    )
    peak_mib = int(out.stdout.strip())
    # The process's own baseline (torch loaded) is ~300 MiB; one pass would add ~6 GB.
    assert peak_mib < 600, f"peak RSS {peak_mib} MiB"


@pytest.mark.parametrize("first", [0, 7, 20])
def test_first_sample_continues_a_call_exactly(mlp: nn.Module, x: Tensor, first: int) -> None:
    whole = sample(mlp, x, 30, seed=4)
    rest = list(sample_chunks(mlp, x, 30 - first, seed=4, first_sample=first, max_pass_rows=40))
    got = torch.full_like(whole[first:], torch.nan)
    for c in rest:
        got[c.samples, c.rows] = c.values  # samples count from 0 within the call
    torch.testing.assert_close(got, whole[first:], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("first", [-1, 1.5, True, MAX_SEED - 2, MAX_SEED, 2**64])
@pytest.mark.parametrize("kept", [False, True])
def test_bad_first_sample(mlp: nn.Module, x: Tensor, first: object, kept: bool) -> None:
    """A first sample out of range (the last sample's index past MAX_SEED: 3 samples from
    MAX_SEED - 2 end at MAX_SEED + 1) is the same clear error with a kept plan (the fast
    pass's) or none."""
    given = plan(mlp, x) if kept else None
    with pytest.raises(InvalidArgumentError, match="first_sample"):
        list(sample_chunks(mlp, x, 3, seed=0, first_sample=first, plan=given))  # type: ignore[arg-type]


def test_the_last_sample_index_is_max_seed(mlp: nn.Module, x: Tensor) -> None:
    """Samples up to index MAX_SEED: the fast pass's and the general path's, the same."""
    first = MAX_SEED - 3
    kept = plan(mlp, x)
    fast = [c.values for c in sample_chunks(mlp, x, 3, seed=0, first_sample=first, plan=kept)]
    rows = x.clone().requires_grad_(True)  # (no fast pass takes rows that require grad)
    general = [c.values for c in sample_chunks(mlp, rows, 3, seed=0, first_sample=first)]
    assert all(torch.equal(f, g.detach()) for f, g in zip(fast, general, strict=True))


@pytest.mark.parametrize(
    ("values", "finite"),
    [
        ([1.0, -2.0], True),
        ([1.7e308, 1.7e308, -1.0], True),  # the sum overflows: each value is still finite
        ([-1.7e308, -1.7e308], True),
        ([1.0, float("inf")], False),
        ([float("-inf"), float("inf")], False),  # a NaN sum
        ([float("nan"), 1.0], False),
        ([1e300, float("nan")], False),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_all_finite(values: list[float], finite: bool, dtype: torch.dtype) -> None:
    from mcdrop.sampling import all_finite

    x = torch.tensor([values], dtype=torch.float64).to(dtype)  # float32: 1.7e308 is inf
    expected = bool(torch.isfinite(x).all())  # the reference
    if dtype == torch.float64:
        assert expected is finite
    assert all_finite(x) is expected
    assert all_finite(-x) is expected  # a view with the negative bit


@pytest.mark.parametrize(
    ("drop", "shape"),
    [(nn.Dropout1d, (4, 3, 5)), (nn.Dropout2d, (4, 3, 5, 6)), (nn.Dropout3d, (4, 3, 2, 5, 6))],
)
def test_channel_dropout_of_replicated_rows_is_one_broadcast_product(
    drop: type[nn.Module], shape: tuple[int, ...]
) -> None:
    """Channel dropout on the rows of a shared prefix multiplies the N rows by the multipliers
    of all samples, broadcast, in one product: the same samples, bit for bit, as replicating the
    rows and then multiplying (what a non-contiguous input, the same values, still does)."""
    torch.manual_seed(0)
    model = nn.Sequential(drop(0.3), nn.Flatten(), nn.Linear(math.prod(shape[1:]), 3)).eval()
    x = torch.randn(*shape)
    channels_last = [0, *range(2, x.dim()), 1]
    strided = x.permute(*channels_last).contiguous().permute(0, x.dim() - 1, *range(1, x.dim() - 1))
    assert torch.equal(strided, x)
    assert not strided.is_contiguous()
    assert plan(model, x).prefix  # the first call multiplies the rows of a shared prefix
    samples = sample(model, x, 20, seed=4)
    assert torch.equal(samples, sample(model, strided, 20, seed=4))
    assert samples.var(0).min() > 0


# importing torch._dynamo (torch.compile) warns of torch.jit.script_method
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("own_forward", [False, True])
def test_a_compiled_model_samples_as_its_original_module(own_forward: bool, mlp: nn.Module) -> None:
    # torch.compile's wrapper: compiled code cannot make per-row masks (dynamo traced the
    # sampler's NumPy and raised an AssertionError), so the wrapped module is sampled.
    torch.manual_seed(0)
    model = Residual().eval() if own_forward else mlp
    compiled = torch.compile(model)
    x = torch.randn(3, 4)
    want = sample(model, x, 8, seed=1, plan=plan(model, x))
    assert torch.equal(sample(compiled, x, 8, seed=1), want)
    assert torch.equal(sample(compiled, x, 8, seed=1, plan=plan(compiled, x)), want)
    assert torch.equal(sample(model, x, 8, seed=1, plan=plan(compiled, x)), want)
    chunks = list(sample_chunks(compiled, x, 8, seed=1, max_pass_rows=12))
    assert torch.equal(torch.cat([c.values for c in chunks]), want)


def _always_drops(drop: str, always: bool = True) -> nn.Module:
    torch.manual_seed(0)  # the same weights for a model and its twin
    return AlwaysDrops(drop=drop, always=always).eval()


class _Stream(nn.Module):
    """A model that keeps state between calls (a stream's running sum of its inputs)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5))
        self.register_buffer("total", torch.zeros(3))

    def forward(self, x: Tensor) -> Tensor:
        self.total = self.total + x.sum(0)
        return self.layer(x) + self.total


@pytest.mark.parametrize("drop", [None, "F.dropout"])
def test_predict_runs_a_models_forward_once(drop: str | None) -> None:
    """Finding out whether an eval pass drops takes no pass of its own: a forward that keeps
    state, or a hook, runs once per prediction, the first one too."""
    torch.manual_seed(0)
    model = _Stream() if drop is None else AlwaysDrops(drop=drop)
    calls: list[int] = []
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    for n in (1, 2, 3):
        predict(model, x)
        assert len(calls) == n
    if isinstance(model, _Stream):  # its first answer: its state advanced once
        fresh, twin = _fresh_stream(model), _fresh_stream(model)
        assert torch.equal(predict(fresh, x), twin.eval()(x))


def _fresh_stream(model: _Stream) -> _Stream:
    """A new stream with ``model``'s weights and its running sum at 0."""
    fresh = _Stream()
    fresh.load_state_dict(model.state_dict())
    fresh.total.zero_()
    return fresh


@pytest.mark.parametrize("drop", sorted(DROPS))
def test_predict_of_a_model_that_drops_in_eval_is_its_twins_without_dropout(drop: str) -> None:
    """A forward that drops in any mode (MC-dropout style ``F.dropout(h, p, training=True)``):
    deterministic prediction turns those calls off, as eval mode does for the twin that passes
    ``self.training``, bit for bit and on every call (the first finds out, the rest know)."""
    model, twin = _always_drops(drop), _always_drops(drop, always=False)
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(model(x), model(x))  # its own eval pass drops
    want = twin(x)
    for _ in range(3):
        assert torch.equal(predict(model, x), want)
    assert torch.equal(predict(model, x[2:3]), twin(x[2:3]))
    assert torch.equal(predict(twin, x), want)


def _rows(*shape: int, dtype: torch.dtype = torch.float32) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(5), dtype=dtype)


#: A forward that drops in eval mode for some inputs only (``when``), and inputs it does not drop
#: for, then inputs it drops for: ``(N, L, 3)``.
_SOME_INPUTS: dict[str, tuple[Callable[[Tensor], bool], Tensor, Tensor]] = {
    "batch size": (lambda x: x.shape[0] > 1, _rows(1, 4, 3), _rows(4, 4, 3)),
    "row shape": (lambda x: x.shape[1] > 16, _rows(4, 8, 3), _rows(4, 20, 3)),
    "dtype": (
        lambda x: x.dtype == torch.float64,
        _rows(4, 4, 3),
        _rows(4, 4, 3, dtype=torch.float64),
    ),
}


@pytest.mark.parametrize("case", sorted(_SOME_INPUTS))
def test_predict_of_a_model_that_drops_in_eval_for_some_inputs_only(case: str) -> None:
    """Whether an eval pass drops is found per input key (the batch's size, its rows' shape and
    dtype), not once per model: a first prediction of inputs the forward does not drop for
    leaves those it drops for deterministic, its twin's without the dropout."""
    when, first, then = _SOME_INPUTS[case]
    torch.manual_seed(0)
    model = DropsFor(when).eval()
    torch.manual_seed(0)
    twin = DropsFor(never).eval()
    assert torch.equal(predict(model, first), twin(first))  # found: drops nothing for these
    assert not torch.equal(model(then), model(then))  # its own eval pass drops for these
    for _ in range(3):
        assert torch.equal(predict(model, then), twin(then))
    assert torch.equal(predict(model, first), twin(first))


def test_a_model_that_never_drops_in_eval_runs_its_plain_pass_for_each_input_key() -> None:
    """The first prediction of each input key runs the model once, watched; every later one of
    a key seen runs its plain eval pass, once, with nothing watching."""
    model = Watched().eval()
    inputs = [_rows(n, 3) for n in (1, 4, 2)]
    for x in inputs:
        predict(model, x)
    assert model.watched == [True] * 3
    for x in inputs * 2:
        predict(model, x)
    assert model.watched[3:] == [False] * 6


@pytest.mark.parametrize("drop", sorted(set(DROPS) - {"scaled_dot_product_attention"}))
def test_sampling_a_model_that_drops_in_eval_is_unchanged_by_predict(drop: str) -> None:
    """Sampling makes every dropout call stochastic, ``training=True`` or not: the model's
    samples are its twin's, bit for bit, before and after deterministic predictions (the twin's
    attention passes no rate in eval mode, so it has no twin here)."""
    model, twin = _always_drops(drop), _always_drops(drop, always=False)
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    before = sample(model, x, 16, seed=3)
    assert torch.equal(before, sample(twin, x, 16, seed=3))
    assert bool((before.var(0) > 0).any())
    predict(model, x)
    assert torch.equal(sample(model, x, 16, seed=3), before)
    plan_cache.forget(model)
    assert torch.equal(sample(model, x, 16, seed=3), before)
    assert torch.equal(predict(model, x), twin(x))


def test_a_model_changed_to_drop_in_eval_is_found_when_its_plans_are_made_anew() -> None:
    """Whether an eval pass drops is found at the first prediction and kept beside the model's
    plans: a model changed since is found anew where they are (a sampling call that finds the
    model changed; plan_cache.forget)."""
    model, twin = _always_drops("F.dropout", always=False), _always_drops("F.dropout", False)
    x = torch.randn(3, 3, generator=torch.Generator().manual_seed(2))
    assert torch.equal(predict(model, x), twin(x))  # found: drops nothing
    model.always = True  # an attribute of the user's own module: the kept plans' check sees it
    sample(model, x, 4, seed=0)
    assert torch.equal(predict(model, x), twin(x))
    model.always = False  # found to drop, checked on every call as a kept plan is
    assert torch.equal(predict(model, x), twin(x))
    model.always = True
    plan_cache.forget(model)
    assert torch.equal(predict(model, x), twin(x))


def test_predict_of_a_model_that_drops_in_eval_beside_routed_sampling_passes() -> None:
    """Sampling passes on other threads route torch.nn.functional.dropout for the whole process
    (mcdrop.routing): a deterministic prediction meanwhile finds the route in F.dropout's place,
    and still turns the call off."""
    model, twin = _always_drops("F.dropout"), _always_drops("F.dropout", always=False)
    x = torch.randn(32, 3, generator=torch.Generator().manual_seed(3))
    want, want_samples = twin(x), sample(model, x, 16, seed=4)
    routes = plan(model, x).routes  # its F.dropout is routed while its passes run
    assert routes is not None
    assert routes.functions
    assert _predict_beside_sample(model, x, want, want_samples) == []
