"""Quick modes of the performance benchmarks, so they cannot rot (no timing assertions)."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import mcdrop.saving
from benchmarks import gpu, memory, sampling, saving, service_load, soak, user_models
from mcdrop import predict


def _ratios(text: str, column: str) -> list[float]:
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    index = header.index(column)
    return [float(line.strip("|").split("|")[index]) for line in lines[2:]]


@pytest.mark.slow
def test_sampling_quick() -> None:
    text = sampling.run(quick=True)
    ratios = _ratios(text.split("####")[0], "mcdrop / floor")
    assert len(ratios) == 16  # 7 models × 2 batches, plus T = 10,000 twice for the UCI MLP
    assert all(r > 0 for r in ratios)
    assert len(_ratios(text.split("####")[0], "mcdrop / plain")) == 16
    predictor = text.split("#### Predictor.uncertainty")[1].split("####")[0]
    assert len(_ratios(predictor, "Predictor / plain")) == 14
    fixed = text.split("#### Fixed cost per call")[1]
    assert len(_ratios(fixed, "mcdrop µs")) == 7
    assert len(_ratios(fixed, "Predictor µs")) == 7  # from the second group of each model


@pytest.mark.slow
def test_user_models_quick() -> None:
    """Every model of the kinds users write samples as planned, its samples varying, and every
    figure is a positive time."""
    text, fixed = user_models.run(quick=True).split("#### Fixed cost per call")
    assert len(_ratios(text, "mcdrop / plain")) == 20  # 10 models × 2 cells
    assert all(r > 0 for r in _ratios(text, "mcdrop / plain"))
    rows = [line for line in text.splitlines() if line.startswith("| ") and "µs" not in line]
    assert rows
    assert all(line.rstrip(" |").endswith("yes") for line in rows)
    assert len(_ratios(fixed, "floor µs")) == 10


def test_saving_quick() -> None:
    """Both tiny models saved with and without the warm-up's pass; the bound restored."""
    bound = mcdrop.saving.MAX_WARM_UP_PASS_FLOPS
    text = saving.run(quick=True)
    assert len(_ratios(text, "save / without")) == 2
    assert all(r > 0 for r in _ratios(text, "pass GFLOP"))
    assert bound == mcdrop.saving.MAX_WARM_UP_PASS_FLOPS


#: Samples and rows per comparison: over 40 seeds the largest mean gap was 4.0 standard errors
#: and the spread ratio stayed within 0.83-1.24 (the UCI MLP's rare p = 0.05 drops are the
#: noisiest), so the bounds below hold with room; a naive loop without dropout gives ratio 0.
S, N = 100, 8


def _references() -> list[object]:
    """The reference models; the conv and attention ones marked slow: their naive loop runs the
    whole network S times (about a second)."""
    heavy = (nn.Conv2d, nn.MultiheadAttention)
    return [
        pytest.param(
            ref,
            id=ref.name,
            marks=[pytest.mark.slow]
            if any(isinstance(m, heavy) for m in ref.model.modules())
            else [],
        )
        for ref in sampling.references() + sampling.more_references()
    ]


@pytest.mark.parametrize("ref", _references())
def test_floor_and_naive_compute_what_mcdrop_computes(ref: sampling.Reference) -> None:
    x = torch.randn(N, *ref.input_shape, generator=torch.Generator().manual_seed(0))
    mc = sampling.sample(ref.model, x, S, seed=0)  # (S, N, K)
    # The floor is the same network without masks: every replica is the deterministic output.
    floor = sampling.floor(ref, x, S).reshape(mc.shape)
    assert floor.shape == mc.shape
    torch.testing.assert_close(floor, predict(ref.model, x).expand_as(mc), rtol=1e-4, atol=1e-5)
    # The naive loop draws its masks from torch's RNG instead: the same distribution, so the
    # same mean (within 5 standard errors, everywhere) and the same total spread.
    with torch.random.fork_rng():
        torch.manual_seed(1)
        naive = sampling.naive_loop(ref.model, x, S)
    assert naive.shape == mc.shape
    assert not ref.model.training
    se = ((naive.var(0) + mc.var(0)) / S).sqrt()  # (N, K)
    assert bool(((naive.mean(0) - mc.mean(0)).abs() <= 5 * se).all())
    assert 0.7 < float(naive.var(0).sum() / mc.var(0).sum()) < 1.4


