"""Out-of-distribution (OOD) input sets for a classifier trained on a built-in dataset.

Each set is scored like the test set (:mod:`mcdrop.recipes.scores`); how well an uncertainty
score tells the two apart (AUROC) measures whether it knows what the model has not seen.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mcdrop.recipes import datasets

#: Rows of uniform noise in the OOD sets.
NOISE_ROWS = 1000


def upscale_digits(images: Tensor, size: int = 28, digit_size: int = 20) -> Tensor:
    """scikit-learn digits ``(N, 64)`` in [0, 16] as MNIST-like ``(N, size, size)`` in [0, 255]:
    bilinear upscaling to ``digit_size`` and centred padding, as MNIST centres 20×20 digits."""
    x = images.reshape(-1, 1, 8, 8).float() * (255.0 / 16.0)
    x = F.interpolate(x, size=(digit_size, digit_size), mode="bilinear", align_corners=False)
    pad = (size - digit_size) // 2
    x = F.pad(x, (pad, size - digit_size - pad, pad, size - digit_size - pad))
    return x[:, 0].clamp(0, 255)


def downscale_images(images: Tensor) -> Tensor:
    """28×28 images ``(N, 28, 28)`` in [0, 255] as 8×8 digits-like rows ``(N, 64)`` in [0, 16]."""
    x = F.adaptive_avg_pool2d(images[:, None].float(), 8)
    return (x.flatten(1) * (16.0 / 255.0)).clamp(0, 16)


def ood_sets(
    data: datasets.Dataset, *, seed: int = 0, limit: int | None = None
) -> tuple[dict[str, Tensor], list[str]]:
    """Out-of-distribution input sets for a classifier trained on ``data``.

    Uniform noise over the training inputs' range for every dataset; for ``fashion``, the
    scikit-learn digits upscaled to 28×28; for ``digits``, Fashion-MNIST shrunk to 8×8 (when
    installed). Returns the sets ``{name: (M, *input_shape)}`` and notes on sets left out.
    """
    generator = torch.Generator().manual_seed(seed)
    lo, hi = float(data.x_train.min()), float(data.x_train.max())
    n_noise = NOISE_ROWS if limit is None else min(NOISE_ROWS, limit)
    sets = {
        "uniform noise": lo
        + (hi - lo) * torch.rand(n_noise, *data.input_shape, generator=generator)
    }
    notes: list[str] = []
    if data.name == "fashion":
        from sklearn.datasets import load_digits

        sets["digits 28x28"] = upscale_digits(torch.from_numpy(load_digits().data))
    elif data.name == "digits":
        try:
            test = datasets.fashion_mnist_arrays()["x_test"]
        except datasets.DatasetNotFoundError as exc:
            notes.append(f"Fashion-MNIST 8x8 left out: {exc}")
        else:
            sets["fashion 8x8"] = downscale_images(torch.from_numpy(test[:2000].astype(np.float32)))
    if limit is not None:
        sets = {k: v[:limit] for k, v in sets.items()}
    return sets, notes
