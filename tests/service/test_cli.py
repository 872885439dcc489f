"""The mcdrop command: local prediction, training, errors."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

import mcdrop
from mcdrop import checkpoint
from mcdrop.checking import MAX_ROWS, MAX_SAMPLES
from mcdrop.nets import MLP
from service.cli import EXIT_STATUS, main, parser
from service.config import Settings
from service.errors import rejected_message
from tests import factories
from tests.conftest import MODELS, ROOT, save_tokens
from tests.service.test_client import UNUSABLE_ENVIRONMENT

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


def test_local_auto_uncertainty(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["predict", "diabetes", "--model-dir", str(MODELS), "--inputs", json.dumps([PATIENT])]
    code, out, _ = _run(
        capsys, *args, "--uncertainty", "--n-samples", "auto", "--tolerance", "0.05", "--seed", "1"
    )
    assert code == 0
    body = json.loads(out)
    assert (body["n_samples"], body["tolerance"], body["max_n_samples"]) == ("auto", 0.05, 1000)
    assert body["results"][0]["n_samples"] >= 16
    code, out, _ = _run(capsys, *args, "--uncertainty", "--n-samples", "auto", "--seed", "1")
    assert json.loads(out)["tolerance"] == 0.05  # the regressor's default, as the service's
    with pytest.raises(SystemExit) as usage:  # argparse's exit on a bad command line
        main([*args, "--uncertainty", "--n-samples", "many"])
    assert usage.value.code == 2
    assert "an integer or 'auto'" in capsys.readouterr().err


def test_bad_input_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    """Exit 2, as the service's 422 invalid_input through --url."""
    code, _, err = _run(
        capsys, "predict", "diabetes", "--model-dir", str(MODELS), "--inputs", "[[1, 2]]"
    )
    assert code == 2
    assert err.startswith("mcdrop predict: error:")
    assert "[10]" in err


def test_a_model_folder_nested_too_deeply_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copytree(MODELS / "diabetes", tmp_path / "diabetes")
    (tmp_path / "diabetes" / "model.json").write_text("[" * 100_000 + "]" * 100_000)
    code, out, err = _run(
        capsys, "predict", "diabetes", "--model-dir", str(tmp_path), "--inputs", "[[1]]"
    )
    assert (code, out) == (1, "")
    assert err == (
        f"mcdrop: error: {tmp_path / 'diabetes' / 'model.json'}: not valid JSON: nested too "
        "deeply (arrays or objects inside one another beyond Python's recursion limit)\n"
    )


@pytest.mark.parametrize(
    ("kind", "problem"),
    [("missing", "does not exist"), ("file", "is not a directory"), ("empty", "holds no model")],
)
def test_serve_without_a_model_folder_stops_in_one_line(
    tmp_path: Path, kind: str, problem: str
) -> None:
    """Before it listens: a server that can never be ready must not start (exit_on_error)."""
    model_dir = tmp_path / kind
    if kind == "file":
        model_dir.write_text("")
    elif kind == "empty":
        model_dir.mkdir()
    command = [sys.executable, "-m", "service.cli", "serve", "--model-dir", str(model_dir)]
    # Port 0, any free one: were the check gone, the server would start (and the run time out).
    command += ["--host", "127.0.0.1", "--port", "0", "--log-level", "warning"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.startswith(f"mcdrop serve: error: model_dir {str(model_dir)!r} {problem}")
    assert done.stderr.endswith(
        ": give --model-dir (or MCDROP_MODEL_DIR) a folder of model directories\n"
    )
    assert done.stderr.count("\n") == 1


@pytest.mark.parametrize("workers", ["1", "2"])
def test_serve_with_a_missing_metrics_folder_stops_in_one_line(
    tmp_path: Path, workers: str
) -> None:
    """A PROMETHEUS_MULTIPROC_DIR that is not a folder: said so, not every model 'failed to
    load' for a file it could not make there."""
    missing = tmp_path / "metrics"
    command = [sys.executable, "-m", "service.cli", "serve", "--model-dir", str(MODELS)]
    command += ["--host", "127.0.0.1", "--port", "0", "--workers", workers]
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(missing), "MCDROP_LOG_LEVEL": "warning"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=90)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.startswith(
        f"mcdrop serve: error: PROMETHEUS_MULTIPROC_DIR {str(missing)!r} is not a folder"
    )
    assert done.stderr.count("\n") == 1


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
    from service.config import Settings, env_only

    help_text = parser().format_help()
    assert "serve" in help_text
    # What `mcdrop serve` parses, less the subcommand's own entries (its name and handler).
    flags = set(vars(parser().parse_args(["serve"]))) - {"command", "func"}
    # Every setting but the secrets, which a command line would show to every user in `ps`.
    assert flags == {name for name in Settings.model_fields if not env_only(name)}
    assert "api_key" not in flags
    assert env_only("api_key")


def test_serve_flags_parse_into_settings() -> None:
    argv = ["serve", "--no-exit-on-error", "--allowed-factories", "mypkg.,otherpkg.nets"]
    args = parser().parse_args([*argv, "--trust-model-code", "--no-batching"])
    overrides = {k: v for k in Settings.model_fields if (v := getattr(args, k, None)) is not None}
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


