"""Model factories for tests that load a model directory naming ``tests.factories:...``."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from subprocess import run  # noqa: F401  (re-exported: an allowed module must not pass it on)
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import mcdrop
from mcdrop import checkpoint
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


#: How :class:`AlwaysDrops` drops: each call as MC-dropout code writes it, dropping in any mode
#: where ``always`` (else as torch's layers do: in training only).
DROPS = {
    "F.dropout": lambda h, p, on: F.dropout(h, p, training=on),
    "torch.dropout": lambda h, p, on: torch.dropout(h, p, on),
    "F.dropout2d": lambda h, p, on: F.dropout2d(h.unflatten(1, (-1, 2, 1)), p, on).flatten(1),
    "F.alpha_dropout": lambda h, p, on: F.alpha_dropout(h, p, on),
    "torch.dropout_": lambda h, p, on: torch.dropout_(h, p, on),
    "scaled_dot_product_attention": lambda h, p, on: F.scaled_dot_product_attention(
        *[h.unflatten(1, (2, -1, 2))] * 3, dropout_p=p if on else 0.0
    ).flatten(1),
}


class AlwaysDrops(nn.Module):
    """``(N, D) -> (N, 2)``: linear, ReLU, a dropout call of kind ``drop`` (:data:`DROPS`),
    linear. With ``always`` the call drops in eval mode too (``training=True``: MC-dropout
    style), for batches of at least ``min_rows`` rows (a forward that drops for some batch sizes
    only); without, it drops in training only, the twin that deterministic prediction equals."""

    def __init__(
        self,
        in_features: int = 3,
        width: int = 8,
        drop: str = "F.dropout",
        always: bool = True,
        min_rows: int = 1,
    ) -> None:
        super().__init__()
        self.fc = nn.Linear(in_features, width)
        self.head = nn.Linear(width, 2)
        self.drop, self.always, self.min_rows = drop, always, min_rows

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.fc(x))
        on = (self.always and x.shape[0] >= self.min_rows) or self.training
        return self.head(DROPS[self.drop](h, 0.5, on))


class DropsFor(nn.Module):
    """``(N, L, 3) -> (N, 2)``: linear, ReLU, ``F.dropout``, the mean over ``L``, linear. The call
    drops in eval mode too (MC-dropout style) for the inputs ``when(x)`` picks only (a batch of
    more than one row, a sequence longer than 16: a forward may branch on its input's shape),
    and in training. ``DropsFor(never)``: the twin that deterministic prediction equals."""

    def __init__(self, when: Callable[[Tensor], bool]) -> None:
        super().__init__()
        self.fc, self.head = nn.Linear(3, 8), nn.Linear(8, 2)
        self.when = when

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.fc(x.float()))
        return self.head(F.dropout(h, 0.5, self.training or self.when(x)).mean(1))


def never(x: Tensor) -> bool:
    """:class:`DropsFor`'s twin: drops in training only."""
    return False


class Watched(nn.Module):
    """``(N, 3) -> (N, 2)``: linear, dropout, linear, as torch's layers drop (in training only),
    in a forward of its own that notes for each run whether a torch-function mode watched it
    (:attr:`watched`): a deterministic prediction's plain eval pass runs without one. With
    ``keeps_last`` it keeps its last output too (:attr:`last`, set anew on every call: the
    model changes on every call, as far as its kept plans can tell)."""

    def __init__(self, keeps_last: bool = False) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.5), nn.Linear(8, 2))
        self.watched: list[bool] = []  # (one list: an attribute set anew would make new plans)
        self.keeps_last = keeps_last
        self.last: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        self.watched.append(torch._C._is_torch_function_mode_enabled())
        out = self.layers(x)
        if self.keeps_last:
            self.last = out
        return out


class Noisy(nn.Module):
    """:func:`build`'s network plus uniform noise from torch's global generator: an eval pass
    that is not deterministic, whatever its dropout does."""

    def __init__(self, in_features: int = 3, width: int = 5) -> None:
        super().__init__()
        self.net = build(in_features, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x) + 0.1 * torch.rand(x.shape[0], 1)


class Picky(nn.Module):
    """:func:`build`'s network that refuses rows its own code calls invalid (any value above
    ``bound``, as a token id past an embedding's vocabulary), raising ``ValueError``: a model
    whose forward fails on some finite inputs of the right shape and not on others. ``error``
    says how it fails: ``"value"`` (that ValueError), ``"assert"`` (an ``assert``),
    ``"memory"`` (an allocation far past any memory: torch's "can't allocate memory"),
    ``"memory_error"`` (``MemoryError``), ``"stop_iteration"`` (``next`` of an empty iterator:
    a ``StopIteration``, which a future refuses and a generator turns into a ``RuntimeError``),
    ``"system_exit"`` (``SystemExit``, which no server should obey) or ``"verbose"`` (a
    ``ValueError`` whose text names an absolute path, runs past any echo and has a second
    line)."""

    def __init__(
        self, in_features: int = 3, width: int = 5, bound: float = 100.0, error: str = "value"
    ) -> None:
        super().__init__()
        self.net = build(in_features, width)
        self.bound = bound
        self.error = error

    def forward(self, x: Tensor) -> Tensor:
        if bool((x > self.bound).any()):
            if self.error == "assert":
                assert False, f"an input above {self.bound}"  # noqa: B011, PT015
            if self.error == "memory":
                torch.empty(2**45)  # 128 TiB: refused at once, never touched
            if self.error == "memory_error":
                raise MemoryError
            if self.error == "stop_iteration":
                next(iter(()))
            if self.error == "system_exit":
                raise SystemExit(3)
            if self.error == "verbose":
                raise ValueError(
                    f"an input above {self.bound}, see /srv/app/limits.txt: {'x' * 300}\n"
                    '  File "/srv/app/net.py", line 3'
                )
            raise ValueError(f"an input above {self.bound}: out of range")
        return self.net(x)


