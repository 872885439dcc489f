"""Counter-based masks: the hash against a pure-Python SplitMix64, rates, key properties, and the
torch implementation bit for bit against the NumPy one (on a GPU too, when there is one)."""

from __future__ import annotations

import hashlib
import importlib.util
import itertools
import math
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mcdrop import masks
from mcdrop.exceptions import InvalidArgumentError

MASK64 = (1 << 64) - 1


def splitmix_reference(z: int) -> int:
    """SplitMix64's finaliser on unsigned 64-bit Python ints (Steele et al. 2014)."""
    z &= MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


@pytest.mark.parametrize("value", [0, 1, 2**31, 2**62 + 12345, 2**63 - 1, -1, -(2**63)])
def test_mix64_matches_reference(value: int) -> None:
    got = int(masks.mix64(torch.tensor([value], dtype=torch.int64))[0]) & MASK64
    assert got == splitmix_reference(value & MASK64)
    assert masks.mix_int(value) & MASK64 == got


@pytest.mark.parametrize("p", [0.05, 0.1, 0.3, 0.5, 0.9])
def test_keep_rate_matches_p(p: float) -> None:
    keys = masks.sample_keys(torch.arange(8, dtype=torch.int64), 0, 64)
    keep = masks.keep_mask(keys, call=0, n=2048, p=p)
    rate = 1.0 - keep.double().mean().item()
    # 1M draws: the standard error is below 5e-4.
    assert rate == pytest.approx(p, abs=3e-3)


