"""The counter-based masks of :mod:`mcdrop.masks` as one fused Triton kernel each, for keys on a
CUDA GPU (the ``"triton"`` backend: same bits as the NumPy and torch ones).

Why: the torch implementation takes about 17 elementwise kernels per dropout call (the hash's
shifts, masks, XORs and multiplies, then the lane lookup), each a launch of a few microseconds;
on a GPU a small MC pass is bound by launches, not arithmetic. Here one kernel makes a call's
``(B, n)`` multipliers straight from the ``(B,)`` keys, and one more the sample keys of a chunk.

A program covers a block of rows and, in each, a block of elements: it hashes each 64-bit
word once and spreads the word's lanes over the elements they decide. Element ``e`` of row ``b``
is lane ``q = e mod L`` (``L = 64 / bits``) of word ``w = e div L``, i.e. bits
``bits·q .. bits·q + bits − 1`` of ``mix64((key_b ^ C_call) + (w + 1)·γ)``: exactly what the byte
views of the other backends read on a little-endian machine. No array of words is written or
read, and there is no integer division per element.

Triton is imported only when this module is: :func:`mcdrop.masks.backend_for` does that for keys
on a CUDA device, and falls back to torch where Triton is missing. With ``TRITON_INTERPRET=1``
the kernels also run on CPU tensors (how the tests check them without a GPU).
"""

from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from mcdrop import masks

#: Elements per program: enough work per program to hide latency, few enough programs' tails.
BLOCK = 1024

_GOLDEN = masks.GOLDEN


@triton.jit
def _mix(z):  # type: ignore[no-untyped-def]
    """SplitMix64's finaliser on int64 (logical shifts: arithmetic ones with the sign masked)."""
    z = z ^ ((z >> 30) & 0x3FFFFFFFF)
    z = z * -4658895280553007687  # 0xBF58476D1CE4E5B9
    z = z ^ ((z >> 27) & 0x1FFFFFFFFF)
    z = z * -7723592293110705685  # 0x94D049BB133111EB
    return z ^ ((z >> 31) & 0x1FFFFFFFF)


# Integer arguments are not specialised (Triton would compile a variant per value of 1 and per
# divisibility by 16): one compiled kernel per lane width and dtype, built at the first call.
@triton.jit(do_not_specialize=["n_rows", "total", "first"])
def _sample_keys_kernel(  # type: ignore[no-untyped-def]
    keys_ptr, out_ptr, n_rows, total, first, first_in_memory: tl.constexpr, block: tl.constexpr
):
    i = tl.program_id(0).to(tl.int64) * block + tl.arange(0, block)
    inside = i < total
    s = i // n_rows
    key = tl.load(keys_ptr + (i - s * n_rows), mask=inside, other=0)
    if first_in_memory:  # a one-element int64 tensor (a CUDA graph's input), else an int
        first = tl.load(first)
    z = (s + first + 1) * -7723592293110705685 + key  # (first + s + 1)·M₂ + key
    tl.store(out_ptr + i, _mix(z), mask=inside)


@triton.jit(do_not_specialize=["n_rows", "n", "col_blocks", "call_constant", "ticks"])
def _keep_scale_kernel(  # type: ignore[no-untyped-def]
    keys_ptr,
    out_ptr,
    n_rows,
    n,
    col_blocks,
    call_constant,
    ticks,
    scale,
    bits: tl.constexpr,
    rows_block: tl.constexpr,
    cols_block: tl.constexpr,
):
    # One program: rows_block rows × cols_block elements, i.e. cols_block / lanes words per row;
    # each word is hashed once and its lanes are spread over the elements it covers.
    lanes: tl.constexpr = 64 // bits
    words_block: tl.constexpr = cols_block // lanes
    pid = tl.program_id(0)
    row_block = pid // col_blocks
    col_block = pid - row_block * col_blocks
    r = row_block.to(tl.int64) * rows_block + tl.arange(0, rows_block)  # (R,)
    w = col_block.to(tl.int64) * words_block + tl.arange(0, words_block)  # (W,)
    key = tl.load(keys_ptr + r, mask=r < n_rows, other=0)
    z = _mix((key ^ call_constant)[:, None] + (w + 1)[None, :] * -7046029254386353131)  # (R, W)
    shifts = (tl.arange(0, lanes) * bits).to(tl.int64)  # lane q: bits q·bits .. q·bits + bits − 1
    lane = (z[:, :, None] >> shifts[None, None, :]) & ((1 << bits) - 1)  # (R, W, L)
    if bits == 16:
        lane = lane ^ 0x8000  # the int16 view's order: u − 32768 compared as signed
    value = tl.reshape(tl.where(lane >= ticks, scale, 0.0), (rows_block, cols_block))
    e = col_block.to(tl.int64) * cols_block + tl.arange(0, cols_block)  # element w·L + q
    inside = (r < n_rows)[:, None] & (e < n)[None, :]
    out = out_ptr + r[:, None] * n + e[None, :]
    tl.store(out, value.to(out_ptr.dtype.element_ty), mask=inside)