class Tokens(nn.Module):
    """``(N, L) -> (N, K)``: token ids from ``first`` to ``first + vocab - 1``, sent as float rows
    and cast to long, embedded, averaged over ``L``, dropout, linear. No clamping: an id outside
    that range is an ``IndexError``, as in a model of a user's own: random rows are no inputs of
    it (nor, with ``first=1``, a row of zeros)."""

    def __init__(self, vocab: int = 5, dim: int = 4, n_classes: int = 2, first: int = 0) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(dim, n_classes)
        self.first = first

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.drop(self.embed(x.long() - self.first).mean(1)))


class GatedTokens(nn.Module):
    """``(N, L) -> (N, 2)``: token ids sent as numbers (the model takes ``x.long()``) into an
    ``nn.Embedding`` of ``vocabulary`` entries, dropout, the mean over ``L``, linear: a model
    whose forward raises ``IndexError: index out of range in self`` on an id past its vocabulary
    or below zero. With ``asks`` its forward asks :func:`mcdrop.is_sampling` (its passes run
    under mcdrop's torch-function mode: the general path). With ``hold``, a file's path, a pass
    of :data:`HOLD_ROWS` rows or more first waits (at most 30 s) until that file exists: a
    request that holds the model's worker for as long as a test, in this process or another,
    needs."""

    def __init__(
        self, vocabulary: int = 10, width: int = 8, asks: bool = False, hold: str | None = None
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocabulary, width)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(width, 2)
        self.asks = asks
        self.hold = hold

    def forward(self, x: Tensor) -> Tensor:
        if self.asks:
            mcdrop.is_sampling()
        if self.hold is not None and x.shape[0] >= HOLD_ROWS:
            deadline = time.monotonic() + 30
            while not Path(self.hold).exists() and time.monotonic() < deadline:
                time.sleep(0.005)
        return self.head(self.drop(self.embed(x.long())).mean(1))


#: The rows of a pass that :class:`GatedTokens` holds (more than a server's warm-up timings pass).
HOLD_ROWS = 1000


def save_gated_tokens(directory: Path, **params: Any) -> Path:
    """``directory``: a :class:`GatedTokens` classifier (``params``) of 4 ids a row, labels ``a``,
    ``b``. Written as it is (``mcdrop.checkpoint.save``), without example rows: its server warms
    it up on a row of zeros, ids it takes."""
    spec = checkpoint.ModelSpec(
        name=directory.name,
        task="classification",
        input_shape=[4],
        labels=["a", "b"],
        architecture={"factory": "tests.factories:GatedTokens", "params": params},
    )
    torch.manual_seed(0)
    return checkpoint.save(directory, spec, GatedTokens(**params))


class Tied(nn.Module):
    """``(N, D) -> (N, D)``: linear, ReLU, dropout, a decoder that shares the encoder's weight
    (``tie="weight"``: one Parameter in two modules, as a language model ties its output layer
    to its embedding) or a linear module registered under two names (``tie="module"``): a
    ``state_dict`` whose tensors share memory."""

    def __init__(self, features: int = 3, tie: str = "weight") -> None:
        super().__init__()
        self.encoder = nn.Linear(features, features)
        self.drop = nn.Dropout(0.5)
        self.decoder = nn.Linear(features, features)
        if tie == "weight":
            self.decoder.weight = self.encoder.weight
        else:
            self.decoder = self.encoder

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.drop(torch.relu(self.encoder(x))))


class Logs(nn.Module):
    """:func:`build`'s network of the rows' logarithms: NaN on any row with a negative value
    (as random standard-normal rows have), finite on positive rows."""

    def __init__(self, in_features: int = 3, width: int = 5) -> None:
        super().__init__()
        self.net = build(in_features, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.log())


class BatchOf(nn.Module):
    """:func:`build`'s network that refuses a batch of any size but ``sizes`` (a ``ValueError``),
    as a model written for a fixed batch: MC sampling runs a row's samples as more rows of one
    batch, and a row alone."""

    def __init__(self, sizes: tuple[int, ...] = (4,), in_features: int = 3) -> None:
        super().__init__()
        self.net = build(in_features)
        self.sizes = sizes

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[0] not in self.sizes:
            raise ValueError(f"a batch of {self.sizes} rows only, got {x.shape[0]}")
        return self.net(x)


