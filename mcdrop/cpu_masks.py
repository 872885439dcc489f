"""The counter-based masks of :mod:`mcdrop.masks` as compiled loops for keys on the CPU (the
``"numba"`` backend: same bits as the NumPy, torch and Triton ones).

Why: NumPy makes a call's multipliers in ~12 array operations (the hash's shifts, XORs and
multiplies over a ``(B, W)`` array of words, then the byte lookup), each a pass over memory and
~1 µs of Python and dispatch. On the one-row requests a service mostly answers, those calls cost
more than the model's arithmetic (13 µs for the 50 multipliers of one sample, against a 20 µs
pass); on large masks each pass is a trip to memory. Here one compiled loop hashes each 64-bit
word once, in registers, and writes the lanes it decides straight into the multipliers: ~1 µs
for a small call, and 2–5× faster than NumPy on the masks of a 2,048-unit layer. Where the
caller owns the activation, another loop multiplies it in place as it hashes
(:func:`drop_into`): no multipliers in memory at all, one pass over the activation.

Element ``e`` of row ``b`` is lane ``q = e mod L`` (``L = 64 / bits``) of word ``w = e div L``,
i.e. bits ``bits·q .. bits·q + bits − 1`` of ``mix64((key_b ^ C_call) + (w + 1)·γ)``: what the
byte views of the NumPy backend read on a little-endian machine, the only kind numba compiles
for here. A 16-bit lane is compared as NumPy's ``int16`` view is, i.e. with its top bit flipped.

Compiled by numba at the first use of each output dtype (about 2 s each) and cached on disk
beside this file, or in ``NUMBA_CACHE_DIR``, so later processes load it in milliseconds. Where
``NUMBA_CACHE_DIR`` is read-only, a copy of it in a temporary directory serves
(:mod:`mcdrop._numba_cache`); where nothing is writable the loops are compiled once per
process. numba is imported only when this module is: :func:`mcdrop.masks.backend_for` does
that for the first keys on the CPU, and falls back to NumPy (same bits) where numba cannot be
imported or fails.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import numba
import numpy as np
import torch
from torch import Tensor

from mcdrop import masks
from mcdrop._numba_cache import use_writable_cache
from mcdrop.exceptions import InvalidArgumentError

#: Output dtypes the loops write directly; others are rounded from float32, as NumPy's are.
DTYPES = {torch.float32: np.float32, torch.float64: np.float64}

# Before the first loop is defined: numba picks its cache directory then.
use_writable_cache()


#: Every loop compiled on its own, in the order defined: :func:`warm_up` compiles each (the
#: image caches them all, and the container's check counts them).
LOOPS: list[Any] = []


def _compiled(fn: Callable[..., Any]) -> Any:
    """``numba.njit`` without the GIL (threads that batch requests run their masks at once),
    cached on disk where a cache directory is writable."""
    try:
        loop = numba.njit(nogil=True, cache=True)(fn)
    except RuntimeError:  # numba found no writable cache directory: compile in each process
        loop = numba.njit(nogil=True)(fn)
    LOOPS.append(loop)
    return loop


@numba.njit(inline="always")
def _mix(z: Any) -> Any:
    """SplitMix64's finaliser on a ``uint64`` (all operands ``uint64``: a signed one would make
    numba compute in float64)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@_compiled
def _sample_keys(keys: Any, first: int, n_samples: int, out: Any) -> None:
    """``out[s·N + i] = mix64((first + s + 1)·M₂ + keys[i])``, as ``masks.sample_keys``."""
    n = keys.shape[0]
    for s in range(n_samples):
        offset = np.uint64(first + s + 1) * np.uint64(0x94D049BB133111EB)
        for i in range(n):
            out[s * n + i] = _mix(offset + keys[i])


@numba.njit(inline="always")
def _put(row: Any, at: int, word: Any, count: int, bits: int, threshold: Any, scale: Any) -> None:
    """The first ``count`` lanes of ``word`` to ``row[at:at + count]``: ``scale`` where a lane is
    at least ``threshold``, else 0. ``count`` and ``bits`` are constants where this is inlined,
    so the loop unrolls."""
    lane = np.uint64((1 << bits) - 1)
    flip = np.uint64(0x8000) if bits == 16 else np.uint64(0)
    zero = scale - scale
    for q in range(count):
        drawn = ((word >> np.uint64(q * bits)) & lane) ^ flip
        row[at + q] = scale if drawn >= threshold else zero


