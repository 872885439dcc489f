"""Measured dropout experiments on Fashion-MNIST, each written as a markdown table.

    python -m benchmarks.experiments                    # all experiments -> benchmarks/results/
    python -m benchmarks.experiments --only rates kinds # some of them
    python -m benchmarks.experiments --quick            # smoke run: tiny data, prints only

Experiments (see :data:`EXPERIMENTS`):

- ``rates``: dropout rate 0 … 0.9 (MLP and CNN): train/test accuracy, NLL det and MC, time.
- ``overfit``: learning curves with and without dropout: the train-test gap.
- ``kinds``: standard, alpha and DropConnect (MLP), standard vs spatial (CNN): accuracy, NLL,
  ECE and OOD AUROC.
- ``regularisers``: dropout against L1 and L2, and dropout with weight decay (MLP).
- ``architectures``: MLP, CNN and RowLSTM with variational (locked) dropout.
- ``holdout``: a CNN trained without some classes: AUROC of telling those classes apart.

Every run is seeded (same data order and initial weights for the same seed) and trains on one
thread. Times are wall-clock seconds on a shared machine: compare them within a table only.
Shape legend: ``N`` images of ``28 × 28`` pixels, ``K = 10`` classes.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mcdrop import metrics, nets
from mcdrop.checkpoint import LoadedModel, ModelSpec, Normalization, wrap
from mcdrop.exceptions import NoDropoutError
from mcdrop.predictor import Predictor
from mcdrop.recipes import datasets, scores
from mcdrop.recipes.ood import ood_sets
from mcdrop.recipes.train import fit
from mcdrop.stats import entropy

RESULTS = Path(__file__).parent / "results"


@dataclass(frozen=True)
class Setup:
    """Data sizes and training budget shared by every run of an invocation."""

    train_size: int = 10_000
    test_size: int = 10_000
    ood_size: int = 1000
    epochs: dict[str, int] = field(default_factory=lambda: {"mlp": 20, "cnn": 8, "row_lstm": 8})
    overfit_epochs: int = 40
    curve_at: tuple[int, ...] = (1, 2, 5, 10, 20, 40)
    n_samples: int = 30
    batch_size: int = 128
    lr: float = 1e-3
    seed: int = 0
    # DropConnect samples a whole weight matrix per row (about 16 ms a row on this CPU, 600x
    # unit dropout), so its runs are scored on fewer rows and samples.
    dropconnect_test_size: int = 1000
    dropconnect_ood_size: int = 200
    dropconnect_n_samples: int = 10


QUICK = Setup(
    train_size=128,
    test_size=64,
    ood_size=32,
    epochs={"mlp": 1, "cnn": 1, "row_lstm": 1},
    overfit_epochs=2,
    curve_at=(1, 2),
    n_samples=3,
    batch_size=64,
)


@dataclass(frozen=True)
class Run:
    """One trained network.

    Attributes:
        arch: "mlp" (784-256-256-10), "cnn" (16/32/32 channels, hidden 128) or "row_lstm"
            (hidden 128).
        dropout: MLP unit (or DropConnect weight) rate; CNN head rate; RowLSTM locked rate.
        spatial: CNN Dropout2d rate after each conv.
        kind: MLP dropout kind: standard, alpha or dropconnect.
        weight_decay: Adam's (coupled) L2 weight decay.
        l1: strength of an L1 penalty ``λ Σ|w|`` on the weight matrices.
        exclude: classes left out of training.
    """

    arch: str
    dropout: float = 0.0
    spatial: float = 0.0
    kind: str = "standard"
    weight_decay: float = 0.0
    l1: float = 0.0
    exclude: tuple[int, ...] = ()

    @property
    def stochastic(self) -> bool:
        return self.dropout > 0 or self.spatial > 0

    def architecture(self) -> dict[str, Any]:
        if self.arch == "mlp":
            params: dict[str, Any] = {
                "in_features": 784,
                "hidden": [256, 256],
                "out_features": 10,
                "dropout": self.dropout,
                "kind": self.kind,
                "flatten": True,
            }
        elif self.arch == "cnn":
            params = {
                "channels": [16, 32, 32],
                "pool": [True, True, False],
                "spatial_dropout": self.spatial,
                "hidden": 128,
                "dropout": self.dropout,
            }
        else:
            params = {"in_features": 28, "hidden": 128, "dropout": self.dropout}
        return {"name": self.arch, "params": params}


class L1Penalized(nn.Module):
    """Cross-entropy plus ``strength · Σ|w|`` over the weight matrices (biases are free)."""

    def __init__(self, net: nn.Module, strength: float) -> None:
        super().__init__()
        # A plain list, so the network is not registered as a child of the loss.
        self.weights = [p for p in net.parameters() if p.dim() > 1]
        self.strength = strength

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        penalty = torch.stack([w.abs().sum() for w in self.weights]).sum()
        return F.cross_entropy(logits, labels) + self.strength * penalty


@dataclass
class Data:
    """Fashion-MNIST cut to the setup's sizes, in pixel units 0–255."""

    fashion: datasets.Dataset
    x_test: Tensor
    y_test: Tensor
    ood: dict[str, Tensor]

    @classmethod
    def load(cls, setup: Setup) -> Data:
        fashion = datasets.load("fashion", seed=setup.seed, train_size=setup.train_size)
        ood, _ = ood_sets(fashion, seed=setup.seed, limit=setup.ood_size)
        n = setup.test_size
        return cls(fashion, fashion.x_test[:n], fashion.y_test[:n], ood)


