"""One-dimensional Bayesian optimisation of τ: a Gaussian process with expected improvement.

The ICML 2016 code tuned τ with Spearmint's ``GPEIOptChooser`` (a GP with a Matérn-5/2 kernel
and expected improvement; DropoutUncertaintyExps a6259f1, README and ``<dataset>/net/config.pb``)
over 30 evaluations. This is the same acquisition on the same one-dimensional search space, small
enough to read: the GP lives on ``log τ`` scaled to [0, 1], its kernel hyper-parameters are fixed
(Spearmint samples them by MCDRAW slice sampling), the observations are standardised, and EI is
maximised on a dense grid. Deterministic: the first three points are a fixed design, so a search
depends only on the values it observes.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import ndtr

#: Matérn-5/2 length-scale on the unit interval of log τ, and the observation noise variance
#: relative to the standardised observations (validation LLs are themselves noisy estimates).
LENGTH_SCALE = 0.2
NOISE = 1e-2
#: The first evaluations: a fixed design over the unit interval.
DESIGN = (1 / 6, 1 / 2, 5 / 6)
CANDIDATES = 513


def matern52(a: np.ndarray, b: np.ndarray, length_scale: float = LENGTH_SCALE) -> np.ndarray:
    """``k(a_i, b_j)`` for points on a line: ``(len(a), len(b))``."""
    r = np.abs(a[:, None] - b[None, :]) * math.sqrt(5) / length_scale
    return (1 + r + r**2 / 3) * np.exp(-r)


class ExpectedImprovement:
    """Maximise an objective of τ over ``[low, high]`` (log scale), one proposal at a time.

    ``propose()`` returns the next τ; ``observe(tau, value)`` records the objective there.
    """

    def __init__(self, low: float, high: float) -> None:
        if not 0 < low < high:
            raise ValueError(f"need 0 < low < high, got {low}, {high}")
        self.low, self.high = math.log(low), math.log(high)
        self.u: list[float] = []
        self.values: list[float] = []

    def _to_tau(self, u: float) -> float:
        return math.exp(self.low + u * (self.high - self.low))

    def _to_unit(self, tau: float) -> float:
        return (math.log(tau) - self.low) / (self.high - self.low)

    def observe(self, tau: float, value: float) -> None:
        self.u.append(self._to_unit(tau))
        # A diverged network's LL can be -inf; it counts as the worst value seen so far.
        self.values.append(value if math.isfinite(value) else -math.inf)

    def posterior(self, u: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        """GP mean and std at ``u`` in standardised units, and the best standardised value."""
        y = np.asarray(self.values, dtype=np.float64)
        finite = np.isfinite(y)
        floor = y[finite].min() if finite.any() else 0.0
        y = np.where(finite, y, floor)
        mu, sd = y.mean(), y.std() or 1.0
        z = (y - mu) / sd
        x = np.asarray(self.u)
        k = matern52(x, x) + NOISE * np.eye(len(x))
        chol = np.linalg.cholesky(k)
        alpha = np.linalg.solve(chol.T, np.linalg.solve(chol, z))
        ks = matern52(u, x)
        mean = ks @ alpha
        v = np.linalg.solve(chol, ks.T)
        var = np.clip(1.0 - (v**2).sum(0), 1e-12, None)
        return mean, np.sqrt(var), float(z.max())

    def propose(self) -> float:
        if len(self.u) < len(DESIGN):
            return self._to_tau(DESIGN[len(self.u)])
        u = np.linspace(0.0, 1.0, CANDIDATES)
        mean, std, best = self.posterior(u)
        gap = mean - best
        z = gap / std
        ei = gap * ndtr(z) + std * np.exp(-0.5 * z**2) / math.sqrt(2 * math.pi)
        return self._to_tau(float(u[int(np.argmax(ei))]))

    @property
    def best(self) -> tuple[float, float]:
        """(τ, value) of the best observation."""
        i = int(np.argmax(self.values))
        return self._to_tau(self.u[i]), self.values[i]
