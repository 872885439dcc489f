"""The Open Inference Protocol endpoints through the real app: metadata, health, infer with JSON
and binary tensors, agreement with the native API, and every malformed tensor a clear 400.

Responses are parsed by Triton's own client code (``tritonclient.http.InferResult``)."""

from __future__ import annotations

import asyncio
import gzip
import itertools
import json
import math
import shutil
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from httpx2 import Response
from sklearn.datasets import load_digits
from tritonclient.http import InferResult

from service.app import create_app
from service.config import Settings
from service.v2 import codec
from service.v2.schemas import MAX_ID_CHARS
from tests.conftest import MODELS
from tests.service.conftest import ALWAYS_DROPS_ROWS, Loading, always_drops_twin, wait_ready

DIGITS = load_digits().data[:4].astype(np.float32)
PATIENT = np.array([[59, 2, 32.1, 101, 157, 93.2, 38, 4, 4.8598, 87]], dtype=np.float32)
CLASSIFIER_OUTPUTS = [
    "probabilities",
    "label",
    "label_index",
    "variance",
    "std",
    "entropy",
    "expected_entropy",
    "mutual_information",
    "variation_ratio",
]
REGRESSOR_OUTPUTS = [
    "mean",
    "variance",
    "std",
    "epistemic_variance",
    "aleatoric_variance",
    "lower",
    "upper",
]


def tensor(
    array: np.ndarray, datatype: str = "FP32", name: str = "inputs", flat: bool = True
) -> dict[str, Any]:
    """A JSON ``$request_input`` of ``array``."""
    data = array.ravel().tolist() if flat else array.tolist()
    return {"name": name, "shape": list(array.shape), "datatype": datatype, "data": data}


def binary_request(
    header: dict[str, Any], blob: bytes, **headers: str
) -> tuple[bytes, dict[str, str]]:
    """A body of ``header`` then ``blob``, and its Inference-Header-Content-Length."""
    head = json.dumps(header).encode()
    return head + blob, {"Inference-Header-Content-Length": str(len(head)), **headers}


def binary_input(array: np.ndarray, datatype: str, name: str = "inputs") -> dict[str, Any]:
    return {
        "name": name,
        "shape": list(array.shape),
        "datatype": datatype,
        "parameters": {"binary_data_size": array.nbytes},
    }


def result(response: Response) -> InferResult:
    """The response as Triton's client reads it."""
    assert response.status_code == 200, response.text
    length = response.headers.get("Inference-Header-Content-Length")
    return InferResult.from_response_body(response.content, header_length=length)


def output(out: InferResult, name: str) -> np.ndarray:
    """An output as numpy, BYTES as str (JSON gives str, binary data gives bytes)."""
    array = out.as_numpy(name)
    if array.dtype == object:
        return np.array([v.decode() if isinstance(v, bytes) else v for v in array.ravel()])
    return array


def infer(http: TestClient, model: str, inputs: list[dict[str, Any]], **body: Any) -> Response:
    return http.post(f"/v2/models/{model}/infer", json={"inputs": inputs, **body})


def test_server_metadata_and_health(http: TestClient) -> None:
    assert http.get("/v2").json() == {
        "name": "mcdrop",
        "version": "0.1.0",
        "extensions": ["binary_tensor_data"],
    }
    assert http.get("/v2/health/live").json() == {"live": True}
    assert http.get("/v2/health/ready").json() == {"ready": True}


def test_openapi_lists_the_v2_routes(http: TestClient) -> None:
    paths = http.get("/openapi.json").json()["paths"]
    assert {"/v2", "/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer"} <= set(
        paths
    )


def test_a_large_input_decodes_off_the_loop_to_the_same_answer(http: TestClient) -> None:
    # 30 rows of 28 × 28 pixels (integers: the JSON fits the test body limit), past the size
    # that moves decoding to a worker thread.
    x = np.random.default_rng(0).integers(0, 256, size=(30, 28, 28)).astype(np.float32)
    parameters = {"mode": "predict"}
    as_json = infer(http, "fashion", [tensor(x)], parameters=parameters)
    header = {"inputs": [binary_input(x, "FP32")], "parameters": parameters}
    body, headers = binary_request(header, x.tobytes())
    as_binary = http.post("/v2/models/fashion/infer", content=body, headers=headers)
    native = _native(http, "fashion", x)
    expected = [row["probabilities"] for row in native]
    for response in (as_json, as_binary):
        probabilities = result(response).as_numpy("probabilities")
        np.testing.assert_allclose(probabilities, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("path", ["/v2/models/digits", "/v2/models/digits/versions/1"])
def test_model_metadata(http: TestClient, path: str) -> None:
    meta = http.get(path).json()
    assert meta["name"] == "digits"
    assert meta["versions"] == ["1"]
    assert meta["platform"] == "pytorch_mcdrop"
    assert meta["inputs"] == [{"name": "inputs", "datatype": "FP32", "shape": [-1, 64]}]
    outputs = {o["name"]: (o["datatype"], o["shape"]) for o in meta["outputs"]}
    assert list(outputs) == [*CLASSIFIER_OUTPUTS, "samples", "n_samples"]
    assert outputs["probabilities"] == ("FP32", [-1, 10])
    assert outputs["label"] == ("BYTES", [-1])
    assert outputs["label_index"] == ("INT64", [-1])
    assert outputs["samples"] == ("FP32", [-1, -1, 10])
    assert outputs["n_samples"] == ("INT64", [-1])


def test_regressor_metadata(http: TestClient) -> None:
    meta = http.get("/v2/models/diabetes").json()
    assert meta["inputs"][0]["shape"] == [-1, 10]
    names = [o["name"] for o in meta["outputs"]]
    assert set(names) == {*REGRESSOR_OUTPUTS, "noise_variance", "samples", "n_samples"}


@pytest.mark.parametrize(
    "path",
    [
        "/v2/models/digits/versions/2",
        "/v2/models/digits/versions/2/ready",
        "/v2/models/nope",
        "/v2/models/nope/ready",
    ],
)
def test_unknown_model_or_version_is_404(http: TestClient, path: str) -> None:
    response = http.get(path)
    assert response.status_code == 404
    assert set(response.json()) == {"error"}
    assert "'2'" in response.json()["error"] or "'nope'" in response.json()["error"]


@pytest.mark.parametrize("path", ["/v2/models/digits/ready", "/v2/models/digits/versions/1/ready"])
def test_model_ready(http: TestClient, path: str) -> None:
    assert http.get(path).json() == {"name": "digits", "ready": True}


def test_infer_classifier(http: TestClient) -> None:
    response = infer(
        http, "digits", [tensor(DIGITS)], id="r1", parameters={"n_samples": 50, "seed": 7}
    )
    body = result(response).get_response()
    assert body["model_name"] == "digits"
    assert body["model_version"] == "1"
    assert body["id"] == "r1"
    assert body["parameters"] == {"mode": "uncertainty", "n_samples": 50, "seed": 7, "level": 0.95}
    assert [o["name"] for o in body["outputs"]] == CLASSIFIER_OUTPUTS
    out = result(response)
    probabilities = out.as_numpy("probabilities")
    assert probabilities.shape == (4, 10)
    np.testing.assert_allclose(probabilities.sum(1), 1.0, atol=1e-5)
    assert output(out, "label").tolist() == ["0", "1", "2", "3"]
    assert out.as_numpy("label_index").tolist() == [0, 1, 2, 3]
    assert (out.as_numpy("entropy") >= out.as_numpy("mutual_information") - 1e-6).all()
    np.testing.assert_allclose(out.as_numpy("std") ** 2, out.as_numpy("variance"), rtol=1e-5)
    again = infer(http, "digits", [tensor(DIGITS)], parameters={"n_samples": 50, "seed": 7})
    np.testing.assert_array_equal(result(again).as_numpy("variance"), out.as_numpy("variance"))


def test_unseeded_request_reports_its_seed_and_default_n_samples(http: TestClient) -> None:
    first = result(infer(http, "digits", [tensor(DIGITS[:1])])).get_response()
    seed = first["parameters"]["seed"]
    assert first["parameters"]["n_samples"] == 100  # the model's default
    again = result(infer(http, "digits", [tensor(DIGITS[:1])], parameters={"seed": seed}))
    assert again.get_response()["outputs"] == first["outputs"]


def _native(http: TestClient, model: str, x: np.ndarray, **options: Any) -> list[dict[str, Any]]:
    endpoint = "uncertainty" if options else "predict"
    body = http.post(f"/models/{model}/{endpoint}", json={"inputs": x.tolist(), **options}).json()
    return body["results"] if options else body["predictions"]


@pytest.mark.parametrize(
    ("model", "x", "fields"),
    [("digits", DIGITS, CLASSIFIER_OUTPUTS), ("diabetes", PATIENT, REGRESSOR_OUTPUTS)],
)
def test_uncertainty_agrees_with_the_native_api(
    http: TestClient, model: str, x: np.ndarray, fields: list[str]
) -> None:
    native = _native(http, model, x, n_samples=30, seed=11, level=0.9)
    parameters = {"n_samples": 30, "seed": 11, "level": 0.9}
    out = result(infer(http, model, [tensor(x)], parameters=parameters))
    for field in fields:
        expected = np.array([row[field] for row in native])
        actual = output(out, field)
        if actual.dtype.kind == "U":
            np.testing.assert_array_equal(actual, expected, err_msg=field)
        else:
            np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=1e-7, err_msg=field)


