"""Sampling speed on models of the kinds users write, beside the reference models.

The reference models (:mod:`benchmarks.sampling`) are layer chains, mcdrop's own nets and
transformer encoders. Users bring others: a ``forward`` of their own that calls ``F.dropout``
(with ``self.training``, or ``training=True`` as MC-dropout code often writes it), a small
ResNet with BatchNorm and ``nn.Dropout2d``, GRU and LSTM classifiers with dropout between
their layers, an ``nn.MultiheadAttention`` block, attention through
``F.scaled_dot_product_attention`` that asks :func:`mcdrop.is_sampling`, wide & deep with
embeddings, a 1-d convolution with ``nn.Dropout1d``, an ``nn.Sequential`` with LayerNorm and
GELU. Issue 14 asks for a fixed cost per call of at most 50 µs and mcdrop never slower than the
plain batched pass; this table shows where that holds on them. For each model, batch N and
sample count T, interleaved in one run:

- **floor**: the model's eval-mode forward over the N·T replicated rows (no masks at all);
- **plain batched**: :func:`benchmarks.sampling.baal_style` (the rows replicated, torch's
  dropout modules in train mode: unseeded, and no dropout that is not a module);
- **train mode**: the same pass with the whole model in train mode, so that every dropout
  drops (``F.dropout(h, p, self.training)``, the recurrent and attention dropout); not for the
  models with BatchNorm (train mode changes its arithmetic) or whose forward drops in any mode;
- **mcdrop**: ``mcdrop.sample(model, x, T, seed=0)``, given no plan (the plan the first call
  made and kept, :mod:`mcdrop.plan_cache`).

The fixed cost is mcdrop − floor at N = T = 1. Each row also checks that mcdrop's samples are
those of a call given the plan (bit for bit) and vary where T > 1. A second table times the
fixed cost alone (:func:`fixed_cost`): the floor and one-row calls given no plan and given the
kept plan, interleaved with nothing else.

Run: ``python -m benchmarks.user_models [--quick]``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import mcdrop
from benchmarks.sampling import baal_style
from benchmarks.timing import compare, machine, run_main, table
from mcdrop.sampling_context import replicate


class FunctionalMLP(nn.Module):
    """16→128→128→4 with ``F.dropout`` in its ``forward``: ``training=self.training``, or
    ``training=True`` (``always``: drops in any mode, as MC-dropout code often writes it)."""

    def __init__(self, always: bool = False, dropout: bool = True) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(16, 128), nn.Linear(128, 128), nn.Linear(128, 4)
        self.p, self.always, self.dropout = 0.2, always, dropout

    def forward(self, x: Tensor) -> Tensor:
        training = self.always or self.training
        h = torch.relu(self.fc1(x))
        h = F.dropout(h, self.p, training) if self.dropout else h
        h = torch.relu(self.fc2(h))
        h = F.dropout(h, self.p, training) if self.dropout else h
        return self.fc3(h)


class Block(nn.Module):
    """A residual block: conv, BatchNorm, ReLU, ``nn.Dropout2d``, conv, BatchNorm."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm1, self.drop = nn.BatchNorm2d(channels), nn.Dropout2d(0.1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm2 = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        h = self.drop(F.relu(self.norm1(self.conv1(x))))
        return F.relu(x + self.norm2(self.conv2(h)))


