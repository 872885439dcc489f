"""Decisions over the wire: reject flags and conformal output from `mcdrop serve` (uvicorn), on
the native API (raw HTTP and the typed client) and the Open Inference Protocol, with the
errors a client can meet."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import numpy as np
import pytest
from sklearn.datasets import load_digits
from tritonclient.http import InferResult

import mcdrop
from mcdrop import calibration as cal
from service.client import BadRequestError, Client
from tests.conftest import MODELS
from tests.e2e.server import serve

pytestmark = pytest.mark.slow

DIGITS = load_digits().data[:6].tolist()
PATIENTS = [
    [59, 2, 32.1, 101, 157, 93.2, 38, 4, 4.8598, 87],
    [48, 1, 21.6, 87, 183, 103.2, 70, 3, 3.8918, 69],
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """digits and diabetes (calibrated), and ``plain``: digits without a calibration."""
    root = tmp_path_factory.mktemp("models")
    for name in ("digits", "diabetes"):
        shutil.copytree(MODELS / name, root / name)
    plain = Path(shutil.copytree(MODELS / "digits", root / "plain"))
    (plain / cal.CALIBRATION).unlink()
    manifest = json.loads((plain / "model.json").read_text())
    (plain / "model.json").write_text(json.dumps({**manifest, "name": "plain"}))
    return root


@pytest.fixture(scope="module")
def url(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with serve(tmp_path_factory.mktemp("serve"), model_dir=model_dir) as server:
        yield server.url


@pytest.fixture
def http(url: str) -> Iterator[httpx2.Client]:
    with httpx2.Client(base_url=url, timeout=60) as client:
        yield client


def _uncertainty(http: httpx2.Client, name: str, **body: Any) -> httpx2.Response:
    rows = DIGITS if name != "diabetes" else PATIENTS
    return http.post(f"/models/{name}/uncertainty", json={"inputs": rows, "seed": 0, **body})


def test_native_reject_rate_flags_rows_above_the_stored_threshold(http: httpx2.Client) -> None:
    calibration = mcdrop.load(MODELS / "digits").calibration
    assert calibration is not None
    response = _uncertainty(http, "digits", reject_rate=0.1, reject_score="mutual_information")
    assert response.status_code == 200, response.text
    body = response.json()
    threshold = calibration.threshold(0.1, "mutual_information")
    assert (body["reject_score"], body["reject_rate"]) == ("mutual_information", 0.1)
    assert body["reject_threshold"] == threshold
    for row in body["results"]:
        assert row["reject"] == (row["mutual_information"] > threshold)
    plain = _uncertainty(http, "digits").json()
    assert "reject" not in plain["results"][0]
    assert "reject_threshold" not in plain


def test_native_explicit_threshold_and_default_score(http: httpx2.Client) -> None:
    body = _uncertainty(http, "plain", reject_threshold=0.05).json()  # no calibration needed
    assert body["reject_score"] == "entropy"
    assert [r["reject"] for r in body["results"]] == [r["entropy"] > 0.05 for r in body["results"]]


def test_native_conformal_sets_and_intervals(http: httpx2.Client) -> None:
    digits = _uncertainty(http, "digits", coverage=0.95).json()
    q = mcdrop.load(MODELS / "digits").calibration.quantile(0.95)  # type: ignore[union-attr]
    for row in digits["results"]:
        expected = [
            lab
            for lab, p in zip(map(str, range(10)), row["probabilities"], strict=False)
            if 1 - p <= q
        ]
        assert row["prediction_set"] == expected
    diabetes = _uncertainty(http, "diabetes", coverage=0.9, reject_rate=0.2).json()
    assert diabetes["reject_score"] == "std"
    for row in diabetes["results"]:
        assert row["conformal_lower"][0] < row["mean"][0] < row["conformal_upper"][0]
        assert isinstance(row["reject"], bool)


def test_the_client_and_model_info_expose_decisions(url: str) -> None:
    with Client(url) as client:
        info = client.model("digits")
        assert info.calibration is not None
        assert info.calibration.n_rows == 270
        assert "mutual_information" in info.calibration.reject_scores
        assert client.model("plain").calibration is None
        result = client.uncertainty("digits", DIGITS, seed=0, reject_rate=0.05, coverage=0.9)
        assert result.reject_rate == 0.05
        assert all(r.reject is not None and r.prediction_set is not None for r in result.results)
        with pytest.raises(BadRequestError) as info_error:
            client.uncertainty("plain", DIGITS, reject_rate=0.1)
        assert info_error.value.code == "decision_unavailable"


@pytest.mark.parametrize(
    ("name", "body", "code", "match"),
    [
        ("plain", {"reject_rate": 0.1}, "decision_unavailable", "mcdrop calibrate"),
        ("plain", {"coverage": 0.9}, "decision_unavailable", "no calibration"),
        ("digits", {"reject_rate": 1.0}, "invalid_request", "reject_rate"),
        ("digits", {"coverage": 1.2}, "invalid_request", "coverage"),
        ("diabetes", {"coverage": 0.99}, "decision_unavailable", "calibration rows"),
        ("digits", {"reject_rate": 0.1, "reject_score": "std"}, "decision_unavailable", "entropy"),
        ("digits", {"reject_rate": 0.1, "reject_score": "max"}, "invalid_request", "reject_score"),
        ("digits", {"reject_rate": 0.1, "reject_threshold": 0.5}, "invalid_request", "not both"),
        ("digits", {"reject_score": "entropy"}, "invalid_request", "reject_rate or"),
    ],
)
def test_native_errors_say_what_to_fix(
    http: httpx2.Client, name: str, body: dict[str, Any], code: str, match: str
) -> None:
    response = _uncertainty(http, name, **body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert match in error["message"] or match in json.dumps(error["details"])


def _infer(http: httpx2.Client, name: str, **extra: Any) -> httpx2.Response:
    rows = np.array(DIGITS if name != "diabetes" else PATIENTS, dtype=np.float32)
    inputs = [
        {"name": "x", "shape": list(rows.shape), "datatype": "FP32", "data": rows.ravel().tolist()}
    ]
    return http.post(f"/v2/models/{name}/infer", json={"inputs": inputs, **extra})


def _result(response: httpx2.Response) -> InferResult:
    assert response.status_code == 200, response.text
    length = response.headers.get("Inference-Header-Content-Length")
    return InferResult.from_response_body(response.content, header_length=length)


@pytest.mark.parametrize("binary", [False, True])
def test_v2_reject_and_prediction_set_outputs(http: httpx2.Client, binary: bool) -> None:
    parameters = {"seed": 0, "reject_rate": 0.1, "coverage": 0.95, "binary_data_output": binary}
    result = _result(_infer(http, "digits", parameters=parameters))
    outputs = {o["name"]: o for o in result.get_response()["outputs"]}
    assert outputs["reject"]["datatype"] == "BOOL"
    assert outputs["prediction_set"]["datatype"] == "BOOL"
    reject = result.as_numpy("reject")
    sets = result.as_numpy("prediction_set")
    assert reject.shape == (6,)
    assert reject.dtype == np.bool_
    assert sets.shape == (6, 10)
    assert sets.dtype == np.bool_
    # The same decisions as the native API (same seed, same rows).
    native = _uncertainty(http, "digits", reject_rate=0.1, coverage=0.95).json()
    assert reject.tolist() == [r["reject"] for r in native["results"]]
    assert [[str(k) for k in np.flatnonzero(s)] for s in sets] == [
        r["prediction_set"] for r in native["results"]
    ]
    params = result.get_response()["parameters"]
    assert params["reject_threshold"] == native["reject_threshold"]
    assert (params["reject_score"], params["coverage"]) == ("entropy", 0.95)


def test_v2_conformal_intervals_and_chosen_outputs(http: httpx2.Client) -> None:
    outputs = [{"name": "mean"}, {"name": "conformal_lower"}, {"name": "conformal_upper"}]
    result = _result(
        _infer(http, "diabetes", parameters={"seed": 0, "coverage": 0.9}, outputs=outputs)
    )
    assert [o["name"] for o in result.get_response()["outputs"]] == [o["name"] for o in outputs]
    lower, mean, upper = (
        result.as_numpy(n) for n in ("conformal_lower", "mean", "conformal_upper")
    )
    assert lower.shape == mean.shape == (2, 1)
    assert (lower < mean).all()
    assert (mean < upper).all()
    # Without decision parameters, responses are as before.
    plain = _result(_infer(http, "diabetes", parameters={"seed": 0}))
    assert "reject" not in [o["name"] for o in plain.get_response()["outputs"]]


@pytest.mark.parametrize(
    ("name", "extra", "match"),
    [
        ("plain", {"parameters": {"reject_rate": 0.1}}, "no calibration"),
        ("digits", {"parameters": {"reject_rate": 2}}, "reject_rate"),
        ("digits", {"parameters": {"reject_rate": 0.1, "reject_score": "std"}}, "reject_score"),
        ("digits", {"parameters": {"mode": "predict", "coverage": 0.9}}, "only for mode"),
        ("digits", {"outputs": [{"name": "reject"}]}, "needs the parameter"),
        ("diabetes", {"parameters": {"coverage": 0.995}}, "calibration rows"),
    ],
)
def test_v2_errors_are_400s(
    http: httpx2.Client, name: str, extra: dict[str, Any], match: str
) -> None:
    response = _infer(http, name, **extra)
    assert response.status_code == 400, response.text
    assert match in response.json()["error"]


@pytest.mark.parametrize("field", ["reject_rate", "coverage"])
@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_decision_options_are_named_as_such(
    http: httpx2.Client, field: str, value: str
) -> None:
    # JSON's NaN and Infinity literals: the error says what is wrong with the value, not that
    # NaN fails a bound.
    native = f'{{"inputs": {json.dumps(DIGITS)}, "{field}": {value}}}'
    response = http.post(
        "/models/digits/uncertainty", content=native, headers={"content-type": "application/json"}
    )
    assert response.status_code == 422, response.text
    assert "finite number" in json.dumps(response.json()["error"])
    rows = np.array(DIGITS, dtype=np.float32)
    tensor = {"name": "x", "shape": list(rows.shape), "datatype": "FP32"}
    v2 = json.dumps({"inputs": [{**tensor, "data": rows.ravel().tolist()}]})
    v2 = v2[:-1] + f', "parameters": {{"{field}": {value}}}}}'
    response = http.post(
        "/v2/models/digits/infer", content=v2, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400, response.text
    assert "finite number" in response.json()["error"]