@pytest.mark.parametrize(
    ("model", "x", "fields"),
    [
        ("digits", DIGITS, ["probabilities", "label", "label_index"]),
        ("diabetes", PATIENT, ["mean", "noise_variance"]),
    ],
)
def test_predict_mode_agrees_with_the_native_api(
    http: TestClient, model: str, x: np.ndarray, fields: list[str]
) -> None:
    native = _native(http, model, x)
    out = result(infer(http, model, [tensor(x)], parameters={"mode": "predict"}))
    assert out.get_response()["parameters"] == {"mode": "predict"}
    assert [o["name"] for o in out.get_response()["outputs"]] == fields
    for field in fields:
        expected = np.array([row[field] for row in native])
        if expected.dtype.kind == "U":
            np.testing.assert_array_equal(output(out, field), expected)
        else:
            np.testing.assert_allclose(output(out, field), expected, rtol=1e-6)


def test_predict_mode_is_deterministic_for_a_model_that_drops_in_eval(
    always_drops: TestClient,
) -> None:
    """As the native /predict: a forward's ``F.dropout(h, p, training=True)`` is off."""
    x = np.array(ALWAYS_DROPS_ROWS, dtype=np.float32)
    parameters = {"mode": "predict"}
    answers = [
        output(
            result(infer(always_drops, "mc", [tensor(x)], parameters=parameters)), "probabilities"
        )
        for _ in range(3)
    ]
    np.testing.assert_array_equal(answers[1], answers[0])
    np.testing.assert_array_equal(answers[2], answers[0])
    np.testing.assert_allclose(answers[0], always_drops_twin().numpy(), rtol=1e-6)


def test_samples_only_when_named(http: TestClient) -> None:
    parameters = {"n_samples": 20, "seed": 0}
    outputs = [{"name": "samples"}, {"name": "probabilities"}]
    out = result(
        infer(http, "digits", [tensor(DIGITS[:2])], parameters=parameters, outputs=outputs)
    )
    assert [o["name"] for o in out.get_response()["outputs"]] == ["samples", "probabilities"]
    samples = out.as_numpy("samples")
    assert samples.shape == (20, 2, 10)  # (S, N, K): samples first
    np.testing.assert_allclose(samples.mean(0), out.as_numpy("probabilities"), atol=1e-5)


@pytest.mark.parametrize(
    "parameters",
    [{"n_samples": 20, "seed": 0}, {"mode": "predict"}],
    ids=["uncertainty", "predict"],
)
def test_an_empty_outputs_list_gives_the_default_outputs(
    http: TestClient, parameters: dict[str, Any]
) -> None:
    # As Triton reads "outputs": [] (no output named: all of them); it gave none.
    named_none = result(infer(http, "digits", [tensor(DIGITS[:2])], parameters=parameters))
    empty = result(
        infer(http, "digits", [tensor(DIGITS[:2])], parameters=parameters, outputs=[])
    ).get_response()
    assert empty == named_none.get_response()
    assert empty["outputs"]


AUTO = {"n_samples": "auto", "tolerance": 0.02, "max_n_samples": 300, "seed": 3}


