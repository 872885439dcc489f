"""The typed client against the real app (TestClient is an httpx2.Client: no mocks)."""

from __future__ import annotations

import asyncio
import importlib.util
import pickle
import socket
from collections.abc import Iterator

import httpx2
import numpy as np
import pytest
from fastapi.testclient import TestClient

from mcdrop_client import (
    APIError,
    AsyncClient,
    AuthenticationError,
    BadRequestError,
    Client,
    ClientError,
    DecodingError,
    InvalidRequestError,
    InvalidURLError,
    NotFoundError,
    RequestTimeoutError,
    ResponseTooLargeError,
    ServerError,
    ServiceUnavailableError,
    TransportError,
)
from mcdrop_client import client as client_module
from mcdrop_client.schemas import ClassificationUncertainty, RegressionUncertainty
from service.config import Settings
from tests.conftest import BUNDLED

PATIENT = [59, 2, 32.1, 101, 157, 93.2, 38, 4, 4.8598, 87]


@pytest.fixture
def client(http: TestClient) -> Client:
    return Client(http=http)


def test_typed_results(client: Client) -> None:
    assert client.health().status == "ok"
    assert client.ready().status == "ready"
    assert {m.name for m in client.models()} == BUNDLED
    info = client.model("diabetes")
    assert info.task == "regression"
    assert info.input_shape == [10]
    result = client.uncertainty("diabetes", [PATIENT], n_samples=50, seed=2)
    assert isinstance(result.results[0], RegressionUncertainty)
    assert result.results[0].epistemic_variance[0] > 0
    assert client.predict("diabetes", [PATIENT]).predictions[0].mean[0] > 0


def test_classifier_result(client: Client) -> None:
    result = client.uncertainty("digits", [[0.0] * 64], n_samples=10, seed=0, return_samples=True)
    row = result.results[0]
    assert isinstance(row, ClassificationUncertainty)
    assert row.samples is not None
    assert len(row.samples) == 10


def test_auto_n_samples(client: Client) -> None:
    result = client.uncertainty(
        "digits", [[0.0] * 64, [8.0] * 64], n_samples="auto", tolerance=0.02, seed=0
    )
    assert (result.n_samples, result.tolerance, result.max_n_samples) == ("auto", 0.02, 1000)
    assert all(row.n_samples is not None and row.n_samples >= 16 for row in result.results)
    capped = client.uncertainty(
        "diabetes", [PATIENT], n_samples="auto", max_n_samples=20, seed=0, return_samples=True
    )
    row = capped.results[0]
    assert 16 <= (row.n_samples or 0) <= 20
    assert len(row.samples or []) == row.n_samples
    with pytest.raises(BadRequestError, match="auto"):
        client.uncertainty("digits", [[0.0] * 64], n_samples=10, tolerance=0.01)


def test_typed_errors_carry_the_server_message(client: Client) -> None:
    with pytest.raises(NotFoundError) as info:
        client.predict("nope", [PATIENT])
    assert info.value.status_code == 404
    assert "available" in info.value.message
    with pytest.raises(BadRequestError) as bad:
        client.predict("diabetes", [[1, 2]])
    assert bad.value.code == "invalid_input"
    assert "[10]" in bad.value.message


def test_transport_error() -> None:
    with Client("http://127.0.0.1:9", timeout=2) as client, pytest.raises(TransportError):
        client.health()


async def _async_round_trip(http: TestClient) -> None:
    transport = httpx2.ASGITransport(app=http.app)
    async with httpx2.AsyncClient(transport=transport, base_url="http://test") as raw:
        client = AsyncClient(http=raw)
        result = await client.uncertainty("diabetes", [PATIENT], n_samples=20, seed=2)
        assert result.seed == 2
        with pytest.raises(NotFoundError):
            await client.model("nope")


def test_async_client(http: TestClient) -> None:
    asyncio.run(_async_round_trip(http))


# ---- every failure is a typed client error ------------------------------------------------


def test_exported_names() -> None:
    assert set(client_module.__all__) == {
        "APIError",
        "AsyncClient",
        "AuthenticationError",
        "BadRequestError",
        "Client",
        "ClientError",
        "DecodingError",
        "InvalidRequestError",
        "InvalidURLError",
        "NotFoundError",
        "PayloadTooLargeError",
        "RequestTimeoutError",
        "ResponseTooLargeError",
        "ServerError",
        "ServiceUnavailableError",
        "TransportError",
    }
    errors = [getattr(client_module, n) for n in client_module.__all__ if n.endswith("Error")]
    assert all(issubclass(e, ClientError) for e in errors)
    # The tree drawn in the module docstring names every error class.
    assert all(e.__name__ in client_module.__doc__ for e in errors)