@pytest.mark.parametrize("ref", _references())
def test_baal_style_samples_like_baal(ref: sampling.Reference) -> None:
    """One replicated pass with the dropout modules on: samples vary, except through the
    transformer's fused inference path, which skips its dropout modules (baal's zero variance)."""
    x = torch.randn(3, *ref.input_shape, generator=torch.Generator().manual_seed(0))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        samples = sampling.baal_style(ref.model, x, 20)
    assert samples.shape == sampling.sample(ref.model, x, 20, seed=0).shape
    assert not any(m.training for m in ref.model.modules())
    varies = bool(samples.var(0).max() > 0)
    assert varies == (not ref.name.startswith("transformer"))


def test_the_gpu_benchmark_without_a_gpu_says_why(capsys: pytest.CaptureFixture[str]) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert gpu.main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("benchmarks.gpu: no CUDA GPU here")
    assert "nothing measured" in out


@pytest.mark.slow
def test_the_gpu_benchmark_quick_on_the_cpu(tmp_path) -> None:
    assert gpu.main(["--device", "cpu", "--quick", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "gpu.md").read_text()
    assert "FAILED" not in text
    assert text.count("bit for bit") == 1
    assert len(_ratios(text.split("#### Sampling")[1], "mcdrop / floor")) == 10
    assert text.count("kernel launches per call") == 4


@pytest.mark.slow
def test_memory_quick() -> None:
    text = memory.run(quick=True)
    assert re.search(r"\| streaming \| 1000 \|", text)


@pytest.mark.slow
@pytest.mark.parametrize("generator", service_load.GENERATORS)
def test_service_load_quick(generator: str) -> None:
    text = service_load.run(quick=True, generator=generator)
    errors = re.findall(r"\| (\d+)/(\d+) \|", text)
    assert len(errors) == 8  # 2 endpoints × batching off/on × 1 and 8 clients
    assert all(e == "0" and int(n) > 0 for e, n in errors)
    assert all(r > 0 for r in _ratios(text, "server CPU ms/req"))


@pytest.mark.slow
def test_service_protocols_quick() -> None:
    text = service_load.protocols(quick=True)
    errors = re.findall(r"\| (\d+)/(\d+) \|", text)
    assert len(errors) == 6  # 2 endpoints × native, v2 JSON, v2 binary
    assert all(e == "0" and int(n) > 0 for e, n in errors)
    assert all(r > 0 for r in _ratios(text, "CPU ÷ native"))


@pytest.mark.slow
def test_workers_quick() -> None:
    text = service_load.workers(quick=True)
    cells = re.findall(
        r"^\| ([^|]+) \| digits \| 8 \| (\d+) \| .* \| (\d+)/(\d+) \| ([\d.]+) \|$", text, re.M
    )
    assert [name for name, *_ in cells] == [
        "1 worker, 1 torch thread",
        "2 workers, 1 torch thread each",
    ]
    # every request answered, and the workers' CPU counted (not the idle parent's alone)
    assert all(
        int(rps) > 0 and e == "0" and int(n) > 0 and float(cpu) > 0.1 for _, rps, e, n, cpu in cells
    )


@pytest.mark.slow
def test_soak_quick() -> None:
    text = soak.run(quick=True)
    assert "0 unexpected answers" in text
    assert re.search(r"p99 \d+ ms", text)
    for kind, *_ in soak.MIX:  # every kind of request was sent, and answered as expected
        assert re.search(rf"^\| {re.escape(kind)} \| [1-9]\d* \|", text, re.M), kind


@pytest.mark.slow
def test_arrival_wait_quick() -> None:
    text = service_load.arrival_wait(quick=True)
    errors = re.findall(r"\| (\d+)/(\d+) \|", text)
    assert len(errors) == 4  # 2 endpoints × with and without the wait, at 8 clients
    assert all(e == "0" and int(n) > 0 for e, n in errors)


@pytest.mark.slow
def test_service_overhead_quick() -> None:
    text = service_load.overhead(quick=True)
    errors = re.findall(r"\| (\d+)/(\d+) \|", text)
    assert len(errors) == 4  # native predict and uncertainty, v2 predict and uncertainty
    assert all(e == "0" and int(n) > 0 for e, n in errors)
    assert all(r > 0 for r in _ratios(text, "bare route CPU ms/req"))
    assert all(r > 0 for r in _ratios(text, "server ÷ (bare + model)"))
    assert all(r > 0 for r in _ratios(text, "bare route running the model CPU ms/req"))
    assert all(r > 0 for r in _ratios(text, "server ÷ that"))


@pytest.mark.slow
def test_service_against_another_checkout_quick() -> None:
    # This tree against itself: the comparison runs, both servers answer every request.
    text = service_load.against(str(service_load.ROOT), rounds=1, seconds=0.2)
    assert "0 errors" in text
    ratios = _ratios(text, "this ÷ that")
    assert len(ratios) == 4
    assert all(r > 0 for r in ratios)
