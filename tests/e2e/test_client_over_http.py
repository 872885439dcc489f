"""The API key and the client's model names, over real HTTP: `mcdrop serve` with
``MCDROP_API_KEY`` set, as a uvicorn process."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator

import httpx2
import pytest

from service.client import AsyncClient, AuthenticationError, Client, NotFoundError
from tests.conftest import CHECKOUT_PATH, ROOT
from tests.e2e.server import Server, clean_env, serve

pytestmark = pytest.mark.slow

#: Distinctive, so the test can look for it in the server's log.
KEY = "mcdrop-test-key-7f3a9c1e"
ROW = [[0.0] * 64]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # The most verbose level: the key must not appear even there.
    tmp = tmp_path_factory.mktemp("auth")
    with serve(tmp, MCDROP_API_KEY=KEY, MCDROP_LOG_LEVEL="trace") as running:
        yield running


@pytest.fixture
def raw(server: Server) -> Iterator[httpx2.Client]:
    with httpx2.Client(base_url=server.url, timeout=30) as http:
        yield http


@pytest.fixture
def no_key_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MCDROP_API_KEY", raising=False)


def _assert_unauthorized(response: httpx2.Response, challenge: str = "Bearer") -> None:
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"] == challenge
    body = response.json()
    assert set(body) == {"error"}
    assert body["error"]["code"] == "unauthorized"
    assert "Authorization: Bearer" in body["error"]["message"] or challenge != "Bearer"
    assert body["error"]["details"] == []
    assert KEY not in response.text


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/models"),
        ("GET", "/models/digits"),
        ("POST", "/models/digits/predict"),
        ("POST", "/models/digits/uncertainty"),
        ("GET", "/docs"),
        ("GET", "/openapi.json"),
        ("GET", "/no-such-route"),  # no route discovery without the key
    ],
)
def test_without_a_key_every_route_but_the_probes_is_401(
    raw: httpx2.Client, method: str, path: str
) -> None:
    body = {"inputs": ROW} if method == "POST" else None
    _assert_unauthorized(raw.request(method, path, json=body))


@pytest.mark.parametrize("path", ["/health", "/ready"])
def test_probes_need_no_key(raw: httpx2.Client, path: str) -> None:
    assert raw.get(path).status_code == 200


def test_a_large_body_without_a_key_is_refused_unread(raw: httpx2.Client) -> None:
    response = raw.post(
        "/models/digits/predict",
        content=b"[" * 20_000_000,  # above the body limit: 413 if it were read
        headers={"content-type": "application/json"},
    )
    _assert_unauthorized(response)


@pytest.mark.parametrize(
    "authorization",
    [
        "Bearer wrong",
        f"Bearer {KEY[:-1]}",
        f"Bearer {KEY}x",
        f"Bearer {KEY.upper()}",
        "Bearer",
        f"Basic {KEY}",
        KEY,
    ],
)
def test_a_wrong_key_is_401(raw: httpx2.Client, authorization: str) -> None:
    response = raw.get("/models", headers={"Authorization": authorization})
    wrong = authorization.startswith("Bearer ")
    _assert_unauthorized(response, 'Bearer error="invalid_token"' if wrong else "Bearer")


def test_the_key_opens_every_route(raw: httpx2.Client) -> None:
    headers = {"Authorization": f"bearer {KEY}"}  # the scheme is case-insensitive
    assert raw.get("/models", headers=headers).status_code == 200
    assert raw.get("/openapi.json", headers=headers).status_code == 200
    assert raw.get("/docs", headers=headers).status_code == 200


def test_the_client_sends_the_key(server: Server, no_key_env: None) -> None:
    with Client(server.url, api_key=KEY) as client:
        assert {m.name for m in client.models()} >= {"digits"}
        assert client.predict("digits", ROW).predictions[0].label
        assert client.uncertainty("digits", ROW, n_samples=10, seed=1).seed == 1

    async def run() -> int:
        async with AsyncClient(server.url, api_key=KEY) as client:
            return len(await client.models())

    assert asyncio.run(run()) >= 1


def test_the_client_reads_the_key_from_the_environment(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MCDROP_API_KEY", KEY)
    with Client(server.url) as client:
        assert client.model("digits").name == "digits"


@pytest.mark.parametrize("key", [None, "wrong"])
def test_the_client_without_the_key_raises_authentication_error(
    server: Server, no_key_env: None, key: str | None
) -> None:
    with Client(server.url, api_key=key) as client:
        assert client.health().status == "ok"
        with pytest.raises(AuthenticationError) as info:
            client.models()
    assert info.value.status_code == 401
    assert info.value.code == "unauthorized"


@pytest.mark.parametrize("key", [KEY, None])
def test_the_cli_reads_url_and_key_from_the_environment(server: Server, key: str | None) -> None:
    env = clean_env(PYTHONPATH=CHECKOUT_PATH, MCDROP_URL=server.url)
    if key is not None:
        env["MCDROP_API_KEY"] = key
    done = subprocess.run(
        [sys.executable, "-m", "service.cli", "models"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if key is not None:
        assert done.returncode == 0, done.stderr
        assert "digits" in done.stdout
    else:
        assert done.returncode == 2  # a 4xx: the request (its missing key) to fix
        assert done.stderr.startswith("mcdrop models: error: 401 unauthorized:")
        assert done.stderr.count("\n") == 1


@pytest.mark.parametrize(
    "name", ["a%b", "%2e%2e", "%2F", "digits%2Fpredict", "a?b", "a#b", "..%2Fhealth", "ünï"]
)
def test_model_names_reach_the_server_as_one_segment(server: Server, name: str) -> None:
    """Percent-escapes in a name stay literal characters of the name: the server sees exactly
    ``name`` and routes to /models/{name} (TestClient decodes twice, so this needs uvicorn)."""
    with Client(server.url, api_key=KEY) as client:
        for call in (lambda: client.model(name), lambda: client.predict(name, ROW)):
            with pytest.raises(NotFoundError) as info:
                call()
            assert info.value.code == "model_not_found"
            assert repr(name) in info.value.message


def test_the_key_never_reaches_the_log(server: Server, raw: httpx2.Client) -> None:
    raw.get("/models", headers={"Authorization": f"Bearer {KEY}"})
    raw.get("/models", headers={"Authorization": f"Bearer {KEY}x"})
    raw.get("/models", headers={"Authorization": KEY})
    log = server.log()
    assert "mcdrop.access: GET /models 401" in log  # the requests are logged ...
    assert KEY not in log  # ... the key is not
