"""Model families users bring, end to end: saved with ``mcdrop.save`` (naming a factory of
``tests.families``), loaded only with the opt-in, sampled by the Predictor, checked by
``mcdrop check`` and served by a real ``mcdrop serve``.

The families: a ResNet-style CNN with BatchNorm and a dropout head; a transformer encoder
classifier (``nn.TransformerEncoder``: attention and feed-forward dropout); a transformer written
with ``F.scaled_dot_product_attention(dropout_p=...)``; an LSTM forecaster with ``LockedDropout``
and dropout between its layers; an MLP whose ``forward`` calls ``F.dropout``; a heteroscedastic
regressor (K means, then K log-variances), trained on noise that grows with its input.
"""

from __future__ import annotations

import json
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import mcdrop
from mcdrop import Predictor
from mcdrop.checking import example_inputs
from mcdrop.predictor import ClassificationPrediction
from mcdrop_client import Client
from service.cli import main
from tests import families
from tests.e2e.server import serve

# Trains, saves and serves six models: part of `make test`, not of the edit loop.
pytestmark = pytest.mark.slow

TRUSTED = "tests.families"


@dataclass(frozen=True)
class Family:
    """A model family: its factory in :mod:`tests.families`, the manifest fields it is saved
    with, and what sampling should find (dropout call kinds in order, a shared prefix)."""

    factory: str
    params: dict[str, Any]
    manifest: dict[str, Any]
    kinds: list[str]
    prefix: bool
    normalization: dict[str, Any] = field(default_factory=dict)


_ENCODER_LAYER = ["attention dropout", "dropout", "dropout", "dropout"]

FAMILIES = {
    "resnet": Family(
        "ResNet",
        {"in_channels": 3, "channels": 8, "blocks": 2, "n_classes": 4, "dropout": 0.3},
        {"task": "classification", "input_shape": [3, 10, 10], "labels": list("abcd")},
        ["dropout"],
        prefix=True,
    ),
    "transformer": Family(
        "TransformerClassifier",
        {"features": 4, "length": 6, "d_model": 16, "heads": 2, "layers": 2, "n_classes": 3},
        {"task": "classification", "input_shape": [6, 4], "labels": ["x", "y", "z"]},
        _ENCODER_LAYER * 2,
        prefix=False,  # residual connections across the first dropout
    ),
    "sdpa_transformer": Family(
        "ScaledDotProductClassifier",
        {"features": 4, "d_model": 16, "heads": 2, "layers": 2, "n_classes": 3, "p": 0.1},
        {"task": "classification", "input_shape": [6, 4], "labels": ["x", "y", "z"]},
        ["attention dropout", "dropout"] * 2,
        prefix=False,
    ),
    "lstm": Family(
        "LSTMForecaster",
        {"features": 3, "hidden": 16, "layers": 2, "dropout": 0.25, "input_dropout": 0.2},
        {"task": "regression", "input_shape": [8, 3], "labels": ["t+1", "t+2"], "tau": 4.0},
        ["LockedDropout(batch_first=True)", "LSTM dropout between layers"],
        prefix=True,
    ),
    "functional_mlp": Family(
        "FunctionalMLP",
        {"features": 4, "hidden": 32, "n_classes": 3, "p": 0.2},
        {"task": "classification", "input_shape": [4], "labels": ["a", "b", "c"]},
        ["dropout", "dropout"],
        prefix=True,
    ),
    "heteroscedastic": Family(
        "heteroscedastic",
        {"features": 1, "hidden": 32, "targets": 1, "dropout": 0.1},
        {
            "task": "regression",
            "input_shape": [1],
            "labels": ["y"],
            "likelihood": "heteroscedastic",
        },
        ["dropout", "dropout"],
        prefix=True,
        normalization={
            "input_normalization": {"mean": [0.0], "std": [1.5]},
            "target_normalization": {"mean": [1.0], "std": [2.0]},
        },
    ),
}


