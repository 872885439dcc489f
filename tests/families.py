"""Model families users bring, small enough for tests: the factories that model directories in
tests/e2e/test_families.py name as ``tests.families:<factory>``.

Shape legend: ``N`` rows, ``C`` channels, ``H``/``W`` image size, ``T`` time steps, ``F``
features per step, ``K`` outputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import mcdrop


class ResidualBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus the input, then ReLU (He et al. 2016)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(x + self.bn2(self.conv2(h)))


class ResNet(nn.Module):
    """A ResNet-style CNN with BatchNorm and a dropout head: ``(N, C, H, W) -> (N, K)``."""

    def __init__(
        self, in_channels: int = 3, channels: int = 8, blocks: int = 2, n_classes: int = 4,
        dropout: float = 0.3,
    ) -> None:  # fmt: skip
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
        )
        self.blocks = nn.Sequential(*(ResidualBlock(channels) for _ in range(blocks)))
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(channels, n_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.stem(x)))


class TransformerClassifier(nn.Module):
    """``nn.TransformerEncoder`` over a sequence of feature vectors, dropout in attention and
    feed-forward, mean-pooled: ``(N, T, F) -> (N, K)``."""

    def __init__(
        self, features: int = 4, length: int = 6, d_model: int = 16, heads: int = 2,
        layers: int = 2, n_classes: int = 3, dropout: float = 0.1,
    ) -> None:  # fmt: skip
        super().__init__()
        self.embed = nn.Linear(features, d_model)
        self.position = nn.Parameter(torch.randn(length, d_model) * 0.1)
        layer = nn.TransformerEncoderLayer(
            d_model, heads, 2 * d_model, dropout=dropout, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(self.embed(x) + self.position).mean(1))


class ScaledDotProductBlock(nn.Module):
    """Self-attention written with ``F.scaled_dot_product_attention`` and a feed-forward layer,
    each with a residual connection and layer norm.

    ``sampled=True`` gives the attention its rate under MC sampling too (``self.training or
    mcdrop.is_sampling()``); ``sampled=False`` is the common training-only idiom, which MC
    sampling cannot reach.
    """

    def __init__(
        self, d_model: int, heads: int, p: float, ffn_dropout: float, sampled: bool
    ) -> None:
        super().__init__()
        self.heads, self.p, self.sampled = heads, p, sampled
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.ffn = nn.Sequential(
            nn.Linear(d_model, 2 * d_model),
            nn.GELU(),
            nn.Dropout(ffn_dropout),
            nn.Linear(2 * d_model, d_model),
        )
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, x: Tensor) -> Tensor:  # (N, T, D) -> (N, T, D)
        n, t, d = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if self.sampled:
            p = self.p if self.training or mcdrop.is_sampling() else 0.0
        else:
            p = self.p if self.training else 0.0
        attended = F.scaled_dot_product_attention(q, k, v, dropout_p=p)  # (N, H, T, D / H)
        x = self.norm1(x + self.out(attended.transpose(1, 2).reshape(n, t, d)))
        return self.norm2(x + self.ffn(x))


class ScaledDotProductClassifier(nn.Module):
    """Transformer blocks of :class:`ScaledDotProductBlock`: ``(N, T, F) -> (N, K)``."""

    def __init__(
        self, features: int = 4, d_model: int = 16, heads: int = 2, layers: int = 2,
        n_classes: int = 3, p: float = 0.1, ffn_dropout: float = 0.1, sampled: bool = True,
    ) -> None:  # fmt: skip
        super().__init__()
        self.embed = nn.Linear(features, d_model)
        self.blocks = nn.Sequential(
            *(ScaledDotProductBlock(d_model, heads, p, ffn_dropout, sampled) for _ in range(layers))
        )
        self.head = nn.Linear(d_model, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.embed(x)).mean(1))


class LSTMForecaster(nn.Module):
    """Variational (locked) dropout on the inputs, a stacked LSTM with dropout between its
    layers, and the next ``horizon`` values from the last step: ``(N, T, F) -> (N, horizon)``."""

    def __init__(
        self, features: int = 3, hidden: int = 16, layers: int = 2, dropout: float = 0.25,
        input_dropout: float = 0.2, horizon: int = 2,
    ) -> None:  # fmt: skip
        super().__init__()
        self.input_dropout = mcdrop.LockedDropout(input_dropout)
        self.lstm = nn.LSTM(features, hidden, layers, dropout=dropout, batch_first=True)
        self.head = nn.Linear(hidden, horizon)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.lstm(self.input_dropout(x))
        return self.head(out[:, -1])


def heteroscedastic(
    features: int = 1, hidden: int = 32, targets: int = 1, dropout: float = 0.1
) -> nn.Module:
    """A regressor that predicts its noise: ``(N, D) -> (N, 2K)``, K means then K
    log-variances."""
    return nn.Sequential(
        nn.Linear(features, hidden),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(hidden, 2 * targets),
    )


class FunctionalMLP(nn.Module):
    """An MLP whose ``forward`` calls ``F.dropout`` itself, as much research code does:
    ``(N, D) -> (N, K)``."""

    def __init__(
        self, features: int = 4, hidden: int = 32, n_classes: int = 3, p: float = 0.2
    ) -> None:
        super().__init__()
        self.p = p
        self.fc1, self.fc2 = nn.Linear(features, hidden), nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = F.dropout(F.relu(self.fc1(x)), self.p, self.training)
        h = F.dropout(F.gelu(self.fc2(h)), p=self.p, training=self.training)
        return self.out(h)
