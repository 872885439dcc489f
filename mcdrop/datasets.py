"""Offline datasets: scikit-learn's bundled digits and diabetes, and the UCI regression splits.

Nothing here downloads. Splits are seeded permutations, so a training command is reproducible.
Shapes: ``x (N, *input_shape)`` float32; classification ``y (N,)`` int64; regression
``y (N, K)`` float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mcdrop.exceptions import InvalidArgumentError


@dataclass(frozen=True)
class Dataset:
    """A task with train / validation / test parts."""

    name: str
    task: str
    labels: list[str]
    input_shape: list[int]
    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor
    description: str = ""


def _split(
    x: np.ndarray, y: np.ndarray, seed: int, fractions: tuple[float, float] = (0.7, 0.15)
) -> tuple[Tensor, ...]:
    order = np.random.default_rng(seed).permutation(len(x))
    n_train = round(fractions[0] * len(x))
    n_val = round(fractions[1] * len(x))
    parts = (order[:n_train], order[n_train : n_train + n_val], order[n_train + n_val :])
    out: list[Tensor] = []
    for idx in parts:
        out += [torch.as_tensor(x[idx]), torch.as_tensor(y[idx])]
    return tuple(out)


def digits(seed: int = 0) -> Dataset:
    """scikit-learn's 8×8 digits: 1,797 images as 64 pixel intensities in [0, 16], 10 classes."""
    from sklearn.datasets import load_digits

    data = load_digits()
    parts = _split(data.data.astype(np.float32), data.target.astype(np.int64), seed)
    return Dataset(
        "digits",
        "classification",
        [str(i) for i in range(10)],
        [64],
        *parts,
        description="MLP classifier of 8x8 handwritten digits (64 pixels, 0-16)",
    )


DIABETES_FEATURES = ["age", "sex", "bmi", "bp", "s1", "s2", "s3", "s4", "s5", "s6"]


def diabetes(seed: int = 0) -> Dataset:
    """scikit-learn's diabetes data in original units: 442 patients, 10 features, target a
    measure of disease progression one year after baseline."""
    from sklearn.datasets import load_diabetes

    data = load_diabetes(scaled=False)
    parts = _split(data.data.astype(np.float32), data.target.astype(np.float32)[:, None], seed)
    return Dataset(
        "diabetes",
        "regression",
        ["disease_progression"],
        [10],
        *parts,
        description="MLP regressor of diabetes progression from " + ", ".join(DIABETES_FEATURES),
    )


BUILTIN = {"digits": digits, "diabetes": diabetes}


def load(name: str, seed: int = 0) -> Dataset:
    """A built-in dataset by name."""
    if name not in BUILTIN:
        raise InvalidArgumentError(f"unknown dataset {name!r}; choose from {sorted(BUILTIN)}")
    return BUILTIN[name](seed)


# -- UCI regression benchmark (Gal & Ghahramani 2016 splits) -----------------------------------


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


def uci_n_splits(root: str | Path, name: str) -> int:
    return int(_ints(Path(root) / name / "n_splits.txt")[0])


def uci_split(root: str | Path, name: str, split: int) -> UCISplit:
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
