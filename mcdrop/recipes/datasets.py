"""Offline datasets: scikit-learn's bundled digits and diabetes, and Fashion-MNIST from Debian's
``dataset-fashion-mnist`` package.

Nothing here downloads. Splits are seeded permutations, so a training command is reproducible.
Shapes: ``x (N, *input_shape)`` float32; classification ``y (N,)`` int64; regression
``y (N, K)`` float32.
"""

from __future__ import annotations

import functools
import gzip
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mcdrop.checkpoint import Task
from mcdrop.exceptions import InvalidArgumentError


@dataclass(frozen=True)
class Dataset:
    """A task with train / validation / test parts."""

    name: str
    task: Task
    labels: list[str]
    input_shape: list[int]
    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor
    description: str = ""
    split: str = "seeded permutation 70/15/15 train/validation/test"


#: x_train, y_train, x_val, y_val, x_test, y_test: the tensor fields of a :class:`Dataset`.
_Splits = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]


def _split(
    x: np.ndarray, y: np.ndarray, seed: int, fractions: tuple[float, float] = (0.7, 0.15)
) -> _Splits:
    order = np.random.default_rng(seed).permutation(len(x))
    n_train = round(fractions[0] * len(x))
    n_val = round(fractions[1] * len(x))
    train, val, test = (
        order[:n_train],
        order[n_train : n_train + n_val],
        order[n_train + n_val :],
    )
    return (
        torch.as_tensor(x[train]),
        torch.as_tensor(y[train]),
        torch.as_tensor(x[val]),
        torch.as_tensor(y[val]),
        torch.as_tensor(x[test]),
        torch.as_tensor(y[test]),
    )


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


# -- Fashion-MNIST (IDX files from Debian's dataset-fashion-mnist) -----------------------------

FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_LABELS = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
FASHION_MNIST_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
FASHION_MNIST_INSTALL = "apt-get install dataset-fashion-mnist"
#: Rows of the official training set held out (seeded) for validation.
FASHION_MNIST_VALIDATION = 5000

# IDX type codes (LeCun's format): the third magic byte.
_IDX_DTYPES: dict[int, np.dtype[Any]] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are not on this machine; the message says how to install them."""


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (gzip-compressed or not) as a numpy array of its stored shape and type."""
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":  # gzip magic, whatever the file is called
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise InvalidArgumentError(f"{path}: not an IDX file (magic bytes {raw[:4].hex()})")
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    count = int(np.prod(shape))
    if len(raw) - header != count * dtype.itemsize:
        raise InvalidArgumentError(
            f"{path}: header says shape {shape} ({count * dtype.itemsize} bytes of data), the "
            f"file holds {len(raw) - header}"
        )
    return np.frombuffer(raw, dtype=dtype, count=count, offset=header).reshape(shape)


def _find_idx(root: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    raise DatasetNotFoundError(
        f"Fashion-MNIST file {stem}[.gz] not found in {root}; install the data with "
        f"`{FASHION_MNIST_INSTALL}` (Debian), or pass the folder that holds the four IDX files"
    )


def fashion_mnist_arrays(root: str | Path | None = None) -> dict[str, np.ndarray]:
    """The four official Fashion-MNIST arrays: ``x_train (60000, 28, 28)`` and
    ``x_test (10000, 28, 28)`` uint8 pixels, ``y_train``/``y_test`` uint8 labels.

    Raises:
        DatasetNotFoundError: a file is missing; the message names the install command.
    """
    folder = FASHION_MNIST_ROOT if root is None else Path(root)
    paths = tuple(_find_idx(folder, stem) for stem in FASHION_MNIST_FILES.values())
    return dict(zip(FASHION_MNIST_FILES, _read_all(paths), strict=True))


@functools.lru_cache(maxsize=2)
def _read_all(paths: tuple[Path, ...]) -> tuple[np.ndarray, ...]:
    # Decompressing 60,000 images takes about a second; the arrays are read-only, so a
    # process that loads them twice (tests, experiments, OOD sets) shares one copy.
    return tuple(read_idx(p) for p in paths)


def fashion_mnist(
    seed: int = 0,
    *,
    root: str | Path | None = None,
    n_validation: int = FASHION_MNIST_VALIDATION,
) -> Dataset:
    """Fashion-MNIST (Xiao et al. 2017): 28×28 grey images of 10 kinds of clothing.

    Inputs are pixel intensities 0–255 as float32 ``(N, 28, 28)``; normalisation belongs to the
    model. The official 10,000 test images are the test part; ``n_validation`` rows of the
    60,000 training images (a seeded permutation) are the validation part, the rest, in that
    permuted order, the training part.
    """
    arrays = fashion_mnist_arrays(root)
    order = np.random.default_rng(seed).permutation(len(arrays["x_train"]))
    val, train = order[:n_validation], order[n_validation:]

    def images(a: np.ndarray) -> Tensor:
        return torch.from_numpy(a.astype(np.float32))

    def labels(a: np.ndarray) -> Tensor:
        return torch.from_numpy(a.astype(np.int64))

    return Dataset(
        "fashion",
        "classification",
        list(FASHION_MNIST_LABELS),
        [28, 28],
        images(arrays["x_train"][train]),
        labels(arrays["y_train"][train]),
        images(arrays["x_train"][val]),
        labels(arrays["y_train"][val]),
        images(arrays["x_test"]),
        labels(arrays["y_test"]),
        description="CNN classifier of 28x28 Fashion-MNIST images (pixels 0-255)",
        split=f"official 10k test set; seeded {n_validation} of the 60k training set for "
        "validation, the rest for training",
    )


BUILTIN = {"digits": digits, "diabetes": diabetes, "fashion": fashion_mnist}


def load(
    name: str,
    seed: int = 0,
    *,
    train_size: int | None = None,
    exclude_classes: list[int] | None = None,
) -> Dataset:
    """A built-in dataset by name.

    Args:
        name: one of :data:`BUILTIN`.
        seed: seed of the split.
        train_size: keep only the first ``train_size`` training rows (the training part is
            already in seeded random order), for quick experiments.
        exclude_classes: classification only: drop these classes from the training and
            validation parts (the test part keeps them, as out-of-distribution examples).
    """
    if name not in BUILTIN:
        raise InvalidArgumentError(f"unknown dataset {name!r}; choose from {sorted(BUILTIN)}")
    data = BUILTIN[name](seed)
    if exclude_classes:
        if data.task != "classification":
            raise InvalidArgumentError(f"exclude_classes needs a classifier; {name} is regression")
        bad = [c for c in exclude_classes if not 0 <= c < len(data.labels)]
        if bad:
            raise InvalidArgumentError(f"exclude_classes {bad} are not classes of {name}")
        drop = torch.tensor(exclude_classes)
        keep_train = ~torch.isin(data.y_train, drop)
        keep_val = ~torch.isin(data.y_val, drop)
        data = replace(
            data,
            x_train=data.x_train[keep_train],
            y_train=data.y_train[keep_train],
            x_val=data.x_val[keep_val],
            y_val=data.y_val[keep_val],
        )
    if train_size is not None:
        if train_size < 1:
            raise InvalidArgumentError(f"train_size must be at least 1, got {train_size}")
        data = replace(data, x_train=data.x_train[:train_size], y_train=data.y_train[:train_size])
    return data
