"""Devices and dtypes: names, loading onto a device, sampling where the model is.

Without a GPU, sampling runs on the ``meta`` device, which holds shapes but no values: a pass
that read anything back to the host (``.item()``, ``bool(t)``, ``.tolist()``, ``.cpu()``,
NumPy) or mixed in a tensor from another device would fail there, so these tests show that
sampling stays on the model's device with no host-device synchronisation between passes. With a
GPU, the tests marked ``cuda`` check the same with ``torch.cuda.set_sync_debug_mode("error")``
and compare CUDA results with the CPU's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

import pytest
import torch
from torch import Tensor, nn

import mcdrop
from mcdrop import cuda_graphs, masks, planning, sampling
from mcdrop.devices import first_parameter_path, model_device, resolve_device, resolve_dtype
from mcdrop.exceptions import InvalidArgumentError
from mcdrop.nets import CNN, MLP, ReducedPrecision, RowLSTM
from mcdrop.predictor import Predictor, to_device
from mcdrop.stats import ClassificationSummary
from tests.conftest import MODELS

CUDA = torch.cuda.is_available()
cuda = pytest.mark.skipif(not CUDA, reason="no CUDA GPU")
#: torch warns, once, that its sync debug mode is a prototype: not this suite's concern.
sync_debug = pytest.mark.filterwarnings("ignore:Synchronization debug mode:UserWarning")


class Encoder(nn.Module):
    """A transformer encoder classifier ``(N, 6, 16) -> (N, 3)``: attention dropout too."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.2, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(x).mean(1))


class WeightsReturned(nn.Module):
    """Attention that returns its weights: the general (dispatch-mode) attention path."""

    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(8, 2, dropout=0.3, batch_first=True)
        self.head = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        out, weights = self.attention(x, x, x, need_weights=True)
        return self.head(out.mean(1)) + weights.sum((1, 2))[:, None]  # (N, 2)


def _models() -> dict[str, tuple[nn.Module, tuple[int, ...]]]:
    torch.manual_seed(0)
    return {
        "mlp": (MLP(4, [16, 16], 3, dropout=0.3, input_dropout=0.1), (4,)),
        "alpha": (MLP(4, [16], 3, dropout=0.3, kind="alpha"), (4,)),
        "dropconnect": (MLP(4, [16], 3, dropout=0.3, kind="dropconnect"), (4,)),
        "cnn": (CNN(channels=(4, 8, 8)), (1, 28, 28)),
        "encoder": (Encoder(), (6, 16)),
        "attention weights": (WeightsReturned(), (5, 8)),
        "locked": (RowLSTM(8, 16, 3), (5, 8)),
    }


MODEL_NAMES = list(_models())


# -- names ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "expected"), [("cpu", "cpu"), (" CPU ", "cpu")])
def test_device_names(name: str, expected: str) -> None:
    assert resolve_device(name) == torch.device(expected)


def test_auto_takes_a_gpu_only_where_there_is_one() -> None:
    assert resolve_device("auto") == torch.device("cuda" if CUDA else "cpu")


@pytest.mark.parametrize("name", ["gpu", "tpu", "cuda:", "cuda:-1", "cuda0", "", "cpu:0"])
def test_unknown_device_names_say_what_to_give(name: str) -> None:
    with pytest.raises(InvalidArgumentError, match="give one of cpu, cuda, cuda:N, auto"):
        resolve_device(name)


@pytest.mark.skipif(CUDA, reason="this machine has a GPU")
@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:1"])
def test_cuda_without_a_gpu_is_refused_with_the_reason(name: str) -> None:
    with pytest.raises(InvalidArgumentError, match=r"needs a CUDA GPU, but .*use cpu, or auto"):
        resolve_device(name)
    with pytest.raises(InvalidArgumentError, match="needs a CUDA GPU"):
        resolve_device(torch.device(name))


@cuda
def test_a_gpu_index_past_the_last_is_refused() -> None:
    count = torch.cuda.device_count()
    assert resolve_device(f"cuda:{count - 1}") == torch.device(f"cuda:{count - 1}")
    with pytest.raises(InvalidArgumentError, match=f"sees {count} GPU"):
        resolve_device(f"cuda:{count}")