@pytest.mark.parametrize(("name", "value"), UNUSABLE_ENVIRONMENT)
def test_environment_settings_that_cannot_be_used_are_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], name: str, value: str
) -> None:
    """A proxy (or certificate file) of the environment the client cannot use: one line, exit
    2 (a SOCKS proxy without socksio was an ImportError's traceback)."""
    monkeypatch.setenv(name, value)
    code, out, err = _run(capsys, "models", "--url", "http://127.0.0.1:9")
    assert (code, out) == (2, "")
    assert err.startswith("mcdrop models: error:")
    assert name in err
    assert err.count("\n") == 1


def test_url_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MCDROP_URL", "http://127.0.0.1:9")
    code, _, err = _run(capsys, "models")
    assert code == 1
    assert "cannot reach" in err
    assert "127.0.0.1:9" in err
    # --url wins over the environment.
    code, _, err = _run(capsys, "models", "--url", "http://127.0.0.1:7")
    assert "127.0.0.1:7" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["models", "--url", "localhost:8000"], "http://"),
        (["predict", "digits", "--url", "ftp://x", "--inputs", "[[0]]"], "http://"),
        (["models", "--url", "http://me:s3cret@127.0.0.1:9"], "remove it"),
        (["predict", "digits", "--inputs", "[[0,"], "--inputs is not valid JSON"),
        (["predict", "digits", "--inputs", '{"rows": []}'], "--inputs must be a JSON list"),
        (["predict", "digits", "--inputs", "[[NaN]]"], "cannot encode"),
        # A file that is not there or not a file: the command line's to fix (it was exit 1).
        (
            ["predict", "digits", "--inputs", "@/no/such/rows.json"],
            "--inputs @/no/such/rows.json: cannot read it: No such file or directory",
        ),
        (["predict", "digits", "--inputs", "@/"], "--inputs @/: cannot read it: Is a directory"),
        (["predict", "../health", "--inputs", "[[0]]"], "model name"),
        # Locally too, a model is a folder inside --model-dir, never a path out of it.
        (
            ["predict", "../diabetes", "--model-dir", str(MODELS / "digits"), "--inputs", "[[0]]"],
            "invalid model name '../diabetes': give the name of a folder inside --model-dir",
        ),
        (["predict", "..", "--model-dir", str(MODELS / "digits"), "--inputs", "[[0]]"], "'..'"),
        (["predict", str(MODELS / "digits"), "--model-dir", "/", "--inputs", "[[0]]"], "name"),
        (["predict", "digits/", "--model-dir", str(MODELS), "--inputs", "[[0]]"], "'digits/'"),
        # A name of no model there: the service's 404 model_not_found.
        (
            ["predict", "nosuch", "--model-dir", str(MODELS), "--inputs", "[[0]]"],
            f"no model 'nosuch' in --model-dir {MODELS} (no {MODELS / 'nosuch' / 'model.json'})",
        ),
        (["serve", "--port", "-1"], "port"),
        (["serve", "--device", "tpu"], "device: Value error, unknown device 'tpu'"),
        (["predict", "digits", "--model-dir", ".", "--device", "gpu", "--inputs", "[[0]]"], "gpu"),
    ],
)
def test_command_lines_to_fix_exit_2_in_one_line(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    code, out, err = _run(capsys, *argv)
    assert code == 2
    assert not out
    assert err.startswith(f"mcdrop {argv[0]}: error:")
    assert message in err
    assert err.count("\n") == 1  # one line, no traceback, no pydantic report


class _QuietFiles(SimpleHTTPRequestHandler):
    def log_message(self, *_: object) -> None:  # the test reads stderr
        pass


@pytest.fixture
def html_server(tmp_path: Path) -> Iterator[str]:
    """A real web server that is not mcdrop: it answers /models with an HTML page."""
    (tmp_path / "models").write_text("<html><body>It works!</body></html>")
    with _serving(partial(_QuietFiles, directory=str(tmp_path))) as url:
        yield url


@contextmanager
def _serving(handler: Callable[..., BaseHTTPRequestHandler]) -> Iterator[str]:
    """A real HTTP server on a free port, answering with ``handler``: its URL."""
    with ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        # A short poll: shutdown() waits up to one poll interval (0.5 s by default).
        thread = threading.Thread(target=server.serve_forever, args=(0.05,))
        thread.start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}"
        finally:
            server.shutdown()
            thread.join()


