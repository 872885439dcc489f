"""Decisions from held-out data: rejection thresholds and split-conformal prediction.

A model's uncertainty scores say *how* uncertain a row is; a user wants to know *when not to
trust* an answer. Both need a reference: the scores of rows the model never trained on, whose
answers are known. :func:`calibrate` computes them once (MC statistics of a held-out split and
its targets) and a model directory stores them as ``calibration.json`` beside ``model.json``.

Rejection. For each uncertainty score of the task (:data:`SCORES`) the sorted held-out scores
are kept, so the threshold for any rejection rate ``r`` is exact (an order statistic, no grid):
a row is *rejected* (flagged) when its score is above the threshold, and at most ``r`` of the
held-out rows are (at least ``r - 1/n`` without ties).

Conformal. Split conformal prediction (Vovk et al. 2005; Angelopoulos & Bates 2021) on the MC
statistics ("MC-CP", Bethell et al. 2023): with ``n`` held-out nonconformity scores and
coverage ``1 - α``, the quantile ``q`` is the ``⌈(n + 1)(1 - α)⌉``-th smallest score, and a new
row exchangeable with the held-out ones is covered with probability at least ``1 - α``.

* classification (LAC, Sadinle et al. 2019): score ``1 - p_y`` on the MC mean probabilities;
  the prediction set of a row is every class with ``p_k ≥ 1 - q`` (it may be empty: no class is
  plausible enough, a row to flag).
* regression: score ``max_k |y_k - mean_k| / std_k`` on the MC predictive mean and std; the
  interval of a row is ``mean ± q · std`` for every target (joint coverage).

Both guarantees hold for the ``n_samples`` the calibration used (recorded); other sample counts
change the scores a little.

Shape legend: ``N`` rows, ``K`` classes or regression targets.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from mcdrop import _files
from mcdrop.exceptions import (
    CheckpointError,
    DecisionUnavailableError,
    InvalidArgumentError,
    NotCalibratedError,
)
from mcdrop.stats import ClassificationSummary, RegressionSummary

if TYPE_CHECKING:
    from numpy.typing import ArrayLike

    from mcdrop.checkpoint import LoadedModel

#: The file in a model directory.
CALIBRATION = "calibration.json"
FORMAT_VERSION = 1

Task = Literal["classification", "regression"]

#: The uncertainty scores a row can be rejected on, per task (higher: less trustworthy).
#: ``least_confidence`` is ``1 - max_k p_k`` of the MC mean probabilities; ``std`` the row's
#: largest predictive std over its targets (epistemic and aleatoric), ``epistemic_std`` the
#: largest spread of its sampled means (the model's own doubt, without the noise it expects).
SCORES: dict[str, tuple[str, ...]] = {
    "classification": ("entropy", "least_confidence", "mutual_information"),
    "regression": ("epistemic_std", "std"),
}
#: The score a request that names none is rejected on: total uncertainty (the model's own
#: errors and rows it has not seen both raise it; see docs/decisions.md for the numbers).
DEFAULT_SCORE: dict[str, str] = {"classification": "entropy", "regression": "std"}
#: The nonconformity score of each task.
CONFORMAL_METHOD: dict[str, str] = {
    "classification": "lac",
    "regression": "normalized_residual",
}
#: The rejection rates and coverages ``calibration.json`` tabulates for people to read (any
#: rate or coverage can be asked for: the sorted scores give the exact answer).
RATES = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)
COVERAGES = (0.5, 0.8, 0.9, 0.95, 0.99)


# -- scores of rows --------------------------------------------------------------------------


def row_scores(summary: ClassificationSummary | RegressionSummary) -> dict[str, Tensor]:
    """Every rejection score of the task, ``{name: (N,)}`` float64, from an MC summary."""
    if isinstance(summary, ClassificationSummary):
        p = summary.probabilities.double()
        return {
            "entropy": summary.entropy.double(),
            "least_confidence": 1.0 - p.max(-1).values,
            "mutual_information": summary.mutual_information.double(),
        }
    return {
        "epistemic_std": summary.epistemic_variance.double().sqrt().amax(-1),
        "std": summary.std.double().amax(-1),
    }


def conformal_scores(summary: ClassificationSummary | RegressionSummary, targets: Tensor) -> Tensor:
    """Nonconformity ``(N,)`` of each row given its target: classifier ``targets (N,)`` class
    indices (score ``1 - p_y``); regressor ``targets (N, K)`` (score ``max_k |y - mean| /
    std``)."""
    if isinstance(summary, ClassificationSummary):
        p = summary.probabilities.double()
        y = targets.reshape(-1).long().to(p.device)
        if y.shape[0] != p.shape[0] or bool(((y < 0) | (y >= p.shape[1])).any()):
            raise InvalidArgumentError(
                f"targets must be {p.shape[0]} class indices in [0, {p.shape[1]}), got shape "
                f"{list(targets.shape)}"
            )
        return 1.0 - p.gather(1, y[:, None])[:, 0]
    mean, std = summary.mean.double(), summary.std.double()
    y = targets.double().to(mean.device)
    if y.dim() == 1 and mean.shape[1] == 1:
        y = y[:, None]
    if tuple(y.shape) != tuple(mean.shape):
        raise InvalidArgumentError(
            f"targets must have shape {list(mean.shape)} (rows, targets), got {list(targets.shape)}"
        )
    return ((y - mean).abs() / std.clamp_min(torch.finfo(torch.float64).tiny)).amax(-1)


# -- order statistics ------------------------------------------------------------------------


def rejection_threshold(sorted_scores: Tensor, rate: float) -> float:
    """The threshold that rejects (score above it) at most ``rate`` of ``sorted_scores (n,)``:
    the ``⌈n (1 - rate)⌉``-th smallest score (at least the smallest: ``rate < 1``)."""
    check_rate(rate)
    n = sorted_scores.shape[0]
    k = math.ceil(n * (1.0 - rate) - 1e-9)  # -1e-9: 0.9 * 10 is 9.000000000000002 in floats
    return float(sorted_scores[max(k, 1) - 1])


def conformal_quantile(sorted_scores: Tensor, coverage: float) -> float:
    """Split-conformal quantile of ``sorted_scores (n,)``: the ``⌈(n + 1) coverage⌉``-th
    smallest (Vovk et al. 2005), or an error when ``n`` rows cannot give that coverage (the
    quantile would be infinite: coverage above ``n / (n + 1)``)."""
    check_coverage(coverage)
    n = sorted_scores.shape[0]
    k = math.ceil((n + 1) * coverage - 1e-9)
    if k > n:
        raise DecisionUnavailableError(
            f"coverage {coverage} needs at least {k} calibration rows, this calibration has {n} "
            f"(the most it can give is {n / (n + 1):.4f}); ask for a lower coverage"
        )
    return float(sorted_scores[k - 1])


def check_rate(rate: float) -> float:
    if not (isinstance(rate, int | float) and 0.0 <= rate < 1.0):
        raise InvalidArgumentError(f"reject_rate must be in [0, 1), got {rate!r}")
    return float(rate)


def check_coverage(coverage: float) -> float:
    if not (isinstance(coverage, int | float) and 0.0 < coverage < 1.0):
        raise InvalidArgumentError(f"coverage must be in (0, 1), got {coverage!r}")
    return float(coverage)


def check_score(task: str, score: str | None) -> str:
    """``score``, or the task's default when None; an error names the task's scores."""
    if score is None:
        return DEFAULT_SCORE[task]
    if score not in SCORES[task]:
        raise DecisionUnavailableError(
            f"reject_score {score!r} is not a score of a {task} model; choose from "
            f"{list(SCORES[task])}"
        )
    return score


# -- the calibration -------------------------------------------------------------------------


@dataclass(frozen=True)
class Calibration:
    """The held-out statistics of one model: sorted rejection scores and conformal scores.

    Attributes:
        model: the model's name; task: its task; n_outputs: K.
        n_rows: held-out rows n.
        n_samples, seed: the MC samples the statistics were computed with.
        data: where the rows came from (e.g. ``"digits validation split"``); split: how.
        scores: ``{score: (n,)}`` float64, each sorted ascending.
        conformal: ``(n,)`` float64 nonconformity scores, sorted ascending.
        conformal_method: ``lac`` (classifier) or ``normalized_residual`` (regressor).
        command: what produced it, for people.
        weights_sha256: SHA-256 of the weights file it was computed with: loading refuses a
            calibration of other weights (a retrained model with a stale file); empty: unknown.
    """

    model: str
    task: Task
    n_outputs: int
    n_rows: int
    n_samples: int
    seed: int
    data: str
    scores: dict[str, Tensor]
    conformal: Tensor
    split: str = ""
    command: str = ""
    conformal_method: str = field(default="")
    weights_sha256: str = ""

    def __post_init__(self) -> None:
        if not self.conformal_method:
            object.__setattr__(self, "conformal_method", CONFORMAL_METHOD[self.task])

    @property
    def max_coverage(self) -> float:
        """The highest coverage ``n`` rows can give: ``n / (n + 1)``."""
        return self.n_rows / (self.n_rows + 1)

    def threshold(self, rate: float, score: str | None = None) -> float:
        """The rejection threshold of ``score`` (the task's default if None) at ``rate``."""
        return rejection_threshold(self.scores[check_score(self.task, score)], rate)

    def rejected_share(self, threshold: float, score: str | None = None) -> float:
        """Share of the held-out rows whose ``score`` is above ``threshold``."""
        s = self.scores[check_score(self.task, score)]
        return float((s > threshold).double().mean())

    def quantile(self, coverage: float) -> float:
        """The conformal quantile ``q`` at ``coverage`` (see :func:`conformal_quantile`)."""
        return conformal_quantile(self.conformal, coverage)

    def table(self) -> dict[str, Any]:
        """Thresholds at :data:`RATES` and quantiles at :data:`COVERAGES`, for people."""
        covs = [c for c in COVERAGES if math.ceil((self.n_rows + 1) * c - 1e-9) <= self.n_rows]
        return {
            "rejection_thresholds": {
                name: {str(r): self.threshold(r, name) for r in RATES} for name in self.scores
            },
            "conformal_quantiles": {str(c): self.quantile(c) for c in covs},
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "model": self.model,
            "task": self.task,
            "n_outputs": self.n_outputs,
            "n_rows": self.n_rows,
            "n_samples": self.n_samples,
            "seed": self.seed,
            "data": self.data,
            "split": self.split,
            "command": self.command,
            "conformal_method": self.conformal_method,
            "weights_sha256": self.weights_sha256,
            # Derived, for people reading the file; loading ignores it.
            "table": self.table(),
            "scores": {k: _floats(v) for k, v in self.scores.items()},
            "conformal": _floats(self.conformal),
        }

    @classmethod
    def from_dict(cls, data: Any, *, source: str = CALIBRATION) -> Calibration:
        """Validate parsed JSON; errors name ``source`` and the field."""

        def fail(message: str) -> CheckpointError:
            return CheckpointError(f"{source}: {message}")

        if not isinstance(data, dict):
            raise fail("the calibration must be a JSON object")
        if data.get("format_version") != FORMAT_VERSION:
            raise fail(f"format_version {data.get('format_version')!r} is not {FORMAT_VERSION}")
        known = {*_FIELDS, "format_version", "table"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise fail(f"unknown field(s) {unknown}")
        missing = sorted(set(_REQUIRED) - set(data))
        if missing:
            raise fail(f"missing field(s) {missing}")
        task = data["task"]
        if task not in SCORES:
            raise fail(f"'task' must be 'classification' or 'regression', got {task!r}")
        for key in ("n_outputs", "n_rows", "n_samples", "seed"):
            value = data[key]
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
                raise fail(f"{key!r} must be a non-negative integer, got {value!r}")
        for key in ("model", "data", "split", "command", "weights_sha256"):
            if not isinstance(data.get(key, ""), str):
                raise fail(f"{key!r} must be a string")
        if data.get("conformal_method", CONFORMAL_METHOD[task]) != CONFORMAL_METHOD[task]:
            raise fail(f"'conformal_method' of a {task} model must be {CONFORMAL_METHOD[task]!r}")
        n = data["n_rows"]
        if n < 1:
            raise fail("'n_rows' must be at least 1")
        raw = data["scores"]
        if not isinstance(raw, dict) or set(raw) != set(SCORES[task]):
            raise fail(f"'scores' must have exactly the {task} scores {list(SCORES[task])}")
        scores = {k: _sorted(raw[k], n, f"scores.{k}", fail) for k in SCORES[task]}
        conformal = _sorted(data["conformal"], n, "conformal", fail)
        return cls(
            model=data["model"],
            task=task,
            n_outputs=data["n_outputs"],
            n_rows=n,
            n_samples=data["n_samples"],
            seed=data["seed"],
            data=data["data"],
            split=data.get("split", ""),
            command=data.get("command", ""),
            weights_sha256=data.get("weights_sha256", ""),
            scores=scores,
            conformal=conformal,
        )

    def save(self, directory: str | Path) -> Path:
        """Write ``directory/calibration.json``; returns its path."""
        path = Path(directory) / CALIBRATION
        text = json.dumps(self.to_dict(), indent=1) + "\n"
        # (never half-written, nor written through a symlink: _files.write_files)
        _files.write_files({path: lambda name: Path(name).write_text(text)})
        return path

    def check_fits(self, task: str, n_outputs: int, weights: Path, *, source: str) -> None:
        """Raise :class:`CheckpointError` unless this calibration is of a model of this task
        and K, with these weights (when it records their digest)."""
        if (self.task, self.n_outputs) != (task, n_outputs):
            raise CheckpointError(
                f"{source}: calibrates a {self.task} model of {self.n_outputs} outputs, not a "
                f"{task} model of {n_outputs}; run `mcdrop calibrate` again"
            )
        if self.weights_sha256 and self.weights_sha256 != weights_digest(weights):
            raise CheckpointError(
                f"{source}: was computed with other weights than {weights.name} (SHA-256 "
                "differs: the model was retrained or replaced); run `mcdrop calibrate` again"
            )


def weights_digest(path: Path) -> str:
    """SHA-256 of a weights file, hex; empty if there is none."""
    if not path.is_file():
        return ""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


_REQUIRED = (
    "model",
    "task",
    "n_outputs",
    "n_rows",
    "n_samples",
    "seed",
    "data",
    "scores",
    "conformal",
)
_FIELDS = (*_REQUIRED, "split", "command", "conformal_method", "weights_sha256")


def _floats(t: Tensor) -> list[float]:
    # 17 significant digits round-trip a float64 exactly, so a loaded threshold is the stored one.
    return [float(v) for v in t.tolist()]


def _sorted(value: Any, n: int, what: str, fail: Any) -> Tensor:
    if not (isinstance(value, list) and len(value) == n):
        raise fail(f"{what!r} must be a list of n_rows={n} numbers")
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value):
        raise fail(f"{what!r} must hold numbers only")
    t = torch.tensor(value, dtype=torch.float64)
    if not bool(torch.isfinite(t).all()):
        raise fail(f"{what!r} must hold finite numbers")
    if bool((t[1:] < t[:-1]).any()):
        raise fail(f"{what!r} must be sorted ascending")
    return t


def read(directory: str | Path) -> Calibration | None:
    """``directory/calibration.json`` parsed and validated (JSON only: nothing runs), or None
    when the directory has none."""
    path = Path(directory) / CALIBRATION
    if not _files.is_present(path, "calibration"):
        return None
    return Calibration.from_dict(_files.read_json(path, "calibration"), source=str(path))


def from_statistics(
    summary: ClassificationSummary | RegressionSummary,
    targets: Tensor,
    *,
    model: str,
    seed: int,
    data: str,
    split: str = "",
    command: str = "",
) -> Calibration:
    """A calibration from the MC summary of held-out rows and their ``targets`` (classifier
    ``(N,)`` class indices; regressor ``(N, K)`` in original units)."""
    task: Task = "classification" if isinstance(summary, ClassificationSummary) else "regression"
    conformal = conformal_scores(summary, targets)
    scores = {k: v.cpu().sort().values for k, v in row_scores(summary).items()}
    if not all(bool(torch.isfinite(v).all()) for v in [conformal, *scores.values()]):
        raise InvalidArgumentError("held-out statistics must be finite to calibrate on")
    n_outputs = (
        summary.probabilities.shape[1]
        if isinstance(summary, ClassificationSummary)
        else summary.mean.shape[1]
    )
    return Calibration(
        model=model,
        task=task,
        n_outputs=n_outputs,
        n_rows=int(conformal.shape[0]),
        n_samples=summary.n_samples,
        seed=seed,
        data=data,
        split=split,
        command=command,
        scores=scores,
        conformal=conformal.cpu().sort().values,
    )


def calibrate(
    model: LoadedModel,
    x: Tensor | ArrayLike,
    targets: Tensor | ArrayLike,
    *,
    n_samples: int | None = None,
    seed: int = 0,
    data: str = "held-out rows",
    split: str = "",
    command: str = "",
    save: bool = False,
) -> Calibration:
    """Calibrate a loaded model on held-out rows ``x (N, *input_shape)`` and their ``targets``
    (classifier ``(N,)`` class indices; regressor ``(N, K)`` or ``(N,)`` for one target, in
    original units), with ``n_samples`` MC samples (the manifest's default if None). Both are
    tensors, or arrays or nested lists (what ``np.load`` gives of an ``.npz``, as ``mcdrop
    calibrate --data`` reads).

    With ``save``, the calibration is written into the model's directory, and the model
    carries it (``model.calibration``). Rows must not have been trained on: the guarantees
    hold for rows exchangeable with these.
    """
    from mcdrop.predictor import Predictor  # the predictor imports checkpoint, which imports us

    predictor = Predictor(model, results_device="cpu")
    x, targets = torch.as_tensor(x), torch.as_tensor(targets)
    if x.shape[0] != targets.shape[0]:
        raise InvalidArgumentError(
            f"x has {x.shape[0]} rows and targets {targets.shape[0]}; they must match"
        )
    if model.spec.task == "regression" and targets.dim() == 1:
        targets = targets[:, None]
    summary, _ = predictor.uncertainty(x, n_samples, seed=seed)
    result = from_statistics(
        summary, targets, model=model.spec.name, seed=seed, data=data, split=split, command=command
    )
    from mcdrop.checkpoint import WEIGHTS

    result = dataclasses.replace(result, weights_sha256=weights_digest(Path(model.path) / WEIGHTS))
    if save:
        result.save(model.path)
        model.calibration = result
    return result


# -- decisions on new rows -------------------------------------------------------------------


@dataclass(frozen=True)
class DecisionRequest:
    """What a request asks: a rejection flag on ``reject_score`` above ``reject_threshold``
    (given, or resolved from ``reject_rate``), and/or conformal output at ``coverage`` with its
    ``quantile``. Made by :func:`resolve`, checked before any sampling."""

    reject_score: str | None = None
    reject_threshold: float | None = None
    reject_rate: float | None = None
    coverage: float | None = None
    quantile: float | None = None

    @property
    def empty(self) -> bool:
        return self.reject_threshold is None and self.coverage is None


def resolve(
    task: str,
    calibration: Calibration | None,
    *,
    reject_rate: float | None = None,
    reject_threshold: float | None = None,
    reject_score: str | None = None,
    coverage: float | None = None,
    model: str = "the model",
) -> DecisionRequest:
    """Check a request's decision options and resolve them against ``calibration``.

    Raises:
        InvalidArgumentError: a rate or coverage out of range, both a rate and a threshold, or
            a score without a rate or threshold.
        DecisionUnavailableError: a score the task does not have, a coverage the calibration
            cannot give, or (NotCalibratedError) a rate or coverage asked of a model without a
            calibration (an explicit threshold needs none).
    """
    if reject_rate is not None and reject_threshold is not None:
        raise InvalidArgumentError(
            "send reject_rate or reject_threshold, not both (a rate is turned into a threshold)"
        )
    if reject_score is not None and reject_rate is None and reject_threshold is None:
        raise InvalidArgumentError("reject_score applies with reject_rate or reject_threshold")
    if reject_threshold is not None and not math.isfinite(reject_threshold):
        raise InvalidArgumentError(f"reject_threshold must be finite, got {reject_threshold!r}")
    score = None
    if reject_rate is not None or reject_threshold is not None:
        score = check_score(task, reject_score)
    if reject_rate is not None:
        check_rate(reject_rate)
    if coverage is not None:
        check_coverage(coverage)
    if (reject_rate is not None or coverage is not None) and calibration is None:
        asked = "reject_rate" if reject_rate is not None else "coverage"
        # (a threshold stands in for a rate, never for a coverage)
        instead = " or send an explicit reject_threshold" if asked == "reject_rate" else ""
        raise NotCalibratedError(
            f"{model} has no calibration ({CALIBRATION}), so {asked} cannot be served; "
            f"calibrate it (`mcdrop calibrate MODEL_DIR`){instead} (a server reads the file "
            "when it loads the model: restart one that runs)"
        )
    threshold = reject_threshold
    if reject_rate is not None:
        assert calibration is not None
        threshold = calibration.threshold(reject_rate, score)
    quantile = None
    if coverage is not None:
        assert calibration is not None
        quantile = calibration.quantile(coverage)
    return DecisionRequest(
        reject_score=score,
        reject_threshold=None if threshold is None else float(threshold),
        reject_rate=reject_rate,
        coverage=coverage,
        quantile=quantile,
    )


@dataclass(frozen=True)
class Decisions:
    """Per-row decisions.

    Attributes:
        reject: ``(N,)`` bool, the row's score is above the threshold (None if not asked).
        prediction_set: ``(N, K)`` bool, class k is in the row's conformal set (classifier).
        lower, upper: ``(N, K)`` conformal interval (regressor).
    """

    reject: Tensor | None = None
    prediction_set: Tensor | None = None
    lower: Tensor | None = None
    upper: Tensor | None = None


def decide(
    request: DecisionRequest, summary: ClassificationSummary | RegressionSummary
) -> Decisions:
    """Apply a resolved request to an MC summary of ``N`` rows."""
    reject = prediction_set = lower = upper = None
    if request.reject_threshold is not None:
        assert request.reject_score is not None
        reject = row_scores(summary)[request.reject_score] > request.reject_threshold
    if request.quantile is not None:
        q = request.quantile
        if isinstance(summary, ClassificationSummary):
            # The same comparison as the score (1 - p_k <= q), so membership and coverage agree
            # to the last bit.
            prediction_set = (1.0 - summary.probabilities.double()) <= q
        else:
            mean, std = summary.mean.double(), summary.std.double()
            lower, upper = mean - q * std, mean + q * std
    return Decisions(reject=reject, prediction_set=prediction_set, lower=lower, upper=upper)


def coverage_of(
    request: DecisionRequest,
    summary: ClassificationSummary | RegressionSummary,
    targets: Tensor,
) -> Tensor:
    """``(N,)`` bool: the row's target is in its conformal set or interval (for evaluation)."""
    assert request.quantile is not None
    return conformal_scores(summary, targets) <= request.quantile


def describe(calibration: Calibration) -> Mapping[str, Any]:
    """What a client may know of a calibration (no scores): where it came from and its range."""
    return {
        "n_rows": calibration.n_rows,
        "n_samples": calibration.n_samples,
        "seed": calibration.seed,
        "data": calibration.data,
        "reject_scores": list(SCORES[calibration.task]),
        "default_reject_score": DEFAULT_SCORE[calibration.task],
        "conformal_method": calibration.conformal_method,
        "max_coverage": calibration.max_coverage,
    }
