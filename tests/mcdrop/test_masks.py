"""Counter-based masks: the hash against a pure-Python SplitMix64, rates, and key properties."""

from __future__ import annotations

import pytest
import torch

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


def test_calls_give_independent_masks() -> None:
    keys = torch.arange(4, dtype=torch.int64)
    assert not torch.equal(masks.uniform16(keys, 0, 16), masks.uniform16(keys, 1, 16))


@pytest.mark.parametrize("seed", [-1, 2**63, 1.5, True, "3"])
def test_bad_seeds(seed: object) -> None:
    with pytest.raises(InvalidArgumentError):
        masks.check_seed(seed)  # type: ignore[arg-type]


def test_fresh_seed_in_range() -> None:
    assert 0 <= masks.fresh_seed() <= masks.MAX_SEED
