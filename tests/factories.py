"""Model factories for tests that load a model directory naming ``tests.factories:...``."""

from __future__ import annotations

import threading
from subprocess import run  # noqa: F401  (re-exported: an allowed module must not pass it on)

from torch import Tensor, nn

from mcdrop.nets import MLP

#: The gates :func:`gated_mlp` waits on, by name: a test holds a model in "loading" with one.
GATES: dict[str, threading.Event] = {}


def build(in_features: int = 3, width: int = 5) -> nn.Module:
    """``(N, D) -> (N, 1)``: linear, dropout 0.5, linear."""
    return nn.Sequential(nn.Linear(in_features, width), nn.Dropout(0.5), nn.Linear(width, 1))


def gated_mlp(gate: str, **params: object) -> nn.Module:
    """The built-in MLP (``params`` as for ``"name": "mlp"``), built once ``GATES[gate]`` is set
    (at most 30 s later): a model that is still loading for as long as a test needs."""
    GATES[gate].wait(30)
    return MLP(**params)  # type: ignore[arg-type]  # the manifest's params, checked by MLP


class UnitRows(nn.Module):
    """Each row scaled to unit length: NaN on a row of zeros, as a model that takes all-zero
    steps for padding and averages over none."""

    def forward(self, x: Tensor) -> Tensor:
        return x / x.norm(dim=-1, keepdim=True)


def unit_rows(in_features: int = 3, width: int = 5) -> nn.Module:
    """:func:`build` of rows scaled to unit length: finite on any row but zeros."""
    return nn.Sequential(UnitRows(), build(in_features, width))
