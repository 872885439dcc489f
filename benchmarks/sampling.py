"""Sampling speed on the reference models: mcdrop against a naive loop and the compute floor.

For each model, batch size N and sample count T:

- **naive**: T forward passes of the batch in train mode (what most tutorials do);
- **floor**: the least work any MC-dropout implementation must do: the layers before the first
  dropout once on the N rows, then one eval-mode pass of the rest over the S×N replicated rows
  (no masks at all);
- **mcdrop**: ``mcdrop.sample(model, x, T, seed=0, plan=plan)`` with the model's sampling plan
  made beforehand (``mcdrop.plan(model, x)``), as a ``Predictor`` keeps it;
- **baal** / **torch-uncertainty**: their MC-dropout wrappers, when installed
  (``pip install -e '.[compare]'``).

Run: ``python -m benchmarks.sampling [--quick]``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from benchmarks.timing import compare, machine, ms, run_main, table
from mcdrop import plan, sample
from mcdrop.nets import CNN, MLP
from mcdrop.sampling_context import replicate


class TinyTransformer(nn.Module):
    """A 2-layer transformer encoder classifier: ``(N, 16, 64) -> (N, 10)``."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(64, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(x).mean(1))


@dataclass
class Reference:
    name: str
    model: nn.Module
    input_shape: tuple[int, ...]
    prefix: nn.Module  # layers before the first dropout (deterministic)
    rest: nn.Module


def _split(layers: Sequence[nn.Module]) -> tuple[nn.Module, nn.Module]:
    first = next(i for i, m in enumerate(layers) if isinstance(m, nn.Dropout))
    return nn.Sequential(*layers[:first]), nn.Sequential(*layers[first:])


def references() -> list[Reference]:
    torch.manual_seed(0)
    uci = MLP(13, [50], 1, dropout=0.05).eval()
    wide = MLP(784, [1024, 1024], 10, dropout=0.5).eval()
    cnn = CNN().eval()  # conv 1→32, 32→64, pool, 64→64, pool, dropout, 3136→256, dropout, →10
    transformer = TinyTransformer().eval()
    out = []
    for name, model, shape in (
        ("UCI MLP 13→50→1", uci, (13,)),
        ("wide MLP 784→1024→1024→10", wide, (784,)),
    ):
        out.append(Reference(name, model, shape, *_split(list(model.layers))))
    out.append(Reference("CNN 28×28", cnn, (1, 28, 28), *_split([*cnn.features, *cnn.head])))
    # Its first dropout is inside the first attention block: no deterministic prefix.
    out.append(
        Reference("transformer 2×(d64, 4 heads)", transformer, (16, 64), nn.Identity(), transformer)
    )
    return out


def naive_loop(model: nn.Module, x: Tensor, n_samples: int) -> Tensor:
    """T stochastic passes in train mode."""
    model.train()
    try:
        with torch.no_grad():
            return torch.stack([model(x) for _ in range(n_samples)])
    finally:
        model.eval()