class Centred(nn.Module):
    """:func:`build`'s network of the rows minus their batch mean: a row's output depends on the
    other rows of its batch (and is zeros' alone), as a model that normalises over the batch."""

    def __init__(self, in_features: int = 3, width: int = 5) -> None:
        super().__init__()
        self.net = build(in_features, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x - x.mean(0, keepdim=True))


class Returns(nn.Module):
    """:func:`build`'s network whose ``(N, 1)`` output is returned as ``kind``: ``"tuple"`` (it
    and its double), ``"dict"``, ``"flat"`` (``(N,)``), ``"wide"`` (``(N, 2)``: one output more
    than a manifest of one label says) or ``"3d"`` (``(N, 1, 1)``): outputs that do not fit the
    manifest, as a model folder written with ``mcdrop.checkpoint.save`` (unchecked) may hold."""

    def __init__(self, kind: str = "tuple", in_features: int = 3, width: int = 5) -> None:
        super().__init__()
        self.net = build(in_features, width)
        self.kind = kind

    def forward(self, x: Tensor) -> Any:
        y = self.net(x)
        return {
            "tuple": lambda: (y, 2 * y),
            "dict": lambda: {"y": y},
            "flat": lambda: y[:, 0],
            "wide": lambda: torch.cat([y, y], 1),
            "3d": lambda: y.unsqueeze(-1),
        }[self.kind]()


class Counting(nn.Module):
    """:func:`build`'s network plus the number of times it has run (a buffer it updates): an
    eval pass that is not deterministic, with no randomness in it."""

    def __init__(self, in_features: int = 3, width: int = 5) -> None:
        super().__init__()
        self.net = build(in_features, width)
        self.register_buffer("calls", torch.zeros(()), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        return self.net(x) + self.calls


class MaxBatch(nn.Module):
    """``(N, D) -> (N, 1)``: linear, ReLU, the activation plus its dropout (a residual across the
    dropout: a sampling pass runs samples × rows through the whole forward), linear; a batch of
    more than ``most`` rows is refused (a ``ValueError``), as a model written for small batches."""

    def __init__(self, most: int = 8, in_features: int = 3, width: int = 5) -> None:
        super().__init__()
        self.fc, self.head = nn.Linear(in_features, width), nn.Linear(width, 1)
        self.drop = nn.Dropout(0.5)
        self.most = most

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[0] > self.most:
            raise ValueError(f"at most {self.most} rows a batch, got {x.shape[0]}")
        h = torch.relu(self.fc(x))
        return self.head(h + self.drop(h))


class MaxPass(MaxBatch):
    """:class:`MaxBatch` that takes a batch of any size, but no sampling pass of more than
    ``most`` rows (its forward asks :func:`mcdrop.is_sampling`)."""

    def __init__(self, most: int = 64, in_features: int = 3, width: int = 5) -> None:
        super().__init__(10**9, in_features, width)
        self.most_sampled = most

    def forward(self, x: Tensor) -> Tensor:
        if mcdrop.is_sampling() and x.shape[0] > self.most_sampled:
            raise ValueError(f"at most {self.most_sampled} rows a sampling pass, got {x.shape[0]}")
        return super().forward(x)


class Sizes(MaxBatch):
    """:class:`MaxBatch` that takes a batch of any size, noting each size its forward is given
    (:attr:`sizes`)."""

    def __init__(self, in_features: int = 3, width: int = 5) -> None:
        super().__init__(10**9, in_features, width)
        self.sizes: list[int] = []

    def forward(self, x: Tensor) -> Tensor:
        self.sizes.append(x.shape[0])
        return super().forward(x)


#: What :class:`Outputs` ends its forward with: a classifier's logits, or what is no logits.
ENDINGS: dict[str, Callable[[Tensor], Tensor]] = {
    "logits": lambda z: z,
    "nn.Softmax": nn.Softmax(dim=1),
    "torch.softmax": lambda z: torch.softmax(z, dim=-1),
    "log_softmax": lambda z: F.log_softmax(z, dim=1),
    "sigmoid": torch.sigmoid,  # multi-label: each in [0, 1], not summing to 1
}


class Outputs(nn.Module):
    """``(N, D) -> (N, K)``: linear, ReLU, dropout, linear, then ``ending`` (:data:`ENDINGS`):
    a classifier that returns logits, log-probabilities, probabilities (a final softmax, which
    mcdrop's own softmax would squash toward uniform), or multi-label sigmoids."""

    def __init__(
        self, ending: str = "logits", in_features: int = 3, width: int = 8, n_classes: int = 3
    ) -> None:
        super().__init__()
        self.fc, self.head = nn.Linear(in_features, width), nn.Linear(width, n_classes)
        self.drop = nn.Dropout(0.3)
        self.ending = ending

    def forward(self, x: Tensor) -> Tensor:
        return ENDINGS[self.ending](self.head(self.drop(torch.relu(self.fc(x)))))
