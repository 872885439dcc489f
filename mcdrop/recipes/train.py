"""Fitting networks with dropout, and the reproducible command that writes ``models/<name>/``.

Training is seeded without leaving a trace on the caller's RNG (``torch.random.fork_rng``) and
runs on a fixed thread count, so the same command gives the same weights on the same machine.
"""

from __future__ import annotations

import math
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from mcdrop import calibration, checkpoint, metrics, stats
from mcdrop.checkpoint import ModelSpec, Normalization
from mcdrop.exceptions import InvalidArgumentError
from mcdrop.nets import Standardized, build
from mcdrop.predictor import ClassificationPrediction, Predictor, RegressionPrediction
from mcdrop.recipes import datasets
from mcdrop.recipes.report import rounded
from mcdrop.sampling import sample

ARCHS = ("mlp", "cnn", "row_lstm")


@dataclass
class TrainConfig:
    """Options of ``mcdrop train``.

    ``hidden`` is the MLP's hidden widths, or ``[width]`` of the CNN's hidden layer and of the
    RowLSTM's state. ``channels`` and ``spatial_dropout`` are the CNN's; ``kind`` the MLP's
    dropout kind. ``train_size`` and ``exclude_classes`` are passed to
    :func:`mcdrop.recipes.datasets.load`.
    """

    dataset: str
    out: Path
    hidden: list[int] = field(default_factory=lambda: [128, 128])
    dropout: float = 0.1
    weight_decay: float = 1e-4
    epochs: int = 100
    lr: float = 1e-3
    batch_size: int = 64
    seed: int = 0
    n_samples: int = 100
    threads: int = 1
    progress: bool = True
    arch: str = "mlp"
    kind: str = "standard"
    channels: list[int] = field(default_factory=lambda: [16, 32, 32])
    spatial_dropout: float = 0.0
    train_size: int | None = None
    exclude_classes: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not 0.0 <= self.dropout < 1.0:
            raise InvalidArgumentError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 <= self.spatial_dropout < 1.0:
            raise InvalidArgumentError(
                f"spatial_dropout must be in [0, 1), got {self.spatial_dropout}"
            )
        if self.arch not in ARCHS:
            raise InvalidArgumentError(f"unknown arch {self.arch!r}; choose from {list(ARCHS)}")
        if self.kind not in ("standard", "alpha", "dropconnect"):
            raise InvalidArgumentError(f"unknown dropout kind {self.kind!r}")
        if not self.hidden or not self.channels:
            raise InvalidArgumentError("hidden and channels need at least one width")
        for name in ("epochs", "batch_size", "n_samples", "threads"):
            if getattr(self, name) < 1:
                raise InvalidArgumentError(f"{name} must be at least 1")
        if self.weight_decay < 0 or self.lr <= 0:
            raise InvalidArgumentError("weight_decay must be >= 0 and lr > 0")