@pytest.mark.parametrize(
    ("model", "x", "fields"),
    [("digits", DIGITS, CLASSIFIER_OUTPUTS), ("diabetes", PATIENT, REGRESSOR_OUTPUTS)],
)
def test_adaptive_sampling_agrees_with_the_native_api(
    http: TestClient, model: str, x: np.ndarray, fields: list[str]
) -> None:
    native = _native(http, model, x, **AUTO)
    out = result(infer(http, model, [tensor(x)], parameters=AUTO))
    response = out.get_response()
    assert response["parameters"] == {"mode": "uncertainty", **AUTO, "level": 0.95}
    # By default every output of the mode, then the samples each row used.
    assert [o["name"] for o in response["outputs"]] == [*fields, "n_samples"]
    used = out.as_numpy("n_samples")
    assert used.dtype == np.int64
    assert used.tolist() == [row["n_samples"] for row in native]
    assert ((used >= 16) & (used <= 300)).all()
    for field in fields:
        expected = np.array([row[field] for row in native])
        actual = output(out, field)
        if actual.dtype.kind == "U":
            np.testing.assert_array_equal(actual, expected, err_msg=field)
        else:
            np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=1e-7, err_msg=field)


def test_adaptive_defaults_and_rows_that_stop_at_different_counts(http: TestClient) -> None:
    # Blends of two digits are hard, clear digits easy: the rows stop at different counts.
    x = np.stack([DIGITS[0], (DIGITS[1] + DIGITS[3]) / 2, DIGITS[2], (DIGITS[1] + DIGITS[2]) / 2])
    out = result(infer(http, "digits", [tensor(x)], parameters={"n_samples": "auto", "seed": 1}))
    parameters = out.get_response()["parameters"]
    assert parameters["tolerance"] == 0.01  # the defaults, as the native API's
    assert parameters["max_n_samples"] == 1000
    used = out.as_numpy("n_samples")
    assert len(set(used.tolist())) > 1, used
    again = result(infer(http, "digits", [tensor(x)], parameters={"n_samples": "auto", "seed": 1}))
    np.testing.assert_array_equal(again.as_numpy("n_samples"), used)  # seeded: reproducible
    regressor = result(
        infer(http, "diabetes", [tensor(PATIENT)], parameters={"n_samples": "auto", "seed": 1})
    )
    assert regressor.get_response()["parameters"]["tolerance"] == 0.05  # a regressor's default


@pytest.mark.parametrize("binary", [False, True])
def test_adaptive_samples_are_each_rows_own(http: TestClient, binary: bool) -> None:
    x = np.stack([DIGITS[0], (DIGITS[1] + DIGITS[3]) / 2])
    names = ["samples", "n_samples", "probabilities"]
    outputs = [{"name": n, "parameters": {"binary_data": binary}} for n in names]
    out = result(infer(http, "digits", [tensor(x)], parameters=AUTO, outputs=outputs))
    used = out.as_numpy("n_samples")
    samples = out.as_numpy("samples")  # (S, N, K): S the most any row used
    assert samples.shape == (used.max(), 2, 10)
    for row, n in enumerate(used):
        assert np.isfinite(samples[:n, row]).all()
        assert np.isnan(samples[n:, row]).all()  # never drawn: NaN (null in JSON)
        np.testing.assert_allclose(
            samples[:n, row].mean(0), out.as_numpy("probabilities")[row], atol=1e-5
        )


def test_a_fixed_count_request_may_name_the_n_samples_output(http: TestClient) -> None:
    outputs = [{"name": "n_samples"}]
    out = result(
        infer(http, "digits", [tensor(DIGITS)], parameters={"n_samples": 20}, outputs=outputs)
    )
    assert out.as_numpy("n_samples").tolist() == [20] * len(DIGITS)


# Every encoding of the same four digits (integers 0..16, exact in every datatype).
ENCODINGS = ["FP32", "FP64", "FP16", "INT8", "INT32", "INT64", "UINT8", "UINT16", "UINT64"]


def _reference(http: TestClient) -> np.ndarray:
    parameters = {"n_samples": 10, "seed": 5}
    return result(infer(http, "digits", [tensor(DIGITS)], parameters=parameters)).as_numpy(
        "probabilities"
    )


@pytest.mark.parametrize("datatype", ENCODINGS)
@pytest.mark.parametrize("encoding", ["flat", "nested", "binary"])
def test_every_input_encoding_gives_the_same_answer(
    http: TestClient, datatype: str, encoding: str
) -> None:
    from tritonclient.utils import triton_to_np_dtype

    x = DIGITS.astype(triton_to_np_dtype(datatype))
    parameters = {"n_samples": 10, "seed": 5}
    if encoding == "binary":
        header = {"inputs": [binary_input(x, datatype, "input__0")], "parameters": parameters}
        body, headers = binary_request(header, x.tobytes())
        response = http.post("/v2/models/digits/infer", content=body, headers=headers)
    else:
        inputs = [tensor(x, datatype, "input__0", flat=encoding == "flat")]
        response = infer(http, "digits", inputs, parameters=parameters)
    np.testing.assert_array_equal(result(response).as_numpy("probabilities"), _reference(http))


def test_bf16_and_bool_binary_inputs(http: TestClient) -> None:
    x = torch.tensor(DIGITS)  # integers up to 16: exact in bfloat16
    header = {"inputs": [binary_input(DIGITS.astype(np.float16), "BF16")]}
    header["parameters"] = {"n_samples": 10, "seed": 5}
    body, headers = binary_request(header, x.to(torch.bfloat16).view(torch.int16).numpy().tobytes())
    response = http.post("/v2/models/digits/infer", content=body, headers=headers)
    np.testing.assert_array_equal(result(response).as_numpy("probabilities"), _reference(http))

    bits = DIGITS > 8
    as_json = infer(http, "digits", [tensor(bits, "BOOL")], parameters={"mode": "predict"})
    header = {"inputs": [binary_input(bits, "BOOL")], "parameters": {"mode": "predict"}}
    body, headers = binary_request(header, bits.tobytes())
    as_binary = http.post("/v2/models/digits/infer", content=body, headers=headers)
    floats = infer(
        http, "digits", [tensor(bits.astype(np.float32))], parameters={"mode": "predict"}
    )
    for response in (as_json, as_binary):
        np.testing.assert_array_equal(
            result(response).as_numpy("probabilities"), result(floats).as_numpy("probabilities")
        )


def test_binary_and_json_outputs_agree(http: TestClient) -> None:
    parameters = {"n_samples": 10, "seed": 2}
    as_json = result(infer(http, "digits", [tensor(DIGITS)], parameters=parameters))
    all_binary = infer(
        http, "digits", [tensor(DIGITS)], parameters={**parameters, "binary_data_output": True}
    )
    assert all_binary.headers["content-type"] == "application/octet-stream"
    mixed = infer(
        http,
        "digits",
        [tensor(DIGITS)],
        parameters=parameters,
        outputs=[
            {"name": "label", "parameters": {"binary_data": True}},
            {"name": "entropy"},
            {"name": "probabilities", "parameters": {"binary_data": True}},
        ],
    )
    for response, as_data in ((all_binary, set()), (mixed, {"entropy"})):
        out = result(response)
        for entry in out.get_response()["outputs"]:
            name = entry["name"]
            assert ("data" in entry) == (name in as_data), entry
            np.testing.assert_array_equal(output(out, name), output(as_json, name))