class Runner:
    """Trains and scores runs, remembering results so a run shared by two tables trains once."""

    def __init__(self, setup: Setup, data: Data, log: Callable[[str], None] = print) -> None:
        self.setup = setup
        self.data = data
        self.log = log
        self.cache: dict[tuple[Run, int], dict[str, Any]] = {}

    def train(
        self,
        run: Run,
        epochs: int | None = None,
        on_epoch: Callable[[int, Predictor], None] | None = None,
    ) -> tuple[Predictor, float]:
        """Fit ``run``; returns a predictor in pixel units and the training seconds."""
        setup = self.setup
        epochs = setup.epochs[run.arch] if epochs is None else epochs
        x, y = self.data.fashion.x_train, self.data.fashion.y_train
        if run.exclude:
            keep = ~torch.isin(y, torch.tensor(run.exclude))
            x, y = x[keep], y[keep]
        mean, std = x.mean().reshape(1), x.std().reshape(1)
        spec = ModelSpec(
            name=f"fashion-{run.arch}",
            task="classification",
            input_shape=[28, 28],
            labels=list(datasets.FASHION_MNIST_LABELS),
            architecture=run.architecture(),
            input_normalization=Normalization(mean.tolist(), std.tolist()),
            default_n_samples=setup.n_samples,
        )
        # Seeded from construction to the last epoch (initial weights and the training-time
        # dropout masks, which come from the global RNG), so a run's numbers do not depend on
        # which runs came before it; fork_rng leaves the caller's RNG as it was.
        with torch.random.fork_rng():
            torch.manual_seed(setup.seed)
            net = nets.build(spec.architecture)
            predictor = Predictor(LoadedModel(spec, wrap(spec, net), Path(spec.name)))
            callback = None if on_epoch is None else (lambda epoch, _: on_epoch(epoch, predictor))
            loss: nn.Module = L1Penalized(net, run.l1) if run.l1 > 0 else nn.CrossEntropyLoss()
            started = time.perf_counter()
            fit(
                net,
                (x - mean) / std,
                y,
                loss,
                epochs=epochs,
                lr=setup.lr,
                weight_decay=run.weight_decay,
                batch_size=setup.batch_size,
                seed=setup.seed,
                on_epoch=callback,
            )
        seconds = time.perf_counter() - started
        predictor.model.module.eval()
        return predictor, seconds

    def score(self, run: Run) -> dict[str, Any]:
        """Train ``run`` for the setup's epochs and score it: accuracy, NLL, Brier, ECE
        (deterministic and MC), OOD AUROCs (by MC entropy, mutual information, and the
        deterministic entropy), training time."""
        key = (run, self.setup.epochs[run.arch])
        if key in self.cache:
            return self.cache[key]
        self.log(f"run {run}")
        predictor, seconds = self.train(run)
        data, setup = self.data, self.setup
        x_test, y_test = data.x_test, data.y_test
        ood = dict(data.ood)
        n_samples = setup.n_samples
        if run.kind == "dropconnect":
            x_test, y_test = (
                x_test[: setup.dropconnect_test_size],
                y_test[: setup.dropconnect_test_size],
            )
            ood = {k: v[: setup.dropconnect_ood_size] for k, v in ood.items()}
            n_samples = min(n_samples, setup.dropconnect_n_samples)
        if run.exclude:
            held = torch.isin(y_test, torch.tensor(run.exclude))
            ood = {"held-out classes": x_test[held], **ood}
            x_test, y_test = x_test[~held], y_test[~held]
        x_train, y_train = data.fashion.x_train, data.fashion.y_train
        if run.exclude:
            seen = ~torch.isin(y_train, torch.tensor(run.exclude))
            x_train, y_train = x_train[seen], y_train[seen]
        train_probs = predictor.predict(x_train).probabilities  # type: ignore[union-attr]
        result: dict[str, Any] = {
            "run": asdict(run),
            "seconds": round(seconds, 1),
            "train_accuracy": metrics.accuracy(train_probs, y_train),
            "n_test": len(x_test),
            "n_samples": n_samples,
        }
        if run.stochastic:
            inside = scores.score_classifier(
                predictor, x_test, n_samples=n_samples, seed=setup.seed
            )
            result["det"] = metrics.classification_metrics(inside.deterministic, y_test)
            result["mc"] = metrics.classification_metrics(inside.mc, y_test)
            result["ood"] = {
                name: scores.ood_aurocs(
                    inside,
                    scores.score_classifier(predictor, x, n_samples=n_samples, seed=setup.seed),
                )
                for name, x in ood.items()
            }
        else:
            probs = predictor.predict(x_test).probabilities.double()  # type: ignore[union-attr]
            result["det"] = metrics.classification_metrics(probs, y_test)
            result["mc"] = None
            h_in = entropy(probs)
            result["ood"] = {
                name: {
                    "auroc_deterministic_entropy": metrics.auroc(
                        h_in,
                        entropy(
                            predictor.predict(x).probabilities.double()  # type: ignore[union-attr]
                        ),
                    )
                }
                for name, x in ood.items()
            }
        self.log(
            f"  {seconds:.0f}s train acc {result['train_accuracy']:.4f} test acc "
            f"{result['det']['accuracy']:.4f}"
        )
        self.cache[key] = result
        return result


