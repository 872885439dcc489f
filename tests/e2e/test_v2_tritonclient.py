"""Triton's own HTTP client (``tritonclient[http]``, unmodified; sync on geventhttpclient, which
sends no Content-Type, and ``aio`` on aiohttp, which sends application/octet-stream) against
`mcdrop serve` as a real uvicorn process: probes, metadata, infer with JSON and binary tensors
both ways, errors, and agreement with the native API."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import numpy as np
import pytest
import tritonclient.http as triton
import tritonclient.http.aio as triton_aio
from sklearn.datasets import load_digits
from tritonclient.utils import InferenceServerException

from service.client import Client
from tests.e2e.server import Server, serve

pytestmark = pytest.mark.slow

DIGITS = load_digits().data[:3].astype(np.float32)
MC = {"n_samples": 40, "seed": 7}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serve(tmp_path_factory.mktemp("v2")) as running:
        yield running


@pytest.fixture
def client(server: Server) -> Iterator[triton.InferenceServerClient]:
    with triton.InferenceServerClient(f"127.0.0.1:{server.port}") as c:
        yield c


def _input(module: object, x: np.ndarray, binary: bool) -> triton.InferInput:
    tensor = module.InferInput("inputs", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    return tensor


def test_probes_and_metadata(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("digits")
    assert client.is_model_ready("digits", "1")
    assert not client.is_model_ready("digits", "2")
    assert not client.is_model_ready("nope")
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    meta = client.get_model_metadata("fashion")
    assert meta["inputs"] == [{"name": "inputs", "datatype": "FP32", "shape": [-1, 28, 28]}]
    assert {"name": "mutual_information", "datatype": "FP32", "shape": [-1]} in meta["outputs"]
    assert client.get_model_metadata("diabetes", "1")["versions"] == ["1"]


@pytest.mark.parametrize("binary_in", [False, True])
@pytest.mark.parametrize("binary_out", [False, True])
def test_infer_agrees_with_the_native_api(
    client: triton.InferenceServerClient, server: Server, binary_in: bool, binary_out: bool
) -> None:
    outputs = [
        triton.InferRequestedOutput(name, binary_data=binary_out)
        for name in ("probabilities", "mutual_information", "label", "samples")
    ]
    result = client.infer(
        "digits",
        [_input(triton, DIGITS, binary_in)],
        outputs=outputs,
        parameters=MC,
        request_id="req-1",
    )
    response = result.get_response()
    assert response["id"] == "req-1"
    assert response["parameters"] == {"mode": "uncertainty", **MC, "level": 0.95}
    with Client(server.url) as native:
        expected = native.uncertainty("digits", DIGITS.tolist(), **MC, return_samples=True)
    rows = expected.results
    np.testing.assert_allclose(
        result.as_numpy("probabilities"), [r.probabilities for r in rows], rtol=1e-6, atol=1e-7
    )
    np.testing.assert_allclose(
        result.as_numpy("mutual_information"),
        [r.mutual_information for r in rows],
        rtol=1e-6,
        atol=1e-7,
    )
    labels = [v.decode() if isinstance(v, bytes) else v for v in result.as_numpy("label")]
    assert labels == [r.label for r in rows]
    samples = result.as_numpy("samples")  # (S, N, K)
    assert samples.shape == (40, 3, 10)
    np.testing.assert_allclose(
        samples.transpose(1, 0, 2), [r.samples for r in rows], rtol=1e-6, atol=1e-7
    )


def test_default_outputs_come_as_binary_data(client: triton.InferenceServerClient) -> None:
    # Without `outputs`, tritonclient asks for every output as binary data.
    result = client.infer("diabetes", [_input(triton, np.ones((2, 10), np.float32), True)])
    response = result.get_response()
    names = [o["name"] for o in response["outputs"]]
    listed = [o["name"] for o in client.get_model_metadata("diabetes")["outputs"]]
    # Every output of the default mode, in the metadata's order, but the raw samples.
    assert names == [n for n in listed if n not in ("noise_variance", "samples", "n_samples")]
    assert all("binary_data_size" in o["parameters"] for o in response["outputs"])
    assert (result.as_numpy("lower") < result.as_numpy("upper")).all()


def test_errors_come_as_inference_server_exceptions(client: triton.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException, match="no model named 'nope'") as missing:
        client.infer("nope", [_input(triton, DIGITS, True)])
    assert missing.value.status() == "404"
    with pytest.raises(InferenceServerException, match=r"expects input shape \[N, 64\]") as bad:
        client.infer("digits", [_input(triton, DIGITS[:, :63].copy(), True)])
    assert bad.value.status() == "400"
    with pytest.raises(InferenceServerException, match="mcdrop reads the parameters"):
        client.infer("digits", [_input(triton, DIGITS, False)], parameters={"n_sample": 5})
    with pytest.raises(InferenceServerException, match="no version '3'"):
        client.get_model_metadata("digits", "3")
    # Still serving.
    result = client.infer("digits", [_input(triton, DIGITS, True)], parameters={"mode": "predict"})
    assert result.as_numpy("label_index").tolist() == [0, 1, 2]


def test_compressed_requests(client: triton.InferenceServerClient) -> None:
    plain = client.infer("digits", [_input(triton, DIGITS, True)], parameters=MC)
    for algorithm in ("gzip", "deflate"):
        packed = client.infer(
            "digits",
            [_input(triton, DIGITS, True)],
            parameters=MC,
            request_compression_algorithm=algorithm,
        )
        np.testing.assert_array_equal(
            packed.as_numpy("probabilities"), plain.as_numpy("probabilities")
        )


def test_async_client(server: Server, client: triton.InferenceServerClient) -> None:
    sync = client.infer("digits", [_input(triton, DIGITS, True)], parameters=MC)

    async def run() -> list[np.ndarray]:
        async with triton_aio.InferenceServerClient(f"127.0.0.1:{server.port}") as aio:
            assert await aio.is_server_live()
            assert await aio.is_server_ready()
            assert await aio.is_model_ready("digits")
            assert (await aio.get_model_metadata("digits"))["platform"] == "pytorch_mcdrop"
            # Concurrent requests, so the batcher may merge them: answers stay per request.
            results = await asyncio.gather(
                *(
                    aio.infer(
                        "digits",
                        [_input(triton_aio, DIGITS, binary)],
                        outputs=[
                            triton_aio.InferRequestedOutput("probabilities", binary_data=binary)
                        ],
                        parameters=MC,
                    )
                    for binary in (True, False, True, False)
                )
            )
            with pytest.raises(InferenceServerException, match="no model named") as missing:
                await aio.infer("nope", [_input(triton_aio, DIGITS, True)])
            assert missing.value.status() == "404"
            return [r.as_numpy("probabilities") for r in results]

    for probabilities in asyncio.run(run()):  # merged or alone: the same to float precision
        np.testing.assert_allclose(
            probabilities, sync.as_numpy("probabilities"), rtol=1e-5, atol=1e-7
        )


@pytest.mark.parametrize("binary", [False, True])
def test_adaptive_sampling(
    client: triton.InferenceServerClient, server: Server, binary: bool
) -> None:
    auto = {"n_samples": "auto", "tolerance": 0.02, "max_n_samples": 300, "seed": 7}
    names = ["probabilities", "n_samples", "samples"]
    result = client.infer(
        "digits",
        [_input(triton, DIGITS, binary)],
        outputs=[triton.InferRequestedOutput(name, binary_data=binary) for name in names],
        parameters=auto,
    )
    assert result.get_response()["parameters"] == {"mode": "uncertainty", **auto, "level": 0.95}
    used = result.as_numpy("n_samples")
    assert used.dtype == np.int64
    with Client(server.url) as native:
        expected = native.uncertainty("digits", DIGITS.tolist(), **auto, return_samples=True)
    assert used.tolist() == [r.n_samples for r in expected.results]
    np.testing.assert_allclose(
        result.as_numpy("probabilities"),
        [r.probabilities for r in expected.results],
        rtol=1e-6,
        atol=1e-7,
    )
    samples = result.as_numpy("samples")  # (S, N, K), NaN past a row's own count
    assert samples.shape == (used.max(), 3, 10)
    for row, r in enumerate(expected.results):
        np.testing.assert_allclose(samples[: used[row], row], r.samples, rtol=1e-6, atol=1e-7)
        assert np.isnan(samples[used[row] :, row]).all()


def test_adaptive_sampling_errors(client: triton.InferenceServerClient) -> None:
    x = [_input(triton, DIGITS, True)]
    with pytest.raises(InferenceServerException, match='only with n_samples "auto"') as fixed:
        client.infer("digits", x, parameters={"n_samples": 10, "tolerance": 0.1})
    assert fixed.value.status() == "400"
    with pytest.raises(InferenceServerException, match="above the limit") as limit:
        client.infer("digits", x, parameters={"n_samples": "auto", "max_n_samples": 10**6})
    assert limit.value.status() == "400"
    with pytest.raises(InferenceServerException, match="tolerance") as zero:
        client.infer("digits", x, parameters={"n_samples": "auto", "tolerance": 0})
    assert zero.value.status() == "400"