def fit(
    net: nn.Module,
    x: Tensor,
    y: Tensor,
    loss_fn: nn.Module,
    *,
    epochs: int,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    batch_size: int = 128,
    seed: int = 0,
    progress: bool = False,
    desc: str = "train",
    on_epoch: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Minibatch Adam with L2 weight decay; returns the mean loss of each epoch.

    Args:
        x: ``(N, D...)`` training inputs (already standardised if the model expects it).
        y: targets as ``loss_fn`` expects them.
        on_epoch: called as ``on_epoch(epoch, mean_loss)`` after each epoch (epochs count
            from 1), e.g. to record learning curves.
    """
    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=weight_decay)
    history: list[float] = []
    net.train()
    # disable=None: a bar on a terminal, none in logs and CI.
    bar = tqdm(range(epochs), desc=desc, disable=None if progress else True, leave=False)
    for _ in bar:
        order = torch.randperm(x.shape[0], generator=generator)
        total = 0.0
        for start in range(0, x.shape[0], batch_size):
            idx = order[start : start + batch_size]
            optimiser.zero_grad(set_to_none=True)
            loss = loss_fn(net(x[idx]), y[idx])
            loss.backward()
            optimiser.step()
            total += float(loss.detach()) * len(idx)
        history.append(total / x.shape[0])
        bar.set_postfix(loss=f"{history[-1]:.4f}")
        if on_epoch is not None:
            on_epoch(len(history), history[-1])
            net.train()  # the callback may have evaluated the network
    net.eval()
    return history


def _standardize(x: Tensor) -> tuple[Tensor, Tensor]:
    if x.dim() > 2:
        # Images: one mean and std for all pixels, stored as [mean] and [std] (shape (1,)
        # broadcasts to a row), so the model stays translation-equivariant.
        return x.mean().reshape(1), x.std().reshape(1)
    mean = x.mean(0)
    std = x.std(0)
    # Constant features (digits has always-zero pixels) would divide by zero.
    return mean, torch.where(std > 1e-6, std, torch.ones_like(std))


def select_tau(means: Tensor, y: Tensor, grid: Tensor | None = None) -> float:
    """τ maximising the mixture log-likelihood of held-out targets.

    Args:
        means: ``(S, N, K)`` sampled predictions; y: ``(N, K)`` targets (same units).
    """
    mse = float((means.mean(0) - y).square().mean())
    if grid is None:
        grid = 1.0 / (mse * torch.logspace(-2, 1, 121))
    lls = torch.stack([stats.mixture_log_likelihood(y, means, 1.0 / float(t)).mean() for t in grid])
    return float(grid[int(lls.argmax())])


def _spec(
    config: TrainConfig,
    data: datasets.Dataset,
    arch: dict[str, Any],
    in_norm: Normalization,
    out_norm: Normalization | None,
    command: str,
) -> ModelSpec:
    return ModelSpec(
        name=data.name,
        version="1",
        task=data.task,
        input_shape=data.input_shape,
        labels=data.labels,
        architecture=arch,
        dropout=config.dropout,
        tau=None,
        input_normalization=in_norm,
        target_normalization=out_norm,
        default_n_samples=config.n_samples,
        training={
            "command": command,
            "dataset": data.name,
            "seed": config.seed,
            "epochs": config.epochs,
            "lr": config.lr,
            "batch_size": config.batch_size,
            "weight_decay": config.weight_decay,
            "threads": config.threads,
            "split": data.split,
            # Only the options that differ from the defaults, so the bundled models' manifests
            # (written before these options existed) are reproduced byte for byte.
            **({"train_size": config.train_size} if config.train_size is not None else {}),
            **({"exclude_classes": config.exclude_classes} if config.exclude_classes else {}),
        },
        description=data.description,
    )


def architecture(config: TrainConfig, data: datasets.Dataset) -> dict[str, Any]:
    """The manifest ``architecture`` of ``config.arch`` for ``data`` (see :func:`nets.build`)."""
    k = len(data.labels)
    shape = data.input_shape
    if config.arch == "mlp":
        params: dict[str, Any] = {
            "in_features": math.prod(shape),
            "hidden": list(config.hidden),
            "out_features": k,
            "dropout": config.dropout,
        }
        if config.kind != "standard":
            params["kind"] = config.kind
        if len(shape) > 1:
            params["flatten"] = True
        return {"name": "mlp", "params": params}
    if len(shape) != 2 or data.task != "classification":
        raise InvalidArgumentError(
            f"arch {config.arch!r} needs a classifier of 2-D images; {data.name} has inputs of "
            f"shape {shape}"
        )
    if config.arch == "cnn":
        if shape[0] != shape[1]:
            raise InvalidArgumentError(f"the CNN takes square images, got {shape}")
        params = {
            "in_channels": 1,
            "image_size": shape[0],
            "channels": list(config.channels),
            # Pool after the first two convs: later convs run on 7×7 maps, cheap on a CPU.
            "pool": [i < 2 for i in range(len(config.channels))],
            "spatial_dropout": config.spatial_dropout,
            "hidden": config.hidden[0],
            "dropout": config.dropout,
            "n_classes": k,
        }
        return {"name": "cnn", "params": params}
    params = {
        "in_features": shape[1],
        "hidden": config.hidden[0],
        "n_classes": k,
        "dropout": config.dropout,
    }
    return {"name": "row_lstm", "params": params}


def train(config: TrainConfig, command: str | None = None) -> checkpoint.LoadedModel:
    """Train on a built-in dataset, evaluate on its held-out test part, write a model directory.

    Regressors get τ chosen on the validation part (mixture log-likelihood); the test metrics
    (accuracy and NLL, or RMSE and test log-likelihood) are recorded in the manifest.
    """
    command = command or "mcdrop train " + shlex.join([config.dataset, "--out", str(config.out)])
    data = datasets.load(
        config.dataset,
        seed=config.seed,
        train_size=config.train_size,
        exclude_classes=config.exclude_classes or None,
    )
    threads = torch.get_num_threads()
    started = time.perf_counter()
    try:
        torch.set_num_threads(config.threads)
        with torch.random.fork_rng():
            torch.manual_seed(config.seed)
            loaded = _train(config, data, command)
    finally:
        torch.set_num_threads(threads)
    loaded.spec.training["seconds"] = round(time.perf_counter() - started, 1)
    checkpoint.save(config.out, loaded.spec, _net_of(loaded))
    # Decisions (rejection thresholds, conformal sets) from the validation part, which
    # training used only to choose tau: rows the weights never fitted.
    calibration.calibrate(
        loaded,
        data.x_val,
        data.y_val,
        n_samples=config.n_samples,
        seed=config.seed,
        data=f"{data.name} validation split",
        split=f"{data.split} (seed {config.seed})",
        command=command,
        save=True,
    )
    return loaded


def _net_of(loaded: checkpoint.LoadedModel) -> nn.Module:
    """The trained network without the normalisation that :func:`checkpoint.wrap` put around it
    (the manifest holds the statistics)."""
    module = loaded.module
    return module.net if isinstance(module, Standardized) else module


def _train(config: TrainConfig, data: datasets.Dataset, command: str) -> checkpoint.LoadedModel:
    in_mean, in_std = _standardize(data.x_train)
    in_norm = Normalization(in_mean.tolist(), in_std.tolist())
    x_train = (data.x_train - in_mean) / in_std
    classification = data.task == "classification"
    arch = architecture(config, data)
    net = build(arch)
    loss_fn: nn.Module
    if classification:
        out_norm = None
        y_train, loss_fn = data.y_train, nn.CrossEntropyLoss()
    else:
        y_mean, y_std = _standardize(data.y_train)
        out_norm = Normalization(y_mean.tolist(), y_std.tolist())
        y_train, loss_fn = (data.y_train - y_mean) / y_std, nn.MSELoss()
    fit(
        net,
        x_train,
        y_train,
        loss_fn,
        epochs=config.epochs,
        lr=config.lr,
        weight_decay=config.weight_decay,
        batch_size=config.batch_size,
        seed=config.seed,
        progress=config.progress,
        desc=f"train {data.name}",
    )

    spec = _spec(config, data, arch, in_norm, out_norm, command)
    module = checkpoint.wrap(spec, net).eval()
    if not classification:
        # τ from validation data; seeded MC samples keep the choice reproducible.
        val_means = _sample_means(module, data.x_val, config)
        spec = replace(spec, tau=select_tau(val_means, data.y_val))
    loaded = checkpoint.LoadedModel(spec=spec, module=module, path=config.out)
    x_test, y_test = data.x_test, data.y_test
    if config.exclude_classes:
        # The held-out classes are out-of-distribution inputs, not errors of the classifier.
        keep = ~torch.isin(y_test, torch.tensor(config.exclude_classes))
        x_test, y_test = x_test[keep], y_test[keep]
    predictor = Predictor(loaded)
    scores = held_out_metrics(predictor, x_test, y_test, n_samples=config.n_samples)
    spec = replace(spec, metrics=rounded(scores))
    return checkpoint.LoadedModel(spec=spec, module=module, path=config.out)


def _sample_means(module: nn.Module, x: Tensor, config: TrainConfig) -> Tensor:
    return sample(module, x, config.n_samples, seed=config.seed)


def held_out_metrics(
    predictor: Predictor, x: Tensor, y: Tensor, *, n_samples: int, seed: int = 0
) -> dict[str, float]:
    """Held-out metrics, deterministic and MC.

    Classification (``y (N,)`` labels): accuracy and NLL (nats per example).
    Regression (``y (N, K)``, original units): RMSE and the mixture test log-likelihood
    (Gal & Ghahramani 2016), plus the coverage of the 95% interval.
    """
    det = predictor.predict(x)
    summary, _ = predictor.uncertainty(x, n_samples, seed=seed, targets=None if y.dim() == 1 else y)
    if isinstance(summary, stats.ClassificationSummary):
        assert isinstance(det, ClassificationPrediction)
        det_probs = det.probabilities
        return {
            "accuracy": metrics.accuracy(summary.probabilities, y),
            "nll": metrics.nll(summary.probabilities, y),
            "deterministic_accuracy": metrics.accuracy(det_probs, y),
            "deterministic_nll": metrics.nll(det_probs, y),
        }
    assert summary.log_likelihood is not None
    assert isinstance(det, RegressionPrediction)
    inside = (y >= summary.lower) & (y <= summary.upper)
    return {
        "rmse": float((summary.mean - y).square().mean().sqrt()),
        "test_log_likelihood": float(summary.log_likelihood.mean()),
        "deterministic_rmse": float((det.mean - y).square().mean().sqrt()),
        "picp95": float(inside.double().mean()),
    }