class ResNet(nn.Module):
    """A small ResNet on 3×12×12 images: a stem, two blocks, pooling, dropout, 5 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()
        )
        self.blocks = nn.Sequential(Block(8), Block(8))
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.3), nn.Linear(8, 5)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.stem(x)))


class Recurrent(nn.Module):
    """A two-layer GRU or LSTM (hidden 32) with dropout between its layers, over 12 steps of 8
    features, then dropout and 3 classes."""

    def __init__(self, cell: type[nn.RNNBase]) -> None:
        super().__init__()
        self.rnn = cell(8, 32, num_layers=2, dropout=0.25, batch_first=True)
        self.drop, self.head = nn.Dropout(0.3), nn.Linear(32, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.drop(self.rnn(x)[0][:, -1]))


class AttentionBlock(nn.Module):
    """A post-norm transformer block of one's own: ``nn.MultiheadAttention`` (d 32, 4 heads,
    dropout on its weights), a GELU feed-forward, dropout modules; 16 steps, 6 classes."""

    def __init__(self, d: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(d, heads, dropout=0.1, batch_first=True)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.ff1, self.ff2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.drop, self.head = nn.Dropout(0.1), nn.Linear(d, 6)

    def forward(self, x: Tensor) -> Tensor:
        a = self.attention(x, x, x, need_weights=False)[0]
        x = self.norm1(x + self.drop(a))
        x = self.norm2(x + self.drop(self.ff2(self.drop(F.gelu(self.ff1(x))))))
        return self.head(x.mean(1))


class FusedAttention(nn.Module):
    """Attention through ``F.scaled_dot_product_attention``, its ``dropout_p`` on while
    training or sampling (:func:`mcdrop.is_sampling`); d 32, 4 heads, 16 steps, 4 classes."""

    def __init__(self, d: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.heads, self.p = heads, 0.1
        self.drop, self.head = nn.Dropout(0.1), nn.Linear(d, 4)

    def forward(self, x: Tensor) -> Tensor:
        n, length, d = x.shape
        qkv = self.qkv(x).view(n, length, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        p = self.p if self.training or mcdrop.is_sampling() else 0.0
        a = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        x = x + self.out(a.transpose(1, 2).reshape(n, length, d))
        return self.head(self.drop(x.mean(1)))


class WideAndDeep(nn.Module):
    """Wide & deep on 16 columns: 3 category ids (as floats: 10, 20 and 7 values, embedded in
    8 each), then 13 numbers; a linear wide part and a deep MLP with dropout modules."""

    CATEGORIES = (10, 20, 7)

    def __init__(self) -> None:
        super().__init__()
        self.embeddings = nn.ModuleList(nn.Embedding(n, 8) for n in self.CATEGORIES)
        self.wide = nn.Linear(13, 1)
        self.deep = nn.Sequential(
            nn.Linear(24 + 13, 64), nn.ReLU(), nn.Dropout(0.2),
            nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 1),
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        ids, numbers = x[:, :3].long(), x[:, 3:]
        embedded = [embed(ids[:, i]) for i, embed in enumerate(self.embeddings)]
        return self.wide(numbers) + self.deep(torch.cat([*embedded, numbers], dim=1))

    @classmethod
    def rows(cls, n: int, generator: torch.Generator) -> Tensor:
        """``(n, 16)`` rows: category ids, then numbers."""
        ids = [torch.randint(0, k, (n,), generator=generator) for k in cls.CATEGORIES]
        return torch.cat([torch.stack(ids, 1).float(), torch.randn(n, 13, generator=generator)], 1)


class Convolution1d(nn.Module):
    """Two 1-d convolutions over 8 channels × 64 steps with ``nn.Dropout1d``, pooled, 2 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv1d(8, 32, 5, padding=2), nn.ReLU(), nn.Dropout1d(0.1),
            nn.Conv1d(32, 32, 5, padding=2), nn.ReLU(), nn.Dropout1d(0.1),
        )  # fmt: skip
        self.head = nn.Linear(32, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.net(x).mean(-1))


def normed_sequential() -> nn.Module:
    """An ``nn.Sequential`` 32→256→256→10 with LayerNorm, GELU and dropout layers."""
    return nn.Sequential(
        nn.Linear(32, 256), nn.LayerNorm(256), nn.GELU(), nn.Dropout(0.1),
        nn.Linear(256, 256), nn.LayerNorm(256), nn.GELU(), nn.Dropout(0.1),
        nn.Linear(256, 10),
    )  # fmt: skip


