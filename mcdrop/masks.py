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

import hashlib
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
_MASK64 = (1 << 64) - 1
MAX_SEED = (1 << 63) - 1


def mix64(z: Tensor) -> Tensor:
    """SplitMix64's finaliser, elementwise on an int64 tensor (returns a new tensor)."""
    return mix64_(z.clone())


def mix64_(z: Tensor) -> Tensor:
    """:func:`mix64` in place: two buffers for any size, so the hash is memory-bound."""
    t = z >> 30
    z ^= t.bitwise_and_(_LOW34)
    z *= _MUL1
    torch.bitwise_right_shift(z, 27, out=t)
    z ^= t.bitwise_and_(_LOW37)
    z *= _MUL2
    torch.bitwise_right_shift(z, 31, out=t)
    z ^= t.bitwise_and_(_LOW33)
    return z


def mix_int(value: int) -> int:
    """SplitMix64's finaliser on one Python int, as an int64 (same bits as :func:`mix64`).

    Pure Python: scalars need no tensor round trip on the hot path.
    """
    z = value & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return _signed(z ^ (z >> 31))


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


def row_keys(x: Tensor, seed: int | Tensor) -> Tensor:
    """Keys of the rows of ``x`` under ``seed``: one per row, independent of the other rows.

    A keyed BLAKE2b hash of the row's bytes (floats as float32, with -0.0 as 0.0) under its
    seed, so equal rows under equal seeds get equal keys. Hashing bytes in C costs one call per
    row, far less than a vectorised hash for the small batches of MC requests.

    Args:
        x: ``(N, ...)`` inputs.
        seed: one seed for every row, or ``(N,)`` int64 seeds (one per row, as when requests
            with different seeds are batched together).

    Returns:
        ``(N,)`` int64 keys.
    """
    flat = x.detach().reshape(x.shape[0], -1)
    flat = (flat.to(torch.float32) + 0.0) if flat.is_floating_point() else flat.to(torch.int64)
    rows = flat.cpu().contiguous().numpy()
    n = rows.shape[0]
    seeds = seed.tolist() if isinstance(seed, Tensor) else [seed] * n
    keys = [
        int.from_bytes(
            hashlib.blake2b(row.tobytes(), digest_size=8, key=s.to_bytes(8, "little")).digest(),
            "little",
            signed=True,
        )
        for row, s in zip(rows, seeds, strict=True)
    ]
    return torch.tensor(keys, dtype=torch.int64)


def sample_keys(keys: Tensor, first_sample: int, n_samples: int) -> Tensor:
    """Keys of MC samples ``first_sample .. first_sample + n_samples - 1`` of each row.

    Args:
        keys: ``(N,)`` row keys.

    Returns:
        ``(n_samples * N,)`` keys, sample-major (index ``s * N + n``), the layout of a replicated
        batch.
    """
    s = torch.arange(first_sample + 1, first_sample + n_samples + 1, dtype=torch.int64)
    return mix64_((keys[None, :] + s.mul_(_MUL2)[:, None]).reshape(-1))


def _words(keys: Tensor, call: int, n_words: int) -> Tensor:
    """``(B, n_words)`` int64 hashes: word j of row b is ``mix64(base_b + (j + 1)·γ)``, the
    SplitMix64 stream seeded by the row key and the call."""
    # Sample keys are already mixed, so a key (xor a per-call constant) can seed the stream
    # directly; streams of different rows overlap only if two 64-bit keys nearly collide.
    base = keys ^ mix_int(call * GOLDEN + 0xD809)
    counter = torch.arange(1, n_words + 1, dtype=torch.int64).mul_(GOLDEN)
    return mix64_(base[:, None] + counter[None, :])


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
    # Four 16-bit lanes from every 64-bit word: a quarter of the hashing of one draw per element.
    return _words(keys, call, (n + 3) // 4).view(torch.int16)[:, :n]


def drop_threshold(p: float) -> int:
    """The int16 threshold below which a lane is dropped: ``round(p * 65536) - 32768``."""
    return round(p * P_RESOLUTION) - P_RESOLUTION // 2


def lane_bits(p: float) -> int:
    """Fewest bits per element that realise ``round(p·2¹⁶)/2¹⁶`` exactly: 1 for p = 1/2, 2 for
    1/4 or 3/4, ..., 16 for a rate that is not a multiple of 1/256."""
    ticks = round(p * P_RESOLUTION)
    for bits in (1, 2, 4, 8):
        if ticks % (P_RESOLUTION >> bits) == 0:
            return bits
    return 16


_BIT_SHIFTS = {bits: torch.arange(0, 8, bits, dtype=torch.uint8) for bits in (1, 2, 4)}


def keep_mask(keys: Tensor, call: int, n: int, p: float) -> Tensor:
    """Boolean keep-mask ``(B, n)``: each entry is dropped with probability
    ``round(p·2¹⁶)/2¹⁶`` exactly, independently across rows, calls and elements.

    Each element takes only the bits its rate needs (:func:`lane_bits`): one 64-bit hash covers
    64 elements at p = 0.5, and 4 at a rate like p = 0.1.
    """
    bits = lane_bits(p)
    if bits == 16:
        return uniform16(keys, call, n) >= drop_threshold(p)
    per_word = 64 // bits
    lanes = _words(keys, call, (n + per_word - 1) // per_word).view(torch.uint8)  # (B, 8W)
    threshold = round(p * (1 << bits))  # lane values below it are dropped
    if bits == 8:
        return lanes[:, :n] >= threshold
    # Unpack 8 / bits lanes from every byte.
    shifts = _BIT_SHIFTS[bits]
    fields = (lanes[:, :, None] >> shifts).bitwise_and_((1 << bits) - 1)
    return fields.view(lanes.shape[0], -1)[:, :n] >= threshold
