"""mcdrop.recipes.ood: the out-of-distribution input sets."""

from __future__ import annotations

import torch

from mcdrop.recipes import ood


def test_upscaled_digits_look_like_mnist() -> None:
    x = torch.zeros(2, 64)
    x[:, 27] = 16.0  # one bright pixel near the centre
    images = ood.upscale_digits(x)
    assert images.shape == (2, 28, 28)
    assert float(images.min()) == 0.0
    assert 0 < float(images.max()) <= 255.0
    assert float(images[:, :4].abs().sum()) == 0.0  # the 4-pixel MNIST margin stays empty
    assert ood.downscale_images(images).shape == (2, 64)