def test_other_torch_devices_pass_through() -> None:
    assert resolve_device(torch.device("meta")) == torch.device("meta")


@pytest.mark.parametrize(
    ("name", "dtype"),
    [("float32", torch.float32), ("bfloat16", torch.bfloat16), ("Float16", torch.float16)],
)
def test_dtype_names(name: str, dtype: torch.dtype) -> None:
    assert resolve_dtype(name) is dtype
    assert resolve_dtype(dtype) is dtype


@pytest.mark.parametrize("name", ["float64", "int8", "half precision", torch.int64])
def test_unknown_dtypes_are_refused(name: object) -> None:
    with pytest.raises(InvalidArgumentError, match="give one of float32, bfloat16, float16"):
        resolve_dtype(name)  # type: ignore[arg-type]


def test_model_device_is_its_first_parameters_or_buffers() -> None:
    assert model_device(nn.Linear(2, 2).to("meta")) == torch.device("meta")
    bn = nn.BatchNorm1d(2, affine=False).to("meta")  # buffers only
    assert model_device(bn) == torch.device("meta")
    assert model_device(nn.Dropout()) == torch.device("cpu")


class Unplaced(nn.Module):
    """A parameter ``None`` before a real one (``register_parameter(name, None)``)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_parameter("scale", None)
        self.shift = nn.Parameter(torch.zeros(2))


@pytest.mark.parametrize(
    "make",
    [
        lambda: nn.Linear(2, 2),
        lambda: nn.Sequential(nn.ReLU(), nn.Sequential(nn.Identity(), nn.Linear(2, 2))),
        lambda: nn.Sequential(nn.Sequential(nn.Dropout()), nn.Linear(2, 2, bias=False)),
        lambda: nn.Sequential(nn.LayerNorm(2, elementwise_affine=False), nn.Linear(2, 2)),
        lambda: nn.Sequential(nn.Identity(), Unplaced()),
        lambda: nn.BatchNorm1d(2, affine=False),
        lambda: nn.Dropout(),
    ],
)
def test_the_first_parameter_path_leads_to_model_devices_parameter(
    make: Callable[[], nn.Module],
) -> None:
    """The way the plan cache reads a model's device: the modules walked have no parameter, the
    last one's first entry is the first parameter; or no way, where the walk meets a None entry
    first or finds no parameter (the cache then reads model_device)."""
    model = make()
    path = first_parameter_path(model)
    walked = list(model.modules())  # (model_device's order)
    holder = next((i for i, m in enumerate(walked) if m._parameters), None)
    if holder is None or next(iter(walked[holder]._parameters.values())) is None:
        assert path is None
        return
    assert path == walked[: holder + 1]
    assert next(iter(path[-1]._parameters.values())) is next(model.parameters())


# -- loading --------------------------------------------------------------------------------------


@pytest.mark.skipif(CUDA, reason="this machine has a GPU")
def test_loading_onto_a_missing_gpu_fails_before_reading_the_directory(tmp_path) -> None:
    with pytest.raises(InvalidArgumentError, match="needs a CUDA GPU"):
        mcdrop.load(tmp_path / "nothing here", device="cuda")
    with pytest.raises(InvalidArgumentError, match="needs a CUDA GPU"):
        Predictor(mcdrop.load(MODELS / "digits"), device="cuda")


def test_load_onto_a_device_and_a_dtype() -> None:
    loaded = mcdrop.load(MODELS / "diabetes", device=torch.device("meta"), dtype="bfloat16")
    assert model_device(loaded.module) == torch.device("meta")
    wrapped = [m for m in loaded.module.modules() if isinstance(m, ReducedPrecision)]
    assert len(wrapped) == 1
    # Normalisation stays float32 around the bfloat16 network.
    assert loaded.module.input_mean.dtype == torch.float32
    assert {p.dtype for p in wrapped[0].parameters()} == {torch.bfloat16}


# -- sampling where the model is ------------------------------------------------------------------


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_sampling_stays_on_the_models_device(name: str) -> None:
    """Many passes on a device with no values: nothing is read back, nothing comes from the host
    but the inputs and keys, moved once."""
    model, shape = _models()[name]
    x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(0))
    kept = mcdrop.plan(model.eval(), x)  # planning reads values: on the CPU
    model.to("meta")
    chunks = list(sampling.sample_chunks(model, x, 16, seed=3, max_pass_rows=6, plan=kept))
    assert len(chunks) == 8
    assert {chunk.values.device.type for chunk in chunks} == {"meta"}
    assert sampling.sample(model, x, 6, seed=3, plan=kept).device.type == "meta"
    assert sampling.predict(model, x).device.type == "meta"


@pytest.mark.parametrize("name", ["digits", "diabetes", "fashion"])
def test_a_predictor_accumulates_on_the_models_device(name: str) -> None:
    loaded = mcdrop.load(MODELS / name)
    predictor = Predictor(loaded, max_pass_rows=64)
    x = torch.zeros(7, *loaded.spec.input_shape)
    predictor.warm_up(x)
    predictor.model.module.to("meta")
    assert predictor.device == torch.device("meta")
    summary, samples = predictor.uncertainty(
        x, 40, seed=1, return_samples=True, check_outputs=False
    )
    assert samples is not None
    assert samples.device.type == "meta"
    assert summary.n_samples == 40
    for value in vars(summary).values():
        if isinstance(value, Tensor):
            assert value.device.type == "meta"
            assert value.dtype in (torch.float32, torch.int64)
    prediction = predictor.predict(x, check_outputs=False)
    assert {v.device.type for v in vars(prediction).values()} == {"meta"}


def test_the_torch_masks_give_the_numpys_samples_on_the_cpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model, shape = _models()["cnn"]
    x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(0))
    expected = sampling.sample(model.eval(), x, 12, seed=5, max_pass_rows=8)
    monkeypatch.setattr(masks, "CPU_BACKEND", "torch")
    assert torch.equal(sampling.sample(model, x, 12, seed=5, max_pass_rows=8), expected)


def test_results_come_back_in_one_copy_per_dtype() -> None:
    summary = ClassificationSummary(
        probabilities=torch.rand(3, 4),
        variance=torch.rand(3, 4),
        label=torch.tensor([0, 3, 1]),
        entropy=torch.rand(3),
        expected_entropy=torch.rand(3),
        mutual_information=torch.rand(3),
        variation_ratio=torch.rand(3),
        n_samples=9,
        row_n_samples=torch.full((3,), 9),
    )
    samples = torch.rand(9, 3, 4)
    same, same_samples = to_device(summary, samples, torch.device("cpu"))
    assert same is summary
    assert same_samples is samples
    moved, moved_samples = to_device(summary, samples, torch.device("meta"))
    assert moved_samples is not None
    assert moved_samples.device.type == "meta"
    assert moved_samples.shape == samples.shape
    assert moved.n_samples == 9
    for name, value in vars(summary).items():
        if isinstance(value, Tensor):
            got = getattr(moved, name)
            assert (got.device.type, got.shape, got.dtype) == ("meta", value.shape, value.dtype)


def test_a_predictor_returns_results_where_asked() -> None:
    loaded = mcdrop.load(MODELS / "digits")
    predictor = Predictor(loaded, results_device="cpu")
    x = torch.rand(2, 64) * 16
    expected, _ = Predictor(mcdrop.load(MODELS / "digits")).uncertainty(x, 10, seed=0)
    summary, _ = predictor.uncertainty(x, 10, seed=0)
    assert torch.equal(summary.probabilities, expected.probabilities)


# -- reduced precision ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["digits", "diabetes", "fashion"])
def test_bfloat16_is_close_to_float32_with_float32_statistics(name: str) -> None:
    """Same seed, same masks (row keys are hashed from the float32 inputs): the statistics
    differ only by the network's rounding, and stay float32."""
    full = Predictor(mcdrop.load(MODELS / name))
    half = Predictor(mcdrop.load(MODELS / name, dtype="bfloat16"))
    norm = full.spec.input_normalization
    assert norm is not None
    generator = torch.Generator().manual_seed(0)
    x = torch.tensor(norm.mean) + torch.randn(6, *full.spec.input_shape, generator=generator) * (
        torch.tensor(norm.std)
    )
    a, _ = full.uncertainty(x, 50, seed=1)
    b, samples = half.uncertainty(x, 50, seed=1, return_samples=True)
    assert samples is not None
    assert samples.dtype == torch.float32
    for field, value in vars(a).items():
        if not isinstance(value, Tensor) or not value.is_floating_point():
            continue
        got = getattr(b, field)
        assert got.dtype == torch.float32
        # bfloat16 keeps 8 bits: about 0.4 % of each activation. A vote can flip where two
        # classes are near: the variation ratio may move by a vote or two of 50.
        atol = 2 / 50 if field == "variation_ratio" else 0.02 * value.abs().max().item()
        assert torch.allclose(got, value, rtol=0.02, atol=atol), field
    if full.spec.task == "classification":
        assert torch.equal(b.label, a.label)  # type: ignore[union-attr]