# -- tables -------------------------------------------------------------------------------------


def _f(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _mc(result: dict[str, Any], metric: str) -> float | None:
    return None if result["mc"] is None else result["mc"][metric]


def _auroc(result: dict[str, Any], ood: str, score: str) -> float | None:
    return result["ood"].get(ood, {}).get(f"auroc_{score}")


def _epochs(setup: Setup) -> str:
    names = {"mlp": "MLP", "cnn": "CNN", "row_lstm": "RowLSTM"}
    return " / ".join(f"{names[k]} {v}" for k, v in setup.epochs.items())


@dataclass
class Table:
    """One experiment's result: a markdown table plus the raw results."""

    name: str
    title: str
    header: list[str]
    rows: list[list[str]]
    results: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)

    def markdown(self, command: str, setup: Setup) -> str:
        lines = [
            f"# {self.title}",
            "",
            f"Produced by `{command}` (Fashion-MNIST, {setup.train_size} training images, "
            f"{setup.test_size} test images, epochs {_epochs(setup)}, batch {setup.batch_size}, "
            f"Adam lr {setup.lr}, seed {setup.seed}, {setup.n_samples} MC samples, 1 torch "
            "thread; times are wall-clock seconds on a shared 2-core machine).",
            "",
            "| " + " | ".join(self.header) + " |",
            "|" + "---|" * len(self.header),
        ]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        lines += [""] + [f"- {n}" for n in self.notes] + ([""] if self.notes else [])
        return "\n".join(lines)


