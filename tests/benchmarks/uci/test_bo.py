"""benchmarks.uci.bo: expected improvement on one log-scaled variable."""

from __future__ import annotations

import math

import pytest

from benchmarks.uci.bo import DESIGN, ExpectedImprovement


def _objective(tau: float) -> float:
    return -((math.log(tau) - math.log(0.3)) ** 2)  # maximum at τ = 0.3


def _search(evals: int) -> ExpectedImprovement:
    search = ExpectedImprovement(0.01, 10.0)
    for _ in range(evals):
        tau = search.propose()
        assert 0.01 <= tau <= 10.0
        search.observe(tau, _objective(tau))
    return search


def test_expected_improvement_finds_the_maximum():
    tau, _ = _search(12).best
    assert tau == pytest.approx(0.3, rel=0.1)


def test_search_is_deterministic_and_starts_with_the_design():
    a, b = _search(8), _search(8)
    assert a.u == b.u
    assert a.u[: len(DESIGN)] == pytest.approx(list(DESIGN))


def test_diverged_evaluations_do_not_break_the_gp():
    search = ExpectedImprovement(0.01, 10.0)
    for value in (-math.inf, -1.0, -2.0, -math.inf):
        search.observe(search.propose(), value)
    assert 0.01 <= search.propose() <= 10.0