@pytest.mark.parametrize("p", [0.5, 0.25, 0.75, 0.125, 3 / 256, 0.05, 0.1, 0.3, 1e-4, 0.99999])
@pytest.mark.parametrize("n", [1, 7, 64, 65, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_keep_scale_is_keep_mask_times_inverse_keep_rate(p: float, n: int, dtype) -> None:
    keys = masks.sample_keys(torch.arange(5, dtype=torch.int64), 0, 3)
    keep = masks.keep_mask(keys, 2, n, p)
    got = masks.keep_scale(keys, 2, n, p, dtype)
    assert got.dtype == dtype
    p_eff = round(p * masks.P_RESOLUTION) / masks.P_RESOLUTION
    expected = keep.to(dtype) * (1.0 / (1.0 - p_eff) if p_eff < 1 else 0.0)
    assert torch.equal(got, expected)


def test_p_resolution_is_documented_rounding() -> None:
    assert masks.drop_threshold(0.5) == 0
    assert masks.drop_threshold(0.0) == -32768
    assert masks.drop_threshold(1.0) == 32768


def test_lanes_are_uniform() -> None:
    u = masks.uniform16(torch.arange(1000, dtype=torch.int64), 0, 400).to(torch.int64) + 32768
    counts = torch.bincount(u.flatten() // 4096, minlength=16).double()
    expected = u.numel() / 16
    chi2 = ((counts - expected).square() / expected).sum().item()
    assert chi2 < 50  # 15 degrees of freedom: p < 1e-5 for a fair generator


def test_row_keys_depend_only_on_row_and_seed() -> None:
    x = torch.randn(5, 3)
    keys = masks.row_keys(x, 7)
    assert torch.equal(masks.row_keys(x[[3, 1]], 7), keys[[3, 1]])
    assert not torch.equal(masks.row_keys(x, 8), keys)
    assert len(set(keys.tolist())) == 5


def test_per_row_seeds() -> None:
    x = torch.randn(3, 2)
    seeds = torch.tensor([1, 2, 3])
    keys = masks.row_keys(x, seeds)
    for i in range(3):
        assert keys[i] == masks.row_keys(x[i : i + 1], int(seeds[i]))[0]


def test_signed_zero_hashes_equal() -> None:
    assert torch.equal(
        masks.row_keys(torch.tensor([[0.0, 1.0]]), 3),
        masks.row_keys(torch.tensor([[-0.0, 1.0]]), 3),
    )


@settings(max_examples=200, deadline=None)
@given(
    bits=st.lists(
        st.sampled_from([0, 0x80000000, 0x00008000, 0x80800000, 0x3F800000, 0xBF800000])
        # any value but NaN (inputs with NaN are refused before they are keyed)
        | st.integers(0, 2**32 - 1).filter(lambda b: b & 0x7FFFFFFF <= 0x7F800000),
        min_size=1,
        max_size=12,
    ),
    n_rows=st.integers(1, 3),
    seed=st.integers(0, 2**63 - 1),
)
def test_row_keys_are_blake2b_of_each_rows_float32_bytes_with_minus_zero_as_zero(
    bits: list[int], n_rows: int, seed: int
) -> None:
    """The documented key, by hand: -0.0 (bytes 00 00 00 80) anywhere, or those bytes across two
    values (which are no -0.0), in rows of any bit patterns."""
    values = np.array(bits * n_rows, dtype=np.uint32).view(np.float32).reshape(n_rows, -1)
    expected = [
        int.from_bytes(
            hashlib.blake2b(
                (row + np.float32(0.0)).tobytes(), digest_size=8, key=seed.to_bytes(8, "little")
            ).digest(),
            "little",
            signed=True,
        )
        for row in values
    ]
    assert masks.row_keys(torch.from_numpy(values), seed).tolist() == expected


@given(
    bits=st.lists(
        st.sampled_from([0, 0x80000000, 0x00008000, 0x80800000, 0x3F800000, 0x00000080])
        | st.integers(0, 2**32 - 1).filter(lambda b: b & 0x7F800000 != 0x7F800000),  # finite
        min_size=0,
        max_size=70,
    ),
    n_rows=st.integers(1, 5),
    repeat=st.sampled_from([1, 2, 5]),
    seed=st.integers(0, 2**63 - 1),
    per_row=st.booleans(),
)
@settings(max_examples=300, deadline=None)  # (the first call compiles)
def test_compiled_row_keys_are_hashlibs(
    bits: list[int], n_rows: int, repeat: int, seed: int, per_row: bool
) -> None:
    """numba's BLAKE2b of short rows (mcdrop.cpu_masks.row_keys, a fast pass's keys) gives
    hashlib's keys bit for bit: rows of 0 to 350 values (blocks of 32 values, a last one part
    full, an odd number of values), -0.0 anywhere, under one seed or a seed per row."""
    from mcdrop import cpu_masks

    rows = [np.roll(np.array(bits * repeat, dtype=np.uint32), i) for i in range(n_rows)]
    values = np.stack(rows).view(np.float32) if bits else np.zeros((n_rows, 0), np.float32)
    seeds: int | np.ndarray = seed
    if per_row:  # (rows keyed under 0, the largest seed and others)
        seeds = np.array([(seed * (i + 1)) % 2**63 for i in range(n_rows)], dtype=np.int64)
        seeds[-1] = 0
    keys = cpu_masks.row_keys(values, seeds)
    assert keys is not None
    expected = masks.row_keys(
        torch.from_numpy(values), torch.from_numpy(seeds) if per_row else seed
    )
    assert keys.tolist() == expected.tolist()


#: Row lengths (float32 values) about the bounds of BLAKE2b's 128-byte blocks and of the rows a
#: fast pass hashes with numba (cpu_masks.FEW_VALUES, SHORT_ROW), and one far past them.
_LONG_ROWS = [511, 512, 513, 2047, 2048, 2049, 8191, 8192, 8193, 20_001]


@pytest.mark.parametrize("seeds", ["one", "per row"])
def test_compiled_row_keys_are_hashlibs_at_every_length(seeds: str) -> None:
    """numba's BLAKE2b (its schedule read flat: cpu_masks._SIGMA, all 12 rounds written out)
    against hashlib's, called here row by row: every row length of 0 to 300 values (a last
    block empty, part full or full, an odd number of values) and long rows, -0.0 in them,
    under seeds of 0, the largest and others, one for all rows or one per row."""
    from mcdrop import cpu_masks

    rng = np.random.default_rng(0)
    for width in [*range(301), *_LONG_ROWS]:
        values = rng.standard_normal((3, width), dtype=np.float32)
        if width:
            values[1, width // 2] = -0.0
        per_row = np.array([0, 2**63 - 1, 12_345 + width], dtype=np.int64)
        for seed in per_row if seeds == "one" else [per_row]:
            row_seeds = np.broadcast_to(seed, (3,))
            expected = [
                int.from_bytes(
                    hashlib.blake2b(
                        np.where(row == 0, np.float32(0.0), row).tobytes(),
                        digest_size=8,
                        key=int(s).to_bytes(8, "little"),
                    ).digest(),
                    "little",
                    signed=True,
                )
                for row, s in zip(values, row_seeds, strict=True)
            ]
            given = int(seed) if seeds == "one" else seed
            keys = cpu_masks.row_key_array(values, given)
            assert keys is not None
            assert keys.tolist() == expected, (width, seeds)


def test_compiled_row_keys_refuse_negative_seeds() -> None:
    """A negative per-row seed makes no keys (the general path says what is wrong)."""
    from mcdrop import cpu_masks

    values = np.ones((3, 8), dtype=np.float32)
    assert cpu_masks.row_keys(values, np.array([1, -1, 2])) is None
    assert cpu_masks.row_keys(values, np.array([1, 0, 2])) is not None


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_compiled_row_keys_refuse_rows_that_are_not_finite(bad: float) -> None:
    from mcdrop import cpu_masks

    values = np.ones((3, 40), dtype=np.float32)
    values[2, 39] = bad
    assert cpu_masks.row_keys(values, 1) is None


def test_calls_give_independent_masks() -> None:
    keys = torch.arange(4, dtype=torch.int64)
    assert not torch.equal(masks.uniform16(keys, 0, 16), masks.uniform16(keys, 1, 16))


@pytest.mark.parametrize("seed", [-1, 2**63, 1.5, True, "3"])
def test_bad_seeds(seed: object) -> None:
    with pytest.raises(InvalidArgumentError):
        masks.check_seed(seed)  # type: ignore[arg-type]


def test_fresh_seed_in_range() -> None:
    assert 0 <= masks.fresh_seed() <= masks.MAX_SEED


# -- the torch implementation: the same bits as NumPy's, on every device -------------------------

#: Devices whose torch masks are compared with NumPy's on the CPU.
DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
    ),
]

#: Rates at every lane width, and at the edges: 0, 1, and one tick from each.
EDGE_RATES = [0.0, 1.0, 1 / 65536, 1 - 1 / 65536, 1e-6, 0.999999, 0.5, 0.25, 0.75, 0.125]
EDGE_RATES += [3 / 256, 255 / 256, 0.05, 0.1, 0.3, 0.9]
#: Sizes around the 4-, 8-, 16- and 64-lane boundaries of the byte views.
EDGE_SIZES = [1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 33, 63, 64, 65, 127, 129, 1000]
FLOATS = [torch.float32, torch.float64, torch.bfloat16, torch.float16]

int64s = st.integers(-(2**63), 2**63 - 1)

#: numba is a dependency; a bare interpreter running the sources (the GPU machine's) may lack it,
#: and then NumPy makes the masks.
numba_runs = pytest.mark.skipif(
    importlib.util.find_spec("numba") is None, reason="numba is not installed"
)
rates = st.one_of(st.sampled_from(EDGE_RATES), st.floats(0.0, 1.0))


def _keys(values: list[int], device: str) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64, device=device)


def test_cpu_keys_use_the_cpu_backend_and_others_torch() -> None:
    cpu = "numba" if masks.numba_kernels() is not None else "numpy"  # NumPy without numba
    assert masks.backend_for(torch.zeros(2, dtype=torch.int64)) == cpu
    assert masks.backend_for(torch.zeros(2, dtype=torch.int64, device="meta")) == "torch"
    with pytest.raises(InvalidArgumentError, match="CPU only"):
        masks.backend_for(torch.zeros(2, dtype=torch.int64, device="meta"), "numpy")
    with pytest.raises(InvalidArgumentError, match="'numba', 'numpy', 'torch' or 'triton'"):
        masks.backend_for(torch.zeros(2, dtype=torch.int64), "cupy")  # type: ignore[arg-type]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("value", [0, 1, -1, 2**31, 2**62 + 12345, 2**63 - 1, -(2**63)])
def test_torch_mix64_matches_reference(device: str, value: int) -> None:
    got = masks.mix64(_keys([value], device), backend="torch")
    assert got.device.type == device
    assert int(got[0]) & MASK64 == splitmix_reference(value & MASK64)


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=60, deadline=None)
@given(
    keys=st.lists(int64s, min_size=1, max_size=9),
    first=st.integers(0, 2**40),
    n_samples=st.integers(1, 40),
)
def test_torch_sample_keys_equal_numpy(
    device: str, keys: list[int], first: int, n_samples: int
) -> None:
    expected = masks.sample_keys(_keys(keys, "cpu"), first, n_samples, backend="numpy")
    got = masks.sample_keys(_keys(keys, device), first, n_samples, backend="torch")
    assert got.device.type == device
    assert torch.equal(got.cpu(), expected)


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=150, deadline=None)
@given(
    keys=st.lists(int64s, min_size=1, max_size=6),
    call=st.integers(0, 10_000),
    n=st.one_of(st.sampled_from(EDGE_SIZES), st.integers(1, 600)),
    p=rates,
    dtype=st.sampled_from(FLOATS),
)
def test_torch_masks_equal_numpy(
    device: str, keys: list[int], call: int, n: int, p: float, dtype: torch.dtype
) -> None:
    cpu, dev = _keys(keys, "cpu"), _keys(keys, device)
    for name, args in (("uniform16", ()), ("keep_mask", (p,)), ("keep_scale", (p, dtype))):
        expected = getattr(masks, name)(cpu, call, n, *args, backend="numpy")
        got = getattr(masks, name)(dev, call, n, *args, backend="torch")
        assert got.device.type == device
        assert got.dtype == expected.dtype
        assert got.shape == expected.shape == (len(keys), n)
        assert torch.equal(got.cpu(), expected), (name, p, n)
    assert got.is_contiguous()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p", EDGE_RATES)