@pytest.mark.parametrize(
    "error",
    [
        ServiceUnavailableError(503, "overloaded", "queue full", [{"a": 1}], retry_after=2),
        NotFoundError(404, "model_not_found", "no model 'x'", []),
        RequestTimeoutError("no answer within 1 s", 1.0),
        DecodingError("not JSON", 200, "<html>"),
        ResponseTooLargeError("too large", 200, 1024),
        TransportError("cannot reach"),
    ],
    ids=type,
)
def test_errors_survive_pickling(error: ClientError) -> None:
    """A process pool (concurrent.futures, multiprocessing) sends a worker's error back
    pickled: an error that could not be rebuilt broke the whole pool (BrokenProcessPool), every
    other call's result lost with it."""
    copied = pickle.loads(pickle.dumps(error))
    assert type(copied) is type(error)
    assert str(copied) == str(error)
    assert vars(copied) == vars(error)


@pytest.mark.parametrize(
    "url",
    [
        "not a url",
        "ftp://x",
        "http://",
        "localhost:8000",
        "http://a b",
        "http://[bad",
        "http://x:99999",
        "http://x:port",
        "http://x/?q=1",
        "",
        # urlsplit skips leading blanks and control characters; httpx2 took the whole as a path
        " http://localhost:8000",
        "\x00http://localhost:8000",
    ],
)
@pytest.mark.parametrize("kind", [Client, AsyncClient])
def test_invalid_urls(kind: type, url: str) -> None:
    with pytest.raises(InvalidURLError, match="service URL") as info:
        kind(url)
    assert isinstance(info.value, ValueError)


#: Settings of the environment httpx2 reads (trust_env) and cannot use.
UNUSABLE_ENVIRONMENT = [
    ("HTTP_PROXY", "ftp://proxy:3128"),  # no such proxy scheme: ValueError
    ("SSL_CERT_FILE", "/nonexistent/ca.pem"),  # FileNotFoundError, naming no file
    # SOCKS needs the socksio package: ImportError (where it is missing)
    pytest.param(
        "ALL_PROXY",
        "socks5://127.0.0.1:1080",
        marks=pytest.mark.skipif(
            importlib.util.find_spec("socksio") is not None, reason="socksio is installed"
        ),
    ),
]


