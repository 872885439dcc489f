"""Model factories for tests that load a model directory naming ``tests.factories:...``."""

from __future__ import annotations

from subprocess import run  # noqa: F401  (re-exported: an allowed module must not pass it on)

from torch import nn


def build(in_features: int = 3, width: int = 5) -> nn.Module:
    """``(N, D) -> (N, 1)``: linear, dropout 0.5, linear."""
    return nn.Sequential(nn.Linear(in_features, width), nn.Dropout(0.5), nn.Linear(width, 1))