def rates(runner: Runner) -> Table:
    """Dropout rate 0 … 0.9 on the MLP (unit dropout) and the CNN (head dropout)."""
    header = ["net", "dropout", "train acc", "test acc det", "test acc MC", "NLL det", "NLL MC"]
    header += ["ECE det", "ECE MC", "train s"]
    rows, results = [], []
    for arch in ("mlp", "cnn"):
        for p in (0.0, 0.1, 0.3, 0.5, 0.7, 0.9):
            r = runner.score(Run(arch, dropout=p))
            results.append(r)
            rows.append(
                [
                    arch.upper(),
                    f"{p:.1f}",
                    _f(r["train_accuracy"]),
                    _f(r["det"]["accuracy"]),
                    _f(_mc(r, "accuracy")),
                    _f(r["det"]["nll"]),
                    _f(_mc(r, "nll")),
                    _f(r["det"]["ece"]),
                    _f(_mc(r, "ece")),
                    f"{r['seconds']:.0f}",
                ]
            )
    notes = [
        "det = dropout off (weight scaling); MC = mean of the softmax of the MC samples. Rate 0 "
        "has no MC column: there is nothing to sample. One seed: with 10,000 test images an "
        "accuracy has a standard error of about 0.003.",
        "CNN: the rate is that of the two dropouts in the head; no spatial dropout here.",
    ]
    return Table("rates", "Dropout rate", header, rows, results, notes)


def overfit(runner: Runner) -> Table:
    """Learning curves of the MLP without and with dropout: train and test accuracy, test NLL
    (deterministic) at a few epochs."""
    setup = runner.setup
    header = ["dropout", "epoch", "train acc", "test acc", "gap", "test NLL"]
    rows, results = [], []
    x_train, y_train = runner.data.fashion.x_train, runner.data.fashion.y_train
    x_test, y_test = runner.data.x_test, runner.data.y_test
    for p in (0.0, 0.5):
        curve: list[dict[str, float]] = []

        def record(epoch: int, predictor: Predictor, curve: list[dict[str, float]] = curve) -> None:
            if epoch not in setup.curve_at:
                return
            train_p = predictor.predict(x_train).probabilities  # type: ignore[union-attr]
            test_p = predictor.predict(x_test).probabilities  # type: ignore[union-attr]
            curve.append(
                {
                    "epoch": epoch,
                    "train_accuracy": metrics.accuracy(train_p, y_train),
                    "test_accuracy": metrics.accuracy(test_p, y_test),
                    "test_nll": metrics.nll(test_p, y_test),
                }
            )

        runner.log(f"overfit curve, dropout {p}")
        _, seconds = runner.train(Run("mlp", dropout=p), setup.overfit_epochs, record)
        results.append({"dropout": p, "seconds": round(seconds, 1), "curve": curve})
        for c in curve:
            gap = c["train_accuracy"] - c["test_accuracy"]
            rows.append(
                [
                    f"{p:.1f}",
                    str(c["epoch"]),
                    _f(c["train_accuracy"]),
                    _f(c["test_accuracy"]),
                    _f(gap),
                    _f(c["test_nll"]),
                ]
            )
    notes = ["MLP 784-256-256-10, deterministic predictions; gap = train acc − test acc."]
    return Table("overfit", "With and without dropout: overfitting", header, rows, results, notes)


_OOD_HEADER = ["AUROC digits MI", "AUROC digits H", "AUROC noise MI", "AUROC noise H"]


def _ood_cells(r: dict[str, Any]) -> list[str]:
    return [
        _f(_auroc(r, "digits 28x28", "mutual_information")),
        _f(_auroc(r, "digits 28x28", "entropy")),
        _f(_auroc(r, "uniform noise", "mutual_information")),
        _f(_auroc(r, "uniform noise", "entropy")),
    ]


def _score_all(
    runner: Runner,
    runs: Sequence[tuple[str, Run]],
    cells: Callable[[str, dict[str, Any]], list[str]],
) -> tuple[list[list[str]], list[dict[str, Any]]]:
    """Score each run in order; one table row per run, ``cells(label, result)``."""
    results = [runner.score(run) for _, run in runs]
    rows = [cells(label, r) for (label, _), r in zip(runs, results, strict=True)]
    return rows, results


