"""Fashion-MNIST: the IDX reader, the loader, its install hint, and the bundled model.

The data come from Debian's ``dataset-fashion-mnist`` package. A test that needs them fails
(never skips) with the install command when they are missing.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from mcdrop import checkpoint, metrics
from mcdrop.checkpoint import ModelSpec, Normalization
from mcdrop.exceptions import InvalidArgumentError
from mcdrop.nets import CNN, build
from mcdrop.predictor import Predictor
from mcdrop.recipes import datasets
from mcdrop.recipes.train import TrainConfig, architecture
from tests.conftest import MODELS


@pytest.fixture(scope="module")
def fashion() -> datasets.Dataset:
    try:
        return datasets.fashion_mnist(seed=0)
    except datasets.DatasetNotFoundError as exc:
        pytest.fail(
            f"Fashion-MNIST is not installed ({exc}); run `apt-get install dataset-fashion-mnist`"
        )


def write_idx(path: Path, array: np.ndarray, *, compress: bool) -> Path:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)
    return path


@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_round_trip(tmp_path: Path, compress: bool) -> None:
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    got = datasets.read_idx(write_idx(tmp_path / "x-idx3-ubyte", array, compress=compress))
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, array)


def test_read_idx_rejects_bad_files(tmp_path: Path) -> None:
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(InvalidArgumentError, match="not an IDX file"):
        datasets.read_idx(tmp_path / "bad")
    short = write_idx(tmp_path / "short", np.zeros((2, 2)), compress=False)
    short.write_bytes(short.read_bytes()[:-1])
    with pytest.raises(InvalidArgumentError, match="header says shape"):
        datasets.read_idx(short)


def test_missing_files_name_the_install_command(tmp_path: Path) -> None:
    with pytest.raises(
        datasets.DatasetNotFoundError, match="apt-get install dataset-fashion-mnist"
    ):
        datasets.fashion_mnist(root=tmp_path)
    assert issubclass(datasets.DatasetNotFoundError, FileNotFoundError)  # the CLI's one-liner


def test_loader_reads_uncompressed_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for key, stem in datasets.FASHION_MNIST_FILES.items():
        n = 30 if "train" in key else 7
        shape = (n, 28, 28) if key.startswith("x") else (n,)
        write_idx(tmp_path / stem, rng.integers(0, 10, size=shape), compress=False)
    data = datasets.fashion_mnist(root=tmp_path, n_validation=5)
    assert data.x_train.shape == (25, 28, 28)
    assert data.x_val.shape == (5, 28, 28)
    assert data.x_test.shape == (7, 28, 28)


def test_fashion_mnist_shapes_and_dtypes(fashion: datasets.Dataset) -> None:
    assert fashion.name == "fashion"
    assert fashion.input_shape == [28, 28]
    assert fashion.labels[0] == "T-shirt/top"
    assert fashion.labels[-1] == "Ankle boot"
    assert fashion.x_train.shape == (55_000, 28, 28)
    assert fashion.x_val.shape == (5_000, 28, 28)
    assert fashion.x_test.shape == (10_000, 28, 28)
    assert fashion.x_train.dtype == torch.float32
    assert fashion.y_train.dtype == torch.int64
    assert float(fashion.x_train.min()) == 0.0
    assert float(fashion.x_train.max()) == 255.0
    assert torch.bincount(fashion.y_test).tolist() == [1000] * 10  # the official test set


def test_load_subsets_and_excludes_classes() -> None:
    data = datasets.load("digits", train_size=100, exclude_classes=[0, 9])
    assert len(data.x_train) == 100
    assert not bool(torch.isin(data.y_train, torch.tensor([0, 9])).any())
    assert not bool(torch.isin(data.y_val, torch.tensor([0, 9])).any())
    assert bool(torch.isin(data.y_test, torch.tensor([0, 9])).any())  # kept as OOD inputs
    with pytest.raises(InvalidArgumentError, match="regression"):
        datasets.load("diabetes", exclude_classes=[0])


def test_scalar_normalization_broadcasts_over_images() -> None:
    torch.manual_seed(0)
    net = CNN(channels=(4,), pool=(True,), hidden=8, dropout=0.1)
    spec = ModelSpec(
        name="f",
        task="classification",
        input_shape=[28, 28],
        labels=list(datasets.FASHION_MNIST_LABELS),
        architecture={"name": "cnn", "params": {}},
        input_normalization=Normalization([72.0], [90.0]),
    )
    module = checkpoint.wrap(spec, net).eval()
    x = torch.rand(3, 28, 28) * 255
    torch.testing.assert_close(module(x), net((x - 72.0) / 90.0))


def test_train_builds_a_cnn_for_images(fashion: datasets.Dataset) -> None:
    config = TrainConfig(
        dataset="fashion",
        out=Path("unused"),
        arch="cnn",
        hidden=[32],
        channels=[4, 8],
        spatial_dropout=0.1,
    )
    arch = architecture(config, fashion)
    assert arch["params"]["pool"] == [True, True]
    assert build(arch)(fashion.x_test[:2]).shape == (2, 10)
    lstm = architecture(
        TrainConfig(dataset="fashion", out=Path("unused"), arch="row_lstm"), fashion
    )
    assert build(lstm)(fashion.x_test[:2]).shape == (2, 10)
    with pytest.raises(InvalidArgumentError, match="2-D images"):
        architecture(TrainConfig(dataset="digits", out=Path("x"), arch="cnn"), datasets.digits())


def test_bundled_fashion_model(fashion: datasets.Dataset) -> None:
    loaded = checkpoint.load(MODELS / "fashion")
    spec = loaded.spec
    assert spec.input_shape == [28, 28]
    assert spec.labels == datasets.FASHION_MNIST_LABELS
    assert spec.input_normalization is not None
    assert len(spec.input_normalization.mean) == 1
    assert spec.metrics["accuracy"] > 0.85
    assert (MODELS / "fashion" / checkpoint.WEIGHTS).stat().st_size < 4_000_000
    predictor = Predictor(loaded)
    probs = predictor.predict(fashion.x_test[:500]).probabilities  # type: ignore[union-attr]
    assert metrics.accuracy(probs, fashion.y_test[:500]) > 0.85
    summary, _ = predictor.uncertainty(fashion.x_test[:5], 8, seed=0)
    assert bool((summary.mutual_information >= 0).all())  # type: ignore[union-attr]


@pytest.mark.slow
def test_cli_trains_a_fashion_model(
    fashion: datasets.Dataset, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from service.cli import main

    out = tmp_path / "fashion-mlp"
    argv = ["train", "fashion", "--out", str(out), "--arch", "mlp", "--hidden", "16"]
    argv += ["--train-size", "300", "--epochs", "1", "--n-samples", "2", "--quiet"]
    assert main([*argv, "--exclude-classes", "9"]) == 0
    capsys.readouterr()
    spec = checkpoint.read_spec(out)
    assert spec.input_shape == [28, 28]
    assert spec.architecture["params"]["flatten"] is True
    assert spec.input_normalization is not None
    assert len(spec.input_normalization.mean) == 1
    assert spec.training["train_size"] == 300
    assert spec.training["exclude_classes"] == [9]
    assert 0.0 <= spec.metrics["accuracy"] <= 1.0
    # The held-out class becomes an OOD set when the model is evaluated.
    from mcdrop.recipes.evaluate import evaluate_model

    report = evaluate_model(out, n_samples=2, limit=50, plots=False)
    assert "held-out classes (Ankle boot)" in report["ood"]