def test_an_answer_that_is_not_mcdrop_is_one_line(
    html_server: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _run(capsys, "models", "--url", html_server)
    assert code == 1
    assert not out
    assert err.startswith("mcdrop: error:")
    assert "not a ModelList (not JSON)" in err
    assert "It works!" in err
    assert err.count("\n") == 1
    assert "validation error" not in err
    # An error status with a body that is not mcdrop's still names the status.
    code, _, err = _run(capsys, "predict", "digits", "--url", html_server, "--inputs", "[[0]]")
    assert code == 1
    assert "501" in err


def test_check_reports_what_sampling_does(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(capsys, "check", str(MODELS / "diabetes"))
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0] == "diabetes: rows [10], 1 output"
    assert "  net.layers.2  Dropout  p=0.05: 1 call" in lines
    assert "  1. dropout (B, 50)" in lines
    assert "samples vary: yes, every output (16 samples of 4 rows)" in lines
    assert lines[-1] == "result: ok"
    code, out, _ = _run(capsys, "check", str(MODELS / "diabetes"), "--json", "--rows", "2")
    report = json.loads(out)
    assert (code, report["ok"], report["samples"]["n_rows"]) == (0, True, 2)
    assert report["ms_per_row_sample"] > 0


def test_check_exits_1_when_mc_dropout_is_meaningless(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    params = {"in_features": 3, "hidden": [4], "out_features": 2, "dropout": 0.0}
    spec = checkpoint.ModelSpec(
        name="nodrop", task="classification", input_shape=[3], labels=["a", "b"],
        architecture={"name": "mlp", "params": params},
    )  # fmt: skip
    # (written as it is: mcdrop.save refuses a model without dropout, as a server does)
    checkpoint.save(tmp_path / "nodrop", spec, MLP(**params))
    code, out, _ = _run(capsys, "check", str(tmp_path / "nodrop"))
    assert code == 1
    assert "error (no_dropout): MLP made no stochastic dropout call" in out
    assert out.splitlines()[-1] == "result: not fit for MC dropout as it is (1 error)"
    code, out, _ = _run(capsys, "check", str(tmp_path / "nodrop"), "--json")
    assert (code, json.loads(out)["problems"][0]["code"]) == (1, "no_dropout")


def test_check_needs_the_opt_in_for_a_factory(
    custom_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _run(capsys, "check", str(custom_folder / "custom"))
    assert (code, out) == (1, "")
    assert "--allowed-factories tests.factories" in err
    code, out, _ = _run(
        capsys, "check", str(custom_folder / "custom"), "--allowed-factories", "tests."
    )
    assert code == 0
    assert out.startswith("custom: rows [3], 1 output\n")


def test_check_runs_a_model_on_its_own_example_rows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A model of token ids: random rows fail it (forward_failed, exit 1); the rows saved with it
    pass (exit 0)."""
    bare = save_tokens(tmp_path / "bare", example_inputs=None)
    code, out, _ = _run(capsys, "check", str(bare), "--allowed-factories", "tests.factories")
    assert code == 1
    assert "error (forward_failed): the model fails on 4 example rows: index out of range" in out
    assert "mcdrop.save(..., example_inputs=rows)" in out
    folder = save_tokens(tmp_path / "tokens")
    argv = ["check", str(folder), "--allowed-factories", "tests.factories", "--rows", "5"]
    code, out, err = _run(capsys, *argv)
    assert (code, err) == (0, ""), out
    assert "samples vary: yes, every output (16 samples of 5 rows)" in out
    assert out.splitlines()[-1] == "result: ok"


def test_check_exits_1_on_a_batch_size_the_warm_up_refuses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A model that takes batches of at most 64 rows: ok, where a server's warm-up (16
    samples of 32 rows) refuses it; now the check's error, in the warm-up's words."""
    spec = checkpoint.ModelSpec(
        name="sized", task="regression", input_shape=[3], labels=["y"],
        architecture={"factory": "tests.factories:MaxBatch", "params": {"most": 64}}, tau=1.0,
    )  # fmt: skip
    checkpoint.save(tmp_path / "sized", spec, factories.MaxBatch(most=64))
    argv = ["check", str(tmp_path / "sized"), "--allowed-factories", "tests.factories"]
    code, out, _ = _run(capsys, *argv)
    assert code == 1
    assert (
        "error (batch_size): the model takes a batch of 4 rows but fails on a batch of 512 rows "
        "(ValueError: at most 64 rows a batch, got 512): a server answers a row alone"
    ) in out
    code, out, _ = _run(capsys, *argv, "--json")
    assert (code, [p["code"] for p in json.loads(out)["problems"]]) == (1, ["batch_size"])


def test_check_exits_1_on_a_classifier_that_returns_probabilities(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A forward that ends in a softmax: mcdrop softmaxes again, and the check said ok."""
    spec = checkpoint.ModelSpec(
        name="probs", task="classification", input_shape=[3], labels=["a", "b", "c"],
        architecture={"factory": "tests.factories:Outputs", "params": {"ending": "nn.Softmax"}},
    )  # fmt: skip
    checkpoint.save(tmp_path / "probs", spec, factories.Outputs("nn.Softmax"))
    argv = ["check", str(tmp_path / "probs"), "--allowed-factories", "tests.factories"]
    code, out, _ = _run(capsys, *argv)
    assert code == 1
    assert "error (probabilities): the model returns probabilities, not logits" in out
    code, out, _ = _run(capsys, *argv, "--json")
    assert (code, [p["code"] for p in json.loads(out)["problems"]]) == (1, ["probabilities"])


@pytest.mark.parametrize("uncertainty", [False, True])
def test_local_predict_on_ids_the_model_refuses_says_so(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, uncertainty: bool
) -> None:
    """A local model's own forward that raises on the rows given (a token id past its
    vocabulary) is one line naming the exception and what to check, exit 2: no traceback."""
    save_tokens(tmp_path / "tokens")
    argv = ["predict", "tokens", "--model-dir", str(tmp_path), "--inputs", "[[1, 2, 9, 3, 4, 5]]"]
    argv += ["--allowed-factories", "tests.factories", *(["--uncertainty"] if uncertainty else [])]
    code, out, err = _run(capsys, *argv)
    assert (code, out) == (2, "")
    assert err.startswith("mcdrop predict: error: the model raised IndexError on these inputs")
    assert "token ids within its vocabulary" in err
    assert "Traceback" not in err
    argv[5] = "[[1, 2, 5, 3, 4, 5]]"  # ids it takes
    code, out, err = _run(capsys, *argv)
    assert code == 0, err


@pytest.mark.parametrize("uncertainty", [False, True])
def test_local_predict_on_a_model_that_raises_stop_iteration_says_so(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, uncertainty: bool
) -> None:
    """A StopIteration of the model's (which the sampling generator turns into a RuntimeError)
    is named as itself, one line, exit 2."""
    torch.manual_seed(0)
    mcdrop.save(
        factories.Picky(error="stop_iteration"), tmp_path / "stops", task="regression",
        input_shape=[3], labels=["y"], factory="tests.factories:Picky",
        params={"error": "stop_iteration"}, tau=1.0,
    )  # fmt: skip
    argv = ["predict", "stops", "--model-dir", str(tmp_path), "--inputs", "[[1000, 0, 0]]"]
    argv += ["--allowed-factories", "tests.factories", *(["--uncertainty"] if uncertainty else [])]
    code, out, err = _run(capsys, *argv)
    assert (code, out) == (2, "")
    assert err.startswith("mcdrop predict: error: the model raised StopIteration on these inputs")
    assert err.endswith(" (check that the values are within what the model takes)\n")
    assert "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("command", ["predict", "evaluate"])
def test_local_commands_on_a_missing_gpu_exit_2_in_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    monkeypatch.setenv("MCDROP_DEVICE", "cuda")  # the environment, as for mcdrop serve
    argv = {
        "predict": ["predict", "digits", "--model-dir", str(MODELS), "--inputs", "[[0]]"],
        "evaluate": ["evaluate", str(MODELS / "digits"), "--no-plots", "--limit", "5"],
    }[command]
    code, out, err = _run(capsys, *argv)
    assert (code, out) == (2, "")
    assert "device: Value error, device 'cuda' needs a CUDA GPU" in err
    assert err.count("\n") == 1


def test_local_uncertainty_in_bfloat16(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["predict", "diabetes", "--model-dir", str(MODELS), "--inputs", json.dumps([PATIENT])]
    answers = []
    for dtype in ("float32", "bfloat16"):
        code, out, _ = _run(capsys, *argv, "--uncertainty", "--seed", "7", "--dtype", dtype)
        assert code == 0
        answers.append(json.loads(out)["results"][0])
    assert answers[1]["mean"][0] == pytest.approx(answers[0]["mean"][0], rel=0.01)
    assert answers[1]["std"][0] == pytest.approx(answers[0]["std"][0], rel=0.02)


def test_calibrate_writes_the_file_and_prints_three_lines(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    directory = tmp_path / "diabetes"
    shutil.copytree(MODELS / "diabetes", directory)
    (directory / "calibration.json").unlink()
    code, out, err = _run(capsys, "calibrate", str(directory), "--n-samples", "20")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("calibrated diabetes on 66 rows of diabetes validation split")
    assert lines[1].startswith("reject on std (default): 5% above ")
    assert lines[2].startswith("conformal (normalized_residual): coverage 0.9 at q ")
    assert mcdrop.load(directory).calibration is not None
    code, out, _ = _run(capsys, "calibrate", str(directory), "--n-samples", "20", "--json")
    assert json.loads(out)["n_samples"] == 20


def test_local_predict_with_decisions(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["predict", "diabetes", "--model-dir", str(MODELS), "--inputs", json.dumps([PATIENT])]
    code, out, _ = _run(capsys, *argv, "--uncertainty", "--reject-rate", "0.1", "--coverage", "0.9")
    assert code == 0
    body = json.loads(out)
    assert body["reject_score"] == "std"
    row = body["results"][0]
    assert row["conformal_lower"][0] < row["mean"][0] < row["conformal_upper"][0]
    # A decision the model cannot make: the service's 422 decision_unavailable, exit 2.
    code, _, err = _run(capsys, *argv, "--uncertainty", "--coverage", "0.999")
    assert code == 2
    assert "calibration rows" in err


def test_inputs_nested_too_deeply_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    argv = ["diabetes", "--inputs", f"@{tmp_path / 'deep.json'}"]
    for where in (["--model-dir", str(MODELS)], ["--url", "http://127.0.0.1:9"]):
        code, out, err = _run(capsys, "predict", *argv, *where)
        assert (code, out) == (2, "")
        assert err == (
            "mcdrop predict: error: --inputs is not valid JSON: nested too deeply (arrays or "
            "objects inside one another beyond Python's recursion limit); give a list of rows\n"
        )


def test_inputs_are_read_up_to_the_body_limit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A file above the service's max_body_bytes is refused unread; a device or a pipe that
    never ends is read up to it, not until memory runs out."""
    limit = Settings().max_body_bytes
    big = tmp_path / "big.json"
    with big.open("wb") as file:  # sparse: no disk used
        file.truncate(limit + 1)
    code, out, err = _run(
        capsys, "predict", "diabetes", "--model-dir", str(MODELS), "--inputs", f"@{big}"
    )
    assert (code, out) == (2, "")
    assert err == (
        f"mcdrop predict: error: --inputs {big} holds {limit + 1:_} bytes, above the limit of "
        f"{limit:_} bytes (the service's max_body_bytes): send fewer rows at a time\n"
    )
    # A device, and standard input that never ends (remote mode: the rows never reach a server).
    command = [sys.executable, "-m", "service.cli", "predict", "diabetes"]
    command += ["--url", "http://127.0.0.1:9", "--inputs"]
    for inputs, name in (("@/dev/zero", "/dev/zero"), ("-", "standard input")):
        with Path("/dev/zero").open("rb") as zeros:
            done = subprocess.run(
                [*command, inputs], cwd=ROOT, stdin=zeros, capture_output=True, timeout=60
            )
        assert (done.returncode, done.stdout) == (2, b"")
        assert done.stderr.decode() == (
            f"mcdrop predict: error: --inputs {name} holds more than {limit:_} bytes, above the "
            f"limit of {limit:_} bytes (the service's max_body_bytes): send fewer rows at a time\n"
        )


def test_local_predict_names_a_manifest_whose_input_shape_misfits(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The service's warm-up check, before the rows: the manifest is at fault, not the rows."""
    shutil.copytree(MODELS / "diabetes", tmp_path / "diabetes")
    manifest = tmp_path / "diabetes" / "model.json"
    data = json.loads(manifest.read_text())
    data["input_shape"] = [11]
    data.pop("input_normalization", None)
    manifest.write_text(json.dumps(data))
    code, out, err = _run(
        capsys,
        "predict",
        "diabetes",
        "--model-dir",
        str(tmp_path),
        "--inputs",
        json.dumps([[1] * 11]),
    )
    assert (code, out) == (1, "")
    assert err.startswith(
        f"mcdrop: error: {manifest}: the warm-up pass on one row of input_shape [11] failed, so "
        "input_shape (or input_normalization) does not fit the architecture: "
    )
    assert err.count("\n") == 1


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--n-samples", "1000000000"], "n_samples=1000000000 is above the limit of 10000"),
        (["--n-samples", "10001"], "n_samples=10001 is above the limit of 10000"),
        (
            ["--n-samples", "auto", "--max-n-samples", "10001"],
            "max_n_samples=10001 is above the limit of 10000",
        ),
    ],
)
def test_local_uncertainty_is_held_to_the_service_sample_limit(
    capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    """The service's max_n_samples and its message: a local run cannot ask for a billion."""
    argv = ["predict", "diabetes", "--model-dir", str(MODELS), "--inputs", json.dumps([PATIENT])]
    code, out, err = _run(capsys, *argv, "--uncertainty", *flags)
    assert (code, out) == (2, "")
    assert err == f"mcdrop predict: error: {message}\n"


def test_local_sample_limit_is_the_setting(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MCDROP_MAX_N_SAMPLES", "8")
    argv = ["predict", "diabetes", "--model-dir", str(MODELS), "--inputs", json.dumps([PATIENT])]
    code, _, err = _run(capsys, *argv, "--uncertainty", "--n-samples", "9")
    assert (code, err) == (2, "mcdrop predict: error: n_samples=9 is above the limit of 8\n")
    # The model's default (100) is held to it too, as the service does.
    code, out, _ = _run(capsys, *argv, "--uncertainty", "--seed", "0")
    assert (code, json.loads(out)["n_samples"]) == (0, 8)
    code, out, _ = _run(capsys, *argv, "--uncertainty", "--n-samples", "auto", "--seed", "0")
    assert (code, json.loads(out)["max_n_samples"]) == (0, 8)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "diabetes", "--out", "x", "--hidden", "0"], "argument --hidden: expected a "),
        (["train", "diabetes", "--out", "x", "--epochs", "-1"], "argument --epochs"),
        (["train", "diabetes", "--out", "x", "--exclude-classes", "-1"], "argument --exclude"),
        (["evaluate", "m", "--limit", "-5"], "argument --limit: expected a positive integer"),
        (["evaluate", "m", "--ood-classes", "-1"], "argument --ood-classes: expected a class"),
        (["evaluate", "m", "--n-samples", "0"], "argument --n-samples"),
        (["check", "m", "--rows", "0"], "argument --rows"),
        (["predict", "m", "--inputs", "[]", "--n-samples", "0"], "argument --n-samples"),
    ],
)
def test_counts_below_1_are_usage_errors(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    """argparse's exit 2, before any dataset loads or network is built (--hidden 0 was an
    IndexError deep in the masks)."""
    with pytest.raises(SystemExit) as usage:
        main(argv)
    assert usage.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith(f"mcdrop {argv[0]}: error: {message}")
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("flag", "name", "most"),
    [("--rows", "n_rows", MAX_ROWS), ("--n-samples", "n_samples", MAX_SAMPLES)],
    ids=["rows", "n-samples"],
)
def test_check_bounds_its_rows_and_samples(
    capsys: pytest.CaptureFixture[str], flag: str, name: str, most: int
) -> None:
    """The library's bound, in its words, before a row is made (--rows 10**12 made 10**12
    random rows, --n-samples as many samples of each); the help names the same bound."""
    code, out, err = _run(capsys, "check", str(MODELS / "diabetes"), flag, str(10**12))
    assert (code, out) == (2, "")
    assert err == (
        f"mcdrop check: error: {name}={10**12} is above a check's limit of {most:_} (a probe of "
        "the model)\n"
    )
    with pytest.raises(SystemExit):
        main(["check", "--help"])
    assert f"at most {most:_})" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("argv", [["--help"], ["predict", "--help"]])
