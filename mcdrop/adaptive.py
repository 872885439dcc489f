"""Adaptive sample counts: sample each row until its MC estimate is precise enough.

``n_samples="auto"`` draws samples in rounds on a fixed schedule (:func:`checkpoints`: 16, 24,
32, 48, 64, 96, … up to ``max_n_samples``). After each round every row still sampling checks its
**Monte Carlo standard error** against ``tolerance``; a row within it stops, and leaves the passes
of the later rounds, so easy rows cost few samples and hard rows get more. The error is

* classifier: the standard error of the mean probabilities, the largest over classes,
  ``max_k sqrt(s²_k / n)``, with ``s²_k`` the unbiased sample variance of class k's probability
  over the row's ``n`` samples (tolerance in probability: 0.01 means ±0.01 at one standard
  error; default 0.01);
* regressor: the standard error of the predictive mean and of the predictive standard deviation,
  the larger, **in units of that standard deviation**, the largest over outputs:
  ``max_k max(SE(mean_k), SE(std_k)) / std_k`` (0.05: the mean and the std are each known to
  5 % of the std the answer reports, at one standard error; default 0.05). See
  :meth:`~mcdrop.stats.RegressionAccumulator.standard_error` for the estimate of SE(std).

See :meth:`~mcdrop.stats.ClassificationAccumulator.standard_error`,
:meth:`~mcdrop.stats.RegressionAccumulator.standard_error` and :func:`default_tolerance`.

**Why these units for a regressor (measured).** An error in units of the row's own predictive
std is ``(s/σ)/sqrt(n)`` for the mean: it depends on the row's epistemic share ``s/σ`` of the
spread, which is what separates easy rows (the noise dominates) from hard ones, and it is bounded
(``s/σ ≤ 1``), so even the least known row needs at most ``1/tolerance²`` samples. On
``models/diabetes`` (homoscedastic, dropout 0.05) and the first 300 rows of its data in original
units, ``s/σ`` is 0.06–0.28 (median 0.14); the same rows moved 2×, 4× and 10× as far from the
training mean have medians 0.27, 0.50 and 0.82. Counts at 0.05 follow: mean 18 samples in
distribution (84 % of rows stop at 16), 40, 121 and 329 for the moved rows. The alternative
units were measured too: the row's aleatoric (noise) std is the same as the predictive std for
a homoscedastic model's in-distribution rows (``s ≪ σ_a``), and unusable for a heteroscedastic
one away from its data: on a heteroscedastic MC-dropout net of UCI concrete (dropout 0.01) the
predicted noise std of rows moved 4× away collapses to 0.005–42 (``s/σ_a`` up to 3·10³, 10⁷ at
10×), so a rule in those units would run every such row to the maximum whatever the tolerance.
The std's term is needed: on that concrete net (sampled means with kurtosis 10–80: most masks
agree, a few differ a lot) the MC error of the std is 0.4–2.7× that of the mean in
distribution (median 1.1×) and 1–4.6× on rows moved 4× away, so a mean-only rule stopped rows whose
std was still poorly known; on diabetes (kurtosis ~4) it is at most 0.3× the mean's in distribution,
and changes no count there. The default is per task: 0.01 in these units would ask for
``10⁴ (s/σ)²`` samples (mean 279 on diabetes, 1 % of rows at 16; 892 on concrete); 0.05 lets
in-distribution rows of a model that knows its data stop at the first check while rows far from
it get up to 20× more, and an interval ``mean ± 1.96 std`` read to 5 % of its half-width is as
precise as it is read. (A note for anyone reproducing the figures: scikit-learn's
``load_diabetes()`` returns *scaled* features by default; fed to ``models/diabetes``, which
takes original units, every row lies ~4–9 training stds from the data, and every row
used 1000 samples at 0.01 (nearly all 192 at 0.05) under the earlier mean-only rule;
``load_diabetes(scaled=False)`` is the model's input.)

**Reproducible, and exactly a fixed-n result.** Masks are keyed by (row contents, seed, sample
index), a round draws the next sample indices of its rows, and the stopping rule is a function of
the samples alone: the same seed gives every row the same count, whatever other rows share its
batch, and a row that stopped at n samples has exactly the samples (and, to float rounding of
different pass sizes, the statistics) of a fixed ``n_samples=n`` request with the same seed.

**Limits.** The rule trusts the samples it has: a row whose rare outcomes the first 16 samples
never show looks certain and stops at 16. Regressors whose sampled means have rare large
outliers (low dropout rates) are the common case: on the concrete net above, ``"auto"`` did
worse than a fixed count of equal cost (``benchmarks/README.md``, § Adaptive sample counts,
Regressors); there a fixed count is the better choice. The error is checked only at the
checkpoints, so a row uses up to 1.5× the samples it strictly needed (the price of few, large
passes); and checking several times makes a stop on an error that happens to be estimated low
more likely than at one fixed n: the rule bounds the estimated error, not the true one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from mcdrop import masks, sampling
from mcdrop.exceptions import InvalidArgumentError
from mcdrop.planning import SamplingPlan

#: Samples every row draws before its error is first checked: enough for a usable variance
#: estimate (its relative error is about 1 / sqrt(2·15) ≈ 18 %).
FIRST_CHECK = 16
#: Default tolerance on the MC standard error per task (see the module docstring): in
#: probability for a classifier, in units of the predictive std for a regressor.
DEFAULT_TOLERANCES: dict[str, float] = {"classification": 0.01, "regression": 0.05}
#: Default most samples a row may use.
DEFAULT_MAX_N_SAMPLES = 1000


def checkpoints(max_n_samples: int) -> list[int]:
    """The sample counts after which rows check their error: 16, 24, 32, 48, 64, 96, 128, …
    (powers of two and 1.5× powers of two, so each is at most 1.5× the one before), those below
    ``max_n_samples``, then ``max_n_samples`` itself (where every row stops).

    >>> checkpoints(100)
    [16, 24, 32, 48, 64, 96, 100]
    """
    check_max_n_samples(max_n_samples)
    points: list[int] = []
    n = FIRST_CHECK
    while n < max_n_samples:
        points.append(n)
        n = n * 3 // 2 if n & (n - 1) == 0 else n * 4 // 3  # 16 -> 24 -> 32 -> 48 -> ...
    return [*points, max_n_samples]


def default_tolerance(task: str) -> float:
    """The default tolerance of a model of ``task`` (``"classification"`` or ``"regression"``).

    >>> default_tolerance("classification"), default_tolerance("regression")
    (0.01, 0.05)
    """
    try:
        return DEFAULT_TOLERANCES[task]
    except KeyError:
        raise InvalidArgumentError(f"no default tolerance for task {task!r}") from None


def check_tolerance(tolerance: float) -> float:
    """Validate a tolerance: a finite number above 0."""
    if isinstance(tolerance, bool) or not isinstance(tolerance, int | float):
        raise InvalidArgumentError(f"tolerance must be a number, got {type(tolerance).__name__}")
    if not (math.isfinite(tolerance) and tolerance > 0):
        raise InvalidArgumentError(f"tolerance must be a finite number above 0, got {tolerance}")
    return float(tolerance)


def check_max_n_samples(max_n_samples: int) -> int:
    """Validate a maximum sample count: an integer of at least 1."""
    if isinstance(max_n_samples, bool) or not isinstance(max_n_samples, int):
        raise InvalidArgumentError(
            f"max_n_samples must be an integer, got {type(max_n_samples).__name__}"
        )
    if max_n_samples < 1:
        raise InvalidArgumentError(f"max_n_samples must be at least 1, got {max_n_samples}")
    return max_n_samples


def sample_chunks_until(
    model: nn.Module,
    x: Tensor,
    error: Callable[[Tensor], Tensor],
    *,
    tolerance: float,
    max_n_samples: int = DEFAULT_MAX_N_SAMPLES,
    seed: int | Tensor | None = None,
    max_pass_rows: int | None = None,
    prefix: sampling.Prefix = "auto",
    plan: SamplingPlan | None = None,
) -> Iterator[sampling.Chunk]:
    """MC-dropout samples of every row until its error is within ``tolerance`` at a checkpoint,
    or it has ``max_n_samples``: :func:`~mcdrop.sampling.sample_chunks`, round by round.

    The caller streams every chunk into its statistics before asking for the next; at each
    checkpoint the rows still sampling ask ``error`` for their current error.

    Args:
        model, x, seed, max_pass_rows, prefix, plan: as for :func:`~mcdrop.sampling.sample_chunks`
            (a seed of None draws one seed for all rounds).
        error: ``rows (n,) int64 -> (n,)`` the MC error of those rows over the samples streamed
            so far (e.g. an accumulator's ``standard_error()[rows]``). NaN never stops a row.
        tolerance: a row stops at the first checkpoint where its error is at most this (in the
            error's units: see :func:`default_tolerance` for the library's per-task choice).
        max_n_samples: the most samples a row uses.

    Yields:
        :class:`~mcdrop.sampling.Chunk` objects whose ``samples`` are the rows' sample indices
        (from 0 at the first round) and ``rows`` the ``(n,)`` indices of their rows in ``x``.
    """
    tolerance = check_tolerance(tolerance)
    schedule = checkpoints(max_n_samples)
    if seed is None:
        seed = masks.fresh_seed()  # one seed for every round: rounds continue each other
    active = torch.arange(x.shape[0])
    done = 0
    for point in schedule:
        rows_seed = seed[active] if isinstance(seed, Tensor) else seed
        chunks = sampling.sample_chunks(
            model,
            x[active],
            point - done,
            seed=rows_seed,
            max_pass_rows=max_pass_rows,
            prefix=prefix,
            plan=plan,
            first_sample=done,
        )
        for chunk in chunks:
            s0 = done + chunk.samples.start
            yield sampling.Chunk(
                slice(s0, s0 + chunk.values.shape[0]), active[chunk.rows], chunk.values
            )
        done = point
        if done == max_n_samples:
            return
        active = active[~(error(active) <= tolerance)]  # NaN (a non-finite output) keeps going
        if active.numel() == 0:
            return
