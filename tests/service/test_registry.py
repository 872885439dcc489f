"""Loading the model folder: what code a model may run, what happens when one fails, and what
the responses say about it (never the server's absolute paths)."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from fastapi.testclient import TestClient

import mcdrop
from mcdrop import checkpoint
from mcdrop.checkpoint import ModelSpec
from mcdrop.nets import MLP
from mcdrop.predictor import Predictor
from service.app import StartupError, create_app
from service.config import Settings
from service.registry import warm_up
from tests.conftest import MODELS, TOKEN_ROWS, save_tokens
from tests.factories import BatchOf, Centred, MaxBatch, Outputs, Returns, build, unit_rows

PATIENT = [59, 2, 32.1, 101, 157, 93.2, 38, 4, 4.8598, 87]


def _custom(root: Path, name: str = "custom", factory: Callable[..., Any] = build) -> Path:
    """``root/<name>``: a regressor built by ``tests.factories:<factory>``, 3 features."""
    spec = ModelSpec(
        name=name,
        task="regression",
        input_shape=[3],
        labels=["y"],
        architecture={"factory": f"tests.factories:{factory.__name__}", "params": {"width": 4}},
        tau=1.0,
    )
    torch.manual_seed(0)
    return checkpoint.save(root / name, spec, factory(width=4))


def _settled(client: TestClient, timeout: float = 60.0) -> dict[str, Any]:
    """``/ready`` once no model is loading any more (status code and body)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = client.get("/ready")
        if response.json()["status"] != "loading":
            return {"code": response.status_code, **response.json()}
        time.sleep(0.05)
    raise AssertionError(f"still loading: {client.get('/ready').json()}")


@contextmanager
def _serving_own(folder: Path) -> Iterator[tuple[TestClient, dict[str, str]]]:
    """An app serving ``folder``'s models (factories of tests.factories), what did not load
    reported, not raised; with each model's readiness once none is loading."""
    settings = Settings(model_dir=folder, allowed_factories="tests.factories", exit_on_error=False)
    with TestClient(create_app(settings)) as client:
        yield client, _settled(client)["models"]


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """diabetes (built-in) and custom (a factory) side by side."""
    root = tmp_path / "models"
    shutil.copytree(MODELS / "diabetes", root / "diabetes")
    _custom(root)
    return root


@pytest.fixture
def serve(folder: Path) -> Iterator[Callable[..., TestClient]]:
    """``serve(**settings)``: the app over ``folder``, entered; closed after the test."""
    clients: list[TestClient] = []

    def start(**settings: Any) -> TestClient:
        client = TestClient(create_app(Settings(model_dir=folder, **settings))).__enter__()
        clients.append(client)
        return client

    yield start
    for client in clients:
        client.__exit__(None, None, None)


def test_untrusted_factory_is_refused_with_how_to_opt_in(serve) -> None:
    client = serve(exit_on_error=False)
    ready = _settled(client)
    assert (ready["code"], ready["status"]) == (200, "degraded")
    assert ready["models"]["diabetes"] == "ready"
    reason = ready["models"]["custom"]
    assert reason.startswith("custom/model.json: factory 'tests.factories:build'")
    for how in ("MCDROP_ALLOWED_FACTORIES=tests.factories", "MCDROP_TRUST_MODEL_CODE=1"):
        assert how in reason
    one = client.get("/models/custom/ready")
    assert one.status_code == 503
    assert one.json() == {"name": "custom", "status": "failed", "reason": reason}
    predict = client.post("/models/custom/predict", json={"inputs": [[1.0, 2.0, 3.0]]})
    assert predict.status_code == 503
    assert reason in predict.json()["error"]["message"]
    assert client.post("/models/diabetes/predict", json={"inputs": [PATIENT]}).status_code == 200


@pytest.mark.parametrize(
    "opt_in",
    [
        {"trust_model_code": True},
        {"allowed_factories": ("tests.factories",)},
        {"allowed_factories": "tests."},  # as MCDROP_ALLOWED_FACTORIES gives it
    ],
)
def test_opted_in_factory_loads(serve, opt_in: dict[str, Any]) -> None:
    client = serve(**opt_in)  # exit_on_error: start-up would fail if it did not load
    assert client.get("/ready").json()["status"] == "ready"
    assert client.get("/models/custom/ready").json() == {"name": "custom", "status": "ready"}
    response = client.post("/models/custom/predict", json={"inputs": [[1.0, 2.0, 3.0]]})
    assert response.status_code == 200