def test_reduced_precision_is_float32_in_and_out() -> None:
    net = ReducedPrecision(nn.Sequential(nn.Linear(3, 2), nn.Dropout(0.5)), torch.bfloat16)
    out = net.eval()(torch.randn(4, 3))
    assert out.dtype == torch.float32
    samples = sampling.sample(net, torch.randn(4, 3), 5, seed=0)
    assert samples.dtype == torch.float32
    # The masks are the float32 model's: the same units drop.
    reference = nn.Sequential(nn.Linear(3, 2), nn.Dropout(0.5)).eval()
    reference.load_state_dict({k: v.float() for k, v in net.net.state_dict().items()})
    x = torch.randn(4, 3)
    zeros = sampling.sample(net, x, 30, seed=2) == 0
    assert torch.equal(zeros, sampling.sample(reference, x, 30, seed=2) == 0)


# -- on a GPU -------------------------------------------------------------------------------------


@pytest.fixture
def exact_float32() -> Iterator[None]:
    """Full float32 on the GPU: cuDNN convolutions default to TF32, whose 10-bit mantissa would
    hide a small difference in the masks under rounding."""
    kept = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = kept


@cuda
@pytest.mark.usefixtures("exact_float32")
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_cuda_samples_match_the_cpus(name: str) -> None:
    model, shape = _models()[name]
    x = torch.randn(5, *shape, generator=torch.Generator().manual_seed(0))
    expected = sampling.sample(model.eval(), x, 16, seed=4, max_pass_rows=32)
    got = sampling.sample(model.to("cuda"), x, 16, seed=4, max_pass_rows=32)
    assert got.device.type == "cuda"
    # Same masks; the kernels round differently.
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-3, atol=1e-4)


