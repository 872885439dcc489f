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

Four implementations give the same bits, chosen by where the keys are (:func:`backend_for`):

* **numba** (:mod:`mcdrop.cpu_masks`), for keys on the CPU: one compiled loop per dropout call
  that hashes each word once and writes its lanes' multipliers, where NumPy takes ~12 array
  operations: ~1 µs instead of ~13 for the masks of a one-row request, 2–5× faster on large
  ones. Sample keys and multipliers only; boolean masks and raw draws take the NumPy path.
* **NumPy** on ``uint64`` (wrap-around multiply, logical shifts), for keys on the CPU: NumPy's
  elementwise calls cost about a fifth of torch's at the sizes of one MC request and its 64-bit
  kernels are faster at every size measured (2.5× at 400k elements). Results come back as torch
  tensors sharing the arrays' memory. For keys on the CPU where numba cannot be imported or
  fails, and the reference the others are tested against.
* **torch** on ``int64``, for keys on any other device (masks are made where the activations
  are, with no copy between host and device): torch's multiply wraps like ``uint64``'s, and a
  logical right shift is an arithmetic one with the sign-extended bits masked off. XOR, addition
  and the byte views are the same on both.
* **Triton** (:mod:`mcdrop.triton_masks`), for keys on a CUDA GPU where Triton is installed (it
  comes with CUDA builds of torch): one fused kernel per dropout call instead of torch's ~17, as
  a small pass on a GPU is bound by kernel launches. Sample keys and multipliers only; boolean
  masks and raw draws take the torch path.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import math
import os
import warnings
from types import ModuleType
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from mcdrop.exceptions import InvalidArgumentError


def _signed(value: int) -> int:
    """The int64 whose bit pattern is the unsigned 64-bit ``value``."""
    return value - (1 << 64) if value >= (1 << 63) else value


GOLDEN = _signed(0x9E3779B97F4A7C15)
_GOLDEN_U = np.uint64(0x9E3779B97F4A7C15)
_MUL1_U = np.uint64(0xBF58476D1CE4E5B9)
_MUL2_U = np.uint64(0x94D049BB133111EB)
_SHIFTS = (np.uint64(30), np.uint64(27), np.uint64(31))
_MUL1 = _signed(0xBF58476D1CE4E5B9)
_MUL2 = _signed(0x94D049BB133111EB)

#: Resolution of the dropout probability: p is rounded to a multiple of 1/65536.
P_RESOLUTION = 65536
_MASK64 = (1 << 64) - 1
MAX_SEED = (1 << 63) - 1

Backend = Literal["numba", "numpy", "torch", "triton"]

#: The implementation used for keys on the CPU: ``"numba"`` where numba imports and works (else
#: NumPy), ``"numpy"`` or ``"torch"``. All give the same bits (tests/mcdrop/test_masks.py).
#: Measured on the CPU (2 cores, one thread), the multipliers of one row of 50 at p = 0.05:
#: numba 0.8 µs, NumPy 13; of 100 × 2,048: numba 42 µs, NumPy 163; NumPy against torch: 3200
#: rows × 50 at p = 0.05 in 167 µs vs 364, 3200 × 1024 at p = 0.5 in 0.78 ms vs 9.9.
CPU_BACKEND: Backend = "numba"
#: The implementation used for keys on a CUDA device: ``"triton"`` where Triton imports (else
#: torch), or ``"torch"``. Any other device always uses torch.
CUDA_BACKEND: Backend = "triton"


