"""SamplingContext.dropout_into: in-place dropout with multipliers made a block of rows at a time,
bit for bit as SamplingContext.dropout."""

from __future__ import annotations

import math

import pytest
import torch

from mcdrop import masks
from mcdrop.planning import CallLayout
from mcdrop.sampling_context import DROP_BLOCK_BYTES, SamplingContext


def _contexts(shape: tuple[int, ...], group: int = 1) -> tuple[SamplingContext, SamplingContext]:
    """Two contexts of one call whose input has ``shape`` (rows first, ``group`` per row; a
    multiple of 3 rows)."""
    rows = shape[0] // group
    keys = masks.sample_keys(torch.arange(3, dtype=torch.int64) * 7919, 0, rows // 3)
    call = CallLayout(0, "dropout", (group, *shape[1:]), 0, group)
    return SamplingContext(keys, (call,)), SamplingContext(keys, (call,))


@pytest.mark.parametrize(
    ("shape", "group"),
    [
        ((6, 5), 1),  # one block
        ((9, 300, 512), 1),  # 600 KiB a row: a block per row
        ((12, 64, 700), 1),  # 175 KiB a row: a few rows a block
        ((3 * 4 * 40, 64, 64), 4),  # attention weights (B·H, L, S): H entries per row
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.0, 1.0])
def test_dropout_into_equals_dropout(
    shape: tuple[int, ...], group: int, dtype: torch.dtype, p: float
) -> None:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    whole, blocks = _contexts(shape, group)
    expected = whole.dropout(x.clone(), p)
    into = x.clone()
    got = blocks.dropout_into(into, p)
    assert torch.equal(got, expected)
    assert got.data_ptr() == into.data_ptr() or p == 0.0  # in place
    assert blocks.calls == whole.calls
    if p in (0.1, 0.5) and math.prod(shape[1:]) * group * x.element_size() > DROP_BLOCK_BYTES:
        assert (got == 0).any()
        assert (got != 0).any()


def test_dropout_into_leaves_a_strided_input_to_dropout() -> None:
    x = torch.randn(9, 6, 5).transpose(1, 2)
    whole, blocks = _contexts((9, 5, 6))
    assert torch.equal(blocks.dropout_into(x.clone(), 0.3), whole.dropout(x.clone(), 0.3))


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dropout_into_makes_multipliers_in_blocks_where_numba_does_not(
    backend: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where numba does not make the masks (not installed, or another backend chosen), the
    multipliers are made a block of rows at a time: the same products as numba's one pass."""
    shape = (12, 64, 700)  # 175 KiB a row: a few rows a block
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    whole, blocks = _contexts(shape)
    fused = blocks.dropout_into(x.clone(), 0.1)  # numba where it works, else the blocks
    monkeypatch.setattr(masks, "CPU_BACKEND", backend)
    expected = whole.dropout(x.clone(), 0.1)
    _, in_blocks = _contexts(shape)
    assert torch.equal(in_blocks.dropout_into(x.clone(), 0.1), expected)
    assert torch.equal(fused, expected)
