"""Shared fixtures: small models with known structure, and the repository's paths."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
#: The client's own distribution; its import package, ``mcdrop_client``, is not at the top.
CLIENT_DIST = ROOT / "deploy" / "client"
#: Where this checkout's code is found: ``mcdrop`` and ``service`` at the root, ``mcdrop_client``
#: in ``deploy/client``, for processes the tests start (as ``PYTHONPATH``).
CHECKOUT_PATH = os.pathsep.join([str(ROOT), str(CLIENT_DIST)])
# This checkout's client and contract, in process and in every process the tests start, even
# where the environment has another checkout's mcdrop-client installed, as for mcdrop and service.
sys.path.insert(0, str(CLIENT_DIST))
os.environ["PYTHONPATH"] = os.pathsep.join(
    filter(None, [CHECKOUT_PATH, os.environ.get("PYTHONPATH")])
)
#: The bundled models: every directory of models/ with a manifest.
BUNDLED = frozenset(p.parent.name for p in MODELS.glob("*/model.json"))


@pytest.fixture(scope="session")
def only(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``only("digits", ...)``: a model directory holding just those bundled models (links), for
    an app that needs no other: each model an app loads costs its warm-up (fashion's ~0.4 s)."""

    def model_dir(*names: str) -> Path:
        folder = tmp_path_factory.mktemp("models")
        for name in names:
            (folder / name).symlink_to(MODELS / name, target_is_directory=True)
        return folder

    return model_dir


@pytest.fixture
def root() -> Path:
    return ROOT


@pytest.fixture
def mlp() -> nn.Module:
    """(N, 4) -> (N, 3): linear, BatchNorm, ReLU, dropout 0.5, linear; in eval mode."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3)
    )
    # Non-trivial running statistics, so a BatchNorm update would show.
    net[1].running_mean.uniform_(-1, 1)
    net[1].running_var.uniform_(0.5, 2)
    return net.eval()


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(6, 4, generator=torch.Generator().manual_seed(1))


#: Rows of token ids that :class:`tests.factories.Tokens` (vocabulary 5, ids 1 to 5) takes.
TOKEN_ROWS = torch.tensor([[1, 2, 3, 4, 5, 1], [5, 5, 4, 3, 2, 1], [2, 2, 2, 2, 2, 2]]).float()


def save_tokens(directory: Path, example_inputs: Tensor | None = TOKEN_ROWS) -> Path:
    """``directory``: a two-class model of six token ids from 1 to 5
    (``tests.factories:Tokens``), with ``example_inputs`` (``None``: without, written with
    :func:`mcdrop.checkpoint.save`, which checks no rows: ``mcdrop.save`` refuses it)."""
    import mcdrop
    from mcdrop import checkpoint
    from tests.factories import Tokens

    torch.manual_seed(0)
    net = Tokens(vocab=5, first=1)
    params = {"vocab": 5, "first": 1}
    labels = ["negative", "positive"]
    if example_inputs is not None:
        mcdrop.save(
            net,
            directory,
            task="classification",
            input_shape=[6],
            labels=labels,
            factory="tests.factories:Tokens",
            params=params,
            example_inputs=example_inputs,
        )
        return directory
    spec = checkpoint.ModelSpec(
        name=directory.name,
        task="classification",
        input_shape=[6],
        labels=labels,
        architecture={"factory": "tests.factories:Tokens", "params": params},
    )
    checkpoint.save(directory, spec, net)
    return directory


def only_the_bad_one_rejected(
    responses: Sequence[Any], alone: Sequence[Any], bad: int, rejected: Callable[[Any], object]
) -> None:
    """Requests that ran together in one merged batch, against each sent alone (seeded): the
    ``bad``-th is refused both times (``rejected`` asserts how), every other one answered 200
    with the answer it got alone."""
    for i, (got, want) in enumerate(zip(responses, alone, strict=True)):
        if i == bad:
            rejected(got)
            rejected(want)
        else:
            assert got.status_code == 200, got.text
            assert got.json() == want.json()


def wait_for(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    """Poll ``condition`` until it holds, failing after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)