def kinds(runner: Runner) -> Table:
    """Dropout kinds: standard, alpha, DropConnect on the MLP; head vs spatial on the CNN."""
    runs = [
        ("MLP standard 0.2", Run("mlp", dropout=0.2)),
        ("MLP alpha 0.2 (SELU)", Run("mlp", dropout=0.2, kind="alpha")),
        ("MLP DropConnect 0.2 *", Run("mlp", dropout=0.2, kind="dropconnect")),
        ("CNN standard head 0.3", Run("cnn", dropout=0.3)),
        ("CNN spatial 0.2, no head dropout", Run("cnn", spatial=0.2)),
        ("CNN spatial 0.1 + head 0.3", Run("cnn", dropout=0.3, spatial=0.1)),
    ]
    header = ["kind", "test acc MC", "NLL MC", "ECE det", "ECE MC", *_OOD_HEADER]
    rows, results = _score_all(
        runner,
        runs,
        lambda label, r: [
            label,
            _f(_mc(r, "accuracy")),
            _f(_mc(r, "nll")),
            _f(r["det"]["ece"]),
            _f(_mc(r, "ece")),
            *_ood_cells(r),
        ],
    )
    notes = [
        "AUROC of telling out-of-distribution inputs from the test set by MC mutual information "
        "(MI) or MC predictive entropy (H); digits = scikit-learn digits upscaled to 28×28, noise "
        "= uniform pixels 0–255. 0.5 is chance.",
        f"* DropConnect draws a weight matrix per sampled row (about 600x the cost of unit "
        f"dropout here): scored on the first {runner.setup.dropconnect_test_size} test images, "
        f"{runner.setup.dropconnect_ood_size} of each OOD set and "
        f"{runner.setup.dropconnect_n_samples} MC samples.",
    ]
    return Table("kinds", "Dropout kinds", header, rows, results, notes)


def regularisers(runner: Runner) -> Table:
    """Dropout against L1 and L2 penalties, and dropout with weight decay (MLP)."""
    runs = [
        ("none", Run("mlp")),
        ("L2 (weight decay) 1e-4", Run("mlp", weight_decay=1e-4)),
        ("L2 (weight decay) 1e-3", Run("mlp", weight_decay=1e-3)),
        ("L1 1e-5", Run("mlp", l1=1e-5)),
        ("L1 1e-4", Run("mlp", l1=1e-4)),
        ("dropout 0.3", Run("mlp", dropout=0.3)),
        ("dropout 0.5", Run("mlp", dropout=0.5)),
        ("dropout 0.3 + weight decay 1e-4", Run("mlp", dropout=0.3, weight_decay=1e-4)),
        ("dropout 0.5 + weight decay 1e-4", Run("mlp", dropout=0.5, weight_decay=1e-4)),
    ]
    header = [
        "regulariser",
        "train acc",
        "test acc",
        "gap",
        "NLL det",
        "NLL MC",
        "ECE det",
        "AUROC digits (det H)",
        "AUROC digits (MC MI)",
    ]
    rows, results = _score_all(
        runner,
        runs,
        lambda label, r: [
            label,
            _f(r["train_accuracy"]),
            _f(r["det"]["accuracy"]),
            _f(r["train_accuracy"] - r["det"]["accuracy"]),
            _f(r["det"]["nll"]),
            _f(_mc(r, "nll")),
            _f(r["det"]["ece"]),
            _f(_auroc(r, "digits 28x28", "deterministic_entropy")),
            _f(_auroc(r, "digits 28x28", "mutual_information")),
        ],
    )
    notes = [
        "MLP 784-256-256-10. L2 is Adam's coupled weight decay; L1 adds λ Σ|w| over the weight "
        "matrices to the mean cross-entropy. Only dropout models have MC columns.",
    ]
    return Table("regularisers", "Dropout vs L1 / L2", header, rows, results, notes)


