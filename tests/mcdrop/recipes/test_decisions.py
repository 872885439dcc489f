"""mcdrop.recipes.decisions and benchmarks.decisions: calibrating a model folder, the test-split
evidence, reproduced, and the docs that quote it."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import mcdrop
from benchmarks import decisions as bench
from mcdrop.recipes import datasets, decisions
from tests.conftest import MODELS, ROOT

RESULTS = ROOT / "benchmarks" / "results"


def _close(a: object, b: object) -> bool:
    """Equal structures and counts, numbers to 1e-5 relative: the run is seeded end to end, and
    the model's float32 matrix products round differently on other CPUs (~2e-6 relative, seen
    between two x86 machines)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-12) or (math.isnan(a) and math.isnan(b))
    return a == b


def test_the_committed_evidence_reproduces() -> None:
    # digits and diabetes in seconds; fashion (minutes) is the same code on more rows.
    committed = {r["model"]: r for r in json.loads((RESULTS / "decisions.json").read_text())}
    reports, _ = bench.run(["digits", "diabetes"], write=False, out=None)
    for report in reports:
        assert _close(report, committed[report["model"]]), report["model"]


def test_conformal_coverage_is_within_sampling_error_on_every_bundled_model() -> None:
    reports = json.loads((RESULTS / "decisions.json").read_text())
    assert {r["model"] for r in reports} == {"digits", "fashion", "diabetes"}
    for report in reports:
        assert report["conformal"], report["model"]
        for row in report["conformal"]:
            assert abs(row["empirical"] - row["coverage"]) <= 2 * row["se"], (report["model"], row)


def test_docs_quote_the_results_as_written() -> None:
    page = (ROOT / "docs" / "decisions.md").read_text()
    start = page.index("<!-- results: benchmarks/results/decisions.md -->\n")
    end = page.index("<!-- end results -->")
    quoted = page[start:end].split("\n", 1)[1]
    assert quoted == (RESULTS / "decisions.md").read_text()


def test_rejection_on_fashion_keeps_the_rows_it_gets_right() -> None:
    fashion = next(
        r for r in json.loads((RESULTS / "decisions.json").read_text()) if r["model"] == "fashion"
    )
    by_rate = {r["rate"]: r for r in fashion["rejection"] if r["score"] == "entropy"}
    kept = [by_rate[rate]["accuracy_kept"] for rate in sorted(by_rate)]
    assert fashion["accuracy_all"] < kept[0]
    assert kept == sorted(kept)  # more rejected, more accurate
    assert by_rate[0.1]["ood_flagged"]["digits 28x28"] > 0.9


@pytest.fixture
def digits_dir(tmp_path: Path) -> Path:
    return Path(shutil.copytree(MODELS / "digits", tmp_path / "digits"))


def test_calibrate_dir_on_an_npz_of_your_own(digits_dir: Path, tmp_path: Path) -> None:
    data = datasets.digits()
    npz = tmp_path / "heldout.npz"
    np.savez(npz, x=data.x_test[:50].numpy(), y=data.y_test[:50].numpy())
    calibration = decisions.calibrate_dir(digits_dir, data=npz, n_samples=10, seed=2)
    assert (calibration.n_rows, calibration.n_samples, calibration.data) == (50, 10, "heldout.npz")
    loaded = mcdrop.load(digits_dir).calibration
    assert loaded is not None
    assert torch.equal(loaded.conformal, calibration.conformal)


@pytest.mark.parametrize(
    ("arrays", "match"),
    [
        ({"x": np.zeros((2, 64))}, "needs arrays 'x'"),
        ({"x": np.zeros((2, 3)), "y": np.zeros(2)}, "expects rows of shape"),
        ({"x": np.zeros((2, 64)), "y": np.zeros(3)}, "they must match"),
        ({"x": np.zeros((2, 64)), "y": np.array([0, 10])}, "class indices"),
    ],
)
def test_a_bad_npz_says_what_is_wrong(
    digits_dir: Path, tmp_path: Path, arrays: dict[str, np.ndarray], match: str
) -> None:
    npz = tmp_path / "bad.npz"
    np.savez(npz, **arrays)  # type: ignore[arg-type]
    with pytest.raises(mcdrop.McDropError, match=match):
        decisions.calibrate_dir(digits_dir, data=npz, n_samples=4)


def test_a_model_without_a_recorded_dataset_needs_data(tmp_path: Path) -> None:
    directory = Path(shutil.copytree(MODELS / "digits", tmp_path / "digits"))
    manifest = json.loads((directory / "model.json").read_text())
    manifest["training"] = {}
    (directory / "model.json").write_text(json.dumps(manifest))
    with pytest.raises(mcdrop.InvalidArgumentError, match="--data"):
        decisions.calibrate_dir(directory)