#: Rows whose outputs overflow: digits at 3e38 gives NaN probabilities (yet a label).
OVERFLOWING = np.stack([DIGITS[0], np.full(64, 3e38, dtype=np.float32), DIGITS[1]])


@pytest.mark.parametrize("mode", ["predict", "uncertainty"])
@pytest.mark.parametrize(
    "outputs",
    [
        None,  # the default outputs: every statistic, as JSON
        [{"name": "label"}],  # none of the statistics written: checked all the same
        [{"name": "probabilities", "parameters": {"binary_data": True}}],  # binary
        [{"name": "label_index"}, {"name": "probabilities"}],
    ],
)
def test_outputs_that_are_not_finite_are_a_400_naming_the_rows(
    http: TestClient, mode: str, outputs: list[dict[str, Any]] | None
) -> None:
    parameters: dict[str, Any] = {"mode": mode}
    if mode == "uncertainty":
        parameters |= {"n_samples": 10, "seed": 0}
    body: dict[str, Any] = {"parameters": parameters}
    if outputs is not None:
        body["outputs"] = outputs
    response = infer(http, "digits", [tensor(OVERFLOWING)], **body)
    assert response.status_code == 400, response.text
    assert "rows [1]" in response.json()["error"]


def test_statistics_beyond_float32_are_a_400_naming_the_rows(http: TestClient) -> None:
    """diabetes at 1e20: a variance beyond float32 (inf, where the digits case gives NaN)."""
    x = np.stack([PATIENT[0], np.full(10, 1e20, dtype=np.float32)])
    response = infer(http, "diabetes", [tensor(x)], parameters={"n_samples": 10, "seed": 0})
    assert response.status_code == 400, response.text
    assert "rows [1]" in response.json()["error"]


@pytest.mark.parametrize("binary", [False, True])
def test_samples_that_are_not_finite_are_a_400_naming_the_rows(
    http: TestClient, binary: bool
) -> None:
    outputs = [{"name": "samples", "parameters": {"binary_data": binary}}]
    parameters = {"n_samples": 5, "seed": 0}
    response = infer(http, "digits", [tensor(OVERFLOWING)], parameters=parameters, outputs=outputs)
    assert response.status_code == 400, response.text
    assert "rows [1]" in response.json()["error"]


@pytest.mark.parametrize("content_type", [None, "application/octet-stream", "application/json"])
@pytest.mark.parametrize("encoding", [None, "gzip", "deflate"])
def test_content_types_and_encodings(
    http: TestClient, content_type: str | None, encoding: str | None
) -> None:
    body = json.dumps({"inputs": [tensor(DIGITS[:1])], "parameters": {"mode": "predict"}}).encode()
    headers = {} if content_type is None else {"content-type": content_type}
    if encoding is not None:
        headers["content-encoding"] = encoding
        body = gzip.compress(body) if encoding == "gzip" else zlib.compress(body)
    response = http.post("/v2/models/digits/infer", content=body, headers=headers)
    assert output(result(response), "label").tolist() == ["0"]


def _predict_body() -> bytes:
    return json.dumps({"inputs": [tensor(DIGITS[:1])], "parameters": {"mode": "predict"}}).encode()


@pytest.mark.parametrize("encoding", ["GZIP", "Gzip", "x-gzip", "X-GZIP", " gzip ", "DEFLATE"])
def test_content_codings_are_case_insensitive(http: TestClient, encoding: str) -> None:
    # RFC 9110 section 8.4.1: content-coding names are case-insensitive; x-gzip is gzip's alias.
    body = _predict_body()
    body = zlib.compress(body) if "deflate" in encoding.lower() else gzip.compress(body)
    response = http.post(
        "/v2/models/digits/infer", content=body, headers={"content-encoding": encoding}
    )
    assert output(result(response), "label").tolist() == ["0"]


@pytest.mark.parametrize("members", [2, 3, 1024])
def test_a_gzip_body_of_several_members_is_inflated_whole(http: TestClient, members: int) -> None:
    # RFC 1952 section 2.2: a gzip file is a series of members, inflated one after another.
    body = _predict_body()
    cuts = np.linspace(0, len(body), members + 1).astype(int)
    parts = [gzip.compress(body[a:b]) for a, b in itertools.pairwise(cuts)]
    response = http.post(
        "/v2/models/digits/infer", content=b"".join(parts), headers={"content-encoding": "gzip"}
    )
    assert output(result(response), "label").tolist() == ["0"]


@pytest.mark.parametrize(
    ("body", "encoding", "words"),
    [
        (gzip.compress(b"{}") + b"junk", "gzip", "4 bytes after the end of its compressed data"),
        (gzip.compress(b"{}") + b"\0\0", "gzip", "2 bytes after the end"),
        (gzip.compress(b"{}") * 2 + b"\x1f", "gzip", "1 bytes after the end"),
        (zlib.compress(b"{}") + gzip.compress(b"{}"), "deflate", "bytes after the end"),
        (gzip.compress(b"{}") + gzip.compress(b"{}")[:-4], "gzip", "truncated"),
        (gzip.compress(b"") * 1025, "gzip", "more than 1024 members"),
    ],
    ids=["garbage", "zeros", "part of a magic", "deflate then gzip", "truncated", "1025 members"],
)
def test_bytes_after_the_compressed_data_are_a_400(
    http: TestClient, body: bytes, encoding: str, words: str
) -> None:
    response = http.post(
        "/v2/models/digits/infer", content=body, headers={"content-encoding": encoding}
    )
    assert response.status_code == 400, response.text
    assert words in response.json()["error"]


