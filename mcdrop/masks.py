"""Counter-based random masks: seeded, per row, and cheap.

Dropout masks in mcdrop come from a stateless hash (SplitMix64's finaliser) of
``(row key, dropout call, element index)`` rather than from a stateful generator. That buys:

* **Reproducibility per row.** A row's key depends only on the seed and the row's own contents,
  so a row gets the same samples whatever other rows share its batch (and however the batch is
  chunked or dynamically merged with other requests).
* **No global state.** Nothing touches ``torch``'s global RNG, and two threads never share a
  generator.
* **Few random draws.** One 64-bit hash yields four 16-bit uniforms, so the dropout probability
  is realised exactly as ``round(p * 65536) / 65536`` (within 1/131072 of the requested p).

All arithmetic is int64 with two's-complement wrap-around, which torch's CPU kernels provide.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from mcdrop.exceptions import InvalidArgumentError


def _signed(value: int) -> int:
    """The int64 whose bit pattern is the unsigned 64-bit ``value``."""
    return value - (1 << 64) if value >= (1 << 63) else value


GOLDEN = _signed(0x9E3779B97F4A7C15)
_MUL1 = _signed(0xBF58476D1CE4E5B9)
_MUL2 = _signed(0x94D049BB133111EB)
# torch's >> on int64 is arithmetic; masking the top bits turns it into the logical shift
# SplitMix64 needs.
_LOW34 = (1 << 34) - 1
_LOW37 = (1 << 37) - 1
_LOW33 = (1 << 33) - 1

#: Resolution of the dropout probability: p is rounded to a multiple of 1/65536.
P_RESOLUTION = 65536
MAX_SEED = (1 << 63) - 1


def mix64(z: Tensor) -> Tensor:
    """SplitMix64's finaliser, elementwise on an int64 tensor (returns a new tensor)."""
    z = z ^ ((z >> 30) & _LOW34)
    z = z * _MUL1
    z ^= (z >> 27) & _LOW37
    z *= _MUL2
    z ^= (z >> 31) & _LOW33
    return z


def mix_int(value: int) -> int:
    """SplitMix64's finaliser on one Python int (same result as :func:`mix64`)."""
    return int(mix64(torch.tensor([_signed(value & ((1 << 64) - 1))], dtype=torch.int64))[0])


def fresh_seed() -> int:
    """A random seed from the OS, for calls without ``seed=`` (never the global torch RNG)."""
    return int.from_bytes(os.urandom(8), "little") & MAX_SEED


def check_seed(seed: int) -> int:
    """Validate a user seed: an int in ``[0, 2**63 - 1]``."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InvalidArgumentError(f"seed must be an integer, got {type(seed).__name__}")
    if not 0 <= seed <= MAX_SEED:
        raise InvalidArgumentError(f"seed must be between 0 and 2**63 - 1, got {seed}")
    return seed


def content_keys(x: Tensor) -> Tensor:
    """A 64-bit hash of each row's contents.

    Args:
        x: ``(N, ...)`` inputs; floats are hashed by their float32 bit pattern.

    Returns:
        ``(N,)`` int64 keys; equal rows get equal keys.
    """
    flat = x.reshape(x.shape[0], -1)
    if flat.is_floating_point():
        # +0.0 and -0.0 compare equal; make them hash equal too.
        bits = (flat.to(torch.float32) + 0.0).view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    else:
        bits = flat.to(torch.int64)
    position = torch.arange(1, flat.shape[1] + 1, dtype=torch.int64) * GOLDEN
    return mix64(mix64(bits ^ position).sum(dim=1) + flat.shape[1])


def row_keys(x: Tensor, seed: int | Tensor) -> Tensor:
    """Keys of the rows of ``x`` under ``seed``: one per row, independent of the other rows.

    Args:
        x: ``(N, ...)`` inputs.
        seed: one seed for every row, or ``(N,)`` int64 seeds (one per row, as when requests
            with different seeds are batched together).

    Returns:
        ``(N,)`` int64 keys.
    """
    seeds = torch.as_tensor(seed, dtype=torch.int64)
    return mix64(content_keys(x) ^ mix64(seeds * GOLDEN + 0x5EED))


def sample_keys(keys: Tensor, first_sample: int, n_samples: int) -> Tensor:
    """Keys of MC samples ``first_sample .. first_sample + n_samples - 1`` of each row.

    Args:
        keys: ``(N,)`` row keys.

    Returns:
        ``(n_samples * N,)`` keys, sample-major (index ``s * N + n``), the layout of a replicated
        batch.
    """
    s = torch.arange(first_sample + 1, first_sample + n_samples + 1, dtype=torch.int64)
    return mix64(keys[None, :] + (s * _MUL2)[:, None]).reshape(-1)


def uniform16(keys: Tensor, call: int, n: int) -> Tensor:
    """``n`` uniform 16-bit draws for each key, shifted to int16 (``u - 32768``).

    Args:
        keys: ``(B,)`` int64 keys (one per replicated row).
        call: index of the dropout call within a forward pass, so layers get independent masks.
        n: draws per key.

    Returns:
        ``(B, n)`` int16 tensor; value ``v`` stands for the uniform integer ``v + 32768`` in
        ``[0, 65535]``.
    """
    words = (n + 3) // 4
    base = mix64(keys ^ mix_int(call * GOLDEN + 0xD809))
    counter = torch.arange(1, words + 1, dtype=torch.int64) * GOLDEN
    # Four 16-bit lanes from every 64-bit word: a quarter of the hashing of one draw per element.
    return mix64(base[:, None] + counter[None, :]).view(torch.int16)[:, :n]


def drop_threshold(p: float) -> int:
    """The int16 threshold below which a lane is dropped: ``round(p * 65536) - 32768``."""
    return round(p * P_RESOLUTION) - P_RESOLUTION // 2


def keep_mask(keys: Tensor, call: int, n: int, p: float) -> Tensor:
    """Boolean keep-mask ``(B, n)``: each entry is dropped with probability ``round(p·2¹⁶)/2¹⁶``."""
    return uniform16(keys, call, n) >= drop_threshold(p)