def test_torch_masks_equal_numpy_at_the_edges(device: str, p: float) -> None:
    """Every edge rate at every edge size, over several calls and 77 sample keys."""
    keys = masks.sample_keys(torch.arange(-3, 4, dtype=torch.int64) * 0x9E3779B9, 5, 11)
    dev = keys.to(device)
    for n, call in itertools.product(EDGE_SIZES, (0, 1000)):
        expected = masks.keep_scale(keys, call, n, p, torch.float32, backend="numpy")
        got = masks.keep_scale(dev, call, n, p, torch.float32, backend="torch")
        assert torch.equal(got.cpu(), expected)
        keep = masks.keep_mask(dev, call, n, p, backend="torch")
        assert torch.equal(keep.cpu(), masks.keep_mask(keys, call, n, p, backend="numpy"))


def test_torch_masks_run_on_a_device_without_values() -> None:
    """On the meta device nothing can be read back: the torch path never leaves the device."""
    keys = masks.sample_keys(_keys([1, 2, 3], "meta"), 0, 4)
    assert keys.shape == (12,)
    assert keys.device.type == "meta"
    for p in (0.5, 0.25, 3 / 256, 0.1):
        scale = masks.keep_scale(keys, 3, 37, p, torch.bfloat16)
        assert (scale.shape, scale.dtype, scale.device.type) == ((12, 37), torch.bfloat16, "meta")
        assert masks.keep_mask(keys, 3, 37, p).device.type == "meta"


