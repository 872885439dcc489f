"""Sampling speed on the reference models: mcdrop against a naive loop and the compute floor.

For each model, batch size N and sample count T:

- **naive**: T forward passes of the batch in train mode (what most tutorials do);
- **floor**: the least work any MC-dropout implementation must do: the layers before the first
  dropout once on the N rows, then one eval-mode pass of the rest over the S×N replicated rows
  (no masks at all);
- **plain batched**: the batch replicated T times and one pass with the model's dropout layers
  in train mode (:func:`baal_style`, what baal's ``replicate_in_memory`` does): no seeds, no
  per-row reproducibility, and no dropout that is not a module or that a fused path skips;
- **mcdrop**: ``mcdrop.sample(model, x, T, seed=0, plan=plan)`` with the model's sampling plan
  made beforehand (``mcdrop.plan(model, x)``), as a ``Predictor`` keeps it;
- **baal** / **torch-uncertainty**: their MC-dropout wrappers, when installed
  (``pip install -e '.[compare]'``).

Then ``Predictor.uncertainty`` against the plain batched pass feeding the same statistics, and
the fixed cost of a call (one sample of one row against the floor).

Run: ``python -m benchmarks.sampling [--quick]``.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from benchmarks.timing import compare, machine, ms, run_main, table
from mcdrop import LoadedModel, ModelSpec, Predictor, plan, sample
from mcdrop.nets import CNN, MLP
from mcdrop.predictor import Summary
from mcdrop.sampling_context import replicate
from mcdrop.stats import ClassificationAccumulator, RegressionAccumulator


class TinyTransformer(nn.Module):
    """A 2-layer transformer encoder classifier: ``(N, 16, 64) -> (N, 10)``, with
    ``feedforward`` hidden units per layer."""

    def __init__(self, feedforward: int = 128) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(64, 4, feedforward, dropout=0.1, batch_first=True)
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
    n_samples: int = 100  # T in the sampling table


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


class OwnForwardMLP(nn.Module):
    """The small MLP written as users often write a model: layers as attributes, one dropout
    module called twice, in a ``forward`` of its own. No layer chain: its passes run its own
    forward, with the dropout module routed to the sampling context (:mod:`mcdrop.routing`)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(8, 64), nn.Linear(64, 64), nn.Linear(64, 1)
        self.drop = nn.Dropout(0.1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.drop(torch.relu(self.fc1(x)))
        return self.fc3(self.drop(torch.relu(self.fc2(h))))


def more_references() -> list[Reference]:
    """Models of issue 14 beside the four references: a small MLP of the kind users write (an
    ``nn.Sequential`` with dropout layers, and the same in a forward of its own), and an encoder
    with torch's default feed-forward width (2,048), sampled 50 times."""
    torch.manual_seed(1)
    small = nn.Sequential(
        nn.Linear(8, 64), nn.ReLU(), nn.Dropout(0.1), nn.Linear(64, 64), nn.ReLU(), nn.Dropout(0.1),
        nn.Linear(64, 1),
    ).eval()  # fmt: skip
    encoder = TinyTransformer(feedforward=2048).eval()
    own = OwnForwardMLP().eval()
    return [
        Reference("MLP 8→64→64→1", small, (8,), *_split(list(small))),
        Reference(
            "transformer 2×(d64, 4 heads, ff 2048)", encoder, (16, 64), nn.Identity(), encoder, 50
        ),
        # floor: its forward in eval mode on the replicated rows (no prefix run once per row)
        Reference("MLP 8→64→64→1, own forward", own, (8,), nn.Identity(), own),
    ]


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


def _sampling_cases(ref: Reference, quick: bool) -> list[tuple[int, int]]:
    t = ref.n_samples
    cases = [(1, t), (32, t)] + ([(1, 10_000), (32, 10_000)] if ref.name.startswith("UCI") else [])
    return [(n, min(t, 20)) for n, t in cases] if quick else cases


def run(quick: bool = False) -> str:
    """The sampling table (``mcdrop.sample``), the same for ``Predictor.uncertainty``, and the
    fixed cost per call."""
    rows = []
    others_seen: set[str] = set()
    for ref in references() + more_references():
        for n, t in _sampling_cases(ref, quick):
            x = torch.randn(n, *ref.input_shape, generator=torch.Generator().manual_seed(n))
            kept = plan(ref.model, x)
            candidates: dict[str, Callable[[], object]] = {
                "floor": lambda ref=ref, x=x, t=t: floor(ref, x, t),
                "naive": lambda ref=ref, x=x, t=t: naive_loop(ref.model, x, t),
                "plain": lambda ref=ref, x=x, t=t: baal_style(ref.model, x, t),
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
            plain_cell = ms(got["plain"])
            if ref.name.startswith("transformer"):
                plain_cell += " (zero variance)"  # the fused inference path skips its dropout
            rows.append(
                [
                    ref.name,
                    n,
                    t,
                    ms(got["floor"]),
                    ms(got["naive"]),
                    plain_cell,
                    ms(got["mcdrop"]),
                    *other_cells,
                    f"{got['mcdrop'] / got['floor']:.2f}",
                    f"{got['mcdrop'] / got['plain']:.2f}",
                    f"{got['naive'] / got['mcdrop']:.1f}",
                ]
            )
    header = [
        "model",
        "N",
        "T",
        "floor ms",
        "naive ms",
        "plain batched ms",
        "mcdrop ms",
        "baal ms",
        "torch-unc. ms",
        "mcdrop / floor",
        "mcdrop / plain",
        "naive / mcdrop",
    ]
    note = (
        "baal and torch-uncertainty: not installed (`pip install -e '.[compare]'`)"
        if not others_seen
        else f"compared with: {', '.join(sorted(others_seen))}"
    )
    return (
        f"### Sampling ({machine()}, {load()})\n\n{table(header, rows)}\n\n{note}\n\n"
        f"{predictor_table(quick)}\n\n{fixed_cost_table(quick)}\n"
    )


def load() -> str:
    """The load average, which the ratios of a shared machine depend on."""
    one, five, _ = os.getloadavg()
    return f"load average {one:.1f} (1 min), {five:.1f} (5 min)"


def predictor_of(ref: Reference) -> Predictor:
    """``ref.model`` served as a loaded model: a classifier for 10 outputs, else a regressor."""
    with torch.inference_mode():
        k = ref.model(torch.zeros(1, *ref.input_shape)).shape[-1]
    spec = ModelSpec(
        name=ref.name,
        task="classification" if k > 1 else "regression",
        input_shape=list(ref.input_shape),
        labels=[str(i) for i in range(k)],
        architecture={"name": type(ref.model).__name__},
        tau=None if k > 1 else 1.0,
    )
    return Predictor(LoadedModel(spec, ref.model, Path(ref.name)))


def plain_summary(predictor: Predictor, x: Tensor, n_samples: int) -> Summary:
    """What ``Predictor.uncertainty`` returns, from the plain batched pass's samples."""
    samples = baal_style(predictor.model.module, x, n_samples)  # (T, N, K)
    n, k = x.shape[0], samples.shape[-1]
    acc: ClassificationAccumulator | RegressionAccumulator
    if predictor.spec.task == "classification":
        acc = ClassificationAccumulator(n, k)
    else:
        acc = RegressionAccumulator(n, k, noise_variance=1.0)
    acc.update(samples)
    return acc.result()


def predictor_table(quick: bool = False) -> str:
    """``Predictor.uncertainty`` (plan made beforehand, as a server's warm-up does) against the
    plain batched pass feeding the same streaming statistics."""
    rows = []
    for ref in references() + more_references():
        predictor = predictor_of(ref)
        for n, t in _sampling_cases(ref, quick)[:2]:
            x = torch.randn(n, *ref.input_shape, generator=torch.Generator().manual_seed(n))
            predictor.warm_up(x)
            got = compare(
                {
                    "plain": lambda p=predictor, x=x, t=t: plain_summary(p, x, t),
                    "predictor": lambda p=predictor, x=x, t=t: p.uncertainty(x, t, seed=0),
                },
                rounds=2 if quick else 15,
                budget_s=1 if quick else 20,
            )
            ratio = got["predictor"] / got["plain"]
            rows.append([ref.name, n, t, ms(got["plain"]), ms(got["predictor"]), f"{ratio:.2f}"])
    header = ["model", "N", "T", "plain + stats ms", "Predictor ms", "Predictor / plain"]
    return f"#### Predictor.uncertainty\n\n{table(header, rows)}"


def fixed_cost_table(quick: bool = False) -> str:
    """The cost of a call beyond the model's own work: one sample of one row (T = 1, N = 1),
    ``mcdrop.sample`` (given a kept plan, and given none: the plan it kept) and
    ``Predictor.uncertainty`` against the floor, and a call that probes the model every time
    (as a call given no plan did before plans were kept), in µs.

    Timed in two interleaved groups: the floor, the plain batched pass and the two sampling
    calls; then the probing call and the Predictor beside the floor and the sampling call again
    (``compare`` shuffles the order every round: a call finds the caches as the call before
    it left them, and the probe's ~1-17 ms leave them cold)."""
    rows = []
    for ref in references() + more_references():
        predictor = predictor_of(ref)
        x = torch.randn(1, *ref.input_shape, generator=torch.Generator().manual_seed(1))
        predictor.warm_up(x)
        kept = predictor.plan
        calls: dict[str, Callable[[], object]] = {
            "floor": lambda ref=ref, x=x: floor(ref, x, 1),
            "mcdrop": lambda ref=ref, x=x, kept=kept: sample(ref.model, x, 1, seed=0, plan=kept),
            # the plan that a call given none kept (mcdrop.plan_cache)
            "no plan": lambda ref=ref, x=x: sample(ref.model, x, 1, seed=0),
            # a call given none, as it was before plans were kept: a probe every call
            "probed": lambda ref=ref, x=x: sample(ref.model, x, 1, seed=0, plan=plan(ref.model, x)),
            "predictor": lambda p=predictor, x=x: p.uncertainty(x, 1, seed=0),
            "plain": lambda ref=ref, x=x: baal_style(ref.model, x, 1),
        }
        groups = (
            ("floor", "plain", "mcdrop", "no plan"),
            ("floor", "mcdrop", "probed", "predictor"),
        )
        clean, busy = (
            {
                k: v * 1e6
                for k, v in compare(
                    {name: calls[name] for name in group},
                    rounds=3 if quick else 200,
                    budget_s=1 if quick else 10,
                ).items()
            }
            for group in groups
        )
        rows.append(
            [
                ref.name,
                f"{clean['floor']:.0f}",
                f"{clean['plain']:.0f}",
                f"{clean['mcdrop']:.0f}",
                f"{clean['mcdrop'] - clean['floor']:.0f}",
                f"{clean['no plan']:.0f}",
                f"{busy['probed']:.0f}",
                f"{busy['predictor']:.0f}",
            ]
        )
    header = [
        "model (N = 1, T = 1)",
        "floor µs",
        "plain batched µs",
        "mcdrop µs",
        "fixed cost µs (mcdrop − floor)",
        "mcdrop, no plan given µs",
        "probe every call µs",
        "Predictor µs",
    ]
    return f"#### Fixed cost per call\n\n{table(header, rows)}"


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(run, __doc__, argv)


if __name__ == "__main__":
    raise SystemExit(main())