Pass = Callable[[Tensor, int], Tensor]


@dataclass(frozen=True)
class UserModel:
    """A model, its rows' shape, and the passes it is timed against."""

    name: str
    model: nn.Module
    input_shape: tuple[int, ...]
    floor: Pass
    plain: Pass
    train: Pass | None
    make_rows: Callable[[int, torch.Generator], Tensor] | None = None

    def rows(self, n: int, seed: int) -> Tensor:
        generator = torch.Generator().manual_seed(seed)
        if self.make_rows is not None:
            return self.make_rows(n, generator)
        return torch.randn(n, *self.input_shape, generator=generator)


def eval_pass(model: nn.Module) -> Pass:
    """The model's eval-mode forward over the rows replicated T times."""

    def run(x: Tensor, n_samples: int) -> Tensor:
        with torch.inference_mode():
            return model(replicate(x, n_samples))  # type: ignore[no-any-return]

    return run


def train_pass(model: nn.Module) -> Pass:
    """The same pass with the whole model in train mode: every dropout drops (torch's own)."""

    def run(x: Tensor, n_samples: int) -> Tensor:
        model.train()
        try:
            with torch.inference_mode():
                return model(replicate(x, n_samples))  # type: ignore[no-any-return]
        finally:
            model.eval()

    return run


def user_models() -> list[UserModel]:
    """The ten models, in eval mode, their weights seeded."""
    torch.manual_seed(0)
    found: list[UserModel] = []

    def add(
        name: str,
        model: nn.Module,
        shape: tuple[int, ...],
        *,
        floor: nn.Module | None = None,
        plain: Pass | None = None,
        train: bool = True,
        make_rows: Callable[[int, torch.Generator], Tensor] | None = None,
    ) -> None:
        model.eval()
        found.append(
            UserModel(
                name,
                model,
                shape,
                eval_pass(floor if floor is not None else model),
                plain or (lambda x, t, m=model: baal_style(m, x, t)),
                train_pass(model) if train else None,
                make_rows,
            )
        )

    add("MLP, F.dropout(h, p, self.training)", FunctionalMLP(), (16,))
    always = FunctionalMLP(always=True)
    without = FunctionalMLP(dropout=False).eval()
    without.load_state_dict(always.state_dict())
    # its floor: the same MLP without dropout; its plain pass: its forward, which drops anyway
    add(
        "MLP, F.dropout(h, p, True)",
        always,
        (16,),
        floor=without,
        plain=eval_pass(always),
        train=False,
    )
    add("ResNet, BatchNorm, Dropout2d (3×12×12)", ResNet(), (3, 12, 12), train=False)
    add("GRU, 2 layers, dropout between (12×8)", Recurrent(nn.GRU), (12, 8))
    add("LSTM, 2 layers, dropout between (12×8)", Recurrent(nn.LSTM), (12, 8))
    add("nn.MultiheadAttention block (16×32)", AttentionBlock(), (16, 32))
    add("F.scaled_dot_product_attention, is_sampling() (16×32)", FusedAttention(), (16, 32))
    add("wide & deep, embeddings", WideAndDeep(), (16,), make_rows=WideAndDeep.rows)
    add("Conv1d, Dropout1d (8×64)", Convolution1d(), (8, 64))
    add("nn.Sequential, LayerNorm, GELU", normed_sequential(), (32,))
    return found


def _varies(samples: Tensor) -> bool:
    return bool((samples.float().std(0) > 0).any())