@pytest.mark.parametrize("p", [0.1, 0.5, 0.25, 3 / 256])
@pytest.mark.parametrize("n", [masks.BLOCK_WORDS // 3 + 5, 8 * masks.BLOCK_WORDS + 1])
def test_masks_made_in_blocks_of_rows_equal_one_array(p: float, n: int) -> None:
    """NumPy makes large masks a few rows at a time (``masks.BLOCK_WORDS``); torch in one
    array. Same multipliers, at sizes that take several blocks and a last partial one."""
    keys = masks.sample_keys(torch.arange(5, dtype=torch.int64), 0, 3)  # 15 rows
    expected = masks.keep_scale(keys, 2, n, p, torch.float32, backend="torch")
    assert torch.equal(masks.keep_scale(keys, 2, n, p, torch.float32, backend="numpy"), expected)
    if masks.numba_kernels() is not None:
        assert torch.equal(
            masks.keep_scale(keys, 2, n, p, torch.float32, backend="numba"), expected
        )
    assert torch.equal(masks.keep_mask(keys, 2, n, p), expected > 0)


@pytest.mark.parametrize("backend", ["numpy", pytest.param("numba", marks=numba_runs)])
@pytest.mark.parametrize("rows", [1, 3, 40, masks.PASS_WORDS // 60])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_the_multipliers_of_a_pass_in_one_hash_equal_keep_scale_per_call(
    backend: masks.Backend, rows: int, dtype: torch.dtype
) -> None:
    """``PassMultipliers`` hashes the words of every call of a pass at once: each call's
    multipliers are ``keep_scale``'s, bit for bit, whatever the rates (16-bit lanes, byte
    tables, 1 bit) and the calls' order."""
    keys = masks.sample_keys(torch.arange(rows, dtype=torch.int64) * 7919, 3, 1)
    # (16-bit lanes at 0.05, 0.1 and 0.3: whole words, a tail, fewer elements than a word)
    calls = (
        (2, 50, 0.05), (0, 64, 0.5), (5, 7, 0.25), (1, 129, 0.1), (3, 33, 3 / 256), (4, 3, 0.3),
    )  # fmt: skip
    multipliers = masks.PassMultipliers(calls, dtype)
    assert multipliers.fits(keys)
    assert not multipliers.fits(masks.sample_keys(keys, 0, 400))  # 400 × 53 words or more
    made = multipliers.make(keys, backend=backend)
    assert len(made) == len(calls)
    for (call, n, p), got in zip(calls, made, strict=True):
        expected = masks.keep_scale(keys, call, n, p, dtype, backend="numpy")
        assert (got.shape, got.dtype) == (expected.shape, expected.dtype)
        assert got.is_contiguous()
        assert torch.equal(got, expected)


# -- numba's compiled loops: the same bits, one loop per call --------------------------------------


@numba_runs
def test_numba_makes_the_masks_of_cpu_keys() -> None:
    assert masks.numba_kernels() is not None  # numba is a dependency: it must work here
    assert masks.backend_for(torch.zeros(2, dtype=torch.int64)) == "numba"
    with pytest.raises(InvalidArgumentError, match="numba backend makes masks on the CPU only"):
        masks.backend_for(torch.zeros(2, dtype=torch.int64, device="meta"), "numba")
    with pytest.raises(InvalidArgumentError, match="made by NumPy or numba"):
        masks.PassMultipliers(((0, 3, 0.1),), torch.float32).make(
            torch.zeros(2, dtype=torch.int64), backend="torch"
        )


@numba_runs
@pytest.mark.parametrize("p", EDGE_RATES)
@pytest.mark.parametrize("dtype", FLOATS)
def test_numba_multipliers_equal_numpy(p: float, dtype: torch.dtype) -> None:
    """Every lane width (1, 2, 4, 8, 16 bits; compares and byte tables), rates 0 and 1, sizes
    around every lane boundary, and dtypes made directly and rounded from float32."""
    keys = masks.sample_keys(_keys([0, 1, -1, 2**62 + 12345, -(2**63)], "cpu"), 4, 3)
    for n, call in itertools.product([0, *EDGE_SIZES], [0, 7]):
        expected = masks.keep_scale(keys, call, n, p, dtype, backend="numpy")
        got = masks.keep_scale(keys, call, n, p, dtype, backend="numba")
        assert (got.shape, got.dtype) == (expected.shape, expected.dtype)
        assert torch.equal(got, expected), (p, n, call, dtype)


@numba_runs
@settings(max_examples=200, deadline=None)
@given(
    keys=st.lists(int64s, min_size=0, max_size=6),
    first=st.integers(0, 2**40),
    n_samples=st.integers(0, 9),
    call=st.integers(0, 1000),
    n=st.integers(0, 300),
    ticks=st.integers(0, 65536),
)
def test_numba_equals_numpy_on_any_keys(
    keys: list[int], first: int, n_samples: int, call: int, n: int, ticks: int
) -> None:
    row_keys = _keys(keys, "cpu")
    expected_keys = masks.sample_keys(row_keys, first, n_samples, backend="numpy")
    got_keys = masks.sample_keys(row_keys, first, n_samples, backend="numba")
    assert got_keys.dtype == torch.int64
    assert torch.equal(got_keys, expected_keys)
    p = ticks / 65536
    expected = masks.keep_scale(expected_keys, call, n, p, torch.float32, backend="numpy")
    assert torch.equal(
        masks.keep_scale(expected_keys, call, n, p, torch.float32, backend="numba"), expected
    )


@numba_runs
def test_numba_takes_strided_keys() -> None:
    keys = masks.sample_keys(torch.arange(30, dtype=torch.int64), 0, 1)
    strided = keys[::3]
    assert not strided.is_contiguous()
    expected = masks.keep_scale(strided.contiguous(), 4, 33, 0.1, torch.float32, backend="numpy")
    assert torch.equal(
        masks.keep_scale(strided, 4, 33, 0.1, torch.float32, backend="numba"), expected
    )
    assert torch.equal(
        masks.sample_keys(strided, 2, 3, backend="numba"),
        masks.sample_keys(strided.contiguous(), 2, 3, backend="numpy"),
    )


@numba_runs
@given(
    n_rows=st.integers(1, 4),
    width=st.integers(0, 300),
    minus_zero=st.booleans(),
    seed=st.integers(0, 2**63 - 1),
    first=st.integers(0, 2**40),
    n_samples=st.integers(1, 5),
    strided=st.booleans(),
)
@settings(max_examples=200, deadline=None)  # (the first call compiles)
def test_multipliers_made_from_the_rows_are_those_of_their_hashlib_keys(
    n_rows: int,
    width: int,
    minus_zero: bool,
    seed: int,
    first: int,
    n_samples: int,
    strided: bool,
) -> None:
    """cpu_masks.FusedPass.make_from_values (a fast pass's row keys and multipliers in one
    compiled call) makes what make makes from the rows' keys (hashlib's, -0.0 as 0.0), bit for
    bit, into one buffer, and of any rows a view of strided memory."""
    from mcdrop import cpu_masks

    fused = cpu_masks.FusedPass(((0, 7, 0.1), (3, 40, 0.5), (1, 1, 0.3)), torch.float32)
    values = np.random.default_rng(seed % 1000).standard_normal((n_rows, 2 * width), np.float32)
    values = values[:, ::2] if strided else np.ascontiguousarray(values[:, :width])
    if minus_zero and width:
        values[-1, width // 2] = -0.0
    keys = masks.row_keys(torch.from_numpy(np.ascontiguousarray(values)), seed)
    expected = fused.make(keys, first, n_samples)
    got = fused.make_from_values(values, seed, first, n_samples)
    assert got is not None
    assert [g.shape for g in got] == [e.shape for e in expected]
    assert all(torch.equal(g, e) for g, e in zip(got, expected, strict=True))
    out, views = fused.buffer(n_samples * n_rows)
    samples = np.zeros(n_samples * n_rows, dtype=np.uint64)
    assert fused.fill_from_values(values, seed, first, n_samples, out, samples)
    assert all(torch.equal(v, e) for v, e in zip(views, expected, strict=True))
    # the sample keys made with them: those of the calls hashed in place (DropInto)
    sample_keys = masks.sample_keys(keys, first, n_samples)
    assert torch.equal(torch.from_numpy(samples.view(np.int64)), sample_keys)
    out[:] = 0
    samples[:] = 0
    fused.make_into(keys.numpy(), first, n_samples, out, samples)
    assert all(torch.equal(v, e) for v, e in zip(views, expected, strict=True))
    assert torch.equal(torch.from_numpy(samples.view(np.int64)), sample_keys)


@numba_runs
@given(
    rows=st.integers(1, 4),
    width=st.integers(1, 300),
    p=st.sampled_from([0.1, 0.3, 1 / 256, 1 / 16, 1 / 4, 0.5, 0.9]),
    call=st.integers(0, 40),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**63 - 1),
    relu=st.booleans(),
)
@settings(max_examples=150, deadline=None)
def test_a_call_hashed_in_place_is_its_multipliers_product(
    rows: int, width: int, p: float, call: int, dtype: torch.dtype, seed: int, relu: bool
) -> None:
    """cpu_masks.DropInto (a call's constants worked out once) multiplies as keep_scale's
    multipliers do, bit for bit, -0.0, NaN and infinities included; with ``relu``, it
    multiplies torch's relu_ of the values, in the same pass."""
    from mcdrop import cpu_masks

    generator = torch.Generator().manual_seed(seed % 1000)
    keys = masks.sample_keys(masks.row_keys(torch.randn(rows, 3, generator=generator), seed), 0, 1)
    x = _activations(rows, width, dtype, seed % 1000)
    x[0, 0] = -math.inf  # (-inf · 0: NaN, compared by its bits)
    x[-1, -1] = -0.0
    before = x.clone().relu_() if relu else x
    expected = before * masks.keep_scale(keys, call, width, p, dtype)
    cpu_masks.DropInto(call, p, dtype)(keys.numpy().view(np.uint64), x.numpy(), relu)
    assert torch.equal(_bits(x), _bits(expected))


@numba_runs
@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_multipliers_made_from_rows_that_are_not_finite_are_none(bad: float) -> None:
    from mcdrop import cpu_masks

    fused = cpu_masks.FusedPass(((0, 7, 0.1),), torch.float32)
    values = np.ones((2, 30), dtype=np.float32)
    values[1, 29] = bad
    assert fused.make_from_values(values, 1, 0, 2) is None
    out, _ = fused.buffer(2)
    assert not fused.fill_from_values(values, 1, 0, 1, out)


@numba_runs
def test_a_buffer_of_multipliers_is_of_float32_or_float64() -> None:
    from mcdrop import cpu_masks

    with pytest.raises(InvalidArgumentError, match="float32 or float64"):
        cpu_masks.FusedPass(((0, 7, 0.1),), torch.bfloat16).buffer(2)


# -- numba's in-place multiply: the products of the multipliers, bit for bit, in one pass ----------


def _bits(x: torch.Tensor) -> torch.Tensor:
    """The values' bit patterns (NaN and −0.0 compared exactly)."""
    return x.view(torch.int64 if x.dtype == torch.float64 else torch.int32)


def _activations(rows: int, n: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """``(rows, n)`` values of every kind a product can round or propagate: normal, subnormal,
    ±0, ±inf, NaN, the largest finite (times a multiplier > 1: inf)."""
    x = torch.randn(rows, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    info = torch.finfo(dtype)
    special = [0.0, -0.0, math.inf, -math.inf, math.nan, info.max, -info.max, info.tiny / 3]
    flat = x.view(-1)
    flat[: min(len(special), flat.numel())] = torch.tensor(special[: flat.numel()])
    return x.to(dtype)


@numba_runs
@pytest.mark.parametrize("p", EDGE_RATES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_numba_multiplies_in_place_as_by_the_numpy_multipliers(
    p: float, dtype: torch.dtype
) -> None:
    """Every lane width (1, 2, 4, 8, 16 bits: compares and byte tables), rates 0, 1 and one
    tick from each, sizes around every lane boundary (whole words and tails), both dtypes:
    ``x`` times NumPy's multipliers, bit for bit."""
    keys = masks.sample_keys(_keys([0, 1, -1, 2**62 + 12345, -(2**63)], "cpu"), 4, 3)
    for n, call in itertools.product([0, *EDGE_SIZES], [0, 7]):
        x = _activations(keys.shape[0], n, dtype, seed=n)
        expected = x * masks.keep_scale(keys, call, n, p, dtype, backend="numpy")
        got = x.clone()
        assert masks.keep_scale_into(got, keys, call, p)
        assert torch.equal(_bits(got), _bits(expected)), (p, n, call, dtype)


@numba_runs
@settings(max_examples=200, deadline=None)
@given(
    keys=st.lists(int64s, min_size=0, max_size=6),
    call=st.integers(0, 1000),
    n=st.integers(0, 300),
    ticks=st.integers(0, 65536),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_numba_multiplies_in_place_on_any_keys(
    keys: list[int], call: int, n: int, ticks: int, dtype: torch.dtype
) -> None:
    row_keys = _keys(keys, "cpu")
    p = ticks / 65536
    x = _activations(len(keys), n, dtype)
    expected = x * masks.keep_scale(row_keys, call, n, p, dtype, backend="numpy")
    assert masks.keep_scale_into(x, row_keys, call, p)
    assert torch.equal(_bits(x), _bits(expected))


@numba_runs
def test_numba_multiplies_in_place_with_strided_keys() -> None:
    keys = masks.sample_keys(torch.arange(30, dtype=torch.int64), 0, 1)[::3]
    assert not keys.is_contiguous()
    x = _activations(10, 33, torch.float32)
    expected = x * masks.keep_scale(keys.contiguous(), 4, 33, 0.1, torch.float32, backend="numpy")
    assert masks.keep_scale_into(x, keys, 4, 0.1)
    assert torch.equal(_bits(x), _bits(expected))


@pytest.mark.parametrize(
    "case",
    ["strided", "bfloat16", "float16", "needs_grad", "negated_view", "numpy_backend", "meta"],
)
def test_multiplying_in_place_is_left_to_the_caller_where_numba_cannot(case: str) -> None:
    """Inputs the compiled loop does not take (or keys it does not make masks for, as without
    numba): False, and ``x`` untouched, for the caller's multiply."""
    keys = masks.sample_keys(torch.arange(4, dtype=torch.int64), 0, 1)
    x = _activations(4, 10, torch.float32)
    backend = None
    if case == "strided":
        x = _activations(4, 20, torch.float32)[:, ::2]
    elif case in ("bfloat16", "float16"):
        x = x.to(getattr(torch, case))
    elif case == "needs_grad":
        x.requires_grad_(True)
    elif case == "negated_view":
        x = torch._neg_view(x)
    elif case == "numpy_backend":
        backend = "numpy"
    else:
        keys = keys.to("meta")
    before = x.detach().clone()
    assert not masks.keep_scale_into(x, keys, 3, 0.1, backend=backend)
    assert torch.equal(_bits(x.detach().resolve_neg()), _bits(before.resolve_neg()))


@numba_runs
def test_multiplying_in_place_takes_rows_first_and_refuses_a_shape_without_a_key_per_row() -> None:
    keys = masks.sample_keys(torch.arange(4, dtype=torch.int64), 0, 1)
    for shape in [(4,), (4, 3, 5), (4, 2, 2, 7)]:  # each row's entries in C order
        x = _activations(4, math.prod(shape[1:]), torch.float32).view(shape)
        expected = x.view(4, -1) * masks.keep_scale(
            keys, 2, x[0].numel(), 0.1, torch.float32, backend="numpy"
        )
        assert masks.keep_scale_into(x, keys, 2, 0.1)
        assert torch.equal(_bits(x.view(4, -1)), _bits(expected))
    for shape in [(5, 3), (3, 3), ()]:
        with pytest.raises(ValueError, match=r"must be \(4, \.\.\.\) for 4 keys"):
            masks.keep_scale_into(torch.ones(shape), keys, 0, 0.1)
    for rows, shape in [(0, (0, 5, 2)), (4, (4, 0, 3))]:  # nothing to multiply
        assert masks.keep_scale_into(torch.ones(shape), keys[:rows], 0, 0.1)


@numba_runs
def test_warm_up_compiles_every_loop_for_both_dtypes() -> None:
    """What the image's cache holds (deploy/container counts the loops of ``LOOPS``): every
    compiled loop of the module, each with a signature per output dtype where it has one."""
    from numba.core.registry import CPUDispatcher

    from mcdrop import cpu_masks

    cpu_masks.warm_up()
    compiled = {
        name
        for name, f in vars(cpu_masks).items()
        if isinstance(f, CPUDispatcher) and f.targetoptions.get("nogil")
    }
    assert compiled == {f.__name__ for f in cpu_masks.LOOPS}
    assert all(f.signatures for f in cpu_masks.LOOPS)
    for f in (cpu_masks._drop_into, *cpu_masks._SCALE.values(), cpu_masks._pass_multipliers):
        assert len(f.signatures) == 2, f.__name__  # float32 and float64: no other


# -- the Triton kernels: the same bits again, one kernel per call ----------------------------------


def _triton_device() -> str | None:
    """Where the Triton kernels can run here: a CUDA GPU, else the CPU under Triton's
    interpreter (``TRITON_INTERPRET=1``), else nowhere (Triton missing, or neither)."""
    if masks.triton_kernels() is None:
        return None
    if torch.cuda.is_available():
        return "cuda"
    return "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else None


TRITON = _triton_device()
triton_runs = pytest.mark.skipif(
    TRITON is None, reason="no Triton, or neither a CUDA GPU nor TRITON_INTERPRET=1"
)


@triton_runs
@settings(max_examples=100, deadline=None)
@given(
    keys=st.lists(int64s, min_size=1, max_size=6),
    call=st.integers(0, 10_000),
    n=st.one_of(st.sampled_from(EDGE_SIZES), st.integers(1, 600)),
    p=rates,
    dtype=st.sampled_from(FLOATS),
    first=st.integers(0, 2**40),
    n_samples=st.integers(1, 40),
)
def test_triton_kernels_equal_numpy(
    keys: list[int],
    call: int,
    n: int,
    p: float,
    dtype: torch.dtype,
    first: int,
    n_samples: int,
) -> None:
    assert TRITON is not None
    cpu, dev = _keys(keys, "cpu"), _keys(keys, TRITON)
    expected = masks.keep_scale(cpu, call, n, p, dtype, backend="numpy")
    got = masks.keep_scale(dev, call, n, p, dtype, backend="triton")
    assert (got.shape, got.dtype, got.device.type) == (expected.shape, dtype, TRITON)
    assert got.is_contiguous()
    assert torch.equal(got.cpu(), expected), (p, n, dtype)
    expected_keys = masks.sample_keys(cpu, first, n_samples, backend="numpy")
    assert torch.equal(
        masks.sample_keys(dev, first, n_samples, backend="triton").cpu(), expected_keys
    )


@triton_runs
@pytest.mark.parametrize("p", EDGE_RATES)
def test_triton_masks_equal_numpy_at_the_edges(p: float) -> None:
    assert TRITON is not None
    keys = masks.sample_keys(torch.arange(-3, 4, dtype=torch.int64) * 0x9E3779B9, 5, 11)
    dev = keys.to(TRITON)
    for n, call, dtype in itertools.product(EDGE_SIZES, (0, 1000), (torch.float32, torch.bfloat16)):
        expected = masks.keep_scale(keys, call, n, p, dtype, backend="numpy")
        assert torch.equal(
            masks.keep_scale(dev, call, n, p, dtype, backend="triton").cpu(), expected
        )


@triton_runs
def test_triton_kernels_take_empty_and_strided_keys() -> None:
    assert TRITON is not None
    keys = masks.sample_keys(torch.arange(6, dtype=torch.int64), 0, 2)
    assert masks.keep_scale(
        keys[:0].to(TRITON), 1, 9, 0.3, torch.float32, backend="triton"
    ).shape == (0, 9)
    assert masks.keep_scale(keys.to(TRITON), 1, 0, 0.3, torch.float32, backend="triton").shape == (
        12,
        0,
    )
    assert masks.sample_keys(keys.to(TRITON), 0, 0, backend="triton").shape == (0,)
    strided = keys.to(TRITON)[::3]  # rows picked out of a larger batch
    expected = masks.keep_scale(keys[::3].contiguous(), 4, 33, 0.1, torch.float32, backend="numpy")
    assert torch.equal(
        masks.keep_scale(strided, 4, 33, 0.1, torch.float32, backend="triton").cpu(), expected
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_cuda_keys_use_triton_where_it_imports() -> None:
    keys = torch.zeros(2, dtype=torch.int64, device="cuda")
    expected = "triton" if masks.triton_kernels() is not None else "torch"
    assert masks.backend_for(keys) == expected


def test_the_triton_backend_is_refused_where_triton_cannot_run() -> None:
    if masks.triton_kernels() is not None:
        pytest.skip("Triton imports here")
    with pytest.raises(InvalidArgumentError, match="needs Triton"):
        masks.backend_for(torch.zeros(2, dtype=torch.int64), "triton")


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=triton_runs)])
@pytest.mark.parametrize("first", [0, 7, 2**40])
def test_sample_keys_take_the_first_sample_from_a_tensor(backend: str, first: int) -> None:
    """How a CUDA graph makes sample keys: the first index is an input it reads."""
    device = TRITON if backend == "triton" else "cpu"
    assert device is not None
    keys = _keys([3, -5, 2**62], device)
    at = torch.tensor([first], dtype=torch.int64, device=device)
    got = masks.sample_keys(keys, at, 9, backend=backend)  # type: ignore[arg-type]
    expected = masks.sample_keys(_keys([3, -5, 2**62], "cpu"), first, 9, backend="numpy")
    assert torch.equal(got.cpu(), expected)
    with pytest.raises(InvalidArgumentError, match="as an int"):
        masks.sample_keys(keys.cpu(), at.cpu(), 9, backend="numpy")