@cuda
def test_cuda_masks_drop_the_same_units_as_the_cpus() -> None:
    model = nn.Sequential(nn.Dropout(0.3), nn.Dropout2d(0.5)).eval()
    x = torch.rand(4, 6, 3, 3) + 1
    expected = sampling.sample(model, x, 20, seed=9)
    assert torch.equal(sampling.sample(model.to("cuda"), x, 20, seed=9).cpu(), expected)


@cuda
@sync_debug
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_no_host_device_sync_between_passes_on_cuda(name: str) -> None:
    model, shape = _models()[name]
    model.to("cuda").eval()
    x = torch.randn(6, *shape, generator=torch.Generator().manual_seed(0))
    kept = mcdrop.plan(model, x)
    chunks = sampling.sample_chunks(model, x, 32, seed=0, max_pass_rows=16, plan=kept)
    next(chunks)  # inputs and keys move to the GPU here, once
    torch.cuda.set_sync_debug_mode("error")
    try:
        rest = list(chunks)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(rest) >= 10


@cuda
@sync_debug
@pytest.mark.usefixtures("exact_float32")
@pytest.mark.parametrize("name", ["digits", "diabetes", "fashion"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_cuda_predictor_matches_the_cpus_and_syncs_only_at_the_end(name: str, dtype: str) -> None:
    cpu = Predictor(mcdrop.load(MODELS / name, dtype=dtype), max_pass_rows=64)
    gpu = Predictor(mcdrop.load(MODELS / name, dtype=dtype), device="cuda", max_pass_rows=64)
    x = torch.zeros(8, *cpu.spec.input_shape)
    gpu.warm_up(x)
    passes = 0

    def stop() -> bool:  # called before every pass: from the second on, a sync is an error
        nonlocal passes
        passes += 1
        if passes == 2:
            torch.cuda.set_sync_debug_mode("error")
        return False

    try:
        summary, samples = gpu.uncertainty(
            x, 64, seed=2, return_samples=True, stop=stop, check_outputs=False
        )
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert passes >= 8
    expected, expected_samples = cpu.uncertainty(x, 64, seed=2, return_samples=True)
    moved, moved_samples = to_device(summary, samples, torch.device("cpu"))
    tolerance = {"rtol": 1e-3, "atol": 1e-4} if dtype == "float32" else {"rtol": 0.02, "atol": 0.02}
    for field, value in vars(expected).items():
        if isinstance(value, Tensor) and value.is_floating_point():
            scale = max(1.0, value.abs().max().item()) if dtype == "bfloat16" else 1.0
            torch.testing.assert_close(
                getattr(moved, field),
                value,
                rtol=tolerance["rtol"],
                atol=tolerance["atol"] * scale,
            )
    assert moved_samples is not None
    assert expected_samples is not None
    assert moved_samples.shape == expected_samples.shape


def test_passes_are_cut_to_the_cpus_caches_only_on_the_cpu() -> None:
    model, shape = _models()["cnn"]
    kept = mcdrop.plan(model.eval(), torch.randn(2, *shape))
    assert kept.budget_bytes == planning.ACTIVATION_BUDGET
    assert "fit the 16 MiB budget" in repr(kept)


@cuda
def test_passes_on_a_gpu_are_bounded_by_max_rows() -> None:
    model, shape = _models()["cnn"]
    kept = mcdrop.plan(model.to("cuda").eval(), torch.randn(2, *shape))
    assert kept.budget_bytes == planning.DEVICE_ACTIVATION_BUDGET
    assert kept.pass_rows(32, 100, 8192, prefix=kept.prefix) == 8192


# -- CUDA graphs and pass sizes on a GPU ---------------------------------------------------------


def test_plans_keep_graphs_only_on_cuda() -> None:
    model, shape = _models()["mlp"]
    assert mcdrop.plan(model.eval(), torch.randn(2, *shape)).graphs is None


def test_passes_on_the_cpu_keep_the_default_row_bound() -> None:
    model = MLP(4, [8], 2, dropout=0.3).eval()
    x = torch.randn(100, 4)
    chunks = list(sampling.sample_chunks(model, x, 200, seed=0, prefix="off"))
    assert (
        max(c.values.shape[0] * c.values.shape[1] for c in chunks) <= sampling.DEFAULT_MAX_PASS_ROWS
    )


@cuda
def test_passes_on_a_gpu_are_bounded_by_the_activation_budget_alone() -> None:
    model = MLP(13, [50], 1, dropout=0.05).to("cuda").eval()
    x = torch.randn(32, 13)
    kept = mcdrop.plan(model, x)
    chunks = list(sampling.sample_chunks(model, x, 10_000, seed=0, plan=kept))
    assert len(chunks) == 1  # 320,000 rows of 200 bytes: far within the 1 GiB budget
    bounded = list(sampling.sample_chunks(model, x, 10_000, seed=0, plan=kept, max_pass_rows=8192))
    assert len(bounded) == 40
    torch.testing.assert_close(
        torch.cat([c.values for c in bounded]), chunks[0].values, rtol=1e-5, atol=1e-6
    )


@pytest.fixture
def graphs_off(monkeypatch: pytest.MonkeyPatch) -> Callable[[], AbstractContextManager[None]]:
    """``with graphs_off():`` runs every pass eagerly (``cuda_graphs.ENABLED`` is False)."""

    @contextmanager
    def off() -> Iterator[None]:
        with monkeypatch.context() as patch:
            patch.setattr(cuda_graphs, "ENABLED", False)
            yield

    return off


@cuda
@pytest.mark.usefixtures("exact_float32")
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_kept_plans_replay_cuda_graphs_with_the_eager_samples(
    name: str, graphs_off: Callable[[], AbstractContextManager[None]]
) -> None:
    model, shape = _models()[name]
    model.to("cuda").eval()
    x = torch.randn(5, *shape, generator=torch.Generator().manual_seed(0))
    kept = mcdrop.plan(model, x)
    assert kept.graphs is not None
    with graphs_off():
        eager = [sampling.sample(model, x, 16, seed=seed, plan=kept) for seed in (1, 2)]
    assert kept.graphs.captures == 0
    graphed = [sampling.sample(model, x, 16, seed=seed, plan=kept) for seed in (1, 2, 1)]
    assert kept.graphs.captures == 1  # one shape, captured once, replayed since
    for got, expected in zip(graphed, [*eager, eager[0]], strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    assert not torch.equal(graphed[0], graphed[1])  # the keys reach the graph
    assert graphed[0].data_ptr() != graphed[2].data_ptr()  # each call gets its own output


@cuda
def test_graphed_masks_drop_the_same_units_as_the_cpus() -> None:
    model = nn.Sequential(nn.Dropout(0.3), nn.Dropout2d(0.5)).eval()
    model.register_buffer("anchor", torch.zeros(()))  # moves with the model: its device
    x = torch.rand(4, 6, 3, 3) + 1
    expected = sampling.sample(model, x, 20, seed=9)
    model.to("cuda")
    kept = mcdrop.plan(model, x)
    for _ in range(2):
        assert torch.equal(sampling.sample(model, x, 20, seed=9, plan=kept).cpu(), expected)
    assert kept.graphs is not None
    assert kept.graphs.captures == 1


def _graphed_mlp() -> tuple[nn.Sequential, Tensor, planning.SamplingPlan]:
    """``(N, 4) -> (N, 2)`` with one dropout, on the GPU, three rows and its kept plan."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 2))
    model.to("cuda").eval()
    x = torch.randn(3, 4)
    return model, x, mcdrop.plan(model, x)


@cuda
@pytest.mark.usefixtures("exact_float32")
def test_a_graph_follows_the_models_weights_and_rates(
    graphs_off: Callable[[], AbstractContextManager[None]],
) -> None:
    model, x, kept = _graphed_mlp()
    assert kept.graphs is not None

    def both() -> tuple[Tensor, Tensor]:
        got = sampling.sample(model, x, 8, seed=0, plan=kept)
        with graphs_off():
            return got, sampling.sample(model, x, 8, seed=0, plan=kept)

    first, _ = both()
    with torch.no_grad():
        model[3].weight.mul_(2)  # in place, as load_state_dict and optimisers update
    got, expected = both()
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(got, first)
    assert kept.graphs.captures == 1
    model[3].weight = nn.Parameter(model[3].weight.detach() * 3)  # another tensor
    got, expected = both()
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    assert kept.graphs.captures == 2
    model[2].p = 0.6  # another rate
    got, expected = both()
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    assert kept.graphs.captures == 3


@cuda
def test_graphs_are_kept_for_a_few_shapes_and_small_passes_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = MLP(4, [16], 3, dropout=0.3).to("cuda").eval()
    kept = mcdrop.plan(model, torch.randn(2, 4))
    assert kept.graphs is not None
    sampling.sample(model, torch.randn(50, 4), 10, seed=0, plan=kept)
    assert kept.graphs.captures == 0  # a shape seen once runs eagerly
    for n in range(1, cuda_graphs.MAX_GRAPHS + 4):
        for _ in range(cuda_graphs.CAPTURE_ON_PASS):
            sampling.sample(model, torch.randn(n, 4), 10, seed=0, plan=kept)
        assert len(kept.graphs) <= cuda_graphs.MAX_GRAPHS
    assert kept.graphs.captures == cuda_graphs.MAX_GRAPHS + 3
    sampling.sample(model, torch.randn(1, 4), 10, seed=0, plan=kept)  # evicted, seen anew
    assert kept.graphs.captures == cuda_graphs.MAX_GRAPHS + 3
    sampling.sample(model, torch.randn(1, 4), 10, seed=0, plan=kept)
    assert kept.graphs.captures == cuda_graphs.MAX_GRAPHS + 4
    monkeypatch.setattr(cuda_graphs, "MAX_CAPTURES", kept.graphs.captures)  # no more
    for _ in range(3):
        sampling.sample(model, torch.randn(40, 4), 10, seed=0, plan=kept)
    assert kept.graphs.captures == cuda_graphs.MAX_GRAPHS + 4
    monkeypatch.setattr(cuda_graphs, "GRAPH_BYTES", 0)  # every pass is "large"
    for _ in range(3):
        sampling.sample(model, torch.randn(60, 4), 10, seed=0, plan=kept)
    assert kept.graphs.captures == cuda_graphs.MAX_GRAPHS + 4


class ReadsBack(nn.Module):
    """A model whose pass reads a value back to the host: no graph can hold it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 8)
        self.drop = nn.Dropout(0.3)
        self.out = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.drop(self.fc(x))
        if h.sum() > 1e30:  # a synchronisation, in a capture an error
            h = h * 0
        return self.out(h)


@cuda
def test_a_pass_that_cannot_be_captured_runs_eagerly_and_leaves_cuda_working(
    graphs_off: Callable[[], AbstractContextManager[None]],
) -> None:
    torch.manual_seed(0)
    model = ReadsBack().to("cuda").eval()
    x = torch.randn(3, 4)
    kept = mcdrop.plan(model, x)
    assert kept.graphs is not None
    with graphs_off():
        expected = sampling.sample(model, x, 8, seed=1, plan=kept)
    sampling.sample(model, x, 8, seed=1, plan=kept)  # the first pass of its shape: eager
    with pytest.warns(RuntimeWarning, match="could not be captured as a CUDA graph"):
        got = sampling.sample(model, x, 8, seed=1, plan=kept)
    assert kept.graphs.failed is not None
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    for n in (3, 5, 7):  # no more attempts, no more warnings (they are errors here)
        sampling.sample(model, torch.randn(n, 4), 8, seed=1, plan=kept)
    assert kept.graphs.captures == 0
    # torch's own CUDA random numbers still work after the failed capture.
    assert torch.randn(5, device="cuda").isfinite().all()
    assert nn.functional.dropout(torch.ones(64, device="cuda"), 0.5, training=True).sum() > 0


@cuda
@pytest.mark.usefixtures("exact_float32")
def test_a_graph_follows_replaced_submodules_and_steps_aside_for_autocast(
    graphs_off: Callable[[], AbstractContextManager[None]],
) -> None:
    model, x, kept = _graphed_mlp()
    assert kept.graphs is not None
    for _ in range(3):
        sampling.sample(model, x, 8, seed=0, plan=kept)
    assert kept.graphs.captures == 1
    model[3] = nn.Linear(8, 2).to("cuda")  # another submodule, as a user might swap a head
    for _ in range(3):  # (the layer chain no longer runs it: a new pass shape, captured anew)
        got = sampling.sample(model, x, 8, seed=0, plan=kept)
    with graphs_off():
        expected = sampling.sample(model, x, 8, seed=0, plan=kept)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    assert kept.graphs.captures == 2
    with torch.autocast("cuda", dtype=torch.bfloat16):  # eager: no graph under autocast
        for _ in range(3):
            got = sampling.sample(model, x, 8, seed=0, plan=kept)
        with graphs_off():
            expected = sampling.sample(model, x, 8, seed=0, plan=kept)
    assert got.dtype == expected.dtype
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert kept.graphs.captures == 2


def test_the_activation_budget_follows_the_device() -> None:
    assert planning.activation_budget(torch.device("cpu")) == planning.ACTIVATION_BUDGET
    assert planning.activation_budget(torch.device("meta")) == planning.DEVICE_ACTIVATION_BUDGET
    if CUDA:  # 1 GiB, or a 32nd of the GPU's memory where that is less
        budget = planning.activation_budget(torch.device("cuda"))
        memory = torch.cuda.get_device_properties(0).total_memory
        assert budget == min(planning.DEVICE_ACTIVATION_BUDGET, max(16 << 20, memory // 32))
