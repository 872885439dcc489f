"""benchmarks.uci.protocol: the paper's formulas."""

from __future__ import annotations

import pytest

from benchmarks.uci.protocol import weight_decay


def test_weight_decay_is_twice_the_papers_l2_coefficient():
    p, tau, n = 0.05, 0.1, 455
    lam = 1e-4 * (1 - p) / (2 * n * tau)
    assert weight_decay(p, tau, n) == pytest.approx(2 * lam)