@numba.njit(inline="always")
def _rows(
    keys: Any, xor: Any, n: int, bits: int, threshold: Any, scale: Any, table: Any, out: Any
) -> None:
    """Multipliers ``out`` ``(B, n)`` at ``bits`` per lane (a constant where inlined)."""
    per_word = 64 // bits
    full = n // per_word
    if bits >= 8:  # as _drop_into: a row's words into a buffer, its lanes read as its elements
        words = np.empty((n + per_word - 1) // per_word, dtype=np.uint64)
        lanes16 = words.view(np.uint16)
        lanes8 = words.view(np.uint8)
        limit = np.uint32(threshold)
        zero = scale - scale
        for b in range(keys.shape[0]):
            base = keys[b] ^ xor
            row = out[b]
            for j in range(words.shape[0]):
                words[j] = _mix(base + np.uint64(j + 1) * np.uint64(0x9E3779B97F4A7C15))
            if bits == 16:
                for e in range(n):
                    drawn = np.uint32(lanes16[e]) ^ np.uint32(0x8000)
                    row[e] = scale if drawn >= limit else zero
            else:
                for e in range(n):
                    row[e] = scale if np.uint32(lanes8[e]) >= limit else zero
        return
    for b in range(keys.shape[0]):
        base = keys[b] ^ xor
        row = out[b]
        for j in range(full):
            word = _mix(base + np.uint64(j + 1) * np.uint64(0x9E3779B97F4A7C15))
            if bits == 2 or bits == 4:
                # Compares of 2- and 4-bit lanes ran at half the speed of a byte table here.
                for k in range(8):
                    byte = (word >> np.uint64(8 * k)) & np.uint64(255)
                    for q in range(8 // bits):
                        row[j * per_word + k * (8 // bits) + q] = table[byte, q]
            else:
                _put(row, j * per_word, word, per_word, bits, threshold, scale)
        if full * per_word < n:
            word = _mix(base + np.uint64(full + 1) * np.uint64(0x9E3779B97F4A7C15))
            _put(row, full * per_word, word, n - full * per_word, bits, threshold, scale)


# One loop per lane width, each compiled at its first use (~0.3 s; every width in one function
# took ~5 s to compile, which a container with a read-only file system, where numba cannot
# cache, would pay at every start). ``bits`` is a constant in each, so its lane loops unroll.


@_compiled
def _scale16(keys: Any, xor: Any, n: int, threshold: int, scale: Any, table: Any, out: Any) -> None:
    _rows(keys, xor, n, 16, np.uint64(threshold), scale, table, out)


@_compiled
def _scale8(keys: Any, xor: Any, n: int, threshold: int, scale: Any, table: Any, out: Any) -> None:
    _rows(keys, xor, n, 8, np.uint64(threshold), scale, table, out)


@_compiled
def _scale4(keys: Any, xor: Any, n: int, threshold: int, scale: Any, table: Any, out: Any) -> None:
    _rows(keys, xor, n, 4, np.uint64(threshold), scale, table, out)


@_compiled
def _scale2(keys: Any, xor: Any, n: int, threshold: int, scale: Any, table: Any, out: Any) -> None:
    _rows(keys, xor, n, 2, np.uint64(threshold), scale, table, out)


@_compiled
def _scale1(keys: Any, xor: Any, n: int, threshold: int, scale: Any, table: Any, out: Any) -> None:
    _rows(keys, xor, n, 1, np.uint64(threshold), scale, table, out)


#: ``masks.keep_scale``'s multipliers into ``out`` ``(B, n)`` for the ``(B,)`` keys, by lane bits.
_SCALE = {16: _scale16, 8: _scale8, 4: _scale4, 2: _scale2, 1: _scale1}


@_compiled
def _pass_multipliers(
    keys: Any,
    first: int,
    n_samples: int,
    params: Any,
    scales: Any,
    align: int,
    out: Any,
    sample_out: Any,
) -> None:
    """The multipliers of every call of a pass, straight from the row keys: sample key
    ``mix64((first + s + 1)·M₂ + keys[i])`` of replicated row ``b = s·N + i``, then call ``c``'s
    ``(B, n_c)`` block of ``out`` (the calls' blocks one after another, each from a multiple of
    ``align`` elements), as ``masks.keep_scale`` makes it from that key. ``params[c]``: the
    call's XOR constant, ``n_c``, lane bits and threshold; ``scales[c]``: its multiplier.
    ``sample_out``: ``(B,)`` ``uint64`` for the sample keys themselves (for the calls of the
    pass that hash as they multiply, :func:`_drop_into`), or empty for none."""
    n = keys.shape[0]
    rows = n_samples * n
    keep_keys = sample_out.shape[0] > 0
    # The common rates (not a multiple of 1/256, 16-bit lanes), as _rows makes them: a call's
    # words of a row into a buffer, then its lanes read as its elements: two loops that LLVM
    # vectorises, ~half the time of a word's lanes put one by one (8 calls of 1-2 K elements,
    # 13 -> 7 µs a row).
    most = 0
    for c in range(params.shape[0]):
        most = max(most, params[c, 1])
    words = np.empty(most // 4, dtype=np.uint64)
    lanes16 = words.view(np.uint16)
    for s in range(n_samples):
        offset = np.uint64(first + s + 1) * np.uint64(0x94D049BB133111EB)
        for i in range(n):
            key = _mix(offset + np.uint64(keys[i]))
            b = s * n + i
            if keep_keys:
                sample_out[b] = key
            start = 0
            for c in range(params.shape[0]):
                base = key ^ np.uint64(params[c, 0])
                size = params[c, 1]
                lane_bits = params[c, 2]
                threshold = np.uint64(params[c, 3])
                scale = scales[c]
                at = start + b * size
                per_word = 64 // lane_bits
                lane = np.uint64((1 << lane_bits) - 1)
                flip = np.uint64(0x8000) if lane_bits == 16 else np.uint64(0)
                zero = scale - scale
                e0 = 0
                if lane_bits == 16:
                    e0 = size - size % 4
                    for j in range(e0 // 4):
                        words[j] = _mix(base + np.uint64(j + 1) * np.uint64(0x9E3779B97F4A7C15))
                    limit = np.uint32(threshold)
                    for e in range(e0):
                        drawn = np.uint32(lanes16[e]) ^ np.uint32(0x8000)
                        out[at + e] = scale if drawn >= limit else zero
                # Any other width, and a tail: one loop for every lane width (unrolled loops for
                # each took seconds to compile, which a read-only container pays at each start).
                for e in range(e0, size, per_word):
                    word = _mix(base + np.uint64(e // per_word + 1) * np.uint64(0x9E3779B97F4A7C15))
                    for q in range(min(per_word, size - e)):
                        drawn = ((word >> np.uint64(q * lane_bits)) & lane) ^ flip
                        out[at + e + q] = scale if drawn >= threshold else zero
                start = (start + rows * size + align - 1) // align * align


@numba.njit(inline="always")
def _mul(row: Any, at: int, word: Any, count: int, bits: int, threshold: Any, scale: Any) -> None:
    """:func:`_put`'s multipliers times ``row[at:at + count]``, in place: each product rounded
    in the row's dtype, as torch's multiply of the row by the multipliers rounds it."""
    lane = np.uint64((1 << bits) - 1)
    flip = np.uint64(0x8000) if bits == 16 else np.uint64(0)
    zero = scale - scale
    for q in range(count):
        drawn = ((word >> np.uint64(q * bits)) & lane) ^ flip
        row[at + q] = row[at + q] * (scale if drawn >= threshold else zero)


@numba.njit(inline="always")
def _mul_bytes(row: Any, at: int, word: Any, per_byte: int, table: Any) -> None:
    """``row[at:at + 8 · per_byte]`` times the multipliers of ``word``'s lanes, ``per_byte`` to a
    byte, from the byte table (``per_byte`` a constant where inlined: a width only known at
    run time kept the loop from unrolling, 4x slower)."""
    for k in range(8):
        byte = (word >> np.uint64(8 * k)) & np.uint64(255)
        for q in range(per_byte):
            row[at + k * per_byte + q] = row[at + k * per_byte + q] * table[byte, q]


@_compiled
def _drop_into(
    keys: Any, xor: Any, bits: int, threshold: int, scale: Any, table: Any, relu: bool, x: Any
) -> None:
    """``x`` ``(B, n)`` times :func:`keep_scale`'s multipliers for the ``(B,)`` keys, in place,
    in one pass over ``x``, with no multipliers in memory. ``x * 0`` where a lane drops, not 0:
    the products of torch's multiply bit for bit (−0.0 for a negative unit, NaN for an infinite
    one). With ``relu``, ``relu(x)`` times them: torch's ``relu_`` (0 below 0; −0.0 and NaN
    kept), then the product, in the same pass (16- and 8-bit lanes; a pass of its own before
    the others)."""
    n = x.shape[1]
    per_word = 64 // bits
    lane = np.uint64((1 << bits) - 1)
    limit = np.uint64(threshold)
    zero = scale - scale
    # 16- and 8-bit lanes: a row's words hashed into a buffer first, then its lanes read as
    # the buffer's uint16 or uint8 elements, in the activation's order (a little-endian
    # machine): two plain loops that the compiler vectorises, the hash's multiplies included
    # (0.6x the time of one loop that hashes a word and multiplies its lanes, on the rows of
    # an encoder's activations, 1,024 to 2,048 units).
    words = np.empty((n + per_word - 1) // per_word if bits >= 8 else 0, dtype=np.uint64)
    lanes16 = words.view(np.uint16)
    lanes8 = words.view(np.uint8)
    limit32 = np.uint32(threshold)
    for b in range(x.shape[0]):
        base = keys[b] ^ xor
        row = x[b]
        if bits >= 8:
            for j in range(words.shape[0]):
                words[j] = _mix(base + np.uint64(j + 1) * np.uint64(0x9E3779B97F4A7C15))
            # (ReLU in the multiply's own pass: a pass over a wide activation costs more than
            # its arithmetic, as much as the hash on a 2,048-wide encoder's feed-forward units)
            if bits == 16 and relu:  # compared as NumPy's int16 view is: the top bit flipped
                for e in range(n):
                    drawn = np.uint32(lanes16[e]) ^ np.uint32(0x8000)
                    v = row[e]
                    row[e] = (zero if v < zero else v) * (scale if drawn >= limit32 else zero)
            elif bits == 16:
                for e in range(n):
                    drawn = np.uint32(lanes16[e]) ^ np.uint32(0x8000)
                    row[e] = row[e] * (scale if drawn >= limit32 else zero)
            elif relu:
                for e in range(n):
                    v = row[e]
                    row[e] = (zero if v < zero else v) * (
                        scale if np.uint32(lanes8[e]) >= limit32 else zero
                    )
            else:
                for e in range(n):
                    row[e] = row[e] * (scale if np.uint32(lanes8[e]) >= limit32 else zero)
            continue
        if relu:
            for e in range(n):
                if row[e] < zero:
                    row[e] = zero
        # 4, 2 and 1 bits: whole words, a branch per width, whose lane loop unrolls (with the
        # width unknown to the compiler, it ran 2-3x slower than a multiply by NumPy's
        # multipliers)
        e0 = n - n % per_word
        if bits == 4:  # a byte table, as _rows: compares of 4-bit lanes ran 4x slower here
            for j in range(e0 // 16):
                word = _mix(base + np.uint64(j + 1) * np.uint64(0x9E3779B97F4A7C15))
                _mul_bytes(row, 16 * j, word, 2, table)
        elif bits == 2:
            for j in range(e0 // 32):
                word = _mix(base + np.uint64(j + 1) * np.uint64(0x9E3779B97F4A7C15))
                _mul_bytes(row, 32 * j, word, 4, table)
        else:
            for j in range(e0 // 64):
                word = _mix(base + np.uint64(j + 1) * np.uint64(0x9E3779B97F4A7C15))
                _mul(row, 64 * j, word, 64, 1, limit, scale)
        # the tail: one loop for every width (as _pass_multipliers)
        for e in range(e0, n, per_word):
            word = _mix(base + np.uint64(e // per_word + 1) * np.uint64(0x9E3779B97F4A7C15))
            for q in range(min(per_word, n - e)):
                drawn = (word >> np.uint64(q * bits)) & lane
                row[e + q] = row[e + q] * (scale if drawn >= limit else zero)


@_compiled
def _all_finite(values: Any) -> bool:
    """Whether every value of the 1-D array ``values`` is finite (stops at the first that is
    not)."""
    for v in values:  # noqa: SIM110 (numba compiles this loop, not all() of a generator)
        if not np.isfinite(v):
            return False
    return True


def all_finite(values: np.ndarray) -> bool:
    """Whether every value of the float32 or float64 array ``values`` is finite: one compiled
    loop, where NumPy's check makes a boolean array and reduces it (two calls, ~10 µs of a
    one-row request's path)."""
    return bool(_all_finite(values.reshape(-1)))


@_compiled
def _finite_state(values: Any) -> int:
    """0 where a value of the 1-D array ``values`` is not finite (stops there), else 2 where
    one is -0.0, else 1."""
    state = 1
    for v in values:
        if not np.isfinite(v):
            return 0
        if v == 0 and np.signbit(v):
            state = 2
    return state


def finite_state(values: np.ndarray) -> int:
    """Whether the float32 or float64 array ``values`` is finite (1; 2 where it also holds a
    -0.0, whose bytes the row keys write as 0.0's: :func:`mcdrop.masks.float32_bytes`), or not
    (0): :func:`all_finite` and the search for -0.0 in one loop (the search over the bytes cost
    ~3-5 µs of a 784-value row)."""
    return int(_finite_state(values.reshape(-1)))


# BLAKE2b (RFC 7693), for the keys of short rows (:func:`row_keys`): its initialisation vector
# and message schedule.
_IV = np.array(
    [
        0x6A09E667F3BCC908, 0xBB67AE8584CAA73B, 0x3C6EF372FE94F82B, 0xA54FF53A5F1D36F1,
        0x510E527FADE682D1, 0x9B05688C2B3E6C1F, 0x1F83D9ABFB41BD6B, 0x5BE0CD19137E2179,
    ],
    dtype=np.uint64,
)  # fmt: skip
# Its message schedule, one row of 16 message word indices per round, its 12 rounds written out
# (rounds 10 and 11 repeat 0 and 1), flat, as unsigned bytes: a read of it is one load, with no
# row view, no modulo and no check for a negative index.
_SIGMA = np.array(
    [
        [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15],
        [14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3],
        [11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4],
        [7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8],
        [9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13],
        [2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9],
        [12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11],
        [13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10],
        [6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5],
        [10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0],
        [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15],
        [14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3],
    ],
    dtype=np.uint8,
).reshape(-1)

#: The longest row (in float32 values) whose key a fast pass of several rows hashes here
#: (:func:`row_keys`), not by hashlib: a row through hashlib costs ~0.65 µs beyond its hashing
#: and its finiteness check a pass of its own, and here the hash is as fast per byte (timed
#: warm, against hashlib and the check: 32 rows of 13 values 8.2 against 23.1 µs; 8 rows of 784,
#: 41 against 49; 16 of 3,072, 311 against 347; 4 of 8,192, 195 against 211).
SHORT_ROW = 8192

#: The most values (all rows together) of a fast pass whose row keys numba hashes in the one
#: compiled call that makes its multipliers (:meth:`FusedPass.make_from_values`). Timed warm,
#: that call and the three it replaces (finiteness, hashlib's keys, the multipliers) cost the
#: same on 1 to 8 rows of 28×28 (16.7 against 15.5 µs, 87.8 against 90.9); run cold after a
#: large model's pass, the one call saves ~40 µs. Past this the saving is small beside the
#: pass. (Rows of up to :data:`SHORT_ROW` values, several of them, are hashed here too.)
FEW_VALUES = 2048


@numba.njit(inline="always")
def _rotr(x: Any, n: int) -> Any:
    return (x >> np.uint64(n)) | (x << np.uint64(64 - n))


@numba.njit(inline="always")
def _g(a: Any, b: Any, c: Any, d: Any, x: Any, y: Any) -> tuple[Any, Any, Any, Any]:
    a = a + b + x
    d = _rotr(d ^ a, 32)
    c = c + d
    b = _rotr(b ^ c, 24)
    a = a + b + y
    d = _rotr(d ^ a, 16)
    c = c + d
    b = _rotr(b ^ c, 63)
    return a, b, c, d


@numba.njit(inline="always")
def _compress(h: Any, m: Any, t: int, last: bool) -> None:
    """BLAKE2b's compression of the message block ``m`` (16 words) into the state ``h`` (8
    words), ``t`` bytes in (the state in sixteen locals: they stay in registers). Its schedule
    read flat (:data:`_SIGMA`): with a row view per round, each read of it a signed index, a
    row of 1,024 values took 13.6 µs, against 7.0."""
    v0, v1, v2, v3, v4, v5, v6, v7 = h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7]
    v8, v9, v10, v11 = _IV[0], _IV[1], _IV[2], _IV[3]
    v12 = _IV[4] ^ np.uint64(t)  # (the counter's high word stays 0: rows are far below 2**64 B)
    v13 = _IV[5]
    v14 = ~_IV[6] if last else _IV[6]
    v15 = _IV[7]
    for r in range(12):
        s = 16 * r
        v0, v4, v8, v12 = _g(v0, v4, v8, v12, m[_SIGMA[s]], m[_SIGMA[s + 1]])
        v1, v5, v9, v13 = _g(v1, v5, v9, v13, m[_SIGMA[s + 2]], m[_SIGMA[s + 3]])
        v2, v6, v10, v14 = _g(v2, v6, v10, v14, m[_SIGMA[s + 4]], m[_SIGMA[s + 5]])
        v3, v7, v11, v15 = _g(v3, v7, v11, v15, m[_SIGMA[s + 6]], m[_SIGMA[s + 7]])
        v0, v5, v10, v15 = _g(v0, v5, v10, v15, m[_SIGMA[s + 8]], m[_SIGMA[s + 9]])
        v1, v6, v11, v12 = _g(v1, v6, v11, v12, m[_SIGMA[s + 10]], m[_SIGMA[s + 11]])
        v2, v7, v8, v13 = _g(v2, v7, v8, v13, m[_SIGMA[s + 12]], m[_SIGMA[s + 13]])
        v3, v4, v9, v14 = _g(v3, v4, v9, v14, m[_SIGMA[s + 14]], m[_SIGMA[s + 15]])
    h[0] ^= v0 ^ v8
    h[1] ^= v1 ^ v9
    h[2] ^= v2 ^ v10
    h[3] ^= v3 ^ v11
    h[4] ^= v4 ^ v12
    h[5] ^= v5 ^ v13
    h[6] ^= v6 ^ v14
    h[7] ^= v7 ^ v15


@_compiled
def _row_keys(bits: Any, seeds: Any, out: Any) -> int:
    """:func:`mcdrop.masks.row_keys` of float32 rows given as their bits ``(N, D)`` ``uint32``
    under ``seeds`` (``int64``: ``(1,)``, one seed for every row, or ``(N,)``, one per row),
    into ``out`` ``(N,)`` ``uint64``: each row's BLAKE2b digest of 8 bytes keyed by its seed's
    8 bytes, of its bytes with -0.0 written as 0.0 (hashlib's, bit for bit), read as a
    little-endian word. Returns 0 where a value is not finite or a seed is negative (keys not
    made), else 1."""
    n, d = bits.shape
    for b in range(n):
        for e in range(d):
            if bits[b, e] & np.uint32(0x7F800000) == np.uint32(0x7F800000):
                return 0
    for s in range(seeds.shape[0]):
        if seeds[s] < 0:
            return 0
    m = np.zeros(16, dtype=np.uint64)
    keyed = np.empty(8, dtype=np.uint64)  # the state after the key's block
    size = 4 * d
    h = np.empty(8, dtype=np.uint64)
    words = (d + 1) // 2
    for b in range(n):
        # the key's block hashed once for one seed, per row for per-row seeds
        if b == 0 or seeds.shape[0] > 1:
            for i in range(8):
                keyed[i] = _IV[i]
            keyed[0] ^= np.uint64(0x01010808)  # parameter block: digest of 8, key of 8, fanout 1
            m[:] = 0
            m[0] = np.uint64(seeds[b if seeds.shape[0] > 1 else 0])  # its 8 bytes, then zeros
            _compress(keyed, m, 128, size == 0)
        h[:] = keyed
        done = 0
        for w0 in range(0, words, 16):
            m[:] = 0
            for j in range(min(16, words - w0)):
                e = 2 * (w0 + j)
                lo = bits[b, e]
                if lo == np.uint32(0x80000000):  # -0.0
                    lo = np.uint32(0)
                hi = np.uint32(0)
                if e + 1 < d:
                    hi = bits[b, e + 1]
                    if hi == np.uint32(0x80000000):
                        hi = np.uint32(0)
                m[j] = np.uint64(lo) | (np.uint64(hi) << np.uint64(32))
            done = min(size, done + 128)
            _compress(h, m, 128 + done, done == size)
        out[b] = h[0]
    return 1


@_compiled
def _rows_pass(
    values: Any,
    seeds: Any,
    first: int,
    n_samples: int,
    params: Any,
    scales: Any,
    align: int,
    out: Any,
    sample_out: Any,
) -> int:
    """:func:`_row_keys` of the float32 rows ``values`` ``(N, D)`` under ``seeds``, then
    :func:`_pass_multipliers` from those keys into ``out`` (and the sample keys into
    ``sample_out``, where not empty): a fast pass's finiteness check, row keys and multipliers
    in one compiled call. Returns 0 where a value is not finite or a seed negative (nothing
    made), else 1."""
    keys = np.empty(values.shape[0], dtype=np.uint64)
    if not _row_keys(values.view(np.uint32), seeds, keys):
        return 0
    _pass_multipliers(keys.view(np.int64), first, n_samples, params, scales, align, out, sample_out)
    return 1


def row_keys(values: np.ndarray, seed: int | np.ndarray) -> Tensor | None:
    """:func:`mcdrop.masks.row_keys` of the C-contiguous float32 rows ``values`` ``(N, ...)``
    under ``seed`` (an int in [0, 2**63), or ``(N,)`` int64 seeds, one per row), with their
    finiteness check, in one compiled call: ``(N,)`` int64 keys, or None where a value is not
    finite or a seed is negative. For rows of up to :data:`SHORT_ROW` values
    (:func:`mcdrop.masks.keys_of_bytes` past it)."""
    keys = row_key_array(values, seed)
    return None if keys is None else torch.from_numpy(keys)


def row_key_array(values: np.ndarray, seed: int | np.ndarray) -> np.ndarray | None:
    """:func:`row_keys` as a NumPy ``(N,)`` int64 array (for a fast pass, whose compiled calls
    take arrays: a tensor between them costs ~2 µs a call)."""
    n = values.shape[0]
    out = np.empty(n, dtype=np.uint64)
    if not _row_keys(values.view(np.uint32).reshape(n, -1), _seeds(seed, n), out):
        return None
    return out.view(np.int64)


def _seeds(seed: int | np.ndarray, n: int) -> np.ndarray:
    """One ``seed`` for ``n`` rows, or per-row seeds ``(N,)``, as the compiled loops take them:
    a contiguous int64 array of one seed or ``n`` (one compiled layout for all)."""
    if not isinstance(seed, np.ndarray):
        return np.array((seed,), dtype=np.int64)
    seeds = np.ascontiguousarray(seed, dtype=np.int64)
    if seeds.shape != (1,) and seeds.shape != (n,):
        raise ValueError(f"seeds of shape {seeds.shape} for {n} rows")
    return seeds


def _u64(keys: Tensor | np.ndarray) -> np.ndarray:
    """The keys' bits as a contiguous ``uint64`` array (one compiled signature for all)."""
    # int64 keys: never part of an autograd graph
    u = (keys if isinstance(keys, np.ndarray) else keys.numpy()).view(np.uint64)
    return u if u.flags.c_contiguous else np.ascontiguousarray(u)


def sample_keys(keys: Tensor | np.ndarray, first_sample: int, n_samples: int) -> Tensor:
    """:func:`mcdrop.masks.sample_keys` for ``(N,)`` CPU keys (a tensor or an int64 array):
    ``(n_samples · N,)`` int64."""
    out = np.empty(n_samples * keys.shape[0], dtype=np.uint64)
    _sample_keys(_u64(keys), first_sample, n_samples, out)
    return torch.from_numpy(out.view(np.int64))


@functools.lru_cache(maxsize=64)
def _constants(p: float, dtype: torch.dtype) -> tuple[type, int, int, Any, np.ndarray]:
    """The NumPy dtype, lane bits, threshold, multiplier and byte table of a rate and dtype."""
    np_dtype = DTYPES.get(dtype, np.float32)
    bits = masks.lane_bits(p)
    threshold = round(p * (1 << bits))  # as an unsigned lane (16-bit lanes: top bit flipped)
    factor = masks.keep_scale_factor(p)
    scale = np_dtype(factor)
    if bits in (2, 4):  # the NumPy backend's own table
        table = masks._byte_table(bits, threshold, factor, np_dtype)
    else:  # unused, but of the same type, so that no rate compiles another signature
        table = np.zeros((1, 1), dtype=np_dtype)
        table.flags.writeable = False
    return np_dtype, bits, threshold, scale, table


def keep_scale(keys: Tensor, call: int, n: int, p: float, dtype: torch.dtype) -> Tensor:
    """:func:`mcdrop.masks.keep_scale` for ``(B,)`` CPU keys: ``(B, n)`` multipliers in
    ``dtype`` (rounded from float32 for a dtype other than float32 and float64)."""
    np_dtype, bits, threshold, scale, table = _constants(p, dtype)
    out: np.ndarray = np.empty((keys.shape[0], n), dtype=np_dtype)
    _SCALE[bits](_u64(keys), masks._call_constant(call), n, threshold, scale, table, out)
    result = torch.from_numpy(out)
    return result if result.dtype == dtype else result.to(dtype)


def drop_into(keys: np.ndarray, call: int, x: np.ndarray, p: float, dtype: torch.dtype) -> None:
    """``x`` ``(B, n)`` times ``keep_scale(keys, call, n, p, dtype)``, in place, in one compiled
    pass (:func:`_drop_into`): for the ``(B,)`` keys' bits as a contiguous ``uint64`` array
    (:func:`keys_u64`) and ``x`` a C-contiguous float32 or float64 array, the memory of a
    tensor of ``dtype`` (the caller checks: :class:`mcdrop.masks.KeepScaleInto`)."""
    _, bits, threshold, scale, table = _constants(p, dtype)
    _drop_into(keys, masks._call_constant(call), bits, threshold, scale, table, False, x)


class DropInto:
    """:func:`drop_into` for one call at one rate and dtype, its constants worked out once: for
    a fast pass that makes its sample keys with its other multipliers
    (:meth:`FusedPass.make_into`'s ``sample_out``), where each call's own keys, checks and
    constants cost ~30 µs of a cold call (a 2,048-wide encoder's two feed-forward dropouts).

    Args:
        call: the call's index in its pass; p: its rate, in (0, 1); dtype: float32 or float64.
    """

    __slots__ = ("_args",)

    def __init__(self, call: int, p: float, dtype: torch.dtype) -> None:
        if dtype not in DTYPES:
            raise InvalidArgumentError(f"drop_into multiplies float32 or float64, not {dtype}")
        _, bits, threshold, scale, table = _constants(p, dtype)
        self._args = (masks._call_constant(call), bits, threshold, scale, table)

    def __call__(self, keys: np.ndarray, x: np.ndarray, relu: bool = False) -> None:
        """``x`` ``(B, n)`` (C-contiguous, of the dtype given) times the call's multipliers for
        the ``(B,)`` ``uint64`` sample keys ``keys``, in place; with ``relu``, ``relu(x)`` times
        them (torch's ``relu_`` first, bit for bit), in the same pass."""
        _drop_into(keys, *self._args, relu, x)


#: No sample keys asked of :func:`_pass_multipliers` (an empty array: one compiled signature).
_NO_SAMPLES = np.empty(0, dtype=np.uint64)


def keys_u64(keys: Tensor) -> np.ndarray:
    """CPU keys' bits as the contiguous ``uint64`` array :func:`drop_into` takes."""
    return _u64(keys)


class FusedPass:
    """Every multiplier of a pass of several dropout calls, straight from the row keys, in one
    compiled call (:func:`_pass_multipliers`) and one buffer: what :func:`keep_scale` makes from
    :func:`sample_keys` for each call, bit for bit, with no sample keys in between. For the
    small passes of one request, where each array call costs more than the hashing.

    Args:
        calls: ``(call index, n, p)`` of every call, in call order.
        dtype: the multipliers' dtype (other than float32 and float64: rounded from float32).
    """

    def __init__(self, calls: tuple[tuple[int, int, float], ...], dtype: torch.dtype) -> None:
        self.dtype = dtype
        table = []
        scales = []
        for call, n, p in calls:
            _, bits, threshold, scale, _ = _constants(p, dtype)  # as keep_scale's
            xor = masks._signed(int(masks._call_constant(call)))
            table.append((xor, n, bits, threshold))
            scales.append(scale)
        # per call: XOR constant (its bits as int64), size, lane bits, threshold
        self.params = np.array(table, dtype=np.int64).reshape(len(calls), 4)
        self.scales = np.array(scales, dtype=DTYPES.get(dtype, np.float32))
        self.sizes = tuple(n for _, n, _ in calls)
        # Each call's block starts 16 elements (64 bytes) after a multiple of them: aligned as
        # an array of its own. The matrix product after a dropout rounds differently from an
        # input 4 bytes off, and the samples must be those of the context's path, bit for bit.
        self.align = 64 // self.scales.itemsize
        self._layouts: dict[int, tuple[int, tuple[tuple[int, int], ...]]] = {}

    def _layout(self, rows: int) -> tuple[int, tuple[tuple[int, int], ...]]:
        """The buffer's size for a pass of ``rows`` rows, and where each call's ``rows · n``
        multipliers start and end in it."""
        found = self._layouts.get(rows)
        if found is None:
            bounds = []
            end = 0
            for n in self.sizes:
                bounds.append((end, end + rows * n))
                end = (end + rows * n + self.align - 1) // self.align * self.align
            if len(self.sizes) == 1:  # one call: an array of its own, of its size
                end = rows * self.sizes[0]
            if len(self._layouts) >= 64:  # pass sizes vary: keep the latest few
                self._layouts.clear()
            found = self._layouts[rows] = (end, tuple(bounds))
        return found

    def make(
        self,
        keys: Tensor | np.ndarray,
        first_sample: int,
        n_samples: int,
        shapes: Sequence[tuple[int, ...] | None] | None = None,
    ) -> list[Tensor]:
        """Each call's ``n_samples · N · n`` multipliers of samples ``first_sample ..`` of the
        rows whose keys are ``keys`` ``(N,)`` (int64, contiguous, on the CPU: a tensor or an
        array), flat, or of the call's shape in ``shapes`` (None: flat), its activation's (a
        pass views a flat one as that)."""
        if not isinstance(keys, np.ndarray):
            keys = keys.numpy()
        end, bounds = self._layout(n_samples * keys.shape[0])
        out = np.empty(end, dtype=self.scales.dtype)
        _pass_multipliers(
            keys, first_sample, n_samples, self.params, self.scales, self.align, out, _NO_SAMPLES
        )
        return self._views(out, bounds, shapes)

    def _views(
        self,
        out: np.ndarray,
        bounds: tuple[tuple[int, int], ...],
        shapes: Sequence[tuple[int, ...] | None] | None,
    ) -> list[Tensor]:
        """Each call's multipliers in the buffer ``out``, as tensors: flat, or of its shape in
        ``shapes`` (another dtype than float32 and float64: rounded copies)."""
        # NumPy's flat slices, shaped by NumPy (torch's own slicing, split or view cost 2-3x the
        # time, µs a call)
        if shapes is None:
            made = [torch.from_numpy(out[a:b]) for a, b in bounds]
        else:
            made = [
                torch.from_numpy(out[a:b] if shape is None else out[a:b].reshape(shape))
                for (a, b), shape in zip(bounds, shapes, strict=True)
            ]
        return made if self.dtype in DTYPES else [m.to(self.dtype) for m in made]

    def make_into(
        self,
        keys: np.ndarray,
        first_sample: int,
        n_samples: int,
        out: Any,
        sample_out: np.ndarray | None = None,
    ) -> None:
        """:meth:`make` into the buffer ``out`` from :meth:`buffer` (for ``n_samples · N``
        rows), from the row keys ``keys`` ``(N,)`` (int64, contiguous); with ``sample_out``
        (``(n_samples · N,)`` ``uint64``), the sample keys too, as :func:`sample_keys` makes
        them (for :func:`drop_into`, in the same call)."""
        _pass_multipliers(
            keys,
            first_sample,
            n_samples,
            self.params,
            self.scales,
            self.align,
            out,
            _NO_SAMPLES if sample_out is None else sample_out,
        )

    def make_from_values(
        self,
        values: np.ndarray,
        seed: int | np.ndarray,
        first_sample: int,
        n_samples: int,
        shapes: Sequence[tuple[int, ...] | None] | None = None,
    ) -> list[Tensor] | None:
        """:meth:`make` for the keys :func:`row_key_array` makes of the C-contiguous float32
        rows ``values`` ``(N, ...)`` under ``seed`` (one, or ``(N,)`` int64 seeds, one per row),
        in one compiled call with them (keys, finiteness check and multipliers: one call's fixed
        cost, not three, on a request's few rows); None where a value is not finite or a seed
        negative."""
        out, made = self.buffer(n_samples * values.shape[0], shapes)
        if not self.fill_from_values(values, seed, first_sample, n_samples, out):
            return None
        return made

    def buffer(
        self, rows: int, shapes: Sequence[tuple[int, ...] | None] | None = None
    ) -> tuple[np.ndarray, list[Tensor]]:
        """A buffer for the multipliers of a pass of ``rows`` replicated rows (for
        :meth:`fill_from_values`), and each call's multipliers in it, as :meth:`make` returns
        them (of float32 or float64: the tensors share the buffer's memory)."""
        if self.dtype not in DTYPES:
            raise InvalidArgumentError("a buffer of multipliers holds float32 or float64 only")
        end, bounds = self._layout(rows)
        out = np.empty(end, dtype=self.scales.dtype)
        return out, self._views(out, bounds, shapes)

    def fill_from_values(
        self,
        values: np.ndarray,
        seed: int | np.ndarray,
        first_sample: int,
        n_samples: int,
        out: np.ndarray,
        sample_out: np.ndarray | None = None,
    ) -> bool:
        """:meth:`make_from_values` into the buffer ``out`` from :meth:`buffer` (for
        ``n_samples · N`` rows), and the sample keys into ``sample_out`` where given (as
        :meth:`make_into`); False where a value is not finite or a seed negative (nothing
        written)."""
        n = values.shape[0]
        rows = values.reshape(n, -1)
        if not rows.flags.c_contiguous:  # (a view of strided rows: one compiled signature)
            rows = np.ascontiguousarray(rows)
        seeds = _seeds(seed, n)
        return bool(
            _rows_pass(
                rows,
                seeds,
                first_sample,
                n_samples,
                self.params,
                self.scales,
                self.align,
                out,
                _NO_SAMPLES if sample_out is None else sample_out,
            )
        )


def warm_up() -> None:
    """Compile (or load from the cache) every loop of :data:`LOOPS` for both output dtypes:
    for an image built with its cache, so that no container compiles at start."""
    keys = torch.arange(3, dtype=torch.int64)
    sample_keys(keys, 0, 2)
    for np_dtype in DTYPES.values():
        all_finite(np.zeros(2, dtype=np_dtype))
        finite_state(np.zeros(2, dtype=np_dtype))
    row_keys(np.zeros((2, 3), dtype=np.float32), 0)
    for dtype in DTYPES:
        for p in (0.1, 1 / 256, 1 / 16, 1 / 4, 1 / 2):  # 16, 8, 4, 2 and 1 bits per lane
            keep_scale(keys, 0, 5, p, dtype)
        drop_into(_u64(keys), 0, np.ones((3, 5), DTYPES[dtype]), 0.1, dtype)  # every width
        FusedPass(((0, 5, 0.1), (1, 3, 0.5)), dtype).make(keys, 0, 2)
        FusedPass(((0, 5, 0.1), (1, 3, 0.5)), dtype).make_from_values(
            np.zeros((2, 3), dtype=np.float32), 0, 0, 2
        )