def test_the_inflated_limit_counts_every_member(http: TestClient, settings: Settings) -> None:
    half = gzip.compress(b" " * (settings.max_body_bytes // 2 + 1))
    assert len(half) * 2 < settings.max_body_bytes  # each member inflates within the limit
    response = http.post(
        "/v2/models/diabetes/infer", content=half * 2, headers={"content-encoding": "gzip"}
    )
    assert response.status_code == 413
    assert "inflated" in response.json()["error"]


@pytest.fixture(scope="module")
def default_limits(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """The bundled diabetes model served with the default settings (a 16 MB body limit)."""
    folder = tmp_path_factory.mktemp("models")
    shutil.copytree(MODELS / "diabetes", folder / "diabetes")
    with TestClient(create_app(Settings(model_dir=folder))) as client:
        wait_ready(client)
        yield client


_SMALL = json.dumps(
    {"inputs": [{"name": "x", "shape": [1, 10], "datatype": "FP32", "data": [1.0] * 10}]}
).encode()
_BOMB = b" " * (16 * 1024 * 1024 + 1)  # 16 KB compressed


@pytest.mark.parametrize(
    ("encoding", "plain", "status", "on_loop"),
    [
        ("gzip", _BOMB, 413, False),
        ("deflate", _BOMB, 413, False),
        ("gzip", b" " * (16 * 1024 * 1024 - len(_SMALL)) + _SMALL, 200, False),
        ("gzip", _SMALL, 200, True),  # inflates to ~0.1 MB at most: no thread's round trip
    ],
    ids=["gzip bomb", "deflate bomb", "16 MB inflated", "small"],
)
def test_a_body_that_may_inflate_large_is_inflated_off_the_event_loop(
    default_limits: TestClient,
    monkeypatch: pytest.MonkeyPatch,
    encoding: str,
    plain: bytes,
    status: int,
    on_loop: bool,
) -> None:
    """16 KB of gzip inflate to 16 MB (~30 ms; 9.5 MB of gzip of hex, ~170 ms): on the event
    loop, /health waited that long for every such request."""
    inflate, seen = codec.decompress, []

    def decompress(*args: Any) -> bytes:  # the real one, noting where it runs
        try:
            seen.append(asyncio.get_running_loop() is not None)
        except RuntimeError:  # no loop in this thread: a worker thread
            seen.append(False)
        return inflate(*args)

    monkeypatch.setattr(codec, "decompress", decompress)
    body = gzip.compress(plain) if encoding == "gzip" else zlib.compress(plain)
    response = default_limits.post(
        "/v2/models/diabetes/infer", content=body, headers={"content-encoding": encoding}
    )
    assert response.status_code == status, response.text
    assert seen == [on_loop]


def _row(n: int = 10, value: Any = 1.0) -> list[Any]:
    return [value] * n


def _json(inputs: list[dict[str, Any]] | None = None, **body: Any) -> dict[str, Any]:
    good = [{"name": "inputs", "shape": [1, 10], "datatype": "FP32", "data": _row()}]
    return {"inputs": good if inputs is None else inputs, **body}


def _input(**fields: Any) -> list[dict[str, Any]]:
    return [{"name": "inputs", "shape": [1, 10], "datatype": "FP32", "data": _row(), **fields}]


# case -> (JSON body, status, words the message must contain)
BAD: dict[str, tuple[Any, int, str]] = {
    "shape x data": (_json(_input(data=_row(9))), 400, "needs 10 values, data has 9"),
    "unknown datatype": (_json(_input(datatype="FP8")), 400, "datatype 'FP8'"),
    "bytes datatype": (_json(_input(datatype="BYTES")), 400, "datatype 'BYTES'"),
    "bf16 in JSON": (_json(_input(datatype="BF16")), 400, "BF16 has no JSON form"),
    "negative shape": (_json(_input(shape=[-1, 10])), 400, "must not be negative"),
    "shape of strings": (_json(_input(shape=["1", "10"])), 400, "valid integer"),
    "fractional shape": (_json(_input(shape=[1.5, 10])), 400, "valid integer"),
    "wrong rank": (_json(_input(shape=[10])), 400, "expects input shape [N, 10]"),
    "wrong width": (_json(_input(shape=[2, 5])), 400, "expects input shape [N, 10]"),
    "zero rows": (_json(_input(shape=[0, 10], data=[])), 400, "at least one row"),
    "no data": (_json([{"name": "x", "shape": [1, 10], "datatype": "FP32"}]), 400, "no data"),
    "strings": (_json(_input(data=_row(value="1"))), 400, "valid number"),
    "bools for FP32": (_json(_input(data=_row(value=True))), 400, "valid number"),
    "nulls": (_json(_input(data=_row(value=None))), 400, "valid number"),
    "float32 overflow": (_json(_input(data=_row(value=1e39))), 400, "3.4e38"),
    "float32 overflow, nested": (_json(_input(data=[_row(value=-1e39)])), 400, "3.4e38"),
    "float32 overflow, FP64": (
        _json(_input(data=[*_row(9), 3.5e38], datatype="FP64")),
        400,
        "3.4e38",
    ),
    "float for INT32": (_json(_input(datatype="INT32")), 400, "valid integer"),
    "INT8 out of range": (_json(_input(datatype="INT8", data=_row(value=200))), 400, "127"),
    "FP16 above its range": (_json(_input(datatype="FP16", data=_row(value=1e6))), 400, "65504"),
    "FP16 below its range": (
        _json(_input(datatype="FP16", data=_row(value=-65505))),
        400,
        "[-65504, 65504]",
    ),
    "number for BOOL": (_json(_input(datatype="BOOL", data=_row(value=1))), 400, "valid boolean"),
    "ragged nested": (_json(_input(shape=[2, 10], data=[_row(), _row(9)])), 400, "rectangular"),
    "nested other shape": (
        _json(_input(shape=[2, 10], data=[_row(20)])),
        400,
        "nested as shape [1, 20]",
    ),
    "nested too deep": (_json(_input(data=[[_row()]])), 400, "valid number"),
    # Data longer than its shape is refused by its lengths, its values unread (the strings would
    # be named if read): 7 M values sent for a shape of 10 held the event loop ~1.1 s.
    # More values than 50 rows of 10 hold, refused before the body is parsed.
    "data past the values limit": (
        _json(_input(data=_row(2000))),
        400,
        "at most 50 rows (the server's max_request_rows) of 10 values (shape [10]), and its "
        "options, 1524 in all",
    ),
    "data longer than its shape": (
        _json(_input(data=[*_row(), *["x"] * 1000])),
        400,
        "shape [1, 10] needs 10 values, data has 1010",
    ),
    "nested longer than its shape": (
        _json(_input(data=[[*_row(), *["x"] * 1000]])),
        400,
        "data is nested as shape [1, 1010], but its shape is [1, 10]",
    ),
    "more rows than its shape": (
        _json(_input(data=[_row(), *[["x"]] * 1000])),
        400,
        "data is nested as shape [1001, 10], but its shape is [1, 10]",
    ),
    "a later row longer": (
        _json(_input(shape=[2, 10], data=[_row(), [*_row(), *["x"] * 1000]])),
        400,
        "nested data must be rectangular, of shape [2, 10]",
    ),
    "two inputs": (_json([*_input(), *_input(name="b")]), 400, "one input tensor"),
    "no inputs": (_json([]), 400, "at least 1 item"),
    "missing inputs": ({}, 400, "inputs"),
    "not an object": ([1, 2], 400, "invalid request"),
    "extra field": (_json(model="x"), 400, "model"),
    # The response echoes the id: a 15 MB one was echoed whole.
    "id too long": (_json(id="i" * 257), 400, "id: String should have at most 256 characters"),
    "id not a string": (_json(id=7), 400, "id: Input should be a valid string"),
    "input parameter": (
        _json(_input(parameters={"shared_memory_region": "r"})),
        400,
        "shared_memory_region",
    ),
    "too many rows": (_json(_input(shape=[51, 10], data=_row(510))), 400, "limit of 50"),
    "n_samples above max": (_json(parameters={"n_samples": 2001}), 400, "limit of 2000"),
    "rows x samples": (
        _json(_input(shape=[20, 10], data=_row(200)), parameters={"n_samples": 1500}),
        400,
        "rows × n_samples",
    ),
    "returned samples": (
        _json(
            _input(shape=[10, 10], data=_row(100)),
            parameters={"n_samples": 1000},
            outputs=[{"name": "samples"}],
        ),
        400,
        "return_samples",
    ),
    "n_samples 0": (_json(parameters={"n_samples": 0}), 400, "n_samples"),
    "n_samples string": (_json(parameters={"n_samples": "5"}), 400, "n_samples"),
    "seed negative": (_json(parameters={"seed": -1}), 400, "seed"),
    "level 1": (_json(parameters={"level": 1}), 400, "level"),
    "unknown mode": (_json(parameters={"mode": "sample"}), 400, "'predict' or 'uncertainty'"),
    "seed with predict": (_json(parameters={"mode": "predict", "seed": 1}), 400, "seed"),
    "unknown parameter": (_json(parameters={"samples": 5}), 400, "mcdrop reads the parameters"),
    "object parameter": (_json(parameters={"n_samples": {"a": 1}}), 400, "parameters"),
    "unknown output": (_json(outputs=[{"name": "probabilities"}]), 400, "no output"),
    "other mode's output": (
        _json(parameters={"mode": "predict"}, outputs=[{"name": "lower"}]),
        400,
        "only with mode 'uncertainty'",
    ),
    "output twice": (_json(outputs=[{"name": "mean"}, {"name": "mean"}]), 400, "twice"),
    "classification extension": (
        _json(outputs=[{"name": "mean", "parameters": {"classification": 3}}]),
        400,
        "classification",
    ),
    "unknown model": (_json(), 404, "no model named 'nope'"),
    "tolerance without auto": (
        _json(parameters={"n_samples": 10, "tolerance": 0.1}),
        400,
        'tolerance: only with n_samples "auto"',
    ),
    "max_n_samples without auto": (
        _json(parameters={"max_n_samples": 10}),
        400,
        'max_n_samples: only with n_samples "auto"',
    ),
    "tolerance 0": (_json(parameters={"n_samples": "auto", "tolerance": 0}), 400, "tolerance"),
    "tolerance string": (
        _json(parameters={"n_samples": "auto", "tolerance": "0.1"}),
        400,
        "tolerance",
    ),
    "n_samples other word": (_json(parameters={"n_samples": "many"}), 400, "'auto'"),
    "max_n_samples above max": (
        _json(parameters={"n_samples": "auto", "max_n_samples": 2001}),
        400,
        "max_n_samples=2001 is above the limit of 2000",
    ),
    "rows x max_n_samples": (
        _json(
            _input(shape=[20, 10], data=_row(200)),
            parameters={"n_samples": "auto", "max_n_samples": 1500},
        ),
        400,
        "rows × max_n_samples",
    ),
    # It named only the native API's return_samples, and said no way out.
    "returned samples of auto": (
        _json(
            _input(shape=[6, 10], data=_row(60)),
            parameters={"n_samples": "auto"},
            outputs=[{"name": "samples"}],
        ),
        400,
        "the samples output): rows × max_n_samples = 6 × 1000 = 6000 is above the limit of "
        "5000; send fewer rows, ask for fewer samples, or leave the samples out",
    ),
    "auto with predict": (
        _json(parameters={"mode": "predict", "n_samples": "auto", "tolerance": 0.1}),
        400,
        "n_samples, tolerance: only for mode 'uncertainty'",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_request_is_a_clear_4xx_and_service_keeps_serving(http: TestClient, case: str) -> None:
    body, status, words = BAD[case]
    model = "nope" if case == "unknown model" else "diabetes"
    response = http.post(f"/v2/models/{model}/infer", json=body)
    assert response.status_code == status, response.text
    assert list(response.json()) == ["error"]
    assert words in response.json()["error"]
    assert infer(http, "diabetes", _json()["inputs"]).status_code == 200


def test_rows_nested_flat_for_a_model_of_images_are_named_so(http: TestClient) -> None:
    # Each 28 x 28 image sent as one list of 784 (it said data.0.0 "should be a valid list").
    inputs = [{"name": "inputs", "shape": [1, 28, 28], "datatype": "FP32", "data": [[0.0] * 784]}]
    response = infer(http, "fashion", inputs)
    assert response.status_code == 400, response.text
    expected = "data is nested as shape [1, 784], but its shape is [1, 28, 28]"
    assert expected in response.json()["error"]


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_a_level_that_is_not_finite_is_named_so(http: TestClient, value: float) -> None:
    # As every other float parameter (NaN was told "Input should be less than 1").
    body = json.dumps(_json(parameters={"level": value}))  # NaN, Infinity: pydantic reads them
    response = http.post("/v2/models/diabetes/infer", content=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "parameters.level: Input should be a finite number"


# A list is refused at its first invalid item, the rest unread: pydantic's error for each item
# of a long one cost seconds, the server's other requests held (200 000 inputs that are no
# objects: 2.2-2.8 s; 7 M: 87 s; a 3 MB body of 784 000 strings for fashion's rows: 6-6.5 s).
@pytest.mark.parametrize(
    ("body", "error"),
    [
        ({"inputs": [1] * 1000}, "invalid request: inputs.0: Input should be an object"),
        (_json(outputs=[1] * 1000), "invalid request: outputs.0: Input should be an object"),
        (
            _json(_input(shape=["a"] * 1000)),
            "invalid request: inputs.0.shape.0: Input should be a valid integer",
        ),
        (
            _json(_input(shape=[50, 10], data=["a"] * 500)),
            "input 'inputs' (FP32) must hold finite numbers, flat: data.0: Input should be a "
            "valid number",
        ),
        (
            _json(_input(shape=[50, 10], data=[["a"] * 10] * 50)),
            "input 'inputs' (FP32) must hold finite numbers, nested 2 deep as the shape [50, 10]: "
            "data.0.0: Input should be a valid number",
        ),
    ],
    ids=["inputs", "outputs", "shape", "data", "nested data"],
)
def test_a_list_is_refused_at_its_first_invalid_item(
    http: TestClient, body: dict[str, Any], error: str
) -> None:
    response = http.post("/v2/models/diabetes/infer", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"] == error


def test_integers_may_be_written_as_floats(http: TestClient) -> None:
    """JSON (and its schema's "integer") do not tell 5 from 5.0; nor does the v2 API."""
    inputs = _input(shape=[1.0, 10.0])
    parameters = {"n_samples": 10.0, "seed": 3.0}
    as_floats = result(infer(http, "diabetes", inputs, parameters=parameters))
    as_ints = result(infer(http, "diabetes", _input(), parameters={"n_samples": 10, "seed": 3}))
    assert as_floats.get_response() == as_ints.get_response()


def _binary_case(
    blob: bytes, size: int | None = 40, datatype: str = "FP32", length: str | None = None
) -> tuple[bytes, dict[str, str]]:
    parameters = {} if size is None else {"binary_data_size": size}
    header = {
        "inputs": [{"name": "x", "shape": [1, 10], "datatype": datatype, "parameters": parameters}]
    }
    body, headers = binary_request(header, blob)
    if length is not None:
        headers["Inference-Header-Content-Length"] = length
    return body, headers


FLOATS = np.ones(10, dtype=np.float32).tobytes()

# case -> (body, headers, words the 400 message must contain)
BAD_BINARY: dict[str, tuple[tuple[bytes, dict[str, str]], str]] = {
    "size too small": (
        _binary_case(FLOATS[:36], size=36),
        "needs 40 bytes, binary_data_size is 36",
    ),
    "size past the data": (_binary_case(FLOATS, size=44), "binary_data_size 44"),
    "bytes left over": (_binary_case(FLOATS + b"xx"), "42 bytes after the JSON header"),
    "undeclared binary": (_binary_case(FLOATS, size=None), "no parameters.binary_data_size"),
    "header past the body": (_binary_case(FLOATS, length="100000"), "past the end"),
    "header length not a number": (_binary_case(FLOATS, length="-3"), "byte count"),
    "raw binary": (_binary_case(FLOATS, length="0"), "raw binary"),
    "header cut short": (_binary_case(FLOATS, length="20"), "not valid JSON"),
    "NaN": (_binary_case(np.full(10, np.nan, dtype=np.float32).tobytes()), "NaN"),
    # Cast to float32 without NumPy's overflow warning (a stray line on stderr; a 500 here).
    "FP64 past float32": (
        _binary_case(np.full(10, 1e300).tobytes(), size=80, datatype="FP64"),
        "float32 holds magnitudes up to 3.4e38",
    ),
    "BOOL byte 2": (_binary_case(bytes([2] * 10), size=10, datatype="BOOL"), "0 or 1"),
    "negative size": (_binary_case(FLOATS, size=-1), "binary_data_size"),
}


@pytest.mark.parametrize("case", sorted(BAD_BINARY))
def test_bad_binary_request_is_a_clear_400(http: TestClient, case: str) -> None:
    (body, headers), words = BAD_BINARY[case]
    response = http.post("/v2/models/diabetes/infer", content=body, headers=headers)
    assert response.status_code == 400, response.text
    assert words in response.json()["error"]
    assert infer(http, "diabetes", _json()["inputs"]).status_code == 200


@pytest.mark.parametrize(
    ("body", "headers", "words"),
    [
        (b"{nope", {}, "not valid JSON"),
        (b"\xff\xfe", {}, "not valid JSON"),
        (b"", {}, "not valid JSON"),
        (b"{}", {"content-encoding": "br"}, "'br' is not supported"),
        (b"not gzip", {"content-encoding": "gzip"}, "cannot be inflated"),
        (gzip.compress(b"{}")[:-12], {"content-encoding": "gzip"}, "truncated"),
        # Quoted cut short, as every piece of client data: it was quoted whole.
        (b"{}", {"content-encoding": "x" * 7000}, "'... (7000 characters) is not supported"),
    ],
)
def test_malformed_body_is_a_clear_400(
    http: TestClient, body: bytes, headers: dict[str, str], words: str
) -> None:
    response = http.post("/v2/models/diabetes/infer", content=body, headers=headers)
    assert response.status_code == 400, response.text
    assert words in response.json()["error"]


_BINARY_BODY, _BINARY_HEADERS = _binary_case(FLOATS)
_LENGTH = _BINARY_HEADERS["Inference-Header-Content-Length"]


# A header sent on several lines is read whole, its values joined by ", " (RFC 9110 section
# 5.3): only the first line was read, so a request its proxy may read otherwise was answered.
@pytest.mark.parametrize(
    ("field", "values", "body", "words"),
    [
        (
            "Inference-Header-Content-Length",
            [_LENGTH, "5"],
            _BINARY_BODY,
            f"must be a byte count (the JSON header's length, at most 15 ASCII digits), got "
            f"'{_LENGTH}, 5'",
        ),
        ("Content-Encoding", ["gzip", "gzip"], gzip.compress(_predict_body()), "'gzip, gzip'"),
        (
            "Content-Encoding",
            ["identity", "gzip"],
            gzip.compress(_predict_body()),
            "'identity, gzip' is not supported",
        ),
    ],
    ids=["length", "gzip twice", "identity then gzip"],
)
def test_a_header_on_several_lines_is_read_whole(
    http: TestClient, field: str, values: list[str], body: bytes, words: str
) -> None:
    response = http.post(
        "/v2/models/diabetes/infer", content=body, headers=[(field, v) for v in values]
    )
    assert response.status_code == 400, response.text
    assert words in response.json()["error"]


def test_an_empty_content_encoding_is_none(http: TestClient) -> None:
    # As the native routes read it: an empty list of codings (it was "not supported").
    response = http.post(
        "/v2/models/digits/infer", content=_predict_body(), headers={"content-encoding": ""}
    )
    assert output(result(response), "label").tolist() == ["0"]


def test_limits_in_the_v2_shape(http: TestClient, settings: Settings) -> None:
    large = json.dumps(_json(_input(shape=[20_000, 10], data=_row(200_000)))).encode()
    assert len(large) > settings.max_body_bytes
    response = http.post("/v2/models/diabetes/infer", content=large)
    assert response.status_code == 413
    assert "larger than the limit" in response.json()["error"]
    bomb = gzip.compress(b" " * (settings.max_body_bytes + 1))
    response = http.post(
        "/v2/models/diabetes/infer", content=bomb, headers={"content-encoding": "gzip"}
    )
    assert response.status_code == 413
    assert "inflated" in response.json()["error"]
    assert http.get("/v2/nothing").json() == {"error": "no route serves /v2/nothing"}
    assert http.get("/v2/models/digits/infer").status_code == 405
    assert list(http.get("/v2/models/digits/infer").json()) == ["error"]


def test_a_short_timeout_is_a_504(http: TestClient) -> None:
    x = np.tile(DIGITS, (12, 1))  # 48 rows × 400 samples: well past 1 µs, and not inline
    response = infer(http, "digits", [tensor(x)], parameters={"n_samples": 400, "timeout": 1})
    assert response.status_code == 504
    assert "deadline" in response.json()["error"]


@pytest.mark.parametrize(
    ("path", "model"),
    [
        ("/models/digits/uncertainty", "digits"),
        ("/v2/models/digits/infer", "digits"),
        ("/v2/models/digits/versions/1/infer", "digits"),
        ("/v2/models/digits", None),
    ],
)
def test_infer_routes_count_as_inference(http: TestClient, path: str, model: str | None) -> None:
    """Arrival counting (the batcher's wait) and the metrics follow the v2 infer routes as the
    native ones."""
    scope = {"type": "http", "method": "POST", "path": path, "root_path": ""}
    assert http.app.state.inference.model(scope) == model


def test_not_ready_is_503(loading: Loading) -> None:
    client = loading.client
    assert client.get("/v2/health/live").status_code == 200
    response = client.get("/v2/health/ready")
    assert (response.status_code, response.json()) == (503, {"ready": False})
    response = client.get("/v2/models/diabetes/ready")
    assert response.status_code == 503
    assert response.json()["ready"] is False
    assert "loading" in response.json()["error"]
    response = infer(client, "diabetes", _json()["inputs"])
    assert response.status_code == 503
    assert "loading" in response.json()["error"]
    loading.gate.set()
    wait_ready(client)
    assert client.get("/v2/health/ready").json() == {"ready": True}
    mean = result(infer(client, "diabetes", _json()["inputs"])).as_numpy("mean")
    assert np.isfinite(mean).all()


def test_without_the_api_key_a_401_in_the_v2_shape(tmp_path: Path, root: Path) -> None:
    import shutil

    shutil.copytree(root / "models" / "diabetes", tmp_path / "diabetes")
    with TestClient(create_app(Settings(model_dir=tmp_path, api_key="k3y"))) as client:
        assert client.get("/v2/health/ready").json() == {"ready": True}
        response = infer(client, "diabetes", _json()["inputs"])
        assert response.status_code == 401
        assert "API key" in response.json()["error"]
        response = client.post(
            "/v2/models/diabetes/infer",
            json=_json(),
            headers={"Authorization": "Bearer k3y"},
        )
        assert response.status_code == 200


@pytest.mark.parametrize(
    "timeout",
    [-1, 2**63, 10**30, 10**400, "5", 1.5, True],
    ids=["-1", "2**63", "1e30", "1e400", "str", "1.5", "bool"],
)
def test_a_timeout_out_of_range_is_a_400_that_states_the_range(
    http: TestClient, timeout: Any
) -> None:
    body = json.dumps(_json(parameters={"timeout": 1}))
    body = body.replace('"timeout": 1', f'"timeout": {json.dumps(timeout)}')
    response = http.post("/v2/models/diabetes/infer", content=body)
    assert response.status_code == 400, response.text
    assert (
        "parameters.timeout: must be an integer number of microseconds from 0"
        in (response.json()["error"])
    )
    assert "to 2**63 - 1" in response.json()["error"]
    assert len(response.content) < 500


@pytest.mark.parametrize("timeout", [0, 2**63 - 1, 60_000_000])
def test_a_timeout_of_0_or_past_the_servers_leaves_the_servers_deadline(
    http: TestClient, timeout: int
) -> None:
    """0 is no timeout of the request's own, as Triton reads it."""
    assert infer(http, "diabetes", _input(), parameters={"timeout": timeout}).status_code == 200


@pytest.mark.parametrize("mode", ["predict", "uncertainty"])
def test_a_timeout_shorter_than_small_inline_work_is_a_504_too(http: TestClient, mode: str) -> None:
    """The deadline holds whatever path the work takes: one row runs at once, on arrival, with
    no queue to time out in, and its answer is still not ready within 1 µs."""
    parameters = {"mode": mode, "timeout": 1}
    response = infer(http, "diabetes", _input(), parameters=parameters)
    assert response.status_code == 504
    assert "timeout of 1 µs (parameters.timeout)" in response.json()["error"]
    assert infer(http, "diabetes", _input(), parameters={"mode": mode}).status_code == 200


@pytest.mark.parametrize("value", [65504, -65504])
def test_fp16_json_data_is_taken_up_to_its_largest_value(http: TestClient, value: int) -> None:
    response = infer(http, "diabetes", _input(datatype="FP16", data=_row(value=value)))
    assert response.status_code == 200, response.text


def test_a_body_of_many_keys_is_refused_before_it_is_parsed(http: TestClient) -> None:
    parameters = {f"p{i}": [1] for i in range(5000)}
    response = http.post("/v2/models/diabetes/infer", json=_json(parameters=parameters))
    assert response.status_code == 400
    assert "5006 object keys, more than the limit of 1024" in response.json()["error"]


def test_colons_in_strings_are_no_keys(http: TestClient) -> None:
    # Escaped quotes and backslashes do not end a string: its colons stay inside it. (In the
    # input's name, which may be anything: the id is at most MAX_ID_CHARS.)
    name = 'a\\"b\\\\' + ":" * 5000 + '"'
    response = infer(http, "diabetes", _input(name=name), id=name[:MAX_ID_CHARS])
    assert response.status_code == 200, response.text
    assert response.json()["id"] == name[:MAX_ID_CHARS]


def test_an_id_of_the_longest_length_is_echoed(http: TestClient) -> None:
    request_id = "é" * MAX_ID_CHARS  # characters, not bytes
    response = infer(http, "diabetes", _input(), id=request_id)
    assert response.status_code == 200, response.text
    assert response.json()["id"] == request_id
