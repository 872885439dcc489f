"""Quick modes of the performance benchmarks, so they cannot rot (no timing assertions)."""

from __future__ import annotations

import re

import pytest
import torch

from benchmarks import memory, sampling, service_load, soak


def _ratios(text: str, column: str) -> list[float]:
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    index = header.index(column)
    return [float(line.strip("|").split("|")[index]) for line in lines[2:]]


def test_sampling_quick() -> None:
    text = sampling.run(quick=True)
    ratios = _ratios(text, "mcdrop / floor")
    assert len(ratios) == 10  # 4 models × 2 batches, plus T = 10,000 twice for the UCI MLP
    assert all(r > 0 for r in ratios)


@pytest.mark.parametrize("ref", sampling.references(), ids=lambda r: r.name)
def test_floor_and_naive_compute_what_mcdrop_computes(ref: sampling.Reference) -> None:
    x = torch.randn(2, *ref.input_shape)
    mc = sampling.sample(ref.model, x, 6, seed=0)
    assert sampling.floor(ref, x, 6).reshape(mc.shape).shape == mc.shape
    assert sampling.naive_loop(ref.model, x, 6).shape == mc.shape
    assert not ref.model.training


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
def test_soak_quick() -> None:
    text = soak.run(quick=True)
    assert "0 unexpected answers" in text
    assert re.search(r"p99 \d+ ms", text)
    for kind, *_ in soak.MIX:  # every kind of request was sent, and answered as expected
        assert re.search(rf"^\| {re.escape(kind)} \| [1-9]\d* \|", text, re.M), kind
