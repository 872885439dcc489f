"""Reference networks with dropout, and building a network from a manifest's architecture.

Shape legend: ``N`` rows, ``D`` features, ``K`` outputs. Every network here maps a batch-first
tensor to ``(N, K)``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from mcdrop.dropout import DropConnectLinear, LockedDropout
from mcdrop.exceptions import CheckpointError

DropoutKind = Literal["standard", "alpha", "dropconnect"]


def _dropout(kind: str, p: float) -> nn.Module:
    if kind == "alpha":
        return nn.AlphaDropout(p)
    return nn.Dropout(p)


class MLP(nn.Module):
    """Fully connected network: ``[dropout] → (linear → activation → dropout) × L → linear``.

    Args:
        in_features: D.
        hidden: widths of the hidden layers.
        out_features: K (2K for a heteroscedastic regressor: K means, then K log-variances).
        dropout: rate after every hidden layer.
        input_dropout: rate on the inputs (Gal & Ghahramani's UCI nets drop inputs too).
        kind: "standard" (inverted dropout), "alpha" (AlphaDropout with SELU, which keeps
            self-normalisation), or "dropconnect" (hidden weights dropped instead of units).
        flatten: flatten each input row first, so images ``(N, H, W)`` go in as ``(N, H·W)``.

    Shapes: ``(N, D) -> (N, K)``, or ``(N, D...) -> (N, K)`` with ``flatten``.
    """

    def __init__(
        self,
        in_features: int,
        hidden: Sequence[int],
        out_features: int,
        dropout: float = 0.1,
        input_dropout: float = 0.0,
        kind: DropoutKind = "standard",
        flatten: bool = False,
    ) -> None:
        super().__init__()
        if kind not in ("standard", "alpha", "dropconnect"):
            raise ValueError(f"unknown dropout kind {kind!r}")
        # A flag, not an nn.Flatten layer: the state-dict keys of existing models stay the same.
        self.flatten = flatten
        layers: list[nn.Module] = []
        if input_dropout > 0:
            layers.append(_dropout(kind, input_dropout))
        width = in_features
        for h in hidden:
            if kind == "dropconnect":
                layers += [DropConnectLinear(width, h, p=dropout), nn.ReLU()]
            else:
                act: nn.Module = nn.SELU() if kind == "alpha" else nn.ReLU()
                layers += [nn.Linear(width, h), act, _dropout(kind, dropout)]
            width = h
        layers.append(nn.Linear(width, out_features))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        if self.flatten:
            x = x.flatten(1)  # (N, D...) -> (N, D)
        return self.layers(x)


class CNN(nn.Module):
    """Small convolutional classifier for ``H × W`` images.

    ``conv3x3 → ReLU [→ Dropout2d] [→ maxpool2]`` per entry of ``channels``, then
    ``dropout → linear(hidden) → ReLU → dropout → linear(K)``.

    Args:
        in_channels: C.
        image_size: H (= W).
        channels: output channels of the conv layers.
        pool: whether each conv layer is followed by 2×2 max-pooling.
        spatial_dropout: Dropout2d rate after each conv layer (0 for none).
        hidden: width of the hidden linear layer.
        dropout: rate of the two dropouts in the head.
        n_classes: K.

    Shapes: ``(N, C, H, W)`` or ``(N, H, W)`` for one channel -> ``(N, K)``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 28,
        channels: Sequence[int] = (32, 64, 64),
        pool: Sequence[bool] = (False, True, True),
        spatial_dropout: float = 0.0,
        hidden: int = 256,
        dropout: float = 0.5,
        n_classes: int = 10,
    ) -> None:
        super().__init__()
        if len(pool) != len(channels):
            raise ValueError("pool needs one entry per conv layer")
        self.in_channels = in_channels
        layers: list[nn.Module] = []
        width, size = in_channels, image_size
        for c, p in zip(channels, pool, strict=True):
            layers += [nn.Conv2d(width, c, 3, padding=1), nn.ReLU()]
            if spatial_dropout > 0:
                layers.append(nn.Dropout2d(spatial_dropout))
            if p:
                layers.append(nn.MaxPool2d(2))
                size //= 2
            width = c
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(width * size * size, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, n_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 3 and self.in_channels == 1:
            x = x.unsqueeze(1)  # (N, H, W) -> (N, 1, H, W)
        return self.head(self.features(x))


class RowLSTM(nn.Module):
    """An LSTM that reads an image row by row, with variational (locked) dropout.

    Shapes: ``(N, T, D)`` (T rows of D pixels) -> ``(N, K)``.
    """

    def __init__(
        self, in_features: int = 28, hidden: int = 128, n_classes: int = 10, dropout: float = 0.25
    ) -> None:
        super().__init__()
        self.input_dropout = LockedDropout(dropout)
        self.lstm = nn.LSTM(in_features, hidden, batch_first=True)
        self.output_dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.lstm(self.input_dropout(x))
        return self.head(self.output_dropout(out[:, -1]))


class Standardized(nn.Module):
    """Wraps a network with input standardisation and, for regression, output de-standardisation,
    so the wrapped model takes and returns original units.

    The statistics are non-persistent buffers: the manifest is their one source, and the weights
    file holds only the network.

    Args:
        net: the network, trained on standardised data.
        input_mean, input_std: broadcastable to one input row.
        target_mean, target_std: ``(K,)``, or None for classifiers.
        heteroscedastic: the net returns K means then K log-variances (standardised units).
    """

    def __init__(
        self,
        net: nn.Module,
        input_mean: Tensor | None = None,
        input_std: Tensor | None = None,
        target_mean: Tensor | None = None,
        target_std: Tensor | None = None,
        heteroscedastic: bool = False,
    ) -> None:
        super().__init__()
        self.net = net
        self.heteroscedastic = heteroscedastic
        self.register_buffer("input_mean", input_mean, persistent=False)
        self.register_buffer("input_std", input_std, persistent=False)
        self.register_buffer("target_mean", target_mean, persistent=False)
        self.register_buffer("target_std", target_std, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.input_mean is not None:
            x = (x - self.input_mean) / self.input_std
        y = self.net(x)
        if self.target_mean is None:
            return y
        if self.heteroscedastic:
            k = y.shape[-1] // 2
            mean = y[..., :k] * self.target_std + self.target_mean
            log_var = y[..., k:] + 2 * torch.log(self.target_std)
            return torch.cat([mean, log_var], dim=-1)
        return y * self.target_std + self.target_mean


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "mlp": MLP,
    "cnn": CNN,
    "row_lstm": RowLSTM,
}


def resolve_factory(path: str) -> Callable[..., nn.Module]:
    """Import ``package.module:factory`` (a class or function that returns a module)."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise CheckpointError(f"factory must look like 'package.module:factory', got {path!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise CheckpointError(f"cannot import {module_name!r} for factory {path!r}: {exc}") from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise CheckpointError(f"{path!r}: {module_name} has no callable {attr!r}")
    return factory


def build(architecture: dict[str, Any]) -> nn.Module:
    """A network from a manifest's ``architecture``: ``{"name": "mlp", "params": {...}}`` for a
    built-in, or ``{"factory": "package.module:factory", "params": {...}}`` for your own."""
    params = architecture.get("params", {})
    if "factory" in architecture:
        factory = resolve_factory(architecture["factory"])
    else:
        name = architecture.get("name")
        if name not in ARCHITECTURES:
            raise CheckpointError(
                f"unknown architecture {name!r}; built-ins are {sorted(ARCHITECTURES)}, or give "
                "'factory': 'package.module:factory'"
            )
        factory = ARCHITECTURES[name]
    try:
        return factory(**params)
    except TypeError as exc:
        raise CheckpointError(f"architecture params {params} do not fit: {exc}") from exc