@pytest.mark.parametrize(("name", "value"), UNUSABLE_ENVIRONMENT)
@pytest.mark.parametrize("kind", [Client, AsyncClient])
def test_environment_settings_that_cannot_be_used_are_the_clients_errors(
    monkeypatch: pytest.MonkeyPatch, kind: type, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(InvalidURLError) as info:
        kind("http://127.0.0.1:9")
    assert name in str(info.value)


@pytest.mark.parametrize(
    "url", ["http://localhost:8000", "https://mcdrop.example.com/prefix", "http://[::1]:80"]
)
def test_valid_urls(url: str) -> None:
    Client(url).close()


@pytest.mark.parametrize(
    "url",
    [
        "http://user:s3cret@localhost:8000",
        "https://s3cret@mcdrop.example.com/prefix",
        "http://:s3cret@[::1]:80",
        "ftp://user:s3cret@x",  # refused for its password before its scheme: never quoted
        "http://user:s3cret@x:99999",
    ],
)
@pytest.mark.parametrize("kind", [Client, AsyncClient])
def test_urls_with_a_password_are_refused_without_echo(kind: type, url: str) -> None:
    """httpx2 sends a URL's user:password@ as Basic authentication in place of the API key,
    and every error message quotes the request's URL: refused, and the password not shown."""
    with pytest.raises(InvalidURLError, match="user:password@") as info:
        kind(url, api_key="key")
    assert "s3cret" not in str(info.value)
    assert "api_key=" in str(info.value)


# Names with "%" are tested over uvicorn (tests/e2e/test_client_over_http.py): Starlette's
# TestClient decodes a path twice, so "%252e" would reach the app as "." here, never on the wire.
@pytest.mark.parametrize("name", ["a?b", "a#b", "a b", "é", "digits?x=1", "\\"])
def test_model_names_are_one_path_segment(client: Client, name: str) -> None:
    """Whatever the name, the server sees exactly it as the model name (and knows no such
    model): no character changes the route."""
    for call in (lambda: client.model(name), lambda: client.predict(name, [PATIENT])):
        with pytest.raises(NotFoundError) as info:
            call()
        assert info.value.code == "model_not_found"
        assert repr(name) in info.value.message


@pytest.mark.parametrize("name", ["", ".", "..", "../health", "a/b", "digits/predict", "/"])
def test_names_that_cannot_be_a_segment_are_refused(client: Client, name: str) -> None:
    with pytest.raises(InvalidRequestError, match="model name"):
        client.model(name)
    with pytest.raises(InvalidRequestError, match="model name"):
        client.uncertainty(name, [PATIENT])


def test_arrays_are_rows(client: Client) -> None:
    rows = np.zeros((2, 64))
    assert len(client.predict("digits", rows).predictions) == 2
    assert len(client.predict("digits", list(rows)).predictions) == 2


@pytest.mark.parametrize(
    ("integer", "real"),
    [(np.int64, np.float32), (np.int32, np.float16), (np.uint16, np.float64), (np.array, np.array)],
    ids=["int64-float32", "int32-float16", "uint16-float64", "0d-arrays"],
)
def test_numpy_numbers_are_numbers(client: Client, integer: type, real: type) -> None:
    """NumPy's scalars (and 0-d arrays) as parameters and as the values of rows: sent as the
    numbers they hold (they were refused, "Object of type int64 is not JSON serializable")."""
    options = {"n_samples": 20, "seed": 7, "level": 0.5, "reject_rate": 0.25, "coverage": 0.75}
    given = {k: (integer if isinstance(v, int) else real)(v) for k, v in options.items()}
    rows = [[real(value) for value in PATIENT]]
    plain = [[float(value) for value in row] for row in rows]  # the values rows hold
    expected = client.uncertainty("diabetes", plain, **options)
    assert client.uncertainty("diabetes", rows, **given) == expected
    auto = {"n_samples": "auto", "tolerance": 0.125, "max_n_samples": 30, "seed": 1}
    as_numbers = {**auto, "tolerance": real(0.125), "max_n_samples": integer(30)}
    assert client.uncertainty("diabetes", plain, **as_numbers) == client.uncertainty(
        "diabetes", plain, **auto
    )
    assert client.predict("diabetes", rows) == client.predict("diabetes", plain)


@pytest.mark.parametrize(
    ("options", "says"),
    [
        ({"seed": np.True_}, "Object of type bool is not JSON serializable"),
        ({"seed": np.array([7, 8])}, "Object of type ndarray is not JSON serializable"),
        ({"level": np.float32("nan")}, "level holds NaN or infinity"),
        ({"coverage": np.float64("inf")}, "coverage holds NaN or infinity"),
        ({"seed": 1j}, "Object of type complex is not JSON serializable"),
    ],
)
def test_numbers_json_cannot_carry_are_still_refused(
    client: Client, options: dict[str, object], says: str
) -> None:
    with pytest.raises(InvalidRequestError, match=says):
        client.uncertainty("diabetes", [PATIENT], **options)  # type: ignore[arg-type]
    rows = [[*PATIENT[:-1], next(iter(options.values()))]]
    with pytest.raises(InvalidRequestError):
        client.predict("diabetes", rows)


def test_booleans_stay_refused_by_the_service(client: Client) -> None:
    with pytest.raises(BadRequestError, match="seed: Input should be a valid integer"):
        client.uncertainty("diabetes", [PATIENT], seed=True)


def _serving(status: int, body: bytes, content_type: str = "application/json") -> Client:
    """A client of a server that answers every request with ``status`` and ``body`` (httpx2's
    own transport for canned answers: the real service never answers like this)."""

    def answer(_: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(status, content=body, headers={"content-type": content_type})

    transport = httpx2.MockTransport(answer)
    return Client(http=httpx2.Client(transport=transport, base_url="http://mcdrop.test"))


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"<html><body>Bad gateway</body></html>", "not JSON"),
        (b"", "not JSON"),
        (b'{"models": "nope"}', "models"),
        (b"[]", "body"),
        (b'{"models": [{"name": 1}]}', "models.0"),
    ],
)
def test_answers_that_are_not_the_protocol(body: bytes, reason: str) -> None:
    with pytest.raises(DecodingError) as info:
        _serving(200, body).models()
    error = info.value
    assert error.status_code == 200
    assert error.snippet == body.decode()[: client_module.SNIPPET_CHARS]
    assert reason in str(error)
    assert "GET http://mcdrop.test/models" in str(error)
    assert "validation error" not in str(error)  # pydantic's report stays inside
    assert "\n" not in str(error)


def test_snippets_are_short() -> None:
    with pytest.raises(DecodingError) as info:
        _serving(200, b"x" * 10_000, "text/plain").health()
    assert info.value.snippet == "x" * client_module.SNIPPET_CHARS + "..."
    assert len(str(info.value)) < 600