def test_the_help_says_what_each_exit_status_means(
    capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    with pytest.raises(SystemExit):
        main(argv)
    assert EXIT_STATUS in capsys.readouterr().out


def test_the_help_lists_every_status_a_command_exits_with() -> None:
    # serve's start-up failure (3) and a closed standard output (141) were missing.
    listed = {
        int(line.split()[0]) for line in EXIT_STATUS.splitlines() if line[:5].strip()[:1].isdigit()
    }
    assert listed == {0, 1, 2, 3, 130, 141}


def test_every_option_of_predict_says_what_it_does() -> None:
    # --seed, --level and --return-samples had no help text.
    predict = parser()._subparsers._group_actions[0].choices["predict"]
    silent = [a.option_strings for a in predict._actions if a.option_strings and not a.help]
    assert silent == []


def test_a_reader_that_stops_reading_ends_the_command_quietly(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`mcdrop predict ... | head -1` said "mcdrop: error: [Errno 32] Broken pipe" (exit 1)."""
    read, write = os.pipe()
    os.close(read)  # the reader is gone before a byte is written
    with os.fdopen(write, "w") as closed:
        monkeypatch.setattr(sys, "stdout", closed)
        code = main(["predict", "diabetes", "--model-dir", str(MODELS), "--inputs", f"[{PATIENT}]"])
        assert code == 141
        # the rest goes nowhere: the flush at exit would print "Exception ignored ..."
        print("more")
        closed.flush()
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    ("classes", "message"),
    [
        (["99"], "ood_classes [99] are not classes of this dataset: give indices from 0 to 9"),
        ([str(c) for c in range(10)], "hold out every class: leave at least one in distribution"),
    ],
)
def test_evaluate_names_ood_classes_the_model_lacks(
    capsys: pytest.CaptureFixture[str], classes: list[str], message: str
) -> None:
    argv = ["evaluate", str(MODELS / "digits"), "--no-plots", "--limit", "5", "--ood-classes"]
    code, out, err = _run(capsys, *argv, *classes)
    assert (code, out) == (2, "")  # an argument to fix
    assert err.startswith("mcdrop evaluate: error: ood_classes ")
    assert message in err
    assert err.count("\n") == 1


def test_serve_names_a_model_that_fails_to_load_without_a_traceback(tmp_path: Path) -> None:
    """uvicorn logged the lifespan's traceback before the summary; the summary says it all."""
    shutil.copytree(MODELS / "diabetes", tmp_path / "diabetes")
    manifest = tmp_path / "diabetes" / "model.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "tau": -1}))
    command = [sys.executable, "-m", "service.cli", "serve", "--model-dir", str(tmp_path)]
    command += ["--host", "127.0.0.1", "--port", "0"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout) == (3, "")  # uvicorn's start-up failure
    assert "Traceback" not in done.stderr
    assert "File " not in done.stderr
    assert (
        "uvicorn.error: 1 model(s) failed to load, so the server does not start "
        "(MCDROP_EXIT_ON_ERROR=false or --no-exit-on-error serves the others):\n"
        "  model 'diabetes': diabetes/model.json: 'tau' must be a positive number, got -1\n"
    ) in done.stderr


def _save_picky(folder: Path, error: str) -> Path:
    """A :class:`factories.Picky` model that fails as ``error`` says on a value above 100."""
    torch.manual_seed(0)
    mcdrop.save(
        factories.Picky(error=error), folder, task="regression", input_shape=[3], labels=["y"],
        factory="tests.factories:Picky", params={"error": error}, tau=1.0,
    )  # fmt: skip
    return folder


@pytest.mark.parametrize("uncertainty", [False, True])
@pytest.mark.parametrize("error", ["memory", "memory_error"])
def test_local_predict_out_of_memory_in_the_forward_is_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, error: str, uncertainty: bool
) -> None:
    """The machine's failure, not the inputs' (the service's 500): exit 1, one line naming it,
    no traceback (it was one)."""
    _save_picky(tmp_path / "hungry", error)
    argv = ["predict", "hungry", "--model-dir", str(tmp_path), "--inputs", "[[1000, 0, 0]]"]
    argv += ["--allowed-factories", "tests.factories", *(["--uncertainty"] if uncertainty else [])]
    code, out, err = _run(capsys, *argv)
    assert (code, out) == (1, "")
    name = "RuntimeError: [enforce fail" if error == "memory" else "MemoryError"
    assert err.startswith(f"mcdrop: error: the machine failed running the model ({name}")
    assert err.endswith(
        "out of memory or a device error, not the inputs' values; fewer rows or samples at a "
        "time need less memory\n"
    )
    assert err.count("\n") == 1


def test_local_predict_says_what_the_service_says_of_the_models_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """The service's message, its function's (first line only, cut, paths shortened), with no
    token-id hint for a ValueError."""
    folder = _save_picky(tmp_path / "verbose", "verbose")
    argv = ["predict", "verbose", "--model-dir", str(tmp_path), "--inputs", "[[1000, 0, 0]]"]
    code, out, err = _run(capsys, *argv, "--allowed-factories", "tests.factories")
    assert (code, out) == (2, "")
    loaded = mcdrop.load(folder, allowed_factories=["tests.factories"])
    with pytest.raises(ValueError) as raised:
        mcdrop.predict(loaded.module, torch.tensor([[1000.0, 0, 0]]))
    said = rejected_message(raised.value, "these inputs")
    assert err == f"mcdrop predict: error: {said}\n"
    assert said == (
        "the model raised ValueError on these inputs: an input above 100.0, see limits.txt: "
        + "x" * 62
        + "... (338 characters) (check that the values are within what the model takes)"
    )


#: Messages a service may send that no line of a terminal should show as sent: its own line
#: breaks, an escape sequence (red text), a carriage return that hides what came before, a bell;
#: and 100,000 characters.
SAID = {"control": "one\ntwo \x1b[31mred\x1b[0m\r\x07three", "long": "A" * 100_000}


def _answer(handler: BaseHTTPRequestHandler, status: int, payload: object) -> None:
    """Send ``payload`` as a JSON response of ``status``."""
    body = json.dumps(payload).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


class _Refuses(BaseHTTPRequestHandler):
    """Answers every request with the service's JSON error that the model's name gives:
    ``/models/422-model_rejected_input/predict`` is a 422 of that code, with the message "as
    refused" (or ``SAID[x]`` for ``422-model_rejected_input-x``)."""

    def do_POST(self) -> None:
        status, code, *said = self.path.split("/")[2].split("-", 2)
        message = SAID[said[0]] if said else "as refused"
        error = {"code": code, "message": message, "details": [], "request_id": "r"}
        _answer(self, int(status), {"error": error})

    def log_message(self, *_: object) -> None:  # the test reads stderr
        pass


@pytest.fixture(scope="module")
def refusing_server() -> Iterator[str]:
    with _serving(_Refuses) as url:
        yield url


@pytest.mark.parametrize(
    ("status", "code", "exit_status"),
    [
        (422, "model_rejected_input", 2),
        (422, "invalid_input", 2),
        (422, "limit_exceeded", 2),
        (404, "model_not_found", 2),
        (500, "internal_error", 1),
        (503, "model_not_ready", 1),
        (503, "overloaded", 1),
        (504, "deadline_exceeded", 1),
        # Transient: the same request may pass later (it exited 2, "yours to fix").
        (408, "request_timeout", 1),
        (429, "too_many_requests", 1),
    ],
)
def test_a_services_answer_exits_as_the_same_failure_of_a_local_model(
    refusing_server: str,
    capsys: pytest.CaptureFixture[str],
    status: int,
    code: str,
    exit_status: int,
) -> None:
    """A 4xx, the request refused as the caller's to fix, exits 2, as a local model's refusal
    of the same inputs does; a 5xx exits 1 (a 422 model_rejected_input exited 1, its local twin
    2), and so do 408 and 429, which refuse the moment, not the request."""
    model = f"{status}-{code}"
    argv = ["predict", model, "--url", refusing_server, "--inputs", "[[0]]"]
    got, out, err = _run(capsys, *argv)
    assert (got, out) == (exit_status, "")
    prefix = "mcdrop predict: error:" if exit_status == 2 else "mcdrop: error:"
    assert err == f"{prefix} {status} {code}: as refused\n"


@pytest.mark.parametrize(
    ("key", "hint"),
    [
        (None, "set MCDROP_API_KEY to the service's key: mcdrop sends it"),
        ("wrong", "MCDROP_API_KEY holds the key mcdrop sent"),
    ],
)
def test_a_401_says_how_mcdrop_sends_a_key(
    refusing_server: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    key: str | None,
    hint: str,
) -> None:
    # The service's message ("send the header 'Authorization: Bearer <key>'") said nothing of
    # how the command sends one.
    if key is None:
        monkeypatch.delenv("MCDROP_API_KEY", raising=False)
    else:
        monkeypatch.setenv("MCDROP_API_KEY", key)
    argv = ["predict", "401-unauthorized", "--url", refusing_server, "--inputs", "[[0]]"]
    got, out, err = _run(capsys, *argv)
    assert (got, out) == (2, "")
    assert err == f"mcdrop predict: error: 401 unauthorized: as refused; {hint}\n"


@pytest.mark.parametrize(("status", "exit_status"), [(422, 2), (500, 1)])
def test_a_services_message_is_one_line_as_a_terminal_shows_it(
    refusing_server: str, capsys: pytest.CaptureFixture[str], status: int, exit_status: int
) -> None:
    """A service's message is its own: its control characters are written escaped (they broke
    the one line, and a terminal ran its escape sequences), and a long one is cut."""
    argv = ["predict", f"{status}-invalid_input-control", "--url", refusing_server]
    got, _, err = _run(capsys, *argv, "--inputs", "[[0]]")
    assert got == exit_status
    assert err.endswith(f"{status} invalid_input: one\\ntwo \\x1b[31mred\\x1b[0m\\r\\x07three\n")
    argv = ["predict", f"{status}-invalid_input-long", "--url", refusing_server]
    got, _, err = _run(capsys, *argv, "--inputs", "[[0]]")
    assert got == exit_status
    assert err.count("\n") == 1
    assert len(err) < 3000
    assert err.endswith(" characters)\n")


class _Lists(BaseHTTPRequestHandler):
    """Answers GET /models with one model whose name and description are ``SAID["control"]``
    and ``SAID["long"]``: a hostile service's."""

    def do_GET(self) -> None:
        info = {
            "name": "evil\x1b]0;owned\x07", "version": "1", "task": "regression",
            "description": SAID["control"] + SAID["long"], "input_shape": [1], "labels": ["y"],
            "likelihood": "homoscedastic", "tau": 1.0, "dropout": 0.1, "default_n_samples": 8,
            "max_n_samples": 8, "max_request_rows": 8, "metrics": {},
        }  # fmt: skip
        _answer(self, 200, {"models": [info]})

    def log_message(self, *_: object) -> None:  # the test reads stderr
        pass


def test_models_prints_a_services_words_as_a_terminal_shows_them(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Names and descriptions are the service's: their control characters are written escaped
    (they went to the terminal as sent: a title change, red text, new lines), one line each."""
    with _serving(_Lists) as url:
        code, out, err = _run(capsys, "models", "--url", url)
    assert (code, err) == (0, "")
    assert out.count("\n") == 1
    assert out.startswith(
        "evil\\x1b]0;owned\\x07 regression      input [1]  "
        "one\\ntwo \\x1b[31mred\\x1b[0m\\r\\x07threeAAA"
    )
    assert out.endswith(" characters)\n")
    assert len(out) < 3000
    assert all(c.isprintable() for c in out.rstrip("\n"))


@pytest.fixture
def silent_service() -> Iterator[str]:
    """The URL of a service that takes connections and never answers."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"


@pytest.mark.parametrize(
    "argv", [["models"], ["predict", "digits", "--inputs", "[[0]]"]], ids=["models", "predict"]
)
def test_timeout_bounds_a_request_to_a_service(
    silent_service: str, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    """A silent service kept the command waiting the client's default, 75 s: --timeout bounds
    it, exit 1 (a failure that is not the request's), saying after how long."""
    start = time.monotonic()
    code, out, err = _run(capsys, *argv, "--url", silent_service, "--timeout", "0.3")
    assert time.monotonic() - start < 0.3 + 2.0  # slack for a loaded machine
    assert (code, out) == (1, "")
    assert err.startswith("mcdrop: error: connected, but no answer to ")
    assert f"{silent_service}/" in err
    assert "within 0.3 s" in err


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "-inf", "1e10", "x", ""])
@pytest.mark.parametrize("command", ["models", "predict"])
def test_timeouts_out_of_range_are_usage_errors(
    capsys: pytest.CaptureFixture[str], command: str, value: str
) -> None:
    """As the client refuses them: positive, finite, at most a year (past it the sockets'
    clock overflows); argparse's exit 2, before any request."""
    argv = [command, *(["m", "--inputs", "[]"] if command == "predict" else [])]
    with pytest.raises(SystemExit) as usage:
        main([*argv, "--url", "http://127.0.0.1:9", f"--timeout={value}"])
    assert usage.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (
        f"mcdrop {command}: error: argument --timeout: expected seconds, a number > 0 and at "
        f"most 31536000 (a year), got {value!r}"
    )


def test_timeout_is_for_a_service_not_a_local_model(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["predict", "diabetes", "--model-dir", str(MODELS), "--inputs", json.dumps([PATIENT])]
    code, out, err = _run(capsys, *argv, "--timeout", "5")
    assert (code, out) == (2, "")
    assert err == (
        "mcdrop predict: error: --timeout bounds a request to a service (--url), not --model-dir\n"
    )


@pytest.mark.parametrize("command", ["models", "predict"])
def test_the_timeout_help_gives_the_clients_numbers(
    capsys: pytest.CaptureFixture[str], command: str
) -> None:
    from mcdrop_client.client import DEFAULT_TIMEOUT, MAX_TIMEOUT

    with pytest.raises(SystemExit):
        main([command, "--help"])
    said = " ".join(capsys.readouterr().out.split())
    assert f"(default: {DEFAULT_TIMEOUT:g}, longer than the service's own " in said
    assert (
        f"{Settings().request_timeout_s:g} s deadline; at most {MAX_TIMEOUT:.0f}, a year)" in said
    )
    given = ["m", "--inputs", "[]"] if command == "predict" else []
    assert parser().parse_args([command, *given, "--timeout", "2.5"]).timeout == 2.5