def test_exit_on_error_refuses_to_start(serve) -> None:
    with pytest.raises(StartupError, match=r"model 'custom': custom/model\.json: factory"):
        serve()


def test_model_ready_of_an_unknown_model_is_404(serve) -> None:
    response = serve(allowed_factories="tests").get("/models/nope/ready")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"


BREAKAGES: dict[str, Callable[[Path], None]] = {
    "not valid JSON": lambda p: (p / checkpoint.MANIFEST).write_text("{nope"),
    "weights file is missing": lambda p: (p / checkpoint.WEIGHTS).unlink(),
    "not a readable safetensors file": lambda p: (p / checkpoint.WEIGHTS).write_bytes(b"\0" * 9),
    "does not match its directory": lambda p: (p / checkpoint.MANIFEST).write_text(
        json.dumps({**json.loads((p / checkpoint.MANIFEST).read_text()), "name": "other"})
    ),
}


@pytest.mark.parametrize("problem", sorted(BREAKAGES))
@pytest.mark.parametrize("absolute", [True, False])
def test_errors_name_files_relative_to_the_model_dir(
    folder: Path, monkeypatch: pytest.MonkeyPatch, problem: str, absolute: bool
) -> None:
    BREAKAGES[problem](folder / "diabetes")
    if not absolute:
        monkeypatch.chdir(folder.parent)
    model_dir = folder if absolute else Path(folder.name)
    settings = Settings(model_dir=model_dir, exit_on_error=False, allowed_factories=("tests",))
    with TestClient(create_app(settings)) as client:
        ready = _settled(client)
        texts = [
            json.dumps(ready),
            client.get("/models/diabetes/ready").text,
            client.post("/models/diabetes/predict", json={"inputs": [PATIENT]}).text,
        ]
    reason = ready["models"]["diabetes"]
    assert problem in reason
    assert reason.startswith("diabetes/")
    for text in texts:
        assert reason.replace('"', '\\"') in text
        assert str(folder) not in text
        assert str(folder.parent) not in text


def test_ready_when_every_model_failed(tmp_path: Path) -> None:
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / checkpoint.MANIFEST).write_text("[]")
    with TestClient(create_app(Settings(model_dir=tmp_path, exit_on_error=False))) as client:
        ready = _settled(client)
    assert (ready["code"], ready["status"]) == (503, "failed")
    assert ready["models"] == {"broken": "broken/model.json: the manifest must be a JSON object"}