@functools.cache
def numba_kernels() -> ModuleType | None:
    """:mod:`mcdrop.cpu_masks`, or None where numba cannot be imported or its loops fail or give
    other bits than NumPy's (then with a warning): tried once, on the first keys on the CPU.
    Without numba installed at all (a bare interpreter running the sources), NumPy makes the
    same bits, without a warning."""
    if importlib.util.find_spec("numba") is None:
        return None
    try:
        from mcdrop import cpu_masks

        keys = torch.tensor([1, -2, 3 << 40], dtype=torch.int64)
        made = cpu_masks.sample_keys(keys, 4, 2)
        works = torch.equal(made, sample_keys(keys, 4, 2, backend="numpy")) and torch.equal(
            cpu_masks.keep_scale(made, 7, 37, 0.1, torch.float32),
            keep_scale(made, 7, 37, 0.1, torch.float32, backend="numpy"),
        )
    except Exception as exc:  # ImportError, or a numba that cannot compile here
        warnings.warn(
            f"mcdrop: numba's mask loops failed ({type(exc).__name__}: {exc}); masks on the CPU "
            "are made by NumPy instead (same bits, slower on small requests)",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    if not works:
        warnings.warn(
            "mcdrop: numba's mask loops gave other bits than NumPy; masks on the CPU are made "
            "by NumPy instead",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    return cpu_masks


@functools.cache
def triton_kernels() -> ModuleType | None:
    """:mod:`mcdrop.triton_masks`, or None where Triton cannot be imported (imported once, on
    the first CUDA keys: Triton is never imported for the CPU)."""
    try:
        from mcdrop import triton_masks
    except Exception:  # ImportError, or a Triton that cannot start here: the torch path serves
        return None
    return triton_masks


@functools.cache
def _triton_works(device: torch.device) -> bool:
    """Whether the Triton kernels build and run on ``device`` and give the torch path's bits,
    tried once per device on a few keys. A Triton that imports can still fail at its first
    launch (no C compiler to build its launcher, a driver too old for its PTX): then masks take
    the torch path, with a warning rather than a failed request."""
    kernels = triton_kernels()
    if kernels is None:
        return False
    # The comparison reads back to the host: allowed here even under a sync debug mode.
    debug_mode = torch.cuda.get_sync_debug_mode()
    if debug_mode:
        _set_sync_debug_mode(0)
    try:
        keys = torch.tensor([1, -2, 3 << 40], dtype=torch.int64, device=device)
        made = kernels.sample_keys(keys, 4, 2)
        works = torch.equal(made, sample_keys(keys, 4, 2, backend="torch")) and torch.equal(
            kernels.keep_scale(made, 7, 37, 0.1, torch.float32),
            keep_scale(made, 7, 37, 0.1, torch.float32, backend="torch"),
        )
    except Exception as exc:  # whatever Triton raises while compiling or launching
        warnings.warn(
            f"mcdrop: Triton's mask kernels failed on {device} ({type(exc).__name__}: {exc}); "
            "masks are made by the torch path instead (same bits, more kernel launches)",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    finally:
        if debug_mode:
            _set_sync_debug_mode(debug_mode)
    if not works:
        warnings.warn(
            f"mcdrop: Triton's mask kernels gave other bits than the torch path on {device}; "
            "masks are made by the torch path instead",
            RuntimeWarning,
            stacklevel=2,
        )
    return works


def _set_sync_debug_mode(mode: int) -> None:
    """``torch.cuda.set_sync_debug_mode`` without its warning that the mode is a prototype
    (given once per process, by the first call: a suite that makes warnings errors would fail
    in whichever test sets the mode first, here when the probe restores it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        torch.cuda.set_sync_debug_mode(mode)


def backend_for(keys: Tensor, backend: Backend | None = None) -> Backend:
    """The implementation that makes masks for ``keys``: ``backend`` when given (NumPy and numba
    only for keys on the CPU, numba and Triton only where they work), else :data:`CPU_BACKEND`
    on the CPU (NumPy where numba does not work), :data:`CUDA_BACKEND` on a CUDA device (torch
    without Triton), and torch elsewhere."""
    kind = keys.device.type
    if backend is None:
        if kind == "cpu":
            if CPU_BACKEND == "numba" and numba_kernels() is None:
                return "numpy"
            return CPU_BACKEND
        if kind == "cuda" and CUDA_BACKEND == "triton" and _triton_works(keys.device):
            return "triton"
        return "torch"
    if backend not in ("numba", "numpy", "torch", "triton"):
        raise InvalidArgumentError(
            f"backend must be 'numba', 'numpy', 'torch' or 'triton', got {backend!r}"
        )
    if backend in ("numpy", "numba") and kind != "cpu":
        raise InvalidArgumentError(
            f"the {backend} backend makes masks on the CPU only; these keys are on {keys.device}"
        )
    if backend == "numba" and numba_kernels() is None:
        raise InvalidArgumentError("the numba backend needs numba, which does not work here")
    if backend == "triton" and triton_kernels() is None:
        raise InvalidArgumentError("the Triton backend needs Triton, which cannot be imported here")
    return backend


def _mix_(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser in place on a ``uint64`` array (one scratch buffer)."""
    t = np.empty_like(z)
    np.right_shift(z, _SHIFTS[0], out=t)
    z ^= t
    z *= _MUL1_U
    np.right_shift(z, _SHIFTS[1], out=t)
    z ^= t
    z *= _MUL2_U
    np.right_shift(z, _SHIFTS[2], out=t)
    z ^= t
    return z


def _mix_t_(z: Tensor) -> Tensor:
    """SplitMix64's finaliser in place on an int64 tensor (same bits as :func:`_mix_`): the
    multiplies wrap, and each logical right shift is an arithmetic one with the bits shifted in
    masked off."""
    t = torch.empty_like(z)
    for shift, mul in ((30, _MUL1), (27, _MUL2), (31, None)):
        torch.bitwise_right_shift(z, shift, out=t)
        t &= (1 << (64 - shift)) - 1
        z ^= t
        if mul is not None:
            z *= mul
    return z


#: Backends whose boolean masks, raw draws and mixes NumPy makes (numba compiles only the
#: multipliers and sample keys of sampling).
_HOST = ("numpy", "numba")


def _u64(keys: Tensor) -> np.ndarray:
    """The bits of an int64 tensor as a ``uint64`` array (no copy for a contiguous CPU tensor)."""
    return keys.detach().cpu().numpy().view(np.uint64)


def _tensor(z: np.ndarray) -> Tensor:
    """A ``uint64`` array's bits as an int64 tensor sharing its memory."""
    return torch.from_numpy(z.view(np.int64))


def mix64(z: Tensor, *, backend: Backend | None = None) -> Tensor:
    """SplitMix64's finaliser, elementwise on an int64 tensor (returns a new tensor on ``z``'s
    device)."""
    if backend_for(z, backend) not in _HOST:
        return _mix_t_(z.clone())
    return _tensor(_mix_(_u64(z).copy()))


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
    n = x.shape[0]
    data: bytes
    if x.dtype == torch.float32 and x.device.type == "cpu":  # the common case, in NumPy: faster
        data = float32_bytes((x.detach() if x.requires_grad else x).resolve_neg().numpy())
    else:
        flat = x.detach().reshape(n, -1)
        if flat.is_floating_point():  # as float32 rows
            data = float32_bytes(flat.to(torch.float32).cpu().resolve_neg().numpy())
        else:
            data = flat.to(torch.int64).cpu().contiguous().numpy().tobytes()
    return keys_of_bytes(data, n, seed)


def float32_bytes(values: np.ndarray) -> bytes:
    """The bytes of the float32 array ``values`` in C order, with -0.0 written as 0.0 (the
    bytes :func:`row_keys` hashes)."""
    data = values.tobytes()
    # -0.0's bytes (little-endian 00 00 00 80) in no place of the bytes prove there is none, in
    # one C search: no NumPy ufunc (µs on a request's path).
    if b"\x00\x00\x00\x80" in data:
        data = positive_zero_bytes(values)
    return data


def positive_zero_bytes(values: np.ndarray) -> bytes:
    """The bytes of the float32 array ``values`` in C order with every -0.0 written as 0.0, by
    its bits: ``values + 0.0`` would also flush each denormal to 0.0 where the thread flushes
    them (``torch.set_flush_denormal(True)``), and then key a row by the byte search's hit."""
    bits = np.ascontiguousarray(values).view(np.uint32)
    return np.where(bits == _NEGATIVE_ZERO, np.uint32(0), bits).tobytes()


_NEGATIVE_ZERO = np.uint32(0x8000_0000)  # -0.0's bits


def keys_of_bytes(data: bytes, n: int, seed: int | Tensor) -> Tensor:
    """:func:`row_keys` of ``n`` rows whose bytes, one row after another, are ``data``."""
    if not isinstance(seed, Tensor):
        return torch.from_numpy(key_array_of_bytes(data, n, seed))
    size = len(data) // n if n else 0
    rows = memoryview(data)
    try:
        seeds = [s.to_bytes(8, "little") for s in seed.tolist()]
    except OverflowError:  # checked here, where it costs nothing on the common path
        raise InvalidArgumentError(
            f"per-row seeds must be between 0 and 2**63 - 1, got {seed.tolist()}"
        ) from None
    if len(seeds) != n:
        raise InvalidArgumentError(f"per-row seeds must have shape ({n},)")
    # The digests' bytes read as little-endian int64: one array, no Python int per row.
    digests = b"".join(
        hashlib.blake2b(rows[i * size : (i + 1) * size], digest_size=8, key=s).digest()
        for i, s in enumerate(seeds)
    )
    if not digests:  # no rows (torch.frombuffer takes no empty buffer)
        return torch.empty(0, dtype=torch.int64)
    # A writable buffer, which the tensor shares without a copy (the machine is little-endian,
    # as the byte views of the masks assume).
    return torch.frombuffer(bytearray(digests), dtype=torch.int64)


def key_array_of_bytes(data: bytes, n: int, seed: int) -> np.ndarray:
    """:func:`keys_of_bytes` under one int ``seed``, as a NumPy ``(n,)`` int64 array (a fast
    pass's compiled calls take arrays: a tensor between them costs ~2 µs a call)."""
    key = seed.to_bytes(8, "little")
    if n == 1:
        digests = hashlib.blake2b(data, digest_size=8, key=key).digest()
    else:
        # One keyed state, copied per row: the key's block is hashed once, not per row
        # (32 rows of 13 values: 29 -> 20 µs).
        size = len(data) // n if n else 0
        rows = memoryview(data)
        copy = hashlib.blake2b(digest_size=8, key=key).copy
        digests_of_rows = []
        for i in range(n):
            state = copy()
            state.update(rows[i * size : (i + 1) * size])
            digests_of_rows.append(state.digest())
        digests = b"".join(digests_of_rows)
    # The digests' bytes read as little-endian int64 (as the byte views of the masks assume),
    # from a writable buffer, which the array shares without a copy.
    return np.frombuffer(bytearray(digests), dtype=np.int64)


def sample_keys(
    keys: Tensor, first_sample: int | Tensor, n_samples: int, *, backend: Backend | None = None
) -> Tensor:
    """Keys of MC samples ``first_sample .. first_sample + n_samples - 1`` of each row.

    Args:
        keys: ``(N,)`` row keys.
        first_sample: an int, or (not on the NumPy and numba backends) a one-element int64
            tensor on the keys' device, read there: the input of a CUDA graph that makes sample
            keys.
        backend: the implementation (default: :func:`backend_for` the keys).

    Returns:
        ``(n_samples * N,)`` keys, sample-major (index ``s * N + n``), the layout of a replicated
        batch, on the keys' device.
    """
    chosen = backend_for(keys, backend)
    if chosen == "triton":
        kernels = triton_kernels()
        assert kernels is not None  # backend_for checked
        return kernels.sample_keys(keys, first_sample, n_samples)
    if chosen == "torch":
        if isinstance(first_sample, Tensor):
            first = torch.arange(1, n_samples + 1, dtype=torch.int64, device=keys.device)
            first += first_sample.reshape(())
        else:
            first = torch.arange(
                first_sample + 1,
                first_sample + n_samples + 1,
                dtype=torch.int64,
                device=keys.device,
            )
        first *= _MUL2
        return _mix_t_((first[:, None] + keys[None, :]).reshape(-1))
    if isinstance(first_sample, Tensor):
        raise InvalidArgumentError(f"the {chosen} backend takes first_sample as an int")
    if chosen == "numba":
        compiled = numba_kernels()
        assert compiled is not None  # backend_for checked
        return compiled.sample_keys(keys, first_sample, n_samples)
    offsets = _sample_offsets(first_sample, n_samples)
    return _tensor(_mix_(np.add.outer(offsets, _u64(keys)).ravel()))


@functools.lru_cache(maxsize=256)
def _sample_offsets(first_sample: int, n_samples: int) -> np.ndarray:
    """``(s + 1)·M`` for samples ``first_sample ..`` (read-only: shared between calls)."""
    s = np.arange(first_sample + 1, first_sample + n_samples + 1, dtype=np.uint64)
    s *= _MUL2_U
    s.flags.writeable = False
    return s


def _words_np(keys: Tensor, call: int, n_words: int) -> np.ndarray:
    """``(B, n_words)`` ``uint64`` hashes: word j of row b is ``mix64(base_b + (j + 1)·γ)``, the
    SplitMix64 stream seeded by the row key and the call."""
    # Sample keys are already mixed, so a key (xor a per-call constant) can seed the stream
    # directly; streams of different rows overlap only if two 64-bit keys nearly collide.
    base = _u64(keys) ^ _call_constant(call)
    return _mix_(np.add.outer(base, _counter(n_words)))


@functools.lru_cache(maxsize=64)
def _call_constant(call: int) -> np.uint64:
    return np.uint64(mix_int(call * GOLDEN + 0xD809) & _MASK64)


@functools.lru_cache(maxsize=256)
def _counter(n_words: int) -> np.ndarray:
    """``(j + 1)·γ`` for ``j < n_words`` (read-only: shared between calls)."""
    counter = np.arange(1, n_words + 1, dtype=np.uint64)
    counter *= _GOLDEN_U
    counter.flags.writeable = False
    return counter


def _words_t(keys: Tensor, call: int, n_words: int) -> Tensor:
    """:func:`_words_np` in torch on the keys' device: ``(B, n_words)`` int64."""
    base = keys ^ mix_int(call * GOLDEN + 0xD809)
    counter = torch.arange(1, n_words + 1, dtype=torch.int64, device=keys.device)
    counter *= GOLDEN
    return _mix_t_(base[:, None] + counter)


def _uniform16_np(keys: Tensor, call: int, n: int) -> np.ndarray:
    # Four 16-bit lanes from every 64-bit word: a quarter of the hashing of one draw per element.
    return _words_np(keys, call, (n + 3) // 4).view(np.int16)[:, :n]


def _uniform16_t(keys: Tensor, call: int, n: int) -> Tensor:
    return _words_t(keys, call, (n + 3) // 4).view(torch.int16)[:, :n]


def uniform16(keys: Tensor, call: int, n: int, *, backend: Backend | None = None) -> Tensor:
    """``n`` uniform 16-bit draws for each key, shifted to int16 (``u - 32768``).

    Args:
        keys: ``(B,)`` int64 keys (one per replicated row).
        call: index of the dropout call within a forward pass, so layers get independent masks.
        n: draws per key.

    Returns:
        ``(B, n)`` int16 tensor; value ``v`` stands for the uniform integer ``v + 32768`` in
        ``[0, 65535]``.
    """
    if backend_for(keys, backend) not in _HOST:
        return _uniform16_t(keys, call, n)
    return torch.from_numpy(_uniform16_np(keys, call, n))


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


_BIT_SHIFTS = {bits: np.arange(0, 8, bits, dtype=np.uint8) for bits in (1, 2, 4)}


def _lanes(keys: Tensor, call: int, n: int, bits: int) -> np.ndarray:
    """``(B, 8W)`` mask bytes holding at least ``n`` lanes of ``bits`` bits per row."""
    per_word = 64 // bits
    return _words_np(keys, call, (n + per_word - 1) // per_word).view(np.uint8)


def _lanes_t(keys: Tensor, call: int, n: int, bits: int) -> Tensor:
    per_word = 64 // bits
    return _words_t(keys, call, (n + per_word - 1) // per_word).view(torch.uint8)


def keep_mask(
    keys: Tensor, call: int, n: int, p: float, *, backend: Backend | None = None
) -> Tensor:
    """Boolean keep-mask ``(B, n)``: each entry is dropped with probability
    ``round(p·2¹⁶)/2¹⁶`` exactly, independently across rows, calls and elements.

    Each element takes only the bits its rate needs (:func:`lane_bits`): one 64-bit hash covers
    64 elements at p = 0.5, and 4 at a rate like p = 0.1.
    """
    bits = lane_bits(p)
    if backend_for(keys, backend) not in _HOST:
        return _keep_mask_t(keys, call, n, p, bits)
    if bits == 16:
        return torch.from_numpy(_uniform16_np(keys, call, n) >= drop_threshold(p))
    lanes = _lanes(keys, call, n, bits)
    threshold = round(p * (1 << bits))  # lane values below it are dropped
    if bits == 8:
        return torch.from_numpy(lanes[:, :n] >= threshold)
    # Unpack 8 / bits lanes from every byte.
    fields = (lanes[:, :, None] >> _BIT_SHIFTS[bits]) & np.uint8((1 << bits) - 1)
    return torch.from_numpy(
        fields.reshape(lanes.shape[0], lanes.shape[1] * (8 // bits))[:, :n] >= threshold
    )


def _keep_mask_t(keys: Tensor, call: int, n: int, p: float, bits: int) -> Tensor:
    if bits == 16:
        return _uniform16_t(keys, call, n) >= drop_threshold(p)
    lanes = _lanes_t(keys, call, n, bits)
    threshold = round(p * (1 << bits))
    if bits == 8:
        return lanes[:, :n] >= threshold
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=keys.device)
    fields = (lanes[:, :, None] >> shifts) & ((1 << bits) - 1)
    return fields.reshape(lanes.shape[0], lanes.shape[1] * (8 // bits))[:, :n] >= threshold


def keep_scale_factor(p: float) -> float:
    """``1 / (1 − p_eff)``: the inverted-dropout rescaling of kept units at the realised rate
    (0 when p_eff = 1: nothing is kept)."""
    kept = P_RESOLUTION - round(p * P_RESOLUTION)
    return P_RESOLUTION / kept if kept else 0.0


#: dtypes whose multipliers NumPy builds directly; others are converted from float32.
_NUMPY_FLOATS = {torch.float32: np.float32, torch.float64: np.float64}


@functools.lru_cache(maxsize=64)
def _byte_table(bits: int, threshold: int, scale: float, dtype: type) -> np.ndarray:
    """``(256, 8 // bits)`` multipliers of every byte's lanes: 0 where the lane drops, else
    ``scale``. Lane ``j`` of a byte holds bits ``j·bits`` to ``(j+1)·bits − 1``, as in
    :func:`keep_mask`."""
    fields = (np.arange(256)[:, None] >> np.arange(0, 8, bits)) & ((1 << bits) - 1)
    table: np.ndarray = np.where(fields >= threshold, scale, 0.0).astype(dtype)
    table.flags.writeable = False
    return table


@functools.lru_cache(maxsize=64)
def _byte_table_t(
    bits: int, threshold: int, scale: float, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """:func:`_byte_table` as a tensor on ``device``, made there (no copy from the host), in
    ``dtype`` rounded from the same float32 (or float64) values."""
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    # Cached across calls, some inside inference mode: a normal tensor works in both.
    with torch.inference_mode(False):
        lanes = torch.arange(0, 8, bits, device=device)
        fields = (torch.arange(256, device=device)[:, None] >> lanes) & ((1 << bits) - 1)
        return ((fields >= threshold).to(compute) * scale).to(dtype)


def keep_scale(
    keys: Tensor,
    call: int,
    n: int,
    p: float,
    dtype: torch.dtype,
    *,
    backend: Backend | None = None,
) -> Tensor:
    """Inverted-dropout multipliers ``(B, n)``: 0 where :func:`keep_mask` drops, else
    ``1/(1 − p_eff)`` (same hashes, same decisions).

    Returns a new contiguous tensor. Built with no boolean tensor on the torch side: mixed
    bool/float kernels are several times slower than float ones on CPU, and each extra pass over
    an ``(S·N, H)`` activation costs a good share of the matrix product after it. Rates drawn
    from 1–8 bits per element look every mask byte up in a 256-entry table; 16-bit lanes are
    compared and scaled.
    """
    chosen = backend_for(keys, backend)
    if chosen == "triton":
        kernels = triton_kernels()
        assert kernels is not None  # backend_for checked
        if dtype in kernels.DTYPES:
            return kernels.keep_scale(keys, call, n, p, dtype)
    if chosen == "numba":
        compiled = numba_kernels()
        assert compiled is not None  # backend_for checked
        return compiled.keep_scale(keys, call, n, p, dtype)
    if chosen != "numpy":
        return _keep_scale_t(keys, call, n, p, dtype)
    np_dtype, bits, threshold, scale, table = _scale_constants(p, dtype)
    per_word = 64 // bits
    n_words = (n + per_word - 1) // per_word
    rows = keys.shape[0]
    block = max(1, BLOCK_WORDS // max(n_words, 1))  # rows whose hashes stay in the cache
    if block >= rows:
        out = _scale_block(keys, call, n, bits, threshold, scale, table, np_dtype)
    else:
        out = np.empty((rows, n), dtype=np_dtype)
        for r0 in range(0, rows, block):
            r1 = min(r0 + block, rows)
            out[r0:r1] = _scale_block(keys[r0:r1], call, n, bits, threshold, scale, table, np_dtype)
    result = torch.from_numpy(out)
    return result if result.dtype == dtype else result.to(dtype)


def keep_scale_into(
    x: Tensor, keys: Tensor, call: int, p: float, *, backend: Backend | None = None
) -> bool:
    """``x`` ``(B, n)`` (or ``(B, ...)``, each row's entries in C order, as ``x.view(B, -1)``)
    times ``keep_scale(keys, call, n, p, x.dtype)``, in place, in one compiled pass over ``x``
    with no multipliers in memory (:func:`mcdrop.cpu_masks.drop_into`),
    where numba makes the masks of the ``(B,)`` keys (``backend``: as for :func:`keep_scale`) and
    ``x`` is a C-contiguous float32 or float64 CPU tensor that needs no gradient. Returns whether
    it did; if not, ``x`` is untouched and the caller multiplies it by :func:`keep_scale`'s
    multipliers. :class:`KeepScaleInto` checks the keys once for several calls.

    The same products bit for bit: each is ``x · multiplier`` rounded once in ``x``'s dtype,
    as torch's multiply rounds it (a dropped unit is ``x · 0``: −0.0 for a negative one, NaN
    for an infinite one).

    Why: multipliers made and then multiplied are written once and read twice more; on the
    small passes of one request the second array call and its Python cost as much again.
    """
    return KeepScaleInto(keys, backend=backend)(x, call, p)


class KeepScaleInto:
    """:func:`keep_scale_into` for the ``(B,)`` keys of a pass, which are checked (and their
    bits taken as an array) once for all of its calls: a call costs µs of Python beside a
    compiled loop of µs.

    Args:
        keys: ``(B,)`` int64 keys.
        backend: as for :func:`keep_scale`; only numba multiplies in place.
    """

    def __init__(self, keys: Tensor, *, backend: Backend | None = None) -> None:
        self.rows = keys.shape[0]
        self._compiled: ModuleType | None = None
        self._keys: np.ndarray | None = None
        if keys.device.type == "cpu" and backend_for(keys, backend) == "numba":
            self._compiled = numba_kernels()
            assert self._compiled is not None  # backend_for checked
            self._keys = self._compiled.keys_u64(keys)

    def __call__(self, x: Tensor, call: int, p: float) -> bool:
        """``x`` ``(B, ...)`` times call ``call``'s multipliers at rate ``p``, in place (each
        row's entries in C order, as ``x.view(B, -1)``), where the compiled loop takes it:
        whether it did (if not, ``x`` is untouched).

        Two queries of ``x``: inside a pass every tensor query costs µs, as the pass's
        arithmetic has pushed the interpreter's data out of the caches (~10 µs a call with the
        seven checks this makes by NumPy's view instead, on a 2,048-wide encoder)."""
        dtype = x.dtype
        if self._compiled is None or dtype not in _NUMPY_FLOATS:
            return False
        try:
            values = x.numpy()
        except (RuntimeError, TypeError):  # on a device, needs a gradient, or negated lazily
            return False
        if not values.flags.c_contiguous:
            return False
        if values.ndim == 0 or values.shape[0] != self.rows:  # a key per row, read unchecked
            raise ValueError(
                f"x must be ({self.rows}, ...) for {self.rows} keys, got {values.shape}"
            )
        if values.ndim != 2:
            # a view (contiguous); an explicit width: no rows leave no -1 to infer
            values = values.reshape(self.rows, math.prod(values.shape[1:]))
        self._compiled.drop_into(self._keys, call, values, p, dtype)
        return True


#: Hashes made at once by :func:`keep_scale`: larger masks are made in blocks of rows so that
#: the ~10 passes of the hash over its 64-bit words stay in the cache (512 KiB of words per
#: block). One array for the feed-forward dropout of a d=64 encoder with 2,048 hidden units
#: (1,600 rows × 8,192 words, 100 MiB) made every pass a trip to memory: 200 ms against 92 in
#: blocks (2 cores, one thread; 1,024 words per row: 9.5 ms against 2.0).
BLOCK_WORDS = 1 << 16


def _scale_block(
    keys: Tensor,
    call: int,
    n: int,
    bits: int,
    threshold: Any,
    scale: Any,
    table: np.ndarray | None,
    np_dtype: type,
) -> np.ndarray:
    """:func:`keep_scale`'s multipliers ``(b, n)`` for the rows of ``keys`` ``(b,)``."""
    if table is None:  # 16-bit lanes
        # bool × scale in one ufunc: the same products as a cast and a multiply
        out: np.ndarray = np.multiply(
            _uniform16_np(keys, call, n) >= threshold, scale, dtype=np_dtype
        )
        return out
    lanes = _lanes(keys, call, n, bits)
    # an explicit width: a batch of no rows has no -1 to infer
    out = np.take(table, lanes, axis=0).reshape(lanes.shape[0], lanes.shape[1] * table.shape[1])
    return out if out.shape[1] == n else np.ascontiguousarray(out[:, :n])


@functools.lru_cache(maxsize=64)
def _scale_constants(p: float, dtype: torch.dtype) -> tuple[type, int, Any, Any, np.ndarray | None]:
    """What :func:`keep_scale` needs for a rate and dtype, worked out once: the NumPy dtype,
    the bits per lane, the drop threshold, the multiplier and the byte table (None for 16-bit
    lanes)."""
    np_dtype = _NUMPY_FLOATS.get(dtype, np.float32)
    bits = lane_bits(p)
    scale = keep_scale_factor(p)
    if bits == 16:
        return np_dtype, bits, np.int16(drop_threshold(p)), np_dtype(scale), None
    table = _byte_table(bits, round(p * (1 << bits)), scale, np_dtype)  # (256, 8 / bits)
    return np_dtype, bits, None, None, table


def _keep_scale_t(keys: Tensor, call: int, n: int, p: float, dtype: torch.dtype) -> Tensor:
    """:func:`keep_scale` in torch on the keys' device, rounded as the NumPy path rounds: the
    multiplier is computed in float32 (float64 for float64) and then cast to ``dtype``."""
    bits = lane_bits(p)
    scale = keep_scale_factor(p)
    if bits == 16:
        compute = torch.float64 if dtype == torch.float64 else torch.float32
        out = (_uniform16_t(keys, call, n) >= drop_threshold(p)).to(compute)
        return out.mul_(scale).to(dtype)
    lanes = _lanes_t(keys, call, n, bits)
    table = _byte_table_t(bits, round(p * (1 << bits)), scale, dtype, keys.device)
    out = table[lanes.to(torch.int32)].reshape(lanes.shape[0], lanes.shape[1] * table.shape[1])
    return out if out.shape[1] == n else out[:, :n].contiguous()


#: The most hash words (over all calls) of a pass whose multipliers :class:`PassMultipliers`
#: makes at once (128 KiB). A larger pass makes each call's multipliers right before the call
#: uses them, while they are in the cache: the small MLP (8→64→64→1, two dropout calls) at 32
#: rows × 100 samples (3,200 × 32 words) was 10–15 % slower with them made at once.
PASS_WORDS = 1 << 14


class PassMultipliers:
    """The inverted-dropout multipliers of several calls of one pass from one hash over all
    their words: each call's ``(B, n)`` multipliers equal :func:`keep_scale`'s bit for bit
    (word j of call c for row b is still ``mix64((key_b ^ C_c) + (j + 1)·γ)``), in NumPy calls
    per pass rather than per call.

    Why: on a small pass (one request's rows) the hash's ~10 NumPy calls per dropout call, and
    the Python around them, cost more than the model's own arithmetic. Made once per set of
    calls, rates and dtype (a :class:`~mcdrop.planning.LayerChain` keeps them), used per pass.

    Args:
        calls: ``(call index, n, p)`` of every call, in any order.
        dtype: the multipliers' dtype.
    """

    def __init__(self, calls: tuple[tuple[int, int, float], ...], dtype: torch.dtype) -> None:
        self.calls = calls
        self.dtype = dtype
        self._fused: Any = None  # mcdrop.cpu_masks.FusedPass, made at its first use
        xors: list[np.ndarray] = []
        counters: list[np.ndarray] = []
        # per call: first word, words, n, and _scale_constants's threshold, scale, table, dtype
        self.parts: list[tuple[int, int, int, Any, Any, np.ndarray | None, type]] = []
        start = 0
        for call, n, p in calls:
            np_dtype, bits, threshold, scale, table = _scale_constants(p, dtype)
            per_word = 64 // bits
            n_words = (n + per_word - 1) // per_word
            xors.append(np.full(n_words, _call_constant(call), dtype=np.uint64))
            counters.append(_counter(n_words))
            self.parts.append((start, n_words, n, threshold, scale, table, np_dtype))
            start += n_words
        self.words = start
        self.xor = np.concatenate(xors) if xors else np.empty(0, dtype=np.uint64)
        self.counter = np.concatenate(counters) if counters else np.empty(0, dtype=np.uint64)

    def fits(self, keys: Tensor) -> bool:
        """Whether :meth:`make` takes these keys ``(B,)``: on the CPU, masks made there by NumPy
        or numba, and the words of all calls within :data:`PASS_WORDS`."""
        return (
            keys.device.type == "cpu"
            and keys.shape[0] * self.words <= PASS_WORDS
            and backend_for(keys) in _HOST
        )

    def takes_rows(self, rows: int) -> bool:
        """Whether :meth:`make_from_rows` makes the multipliers of a pass of ``rows`` replicated
        rows on the CPU: numba works, and the pass :meth:`fits`."""
        if not self.calls or rows * self.words > PASS_WORDS or CPU_BACKEND != "numba":
            return False
        if self._fused is None:
            compiled = numba_kernels()
            if compiled is None:
                return False
            self._fused = compiled.FusedPass(self.calls, self.dtype)
        return True

    def compiled(self) -> Any:
        """numba's maker of every multiplier of a pass (:class:`mcdrop.cpu_masks.FusedPass`),
        once :meth:`takes_rows` said yes."""
        if self._fused is None:
            raise InvalidArgumentError("these multipliers have no compiled maker: see takes_rows")
        return self._fused

    def make_from_rows(
        self, row_keys: Tensor, first_sample: int, n_samples: int
    ) -> list[Tensor] | None:
        """:meth:`make` for the sample keys of samples ``first_sample ..`` of the rows whose keys
        are ``row_keys`` ``(N,)``, in one compiled call with no sample keys in between
        (:func:`mcdrop.cpu_masks.pass_multipliers`); None unless numba makes these masks and the
        pass :meth:`fits`."""
        if row_keys.device.type != "cpu" or not self.takes_rows(n_samples * row_keys.shape[0]):
            return None
        if not row_keys.is_contiguous():
            row_keys = row_keys.contiguous()
        made: list[Tensor] = self._fused.make(row_keys, first_sample, n_samples)
        return made

    def make(self, keys: Tensor, *, backend: Backend | None = None) -> list[Tensor]:
        """Each call's ``(B, n)`` multipliers for the keys ``(B,)`` (which :meth:`fits`), in the
        order of ``calls``, made by ``backend`` (default: :func:`backend_for` the keys; NumPy
        and numba only)."""
        chosen = backend_for(keys, backend)
        if chosen not in _HOST:
            raise InvalidArgumentError(f"PassMultipliers are made by NumPy or numba, not {chosen}")
        compiled = numba_kernels() if chosen == "numba" else None
        if compiled is not None:  # one compiled loop per call: no array of words at all
            return [compiled.keep_scale(keys, call, n, p, self.dtype) for call, n, p in self.calls]
        rows = keys.shape[0]
        u = _u64(keys)
        if len(self.parts) == 1:  # _words_np's own two passes
            words = np.add.outer(u ^ self.xor[0], self.counter)
        else:  # each call's columns written once, (key ^ C_c) + counter, then one hash
            words = np.empty((rows, self.words), dtype=np.uint64)
            for start, n_words, *_ in self.parts:
                np.add.outer(
                    u ^ self.xor[start],
                    self.counter[start : start + n_words],
                    out=words[:, start : start + n_words],
                )
        _mix_(words)
        out: list[Tensor] = []
        for start, n_words, n, threshold, scale, table, np_dtype in self.parts:
            own = words[:, start : start + n_words]  # its last axis is contiguous: views work
            if table is None:  # 16-bit lanes, as _scale_block
                values: np.ndarray = np.multiply(
                    own.view(np.int16)[:, :n] >= threshold, scale, dtype=np_dtype
                )
            else:
                lanes = own.view(np.uint8)
                values = np.take(table, lanes, axis=0).reshape(
                    rows, lanes.shape[1] * table.shape[1]
                )
                if values.shape[1] != n:
                    values = np.ascontiguousarray(values[:, :n])
            result = torch.from_numpy(values)
            out.append(result if result.dtype == self.dtype else result.to(self.dtype))
        return out