def _grid(total: int) -> tuple[int]:
    return (triton.cdiv(total, BLOCK),)


def _on(device: torch.device) -> contextlib.AbstractContextManager[object]:
    """Triton launches on torch's current CUDA device: make it the keys' device."""
    if device.type == "cuda" and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def sample_keys(keys: Tensor, first_sample: int | Tensor, n_samples: int) -> Tensor:
    """:func:`mcdrop.masks.sample_keys` in one kernel: ``(n_samples · N,)`` int64.
    ``first_sample`` may be a one-element int64 tensor on the keys' device, read by the kernel
    (so a CUDA graph can take it as an input)."""
    keys = keys.contiguous()
    out = torch.empty(n_samples * keys.shape[0], dtype=torch.int64, device=keys.device)
    if out.numel():
        in_memory = isinstance(first_sample, Tensor)
        with _on(keys.device):
            _sample_keys_kernel[_grid(out.numel())](
                keys,
                out,
                keys.shape[0],
                out.numel(),
                first_sample,
                first_in_memory=in_memory,
                block=BLOCK,
            )
    return out


#: dtypes this kernel writes; float64 multipliers need a float64 scale, which Triton's scalar
#: arguments (float32) do not carry, so they stay on the torch path.
DTYPES = frozenset({torch.float32, torch.bfloat16, torch.float16})


@functools.lru_cache(maxsize=64)
def _rounded_scale(p: float, dtype: torch.dtype) -> float:
    """``float32(1 / (1 − p_eff))`` already rounded to ``dtype``: a float32 argument that the
    kernel's cast to ``dtype`` keeps exactly, whatever rounding that cast uses."""
    return float(torch.tensor(masks.keep_scale_factor(p), dtype=torch.float32).to(dtype))


def keep_scale(keys: Tensor, call: int, n: int, p: float, dtype: torch.dtype) -> Tensor:
    """:func:`mcdrop.masks.keep_scale` in one kernel: ``(B, n)`` multipliers in ``dtype`` (one
    of :data:`DTYPES`), each ``float32(1 / (1 − p_eff))`` or 0 rounded to ``dtype``, as the
    other backends round them."""
    keys = keys.contiguous()
    out = torch.empty(keys.shape[0], n, dtype=dtype, device=keys.device)
    if out.numel():
        bits = masks.lane_bits(p)
        lanes = 64 // bits
        # Columns per program: the row's elements up to 256, at least one word's lanes; rows
        # to make about 2,048 elements. Powers of two, as Triton's blocks must be.
        cols = max(lanes, min(256, triton.next_power_of_2(n)))
        rows = max(1, 2048 // cols)
        col_blocks = triton.cdiv(n, cols)
        with _on(keys.device):
            _keep_scale_kernel[(triton.cdiv(keys.shape[0], rows) * col_blocks,)](
                keys,
                out,
                keys.shape[0],
                n,
                col_blocks,
                masks.mix_int(call * _GOLDEN + 0xD809),
                round(p * (1 << bits)),
                _rounded_scale(p, dtype),
                bits=bits,
                rows_block=rows,
                cols_block=cols,
            )
    return out
