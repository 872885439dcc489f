"""Shared fixtures of the UCI benchmark tests: tiny-budget options on the real splits."""

from __future__ import annotations

import pytest

from benchmarks.uci import data
from benchmarks.uci.protocol import Options

needs_data = pytest.mark.skipif(
    not (data.data_root() / "yacht" / "data.txt").is_file(),
    reason=f"UCI data not found at {data.data_root()} (../shared/data/uci or ${data.DATA_ENV})",
)


@pytest.fixture
def tiny(tmp_path) -> Options:
    """Yacht, 3 epochs, T = 30: seconds per split."""
    return Options(
        datasets=("yacht",),
        epochs=3,
        n_samples=30,
        val_samples=20,
        crps_samples=20,
        out=tmp_path,
        progress=False,
    )