def baal_style(model: nn.Module, x: Tensor, n_samples: int) -> Tensor:
    """What baal's ``MCDropoutModule`` with ``replicate_in_memory`` does, without baal: the batch
    replicated T times and one pass with torch's dropout modules switched on (its masks come from
    the global RNG, and dropout that is not a module, or that a fused path skips, stays off).

    Returns ``(T, N, K)``.
    """
    dropouts = [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
    for m in dropouts:
        m.train()
    try:
        with torch.inference_mode():
            out = model(replicate(x, n_samples))
    finally:
        for m in dropouts:
            m.eval()
    return out.view(n_samples, x.shape[0], *out.shape[1:])


def floor(ref: Reference, x: Tensor, n_samples: int) -> Tensor:
    with torch.inference_mode():
        h = ref.prefix(x)
        # The fastest replication (expand + one copy), the same helper mcdrop uses.
        return ref.rest(replicate(h, n_samples))


def _others(model: nn.Module, x: Tensor, n_samples: int) -> dict[str, Callable[[], object]]:
    """baal's and torch-uncertainty's MC dropout, where installed."""
    found: dict[str, Callable[[], object]] = {}
    try:
        from baal.bayesian.dropout import MCDropoutModule  # type: ignore[import-not-found]
        from baal.modelwrapper import ModelWrapper  # type: ignore[import-not-found]

        mc_module = MCDropoutModule(copy.deepcopy(model))
        try:  # baal >= 2: options in TrainingArgs; replicate_in_memory = one batched pass
            from baal.modelwrapper import TrainingArgs  # type: ignore[import-not-found]

            args = TrainingArgs(criterion=None, use_cuda=False, replicate_in_memory=True)
            wrapper = ModelWrapper(mc_module, args)
        except ImportError:  # baal 1.x
            wrapper = ModelWrapper(mc_module, criterion=None)
        found["baal"] = lambda: wrapper.predict_on_batch(x, iterations=n_samples)
    except ImportError:
        pass
    try:
        from torch_uncertainty.models import mc_dropout  # type: ignore[import-not-found]

        mc = mc_dropout(copy.deepcopy(model), num_estimators=n_samples, on_batch=True).eval()

        def run_tu() -> object:
            with torch.no_grad():
                return mc(x)

        found["torch-uncertainty"] = run_tu
    except ImportError:
        pass
    return found


def _varies(samples: object) -> bool:
    """Whether another library's samples differ at all (baal: ``(N, K, T)``; others: samples
    first). A wrapper that misses a model's dropout returns T equal passes, fast and wrong."""
    if not isinstance(samples, Tensor):
        return True  # an output we cannot read: make no claim
    return bool(samples.float().var(dim=-1 if samples.dim() > 2 else 0).max() > 0)


def run(quick: bool = False) -> str:
    cases = [(1, 100), (32, 100)]
    rows = []
    others_seen: set[str] = set()
    for ref in references():
        ref_cases = cases + ([(1, 10_000), (32, 10_000)] if ref.name.startswith("UCI") else [])
        for n, t in ref_cases:
            if quick:
                t = min(t, 20)
            x = torch.randn(n, *ref.input_shape, generator=torch.Generator().manual_seed(n))
            kept = plan(ref.model, x)
            candidates: dict[str, Callable[[], object]] = {
                "floor": lambda ref=ref, x=x, t=t: floor(ref, x, t),
                "naive": lambda ref=ref, x=x, t=t: naive_loop(ref.model, x, t),
                "mcdrop": lambda ref=ref, x=x, t=t, kept=kept: sample(
                    ref.model, x, t, seed=0, plan=kept
                ),
            }
            others = _others(ref.model, x, t)
            others_seen |= set(others)
            candidates.update(others)
            got = compare(candidates, rounds=2 if quick else 15, budget_s=1 if quick else 20)
            other_cells = [
                (ms(got[k]) + ("" if _varies(others[k]()) else " (zero variance)"))
                if k in got
                else "—"
                for k in ("baal", "torch-uncertainty")
            ]
            rows.append(
                [
                    ref.name,
                    n,
                    t,
                    ms(got["floor"]),
                    ms(got["naive"]),
                    ms(got["mcdrop"]),
                    *other_cells,
                    f"{got['mcdrop'] / got['floor']:.2f}",
                    f"{got['naive'] / got['mcdrop']:.1f}",
                ]
            )
    header = [
        "model",
        "N",
        "T",
        "floor ms",
        "naive ms",
        "mcdrop ms",
        "baal ms",
        "torch-unc. ms",
        "mcdrop / floor",
        "naive / mcdrop",
    ]
    note = (
        "baal and torch-uncertainty: not installed (`pip install -e '.[compare]'`)"
        if not others_seen
        else f"compared with: {', '.join(sorted(others_seen))}"
    )
    return f"### Sampling ({machine()})\n\n{table(header, rows)}\n\n{note}\n"


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(run, __doc__, argv)


if __name__ == "__main__":
    raise SystemExit(main())
