"""What a run of the protocol produces: per-split test metrics, grouped per dataset, and their
summary over splits (the columns of ``uci.csv``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

COLUMNS = [
    "dataset",
    "budget",
    "method",
    "n_splits",
    "rmse_mean",
    "rmse_se",
    "ll_mean",
    "ll_se",
    "picp95_mean",
    "width95_mean",
    "crps_mean",
]


@dataclass
class SplitResult:
    """Test metrics of one split, in original units, for one method (``val_ll``: the grid's
    best validation log-likelihood; ``crps_samples``: the samples the CRPS used;
    ``ll_moment_matched``: LL of the moment-matched Gaussian, Deep Ensembles' score; ``lr``:
    the Adam learning rate Deep Ensembles' final members trained at; ``lr_backoffs``: how many
    times their retrain diverged and stepped down from the rate chosen on validation;
    ``n_epochs``: the epochs they trained)."""

    split: int
    dropout: float
    tau: float
    rmse: float
    rmse_deterministic: float
    ll: float
    picp95: float
    width95: float
    crps: float
    val_ll: float
    crps_samples: int
    ll_moment_matched: float = math.nan
    lr: float = math.nan
    lr_backoffs: int = 0
    n_epochs: int = 0


@dataclass
class DatasetResult:
    """All splits of one dataset, per method, and the wall time they took."""

    name: str
    epochs: int
    splits: dict[str, list[SplitResult]] = field(default_factory=dict)
    seconds: float = 0.0


def summarise(rows: Sequence[SplitResult]) -> dict[str, float]:
    """Mean and standard error (sample std / √n; 0 for one split) over splits."""

    def mean_se(values: list[float]) -> tuple[float, float]:
        arr = np.asarray(values)
        se = float(arr.std(ddof=1) / math.sqrt(len(arr))) if len(arr) > 1 else 0.0
        return float(arr.mean()), se

    rmse, rmse_se = mean_se([r.rmse for r in rows])
    ll, ll_se = mean_se([r.ll for r in rows])
    return {
        "n_splits": len(rows),
        "rmse_mean": rmse,
        "rmse_se": rmse_se,
        "ll_mean": ll,
        "ll_se": ll_se,
        "picp95_mean": float(np.mean([r.picp95 for r in rows])),
        "width95_mean": float(np.mean([r.width95 for r in rows])),
        "crps_mean": float(np.mean([r.crps for r in rows])),
    }


def row_key(row: dict[str, object]) -> tuple[str, str, str]:
    """A row's identity: (dataset, budget, method); ``uci.json`` keys it joined by ``|``."""
    return str(row["dataset"]), str(row["budget"]), str(row["method"])