@pytest.mark.parametrize(
    ("status", "body", "kind", "code"),
    [
        (401, b'{"error": {"code": "unauthorized", "message": "key", "details": []}}',
         AuthenticationError, "unauthorized"),
        (502, b"<html>Bad gateway</html>", ServerError, "http_error"),
        (504, b'{"error": {"code": "timeout", "message": "m", "details": []}}',
         ServerError, "timeout"),
        (503, b"upstream down", ServiceUnavailableError, "http_error"),
        (418, b'{"error": {"code": 1, "message": null}}', APIError, "http_error"),
        (422, b'{"error": "flat"}', BadRequestError, "http_error"),
    ],
)  # fmt: skip
def test_error_statuses_are_typed_whatever_the_body(
    status: int, body: bytes, kind: type[APIError], code: str
) -> None:
    with pytest.raises(kind) as info:
        _serving(status, body).models()
    assert type(info.value) is kind
    assert info.value.status_code == status
    assert info.value.code == code


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections and never answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield listener.getsockname()[1]


def test_timeout_says_it_timed_out_and_after_how_long(silent_port: int) -> None:
    url = f"http://127.0.0.1:{silent_port}"
    with Client(url, timeout=0.1) as client, pytest.raises(RequestTimeoutError) as info:
        client.health()
    assert isinstance(info.value, TransportError)
    assert info.value.timeout == 0.1
    message = str(info.value)
    assert f"no answer to GET {url}/health within 0.1 s" in message
    assert "timeout=" in message


def test_async_timeout(silent_port: int) -> None:
    async def call() -> None:
        async with AsyncClient(f"http://127.0.0.1:{silent_port}", timeout=0.1) as client:
            await client.models()

    with pytest.raises(RequestTimeoutError, match=r"within 0\.1 s"):
        asyncio.run(call())


def test_default_timeout_outlasts_the_server_deadline() -> None:
    """A request the server gives up on ends with the server's 504 (which says why), not a
    client timeout: the client waits longer than the server computes."""
    deadline = Settings.model_fields.get("request_timeout_s")
    server_deadline = float(deadline.default) if deadline is not None else 60.0
    with Client() as client:
        timeout = client._http.timeout
    assert timeout.read == client_module.DEFAULT_TIMEOUT >= server_deadline + 10
    assert timeout.connect == client_module.DEFAULT_CONNECT_TIMEOUT


def test_connection_refused_is_a_transport_error() -> None:
    with Client("http://127.0.0.1:9") as client, pytest.raises(TransportError) as info:
        client.models()
    assert not isinstance(info.value, RequestTimeoutError)
    assert "cannot reach" in str(info.value)
    assert "127.0.0.1:9" in str(info.value)


@pytest.mark.parametrize("key", ["has space", "", "tab\there", "non-ascii-é", "new\nline"])
def test_keys_that_cannot_be_sent_are_refused_without_echo(key: str) -> None:
    with pytest.raises(InvalidRequestError, match="API key") as info:
        Client(api_key=key)
    assert not key or key not in str(info.value)


def _authorization(**kwargs: str) -> str | None:
    """The ``Authorization`` header a client made with ``kwargs`` sends (None: none sent)."""
    sent: list[str | None] = []

    def answer(request: httpx2.Request) -> httpx2.Response:
        sent.append(request.headers.get("authorization"))
        return httpx2.Response(200, json={"status": "ok"})

    transport = httpx2.MockTransport(answer)
    http = httpx2.Client(transport=transport, base_url="http://mcdrop.test")
    Client(http=http, **kwargs).health()
    return sent[0]


def test_key_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MCDROP_API_KEY", "from-env")
    assert _authorization() == "Bearer from-env"
    assert _authorization(api_key="given") == "Bearer given"
    monkeypatch.setenv("MCDROP_API_KEY", "")  # set but empty: no key
    assert _authorization() is None
    monkeypatch.delenv("MCDROP_API_KEY")
    assert _authorization() is None


@pytest.mark.parametrize(
    ("retry_after", "seconds"),
    [("3", 3), (" 1 ", 1), (None, None), ("Wed, 21 Oct 2015 07:28:00 GMT", None), ("-1", None),
     ("2.5", None)],
)  # fmt: skip
def test_an_overloaded_service_says_when_to_retry(
    retry_after: str | None, seconds: int | None
) -> None:
    """The service answers 503 overloaded with Retry-After (seconds): the error carries it."""
    body = b'{"error": {"code": "overloaded", "message": "queue full", "details": []}}'
    headers = {} if retry_after is None else {"retry-after": retry_after}

    def answer(_: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(503, content=body, headers=headers)

    http = httpx2.Client(transport=httpx2.MockTransport(answer), base_url="http://mcdrop.test")
    with pytest.raises(ServiceUnavailableError) as info:
        Client(http=http).predict("digits", [[0.0] * 64])
    assert info.value.code == "overloaded"
    assert info.value.retry_after == seconds


def test_readiness_from_something_else_is_the_status_error() -> None:
    with pytest.raises(ServiceUnavailableError):
        _serving(503, b"<html>maintenance</html>", "text/html").ready()