def _noisy_line(n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``y = 2x + 1 + ε``, ``ε ~ N(0, (0.1 + 0.5|x|)²)``: rows ``(n, 1)`` and targets ``(n, 1)``."""
    x = torch.rand(n, 1, generator=generator) * 6 - 3
    noise = (0.1 + 0.5 * x.abs()) * torch.randn(n, 1, generator=generator)
    return x, 2 * x + 1 + noise


def _train(name: str, net: nn.Module) -> None:
    """What users do before saving: BatchNorm's running statistics from training batches, and a
    real fit for the heteroscedastic regressor (Gaussian negative log-likelihood, on data
    standardised as its manifest says)."""
    g = torch.Generator().manual_seed(1)
    if name == "resnet":
        net.train()
        with torch.no_grad():
            for _ in range(5):
                net(torch.randn(16, 3, 10, 10, generator=g) * 2 + 0.5)
    if name == "heteroscedastic":
        x, y = _noisy_line(2000, g)
        x, y = x / 1.5, (y - 1.0) / 2.0
        optimizer = torch.optim.Adam(net.parameters(), lr=0.01)
        net.train()
        for _ in range(300):
            out = net(x)
            mean, log_var = out[:, :1], out[:, 1:]
            loss = F.gaussian_nll_loss(mean, y, log_var.exp())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    net.eval()


def _save(folder: Path, name: str, factory: str, params: dict[str, Any], **manifest: Any) -> None:
    net = getattr(families, factory)(**params)
    _train(name, net)
    mcdrop.save(net, folder / name, factory=f"{TRUSTED}:{factory}", params=params, **manifest)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models folder with one directory per family."""
    folder = tmp_path_factory.mktemp("families") / "models"
    torch.manual_seed(0)
    for name, family in FAMILIES.items():
        _save(
            folder, name, family.factory, family.params, **family.manifest, **family.normalization
        )
    return folder


@pytest.fixture(scope="module")
def unreachable(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Transformers whose attention gives its rate in training only: with feed-forward dropout
    beside it (``partly``), and without (``only``)."""
    folder = tmp_path_factory.mktemp("unreachable")
    base = FAMILIES["sdpa_transformer"]
    params = {**base.params, "sampled": False, "ffn_dropout": 0.1}
    _save(folder, "partly", base.factory, params, **base.manifest)
    # No dropout sampling reaches: mcdrop.save refuses it, as a server does, so it is written
    # as it is (a folder made without mcdrop.save)
    params = {**params, "ffn_dropout": 0.0}
    net = getattr(families, base.factory)(**params).eval()
    architecture = {"factory": f"{TRUSTED}:{base.factory}", "params": params}
    with pytest.raises(mcdrop.InvalidArgumentError, match=r"mcdrop\.is_sampling\(\)"):
        mcdrop.save(net, folder / "only", factory=architecture["factory"], params=params,
                    **base.manifest)  # fmt: skip
    spec = mcdrop.checkpoint.ModelSpec(name="only", architecture=architecture, **base.manifest)
    mcdrop.checkpoint.save(folder / "only", spec, net)
    return folder


def _rows(loaded: mcdrop.LoadedModel, n: int = 3) -> Tensor:
    return example_inputs(loaded.spec, n, seed=5)


def _check(capsys: pytest.CaptureFixture[str], directory: Path, *flags: str) -> tuple[int, str]:
    code = main(["check", str(directory), "--allowed-factories", TRUSTED, *flags])
    return code, capsys.readouterr().out


@pytest.mark.parametrize("name", FAMILIES)
def test_the_saved_folder_loads_only_with_the_opt_in(models: Path, name: str) -> None:
    with pytest.raises(mcdrop.UntrustedCodeError, match=f"--allowed-factories {TRUSTED}"):
        mcdrop.load(models / name)
    loaded = mcdrop.load(models / name, allowed_factories=[TRUSTED])
    assert loaded.spec.architecture["factory"] == f"{TRUSTED}:{FAMILIES[name].factory}"
    x = _rows(loaded)
    out = mcdrop.predict(loaded.module, x)
    width = len(loaded.spec.labels) * (2 if loaded.spec.likelihood == "heteroscedastic" else 1)
    assert out.shape == (3, width)
    assert bool(torch.isfinite(out).all())


@pytest.mark.parametrize("name", FAMILIES)
def test_the_predictor_samples_every_dropout(models: Path, name: str) -> None:
    family = FAMILIES[name]
    predictor = Predictor(mcdrop.load(models / name, allowed_factories=[TRUSTED]))
    x = _rows(predictor.model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no dropout out of reach
        plan = predictor.warm_up(x)
    assert [c.kind for c in plan.calls] == family.kinds
    assert plan.prefix is family.prefix
    assert plan.unsampled == ()
    summary, samples = predictor.uncertainty(x, 32, seed=3, return_samples=True)
    again, _ = predictor.uncertainty(x, 32, seed=3)
    assert samples is not None
    assert bool((samples.var(0) > 0).all())  # every output of every row varies
    if isinstance(summary, mcdrop.stats.ClassificationSummary):
        assert bool((summary.mutual_information > 0).all())
        assert torch.equal(summary.probabilities, again.probabilities)
    else:
        assert bool((summary.epistemic_variance > 0).all())
        assert torch.equal(summary.mean, again.mean)
    # A row's samples do not depend on the rows beside it.
    _, alone = predictor.uncertainty(x[1:2], 32, seed=3, return_samples=True)
    assert alone is not None
    assert torch.allclose(alone[:, 0], samples[:, 1], atol=1e-5)


@pytest.mark.parametrize("name", FAMILIES)
def test_mcdrop_check_reports_what_sampling_does(
    models: Path, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    family = FAMILIES[name]
    code, out = _check(capsys, models / name, "--json")
    report = json.loads(out)
    assert (code, report["ok"], report["problems"]) == (0, True, [])
    assert [c["kind"] for c in report["calls"]] == family.kinds
    assert report["prefix"]["shared"] is family.prefix
    assert report["samples"]["vary"] is True
    assert report["samples"]["constant_outputs"] == []
    assert all(d["sampled"] for d in report["dropouts"])
    assert report["ms_per_row_sample"] > 0
    code, out = _check(capsys, models / name)
    assert code == 0
    assert out.splitlines()[-1] == "result: ok"


def test_the_resnet_samples_with_batchnorm_in_eval(models: Path) -> None:
    loaded = mcdrop.load(models / "resnet", allowed_factories=[TRUSTED])
    norms = [m for m in loaded.module.modules() if isinstance(m, nn.BatchNorm2d)]
    before = [(m.running_mean.clone(), m.running_var.clone()) for m in norms]
    assert not all(bool((mean == 0).all()) for mean, _ in before)  # stats from training
    Predictor(loaded).uncertainty(_rows(loaded), 16, seed=0)
    for m, (mean, var) in zip(norms, before, strict=True):
        assert torch.equal(m.running_mean, mean)
        assert torch.equal(m.running_var, var)
    # The stem and the residual blocks run once per row; only the head is sampled.
    assert Predictor(loaded).warm_up(_rows(loaded)).prefix


def test_the_heteroscedastic_regressor_predicts_its_noise(models: Path) -> None:
    """In original units: the aleatoric variance follows the noise, (0.1 + 0.5|x|)², and the
    mean follows the line; the epistemic part is there too."""
    predictor = Predictor(mcdrop.load(models / "heteroscedastic", allowed_factories=[TRUSTED]))
    x = torch.tensor([[-2.0], [0.5], [2.5]])
    summary, _ = predictor.uncertainty(x, 200, seed=0)
    assert isinstance(summary, mcdrop.stats.RegressionSummary)
    noise = (0.1 + 0.5 * x.abs()) ** 2
    assert torch.allclose(summary.mean, 2 * x + 1, atol=0.3)
    ratio = summary.aleatoric_variance / noise
    assert bool(((ratio > 0.5) & (ratio < 2)).all()), ratio
    assert bool(summary.aleatoric_variance[2] > 4 * summary.aleatoric_variance[1])
    assert bool((summary.epistemic_variance > 0).all())


def test_attention_dropout_out_of_reach_is_said(
    unreachable: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Beside other dropout, a warning from sampling and from ``mcdrop check`` (exit 0); as
    the only dropout, an error from both (exit 1): never samples that vary too little."""
    partly = Predictor(mcdrop.load(unreachable / "partly", allowed_factories=[TRUSTED]))
    with pytest.warns(mcdrop.UnsampledDropoutWarning, match="blocks.0 .* dropout_p=0"):
        partly.warm_up(_rows(partly.model))
    code, out = _check(capsys, unreachable / "partly", "--json")
    report = json.loads(out)
    assert (code, report["ok"]) == (0, True)
    assert [(p["code"], p["message"].split(" (")[0]) for p in report["problems"]] == [
        ("unsampled_dropout", "blocks.0"),
        ("unsampled_dropout", "blocks.1"),
    ]
    assert [d["module"] for d in report["dropouts"] if not d["sampled"]] == [
        "blocks.0",
        "blocks.1",
    ]

    only = Predictor(mcdrop.load(unreachable / "only", allowed_factories=[TRUSTED]))
    with pytest.raises(mcdrop.NoDropoutError, match=r"mcdrop\.is_sampling\(\)"):
        only.warm_up(_rows(only.model))
    code, out = _check(capsys, unreachable / "only")
    assert code == 1
    assert "error (no_dropout)" in out
    assert out.splitlines()[-1] == "result: not fit for MC dropout as it is (1 error)"


@pytest.fixture(scope="module")
def server_url(models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log_dir = tmp_path_factory.mktemp("families-serve")
    with serve(log_dir, model_dir=models, MCDROP_ALLOWED_FACTORIES=TRUSTED) as server:
        yield server.url


def test_every_family_is_served_over_http(models: Path, server_url: str) -> None:
    """A real ``mcdrop serve`` (uvicorn) of all the families: the answers over HTTP are the
    Predictor's, seed for seed."""
    with Client(server_url) as client:
        assert sorted(info.name for info in client.models()) == sorted(FAMILIES)
        for name in FAMILIES:
            predictor = Predictor(mcdrop.load(models / name, allowed_factories=[TRUSTED]))
            x = _rows(predictor.model, 2)
            result = client.uncertainty(name, x.tolist(), n_samples=50, seed=11)
            local, _ = predictor.uncertainty(x, 50, seed=11)
            for i, row in enumerate(result.results):
                if isinstance(local, mcdrop.stats.ClassificationSummary):
                    got, want = row.probabilities, local.probabilities[i]
                else:
                    got, want = row.mean, local.mean[i]
                assert torch.allclose(torch.tensor(got), want, rtol=1e-4, atol=1e-5), name
            assert len(client.predict(name, x.tolist()).predictions) == 2


def test_the_functional_mlp_is_routed_and_served_to_threads_at_once(
    models: Path, server_url: str
) -> None:
    """The MLP calling F.dropout samples without the torch-function mode (its functions routed,
    mcdrop.routing), bit for bit as under it; over HTTP, requests on several threads at once
    (the server's passes routed at the same time as its deterministic predictions) answer as
    the Predictor does."""
    predictor = Predictor(mcdrop.load(models / "functional_mlp", allowed_factories=[TRUSTED]))
    x = _rows(predictor.model, 4)
    plan = predictor.warm_up(x)
    assert plan.routes is not None
    assert plan.routes.functions
    module = predictor.model.module
    assert torch.equal(
        mcdrop.sample(module, x, 16, seed=2, plan=plan),
        mcdrop.sample(module, x, 16, seed=2, plan=replace(plan, routes=None)),
    )
    local, _ = predictor.uncertainty(x, 40, seed=7)
    assert isinstance(local, mcdrop.stats.ClassificationSummary)
    deterministic = predictor.predict(x)
    assert isinstance(deterministic, ClassificationPrediction)
    failures: list[str] = []

    def ask(i: int) -> None:
        with Client(server_url) as client:
            for _ in range(15):
                if i % 2:
                    got = client.predict("functional_mlp", x.tolist()).predictions
                    want = deterministic.probabilities
                else:
                    got = client.uncertainty(
                        "functional_mlp", x.tolist(), n_samples=40, seed=7
                    ).results
                    want = local.probabilities
                probabilities = torch.tensor([row.probabilities for row in got])
                if not torch.allclose(probabilities, want, rtol=1e-4, atol=1e-5):
                    failures.append(f"thread {i}")

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert failures == []