def architectures(runner: Runner) -> Table:
    """MLP, CNN (spatial + head dropout) and RowLSTM (variational dropout)."""
    runs = [
        ("MLP 784-256-256, dropout 0.3", Run("mlp", dropout=0.3)),
        ("CNN 16/32/32, spatial 0.1 + head 0.3", Run("cnn", dropout=0.3, spatial=0.1)),
        ("RowLSTM 128, locked dropout 0.25", Run("row_lstm", dropout=0.25)),
    ]
    header = ["net", "train acc", "test acc MC", "NLL det", "NLL MC", "ECE MC", "train s"]
    header += _OOD_HEADER
    rows, results = _score_all(
        runner,
        runs,
        lambda label, r: [
            label,
            _f(r["train_accuracy"]),
            _f(_mc(r, "accuracy")),
            _f(r["det"]["nll"]),
            _f(_mc(r, "nll")),
            _f(_mc(r, "ece")),
            f"{r['seconds']:.0f}",
            *_ood_cells(r),
        ],
    )
    notes = [
        "RowLSTM reads the image row by row (28 steps of 28 pixels); its dropout masks are "
        "locked across time steps (Gal & Ghahramani 2016b).",
    ]
    return Table("architectures", "Architectures", header, rows, results, notes)


def holdout(runner: Runner) -> Table:
    """CNNs trained without some classes: are those classes flagged as unfamiliar?"""
    labels = datasets.FASHION_MNIST_LABELS
    groups = [(5, 7, 9), (6,)]
    header = ["held out", "test acc MC (seen classes)", "AUROC MI", "AUROC MC H", "AUROC det H"]
    runs = [
        (", ".join(labels[c] for c in group), Run("cnn", dropout=0.3, spatial=0.1, exclude=group))
        for group in groups
    ]
    rows, results = _score_all(
        runner,
        runs,
        lambda label, r: [
            label,
            _f(_mc(r, "accuracy")),
            _f(_auroc(r, "held-out classes", "mutual_information")),
            _f(_auroc(r, "held-out classes", "entropy")),
            _f(_auroc(r, "held-out classes", "deterministic_entropy")),
        ],
    )
    notes = [
        "CNN 16/32/32 with spatial dropout 0.1 and head dropout 0.3, trained on the other "
        "classes; in = test images of the seen classes, out = test images of the held-out ones.",
    ]
    return Table("holdout", "Held-out classes as OOD", header, rows, results, notes)


EXPERIMENTS: dict[str, Callable[[Runner], Table]] = {
    "rates": rates,
    "overfit": overfit,
    "kinds": kinds,
    "regularisers": regularisers,
    "architectures": architectures,
    "holdout": holdout,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.experiments", description=__doc__)
    parser.add_argument("--only", nargs="+", choices=list(EXPERIMENTS), default=list(EXPERIMENTS))
    parser.add_argument("--quick", action="store_true", help="tiny smoke run; prints only")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"folder for the tables (default {RESULTS}, or none with --quick)",
    )
    parser.add_argument("--train-size", type=int, default=None)
    parser.add_argument("--test-size", type=int, default=None)
    parser.add_argument("--n-samples", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    setup = QUICK if args.quick else Setup()
    overrides = {
        k: getattr(args, k)
        for k in ("train_size", "test_size", "n_samples", "seed")
        if getattr(args, k) is not None
    }
    setup = replace(setup, **overrides)
    out = args.out if args.out is not None else (None if args.quick else RESULTS)
    command = "python -m benchmarks.experiments " + shlex.join(
        sys.argv[1:] if argv is None else list(argv)
    )

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # reproducible, and fair to whoever shares the machine
    try:
        runner = Runner(setup, Data.load(setup), log)
        for name in args.only:
            try:
                table = EXPERIMENTS[name](runner)
            except NoDropoutError as exc:  # pragma: no cover - a bug in a run definition
                raise SystemExit(f"{name}: {exc}") from exc
            text = table.markdown(command.strip(), setup)
            print(text)
            if out is not None:
                out.mkdir(parents=True, exist_ok=True)
                (out / f"{name}.md").write_text(text)
                raw = {"command": command.strip(), "setup": asdict(setup), "results": table.results}
                (out / f"{name}.json").write_text(json.dumps(raw, indent=2) + "\n")
    finally:
        torch.set_num_threads(threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