def test_a_reduced_precision_service_answers_close_to_float32(serve) -> None:
    """``MCDROP_DTYPE=bfloat16``: the same masks, the statistics float32, the answer close."""
    body = {"inputs": [PATIENT], "n_samples": 200, "seed": 7}
    full = serve(allowed_factories="tests").post("/models/diabetes/uncertainty", json=body)
    half = serve(allowed_factories="tests", dtype="bfloat16")
    assert half.get("/ready").json()["status"] == "ready"
    reduced = half.post("/models/diabetes/uncertainty", json=body)
    assert (full.status_code, reduced.status_code) == (200, 200)
    a, b = full.json()["results"][0], reduced.json()["results"][0]
    for field in ("mean", "std", "lower", "upper"):
        assert b[field][0] == pytest.approx(a[field][0], rel=0.01), field


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_a_missing_gpu_stops_the_service_before_any_model_loads(folder: Path) -> None:
    with pytest.raises(ValueError, match="device 'cuda' needs a CUDA GPU"):
        Settings(model_dir=folder, device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_a_cuda_service_answers_as_the_cpu_one(serve) -> None:
    body = {"inputs": [PATIENT, [v * 1.1 for v in PATIENT]], "n_samples": 300, "seed": 7}
    cpu = serve(allowed_factories="tests").post("/models/diabetes/uncertainty", json=body)
    gpu = serve(allowed_factories="tests", device="cuda")
    assert gpu.get("/ready").json()["status"] == "ready"
    answer = gpu.post("/models/diabetes/uncertainty", json=body)
    assert (cpu.status_code, answer.status_code) == (200, 200)
    for a, b in zip(cpu.json()["results"], answer.json()["results"], strict=True):
        for field in ("mean", "std", "lower", "upper"):
            assert b[field][0] == pytest.approx(a[field][0], rel=1e-3), field
    digits = gpu.post("/models/custom/predict", json={"inputs": [[1.0, 2.0, 3.0]]})
    assert digits.status_code == 200


# A folder with nothing to serve: a wrong path must not pass for a ready server.


def _no_models(tmp_path: Path, kind: str) -> Path:
    """A model_dir that gives no model: missing, a file, or an empty folder."""
    path = tmp_path / kind
    if kind == "file":
        path.write_text("not a folder")
    elif kind == "empty":
        path.mkdir()
    return path


NO_MODELS = {
    "missing": "does not exist",
    "file": "is not a directory",
    "empty": "holds no model directories (*/model.json)",
}


@pytest.mark.parametrize("kind", sorted(NO_MODELS))
def test_exit_on_error_refuses_a_model_dir_without_models(tmp_path: Path, kind: str) -> None:
    model_dir = _no_models(tmp_path, kind)
    with pytest.raises(StartupError) as info:
        TestClient(create_app(Settings(model_dir=model_dir))).__enter__()
    message = str(info.value)
    assert message.startswith(f"model_dir {str(model_dir)!r} {NO_MODELS[kind]}")
    assert "so the server does not start" in message
    assert "\n" not in message  # one line


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any folder")
def test_exit_on_error_refuses_an_unreadable_model_dir(folder: Path) -> None:
    folder.chmod(0)
    try:
        with pytest.raises(StartupError, match="cannot be read: Permission denied"):
            TestClient(create_app(Settings(model_dir=folder))).__enter__()
    finally:
        folder.chmod(0o755)


@pytest.mark.parametrize("kind", sorted(NO_MODELS))
def test_without_models_the_server_is_not_ready(tmp_path: Path, kind: str) -> None:
    """README: 503 ``failed`` when no model loaded, none found included (was 200 ``ready``)."""
    settings = Settings(model_dir=_no_models(tmp_path, kind), exit_on_error=False)
    with TestClient(create_app(settings)) as client:
        ready = _settled(client)
        v2 = client.get("/v2/health/ready")
    assert ready == {"code": 503, "status": "failed", "models": {}}
    assert (v2.status_code, v2.json()) == (503, {"ready": False})


def _variant(root: Path, name: str, **changes: Any) -> Path:
    """``root/name``: the bundled diabetes model under another name, its manifest changed
    (a None value removes the field)."""
    target = root / name
    shutil.copytree(MODELS / "diabetes", target)
    manifest = target / checkpoint.MANIFEST
    data = {**json.loads(manifest.read_text()), "name": name}
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    manifest.write_text(json.dumps(data))
    return target


WRONG_TYPES: dict[str, tuple[dict[str, Any], str]] = {
    "description": ({"description": 5}, "'description' must be a string, got 5"),
    "version": ({"version": 1}, "'version' must be a non-empty string"),
    "dropout": ({"dropout": "x"}, "'dropout' must be a number in [0, 1) or null, got 'x'"),
    "metrics": ({"metrics": {"rmse": "high"}}, "'metrics.rmse' must be a finite number"),
    "metrics NaN": ({"metrics": {"rmse": float("nan")}}, "'metrics.rmse' must be a finite"),
}


@pytest.mark.parametrize("case", sorted(WRONG_TYPES))
def test_a_manifest_field_of_the_wrong_type_fails_that_model_only(
    tmp_path: Path, case: str
) -> None:
    """It used to load as ready, then every GET /models answered 500."""
    changes, problem = WRONG_TYPES[case]
    shutil.copytree(MODELS / "diabetes", tmp_path / "diabetes")
    _variant(tmp_path, "bad", **changes)
    with TestClient(create_app(Settings(model_dir=tmp_path, exit_on_error=False))) as client:
        ready = _settled(client)
        assert (ready["code"], ready["status"]) == (200, "degraded")
        assert ready["models"]["bad"].startswith(f"bad/model.json: {problem}")
        listed = client.get("/models")
        assert listed.status_code == 200
        assert [m["name"] for m in listed.json()["models"]] == ["diabetes"]
        for path in ("/models/bad", "/v2/models/bad", "/v2/models/bad/versions/1/ready"):
            answer = client.get(path)
            assert answer.status_code == 503, path
            assert problem in answer.text, path
        assert client.get("/models/diabetes").status_code == 200
        assert client.get("/v2/models/diabetes").status_code == 200


WARM_UP_FAILURES: dict[str, tuple[Callable[[Path], Path], str]] = {
    # The net takes 10 features; the manifest promises rows of 11 (no normalisation to catch it).
    "input_shape": (
        lambda root: _variant(root, "bad", input_shape=[11], input_normalization=None),
        "bad/model.json: the warm-up pass on one row of input_shape [11] failed, so input_shape "
        "(or input_normalization) does not fit the architecture: ",
    ),
    # Weights that overflow float32 on the training mean itself: the model's fault, not a
    # request's ("send values on the scale of its training data" blamed the inputs).
    "non-finite": (
        lambda root: _scaled_weights(_variant(root, "bad"), 1e20),
        "bad/model.json: the warm-up rows (input_normalization's mean, then a row of varied "
        "values) give outputs that are not finite (NaN or beyond float32): check "
        "target_normalization and the weights",
    ),
}


def _scaled_weights(model: Path, factor: float) -> Path:
    weights = model / checkpoint.WEIGHTS
    state = safetensors.torch.load_file(weights)
    safetensors.torch.save_file({k: v * factor for k, v in state.items()}, weights)
    (model / "calibration.json").unlink()  # of the old weights
    return model


@pytest.mark.parametrize("case", sorted(WARM_UP_FAILURES))
def test_a_failed_warm_up_names_the_manifest(tmp_path: Path, case: str) -> None:
    make, reason = WARM_UP_FAILURES[case]
    make(tmp_path)
    with pytest.raises(StartupError) as info:
        TestClient(create_app(Settings(model_dir=tmp_path))).__enter__()
    assert f"model 'bad': {reason}" in str(info.value)
    assert "send values on the scale" not in str(info.value)


def test_a_model_that_gives_nan_on_zeros_warms_up_on_varied_values(tmp_path: Path) -> None:
    """The warm-up row of a model without input_normalization is zeros; a model may take it for
    padding and give NaN. It is not broken: it loads, and serves rows it takes."""
    _custom(tmp_path, "unit", unit_rows)
    settings = Settings(model_dir=tmp_path, allowed_factories="tests.factories")
    with TestClient(create_app(settings)) as client:
        assert client.get("/ready").json()["models"] == {"unit": "ready"}
        answer = client.post("/models/unit/uncertainty", json={"inputs": [[1, 2, 3]], "seed": 1})
        assert answer.status_code == 200, answer.text
        zeros = client.post("/models/unit/uncertainty", json={"inputs": [[0, 0, 0]]})
        # The request's row, not the model, is at fault there.
        assert (zeros.status_code, zeros.json()["error"]["code"]) == (422, "non_finite_output")


def test_a_model_whose_rows_mix_with_their_batch_fails_to_load(tmp_path: Path) -> None:
    """A row's output that depends on the rows beside it (the batch's mean subtracted) would
    depend on the requests merged with it, and its samples on each other: the model fails its
    warm-up, saying so, rather than serving answers that change with the traffic."""
    _custom(tmp_path, "centred", Centred)
    _custom(tmp_path, "custom")
    with _serving_own(tmp_path) as (_, ready):
        assert ready["custom"] == "ready"
        assert ready["centred"].startswith(
            "centred/model.json: the warm-up rows give other outputs together than one at a "
            "time (by up to "
        )
        assert "mcdrop check" in ready["centred"]


def test_a_model_with_dropout_at_rate_1_fails_to_load_in_the_words_of_mcdrop_check(
    tmp_path: Path,
) -> None:
    """Dropout at rate 1 drops all of its input in every sample: the samples do not depend on
    the input along that path (here: all equal), while a prediction keeps it. It was served,
    silently; now the warm-up refuses it, saying what mcdrop check and mcdrop.save say."""
    params = {"in_features": 3, "hidden": [4], "out_features": 1, "dropout": 1.0}
    spec = ModelSpec(
        name="certain", task="regression", input_shape=[3], labels=["y"],
        architecture={"name": "mlp", "params": params}, tau=1.0,
    )  # fmt: skip
    torch.manual_seed(0)
    checkpoint.save(tmp_path / "certain", spec, MLP(**params))  # (mcdrop.save refuses it)
    _custom(tmp_path, "custom")
    report = mcdrop.check(checkpoint.load(tmp_path / "certain"), timed=False)
    assert [p.code for p in report.problems] == ["rate_one", "no_variance"]
    with _serving_own(tmp_path) as (_, ready):
        assert ready["custom"] == "ready"
        assert ready["certain"] == f"certain/model.json: {report.problems[0].message}"
        assert ready["certain"].startswith(
            "certain/model.json: dropout at rate 1 (call 1. dropout (B, 4), declared by "
            "layers.2 (Dropout, p=1)): every sample drops all of that call's input"
        )


def _classifier(root: Path, name: str, ending: str) -> Path:
    """``root/<name>``: an :class:`~tests.factories.Outputs` classifier ending in ``ending``,
    written as it is (``checkpoint.save``: mcdrop.save refuses probabilities)."""
    spec = ModelSpec(
        name=name, task="classification", input_shape=[3], labels=["a", "b", "c"],
        architecture={"factory": "tests.factories:Outputs", "params": {"ending": ending}},
    )  # fmt: skip
    torch.manual_seed(0)
    return checkpoint.save(root / name, spec, Outputs(ending))


def test_a_classifier_that_returns_probabilities_fails_to_load_in_the_words_of_mcdrop_check(
    tmp_path: Path,
) -> None:
    """A forward that ends in a softmax was served, and every answer softmaxed again (squashed
    toward uniform, its uncertainty wrong), silently; now the warm-up refuses it, saying what
    mcdrop check and mcdrop.save say. Log-probabilities are logits, and serve."""
    _classifier(tmp_path, "probs", "nn.Softmax")
    _classifier(tmp_path, "logs", "log_softmax")
    report = mcdrop.check(
        checkpoint.load(tmp_path / "probs", allowed_factories=["tests.factories"]), timed=False
    )
    assert [p.code for p in report.problems] == ["probabilities"]
    with _serving_own(tmp_path) as (_, ready):
        assert ready["logs"] == "ready"
        assert ready["probs"] == f"probs/model.json: {report.problems[0].message}"
        assert ready["probs"].startswith(
            "probs/model.json: the model returns probabilities, not logits"
        )


BATCHES: dict[str, tuple[Callable[[], Any], dict[str, Any], Any, str]] = {
    # Takes its warm-up row alone and the warm-up's first passes, fails on its timings' 32 rows.
    "up to 8": (
        lambda: MaxBatch(most=8),
        {"factory": "tests.factories:MaxBatch", "params": {"most": 8}},
        None,
        "the warm-up pass on zeros failed: the model takes a row alone but fails on a batch of "
        "32 rows (ValueError: at most 8 rows a batch, got 32)",
    ),
    # Takes its timings' 32 rows, fails on their 16 samples (mcdrop check says so too).
    "up to 64": (
        lambda: MaxBatch(most=64),
        {"factory": "tests.factories:MaxBatch", "params": {"most": 64}},
        None,
        "the warm-up pass on zeros failed: the model takes a row alone but fails on a batch of "
        "512 rows (ValueError: at most 64 rows a batch, got 512)",
    ),
    # Takes its four example rows together, not its warm-up row alone.
    "4 only": (
        lambda: BatchOf((4,)),
        {"factory": "tests.factories:BatchOf", "params": {"sizes": [4]}},
        torch.randn(4, 3, generator=torch.Generator().manual_seed(0)),
        "the warm-up pass on its example rows failed: the model takes a batch of 4 rows but "
        "fails on a row alone (ValueError: a batch of [4] rows only, got 1)",
    ),
}


@pytest.mark.parametrize("case", sorted(BATCHES))
def test_a_model_that_fails_on_a_batch_size_fails_to_load_saying_so(
    tmp_path: Path, case: str
) -> None:
    """A forward written for some batch sizes (checkpoint.save runs nothing; mcdrop.save
    refuses it): the warm-up names the batch size it fails on, where it said 'a model that
    takes other values ... needs rows of its own', which blamed the row's values."""
    make, architecture, examples, reason = BATCHES[case]
    spec = ModelSpec(
        name="sized", task="regression", input_shape=[3], labels=["y"],
        architecture=architecture, tau=1.0,
    )  # fmt: skip
    torch.manual_seed(0)
    checkpoint.save(tmp_path / "sized", spec, make(), example_inputs=examples)
    settings = Settings(model_dir=tmp_path, allowed_factories="tests.factories")
    with pytest.raises(StartupError) as info:
        TestClient(create_app(settings)).__enter__()
    message = str(info.value)
    assert f"model 'sized': sized/model.json: {reason}: a server answers a row alone" in message
    assert "so the model must take batches of any size" in message
    assert "needs rows of its own" not in message
    assert "input_shape" not in message


RETURNS = {
    "tuple": "tuple",
    "dict": "dict",
    "flat": "(1,)",
    "wide": "(1, 2)",
    "3d": "(1, 1, 1)",
}


@pytest.mark.parametrize("kind", sorted(RETURNS))
def test_a_model_whose_outputs_do_not_fit_its_manifest_fails_to_load(
    tmp_path: Path, kind: str
) -> None:
    """A folder written with checkpoint.save (which runs nothing) of a model whose outputs are
    not the manifest's (N, K): the warm-up says so, naming what it returns. Before, (N,) outputs
    loaded and every request was a 500, (N, K + 1) and (N, K, 1) failed their warm-up timings
    blaming the warm-up row ('cannot reshape array ...'), and mcdrop predict --model-dir
    ended in a traceback."""
    spec = ModelSpec(
        name="odd",
        task="regression",
        input_shape=[3],
        labels=["y"],
        architecture={"factory": "tests.factories:Returns", "params": {"kind": kind}},
        tau=1.0,
    )
    torch.manual_seed(0)
    checkpoint.save(tmp_path / "odd", spec, Returns(kind))
    _custom(tmp_path, "custom")
    with _serving_own(tmp_path) as (client, ready):
        assert ready["custom"] == "ready"
        assert ready["odd"] == (
            f"odd/model.json: the model returns {RETURNS[kind]} for 1 row, but its manifest "
            "(regression, 1 label, homoscedastic) says (1, 1): fix the manifest's labels (or "
            "task, likelihood), or make the model return one row of outputs per input row"
        )
        answer = client.post("/models/odd/predict", json={"inputs": [[1, 2, 3]]})
        assert (answer.status_code, answer.json()["error"]["code"]) == (503, "model_not_ready")


def test_a_model_is_warmed_up_on_its_own_example_rows(tmp_path: Path) -> None:
    """Token ids from 1: the warm-up's row of zeros (and its random one) are no inputs of it, so
    without rows of its own it fails to load; with them it warms up on the first and serves."""
    save_tokens(tmp_path / "bare", example_inputs=None)
    save_tokens(tmp_path / "tokens")
    with _serving_own(tmp_path) as (client, ready):
        assert ready["tokens"] == "ready"
        assert ready["bare"] == (
            "bare/model.json: the warm-up pass on zeros failed (IndexError: index out of range "
            "in self); a model that takes other values (token ids, counts, pixels in [0, 255]) "
            "needs rows of its own: save it with mcdrop.save(..., example_inputs=rows)"
        )
        ids = [[1, 2, 3, 4, 5, 5], [3, 3, 3, 1, 1, 1]]
        answer = client.post("/models/tokens/uncertainty", json={"inputs": ids, "seed": 1})
        assert answer.status_code == 200, answer.text
        assert len(answer.json()["results"]) == 2
    loaded = checkpoint.load(tmp_path / "tokens", allowed_factories=["tests.factories"])
    x = warm_up(Predictor(loaded), tmp_path / "tokens" / checkpoint.MANIFEST)
    assert torch.equal(x, TOKEN_ROWS[:1])
