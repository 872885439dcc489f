"""The mcdrop command: local prediction, training, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mcdrop import checkpoint
from service.cli import main, parser
from service.config import Settings
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


def test_serve_flags_cover_every_setting() -> None:
    from service.config import Settings

    help_text = parser().format_help()
    assert "serve" in help_text
    serve = parser()._subparsers._group_actions[0].choices["serve"]  # type: ignore[union-attr]
    flags = {a.dest for a in serve._actions if a.dest != "help"}
    assert flags == set(Settings.model_fields)


def test_serve_flags_parse_into_settings() -> None:
    argv = ["serve", "--no-exit-on-error", "--allowed-factories", "mypkg.,otherpkg.nets"]
    args = parser().parse_args([*argv, "--trust-model-code", "--no-batching"])
    overrides = {k: v for k in Settings.model_fields if (v := getattr(args, k)) is not None}
    assert overrides == {
        "exit_on_error": False,
        "allowed_factories": "mypkg.,otherpkg.nets",
        "trust_model_code": True,
        "batching": False,
    }
    settings = Settings(**overrides)
    assert settings.allowed_factories == ("mypkg.", "otherpkg.nets")
    assert parser().parse_args(["serve", "--batching"]).batching is True


@pytest.fixture
def custom_folder(tmp_path: Path) -> Path:
    """A models folder whose ``custom`` model is built by ``tests.factories:build``."""
    from tests.factories import build

    spec = checkpoint.ModelSpec(
        name="custom",
        task="regression",
        input_shape=[3],
        labels=["y"],
        architecture={"factory": "tests.factories:build", "params": {"width": 4}},
        tau=1.0,
    )
    checkpoint.save(tmp_path / "custom", spec, build(width=4))
    return tmp_path


ROW = json.dumps([[1.0, 2.0, 3.0]])


def test_local_predict_refuses_an_untrusted_factory(
    custom_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["predict", "custom", "--model-dir", str(custom_folder), "--inputs", ROW]
    code, out, err = _run(capsys, *argv)
    assert (code, out) == (1, "")
    assert "--allowed-factories tests.factories" in err
    assert "--trust-model-code" in err


@pytest.mark.parametrize(
    ("flags", "env"),
    [
        (["--trust-model-code"], {}),
        (["--allowed-factories", "tests."], {}),
        ([], {"MCDROP_ALLOWED_FACTORIES": "tests.factories"}),
        ([], {"MCDROP_TRUST_MODEL_CODE": "true"}),
    ],
)
def test_local_predict_with_opt_in(
    custom_folder: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    flags: list[str],
    env: dict[str, str],
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    argv = ["predict", "custom", "--model-dir", str(custom_folder), "--inputs", ROW, *flags]
    code, out, _ = _run(capsys, *argv)
    assert code == 0
    assert len(json.loads(out)["predictions"]) == 1


def test_evaluate_refuses_an_untrusted_factory(
    custom_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = _run(capsys, "evaluate", str(custom_folder / "custom"), "--no-plots")
    assert code == 1
    assert "--allowed-factories tests.factories" in err
    args = parser().parse_args(["evaluate", "m", "--trust-model-code", "--allowed-factories", "a"])
    assert (args.trust_model_code, args.allowed_factories) == (True, "a")