def run(quick: bool = False) -> str:
    """The table: each model at N ∈ {1, 32} and T ∈ {1, 100} (quick: N = 1, T ∈ {1, 3})."""
    cells = [(1, 1), (1, 3)] if quick else [(1, 1), (1, 100), (32, 1), (32, 100)]
    rows: list[list[object]] = []
    for user in user_models():
        fixed = "–"
        for n, t in cells:
            x = user.rows(n, seed=n)
            # the plan a call given none keeps (its first call makes it)
            samples = mcdrop.sample(user.model, x, t, seed=0)
            same = torch.equal(
                samples, mcdrop.sample(user.model, x, t, seed=0, plan=mcdrop.plan(user.model, x))
            )
            candidates: dict[str, Callable[[], object]] = {
                "floor": lambda x=x, t=t, u=user: u.floor(x, t),
                "plain": lambda x=x, t=t, u=user: u.plain(x, t),
                "mcdrop": lambda x=x, t=t, u=user: mcdrop.sample(u.model, x, t, seed=0),
            }
            if user.train is not None:
                candidates["train"] = lambda x=x, t=t, train=user.train: train(x, t)
            small = n * t <= 100
            us = {
                k: v * 1e6
                for k, v in compare(
                    candidates,
                    rounds=3 if quick else (400 if small else 60),
                    # (a small cell's first calls run cold: the first model's floor, twice)
                    warmup=1 if quick else (50 if small else 2),
                    budget_s=1 if quick else (4 if small else 5),
                ).items()
            }
            if (n, t) == (1, 1):
                fixed = f"{us['mcdrop'] - us['floor']:.0f}"
            train = us.get("train")
            rows.append(
                [
                    user.name,
                    n,
                    t,
                    f"{us['floor']:.0f}",
                    f"{us['plain']:.0f}",
                    "–" if train is None else f"{train:.0f}",
                    f"{us['mcdrop']:.0f}",
                    f"{us['mcdrop'] / us['plain']:.2f}",
                    "–" if train is None else f"{us['mcdrop'] / train:.2f}",
                    fixed if (n, t) == (1, 1) else "",
                    "yes" if same and (t == 1 or _varies(samples)) else "NO",
                ]
            )
    header = [
        "model",
        "N",
        "T",
        "floor µs",
        "plain batched µs",
        "train mode µs",
        "mcdrop µs",
        "mcdrop / plain",
        "mcdrop / train mode",
        "fixed cost µs",
        "samples as planned, varying",
    ]
    return (
        f"### Models of the kinds users write\n\n{machine()}\n\n{table(header, rows)}\n\n"
        f"{fixed_cost(quick)}"
    )


def fixed_cost(quick: bool = False) -> str:
    """The fixed cost alone: one sample of one row (N = T = 1), the floor, ``mcdrop.sample``
    given no plan and given the kept plan interleaved, each model's calls timed apart from the
    other passes (so warmer than in :func:`run`'s cells), in µs beyond the floor."""
    rows: list[list[object]] = []
    for user in user_models():
        x = user.rows(1, seed=1)
        kept = mcdrop.plan(user.model, x)
        mcdrop.sample(user.model, x, 1, seed=0)  # (the plan a call given none keeps)
        us = {
            k: v * 1e6
            for k, v in compare(
                {
                    "floor": lambda x=x, u=user: u.floor(x, 1),
                    "no plan": lambda x=x, u=user: mcdrop.sample(u.model, x, 1, seed=0),
                    "kept": lambda x=x, u=user, k=kept: mcdrop.sample(
                        u.model, x, 1, seed=0, plan=k
                    ),
                },
                rounds=3 if quick else 3000,
                warmup=1 if quick else 20,
                budget_s=1 if quick else 4,
            ).items()
        }
        rows.append(
            [
                user.name,
                f"{us['floor']:.0f}",
                f"{us['no plan'] - us['floor']:.0f}",
                f"{us['kept'] - us['floor']:.0f}",
            ]
        )
    header = ["model (N = 1, T = 1)", "floor µs", "no plan given µs", "kept plan given µs"]
    return f"#### Fixed cost per call (beyond the floor)\n\n{table(header, rows)}"


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(run, __doc__, argv)


if __name__ == "__main__":
    raise SystemExit(main())
