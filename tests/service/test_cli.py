"""The mcdrop command: local prediction, training, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from service.cli import main, parser
from tests.conftest import MODELS

PATIENT = [59, 2, 32.1, 101, 157, 93.2, 38, 4, 4.8598, 87]


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_local_predict(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(
        capsys, "predict", "diabetes", "--model-dir", str(MODELS), "--inputs", json.dumps([PATIENT])
    )
    assert code == 0
    assert json.loads(out)["predictions"][0]["mean"][0] > 0


def test_local_uncertainty_from_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "rows.json").write_text(json.dumps({"inputs": [[0.0] * 64]}))
    code, out, _ = _run(
        capsys,
        "predict",
        "digits",
        "--model-dir",
        str(MODELS),
        "--inputs",
        f"@{tmp_path / 'rows.json'}",
        "--uncertainty",
        "--n-samples",
        "20",
        "--seed",
        "3",
    )
    assert code == 0
    body = json.loads(out)
    assert body["seed"] == 3
    assert body["n_samples"] == 20
    assert body["results"][0]["mutual_information"] >= 0


def test_bad_input_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(
        capsys, "predict", "diabetes", "--model-dir", str(MODELS), "--inputs", "[[1, 2]]"
    )
    assert code == 1
    assert err.startswith("mcdrop: error:")
    assert "[10]" in err


def test_unreachable_service(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(
        capsys, "predict", "digits", "--url", "http://127.0.0.1:9", "--inputs", "[[0]]"
    )
    assert code == 1
    assert "cannot reach" in err


def test_train_writes_a_loadable_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(
        capsys,
        "train",
        "diabetes",
        "--out",
        str(tmp_path / "m"),
        "--hidden",
        "8",
        "--epochs",
        "2",
        "--n-samples",
        "8",
        "--quiet",
    )
    assert code == 0
    assert "rmse" in json.loads(out)["metrics"]
    manifest = json.loads((tmp_path / "m" / "model.json").read_text())
    assert manifest["training"]["command"].startswith("mcdrop train diabetes")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("command", "missing"),
    [("train diabetes --out unused", "sklearn"), ("evaluate unused", "tqdm")],
)
def test_train_and_evaluate_name_the_missing_extra(command: str, missing: str) -> None:
    # In a fresh interpreter where the package cannot be imported (as if never installed).
    code = (
        f"import sys; sys.modules[{missing!r}] = None; from service.cli import main; "
        f"sys.exit(main({command.split()!r}))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 1
    assert done.stderr.strip().endswith("pip install 'mcdrop[recipes]'")
    assert done.stderr.startswith("mcdrop: error: mcdrop.recipes needs")
    assert "Traceback" not in done.stderr


def test_serve_flags_cover_every_setting() -> None:
    from service.config import Settings

    help_text = parser().format_help()
    assert "serve" in help_text
    serve = parser()._subparsers._group_actions[0].choices["serve"]  # type: ignore[union-attr]
    flags = {a.dest for a in serve._actions if a.dest != "help"}
    assert flags == set(Settings.model_fields)
