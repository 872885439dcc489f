"""Errors as responses: values JSON cannot carry, the one vocabulary of codes, 405's Allow, and
messages without absolute server paths."""

from __future__ import annotations

import ast
import json
import logging
import math
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

import mcdrop
from service import errors
from service.app import create_app
from service.config import Settings
from service.errors import ServiceError, error_response, is_v2, jsonable, public_message
from service.schemas import ErrorCode
from tests import factories
from tests.conftest import MODELS, ROOT, only_the_bad_one_rejected, wait_for
from tests.service.conftest import check_error_body, wait_ready

ROW = ",".join(["0"] * 10)

# -- values JSON cannot carry -----------------------------------------------------------------


class _BadRepr:
    def __repr__(self) -> str:
        raise RuntimeError("no repr")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (math.nan, "nan"),
        (math.inf, "inf"),
        (-math.inf, "-inf"),
        (1.5, 1.5),
        (7, 7),
        (True, True),
        (None, None),
        ("short", "short"),
        ([math.nan, 1], ["nan", 1]),
        ({"a": math.inf}, {"a": "inf"}),
    ],
)
def test_jsonable_keeps_what_json_carries_and_names_the_rest(value: Any, expected: Any) -> None:
    assert jsonable(value) == expected


@pytest.mark.parametrize(
    "value",
    [10**400, -(10**400), 10**5000, "x" * 10_000, b"\xff" * 1000, _BadRepr(), object()],
    ids=["1e400", "-1e400", "1e5000", "long str", "long bytes", "bad repr", "object"],
)
def test_jsonable_renders_huge_and_odd_values_short(value: Any) -> None:
    text = json.dumps(jsonable(value), allow_nan=False)
    assert len(text) < 200


def test_error_response_never_raises() -> None:
    response = error_response(422, ErrorCode.INVALID_REQUEST, "bad", [{"x": math.nan}])
    assert json.loads(response.body) == {
        "error": {
            "code": "invalid_request",
            "message": "bad",
            "details": [],
            "request_id": None,  # outside a request
        }
    }


# Every top-level field, the inputs scalar and a number inside a row, with the JSON tokens
# Python's json accepts (NaN, Infinity, -Infinity), a number beyond float64 and a huge integer.
TOKENS = ["NaN", "Infinity", "-Infinity", "1e400", "1" + "0" * 400]
FIELDS = {  # where VALUE goes
    "level": '{"inputs": [[ROW]], "level": VALUE}',
    "n_samples": '{"inputs": [[ROW]], "n_samples": VALUE}',
    "seed": '{"inputs": [[ROW]], "seed": VALUE}',
    "return_samples": '{"inputs": [[ROW]], "return_samples": VALUE}',
    "inputs": '{"inputs": VALUE}',
    "row": '{"inputs": [VALUE]}',
    "in a row": '{"inputs": [[0, 0, 0, 0, 0, 0, 0, 0, 0, VALUE]]}',
}


@pytest.mark.parametrize("token", TOKENS)
@pytest.mark.parametrize("field", sorted(FIELDS))
def test_non_finite_and_huge_numbers_in_any_field_are_a_4xx(
    http: TestClient, field: str, token: str
) -> None:
    body = FIELDS[field].replace("ROW", ROW).replace("VALUE", token)
    response = http.post(
        "/models/diabetes/uncertainty",
        content=body,
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] in {"invalid_request", "invalid_input", "limit_exceeded"}
    assert len(response.content) < 2000  # the echo of a 401-digit number is cut


def test_an_integer_too_long_to_parse_is_a_400(http: TestClient) -> None:
    body = f'{{"inputs": [[{ROW}]], "seed": 1{"0" * 5000}}}'
    response = http.post(
        "/models/diabetes/uncertainty", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_json"


def test_a_body_that_is_not_json_says_where_and_why(http: TestClient) -> None:
    # It said "the request body is not valid JSON: JSON decode error", with "field": "17".
    response = http.post(
        "/models/diabetes/uncertainty",
        content=b'{"inputs": [[1, 2]\n "seed": 1}',
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_json"
    assert error["message"] == (
        "the request body is not valid JSON: Expecting ',' delimiter at line 2 column 2"
    )


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b'{"inputs": [[ROW]], "tolerance": ' + b"[" * 5000 + b"]" * 5000 + b"}", "nested"),
        (b'{"inputs": [[ROW]], "x": "\xff"}', "UTF-8"),
        (b'{"inputs": [[ROW]], "seed": 1' + b"0" * 5000 + b"}", "digits"),
    ],
    ids=["nested too deeply", "not UTF-8", "5000 digits"],
)
def test_a_body_json_loads_cannot_parse_says_why(
    http: TestClient, body: bytes, reason: str
) -> None:
    # Valid JSON text that the parser refuses: the message says what to change (it was FastAPI's
    # "There was an error parsing the body", whatever the cause).
    response = http.post(
        "/models/diabetes/uncertainty",
        content=body.replace(b"ROW", ROW.encode()),
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_json"
    assert reason in error["message"]


# -- one vocabulary ----------------------------------------------------------------------------


def test_docstring_table_lists_exactly_the_codes() -> None:
    assert errors.__doc__ is not None
    table = set(re.findall(r"^    ([a-z_]+) +(?:\d{3}|4xx) ", errors.__doc__, re.MULTILINE))
    assert table == {c.value for c in ErrorCode}


def _subclasses(cls: type) -> list[type]:
    return [s for c in cls.__subclasses__() for s in (c, *_subclasses(c))]


def test_every_service_error_has_a_code_of_the_vocabulary() -> None:
    for cls in (ServiceError, *_subclasses(ServiceError)):
        assert cls.code in set(ErrorCode), cls


def _literal_codes(path: Path) -> list[tuple[str, str]]:
    """Codes written in ``path``: ``code = ...`` and the second argument of
    ``error_response(...)``, as a string literal or as ``ErrorCode.NAME`` (its value; mypy holds
    error_response to an ErrorCode, and a name that is no member is kept as written)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "code" for t in node.targets
        ):
            value = node.value
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) == "error_response"
            and len(node.args) >= 2
        ):
            value = node.args[1]
        else:
            continue
        if isinstance(value, ast.Constant) and isinstance(value.value, str):
            found.append((f"{path.name}:{node.lineno}", value.value))
        elif isinstance(value, ast.Attribute) and ast.unparse(value.value).endswith("ErrorCode"):
            member = ErrorCode.__members__.get(value.attr)
            written = f"ErrorCode.{value.attr}"
            found.append((f"{path.name}:{node.lineno}", written if member is None else member))
    return found


def test_no_code_outside_the_vocabulary_in_the_service_source() -> None:
    literals = [c for p in sorted((ROOT / "service").glob("*.py")) for c in _literal_codes(p)]
    assert literals, "the scan finds the literal codes (app.py's body_too_large at least)"
    assert [c for c in literals if c[1] not in set(ErrorCode)] == []


# -- 405 ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("GET", "/models/digits/predict", "POST"),
        ("DELETE", "/models/digits/uncertainty", "POST"),
        ("POST", "/health", "GET, HEAD"),
        ("PUT", "/models/digits", "GET, HEAD"),
        ("OPTIONS", "/ready", "GET, HEAD"),
        ("POST", "/openapi.json", "GET, HEAD"),
    ],
)
def test_405_carries_allow(http: TestClient, method: str, path: str, allow: str) -> None:
    response = http.request(method, path)
    assert response.status_code == 405
    assert response.headers["allow"] == allow
    error = response.json()["error"]
    assert error["code"] == "method_not_allowed"
    assert allow in error["message"]


def test_404_names_the_path(http: TestClient) -> None:
    response = http.get("/nothing/here")
    assert response.status_code == 404
    assert "/nothing/here" in response.json()["error"]["message"]
    assert "slash" not in response.json()["error"]["message"]


@pytest.mark.parametrize(
    ("method", "path", "served"),
    [
        ("POST", "/models/diabetes/predict/", "POST /models/diabetes/predict"),
        ("POST", "/models/diabetes/uncertainty//", "POST /models/diabetes/uncertainty"),
        ("GET", "/health/", "GET, HEAD /health"),
        ("GET", "/models/", "GET, HEAD /models"),
        ("HEAD", "/models/diabetes/", "GET, HEAD /models/diabetes"),
        ("POST", "/v2/models/diabetes/infer/", "POST /v2/models/diabetes/infer"),
        ("GET", "/v2/models/diabetes/", "GET, HEAD /v2/models/diabetes"),
        ("GET", "/v2/health/live/", "GET, HEAD /v2/health/live"),
        ("POST", "/v2/", "GET, HEAD /v2"),
    ],
)
def test_a_trailing_slash_is_a_404_saying_to_remove_it(
    http: TestClient, method: str, path: str, served: str
) -> None:
    """No redirect (Starlette's 307 has no body, and a client following it may resend a POST as
    a GET): a 404 in the path's protocol, as Triton answers a path it does not serve."""
    body = {"inputs": [[0.0] * 10]} if method == "POST" else None
    response = http.request(method, path, json=body, follow_redirects=False)
    assert response.status_code == 404
    assert "location" not in response.headers
    if method == "HEAD":  # (no body)
        return
    error = response.json()["error"]
    message = error if is_v2(path) else error["message"]
    assert message == f"no route serves {path}; remove the trailing slash: {served}"


class _CountingRegex:
    """A route's path pattern that counts the paths it is tried on (and matches them as the
    pattern does)."""

    def __init__(self, pattern: re.Pattern[str]) -> None:
        self.pattern, self.tries = pattern, 0

    def match(self, path: str) -> re.Match[str] | None:
        self.tries += 1
        return self.pattern.match(path)


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/v2/models/diabetes/versions/1/ready/", 404),  # the hint's probe
        ("POST", "/models/diabetes/predict/", 404),
        ("GET", "/models/diabetes/predict", 405),  # Allow's probe
    ],
)
def test_an_error_tries_each_route_pattern_on_the_path_twice_at_most(
    http: TestClient, monkeypatch: pytest.MonkeyPatch, method: str, path: str, status: int
) -> None:
    """Routing tries each pattern once, the probe for what is served (the 404's hint to remove
    a trailing slash, the 405's Allow) once more: not once per method (7), which read a 64 KB
    path seven times over on the event loop (~30 ms a request, /health's p90 0.07 -> 0.29 s
    under a flood of them). Only the routes whose pattern matches are asked about methods."""
    counters = []
    for route in http.app.router.routes:
        counter = _CountingRegex(route.path_regex)
        monkeypatch.setattr(route, "path_regex", counter)
        counters.append((route, counter))
    response = http.request(
        method, path, json={"inputs": [[0.0] * 10]} if method == "POST" else None
    )
    assert response.status_code == status
    served = path.rstrip("/")
    for route, counter in counters:
        if route.path_regex.pattern.match(served) is None:  # (the pattern itself: not counted)
            assert counter.tries <= 2, (route.path, counter.tries)


# -- 500 -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def failing() -> Iterator[TestClient]:
    """The real app (one bundled model) plus a native and a v2 route that raise what no
    handler takes."""
    with tempfile.TemporaryDirectory() as folder:
        shutil.copytree(MODELS / "diabetes", Path(folder) / "diabetes")
        app = create_app(Settings(model_dir=Path(folder)))

        @app.get("/boom")
        @app.get("/v2/boom")
        def boom() -> None:
            raise RuntimeError("a secret detail")

        with TestClient(app) as client:  # re-raises an exception that reaches the server
            yield client


@pytest.mark.parametrize("path", ["/boom", "/v2/boom"])
@pytest.mark.parametrize("sent", ["from-the-client-1", None])
def test_an_unexpected_error_is_a_500_with_the_request_id(
    failing: TestClient, caplog: pytest.LogCaptureFixture, path: str, sent: str | None
) -> None:
    headers = {"x-request-id": sent} if sent else {}
    with caplog.at_level(logging.ERROR, logger="mcdrop.service"):
        response = failing.get(path, headers=headers)
    assert response.status_code == 500
    request_id = response.headers["x-request-id"]
    if sent:
        assert request_id == sent
    else:
        assert re.fullmatch(r"[0-9a-f]{32}", request_id)
    assert "secret" not in response.text
    if path.startswith("/v2"):
        assert response.json() == {"error": "internal server error; see the server log"}
    else:
        error = response.json()["error"]
        assert error["code"] == "internal_error"
        assert error["request_id"] == request_id
    # Logged once, with its traceback, for whoever reads the ID in the log.
    [record] = [r for r in caplog.records if r.exc_info]
    assert "a secret detail" in caplog.text
    assert record.exc_info is not None
    assert record.exc_info[0] is RuntimeError


PUBLIC_ROOT = Path("/srv/app/models")


@pytest.mark.parametrize(
    ("message", "public"),
    [
        (
            "/srv/app/models/diabetes/model.json: not valid JSON",
            "diabetes/model.json: not valid JSON",
        ),
        (
            "[Errno 2] No such file or directory: '/srv/app/models/a/weights.safetensors'",
            "[Errno 2] No such file or directory: 'a/weights.safetensors'",
        ),
        ("failed in /usr/lib/python3/site-packages/mypkg/nets.py", "failed in nets.py"),
        ("/srv/app/modelsx/a.json and /srv/app/models", "a.json and models"),
        ("noise variance is 1/tau; see GET /models", "noise variance is 1/tau; see GET /models"),
        ("a/b/model.json: relative paths stay", "a/b/model.json: relative paths stay"),
    ],
)
def test_public_message(message: str, public: str) -> None:
    assert public_message(message, PUBLIC_ROOT) == public


def test_a_relative_model_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    message = f"{tmp_path}/models/a/model.json, models/b/model.json, mymodels/c/model.json"
    expected = "a/model.json, b/model.json, mymodels/c/model.json"
    assert public_message(message, Path("models")) == expected


# -- messages: the server's words whole, the client's data cut -----------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("name", "'name'"),
        ("x" * 101, f"{'x' * 100!r}... (101 characters)"),
        ([1, 10], "[1, 10]"),
        (list(range(12)), "[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, ... and 2 more]"),
        (10**400, "an integer of about 400 digits"),
        (_BadRepr(), "_BadRepr"),
    ],
)
def test_echo_cuts_client_data(value: Any, expected: str) -> None:
    assert errors.echo(value) == expected


def test_bounded_keeps_the_start_and_the_end() -> None:
    assert errors.bounded("short") == "short"
    message = "start " + "x" * 10_000 + " what to fix"
    cut = errors.bounded(message)
    assert len(cut) < errors.MAX_MESSAGE_CHARS + 100
    assert cut.startswith("start ")
    assert cut.endswith(" what to fix")
    assert "characters left out" in cut


#: A value n_samples does not take, on either API.
BAD_N_SAMPLES = [0, -1, "10", 2.5, "many", True, {"a": 1}]


def _n_samples_message(http: TestClient, api: str, value: Any) -> tuple[int, str]:
    if api == "native":
        response = http.post(
            "/models/diabetes/uncertainty", json={"inputs": [[0.0] * 10], "n_samples": value}
        )
        return response.status_code, response.json()["error"]["message"]
    tensor = {"name": "x", "shape": [1, 10], "datatype": "FP32", "data": [0.0] * 10}
    response = http.post(
        "/v2/models/diabetes/infer", json={"inputs": [tensor], "parameters": {"n_samples": value}}
    )
    return response.status_code, response.json()["error"]


@pytest.mark.parametrize("value", BAD_N_SAMPLES, ids=repr)
@pytest.mark.parametrize("api", ["native", "v2"])
def test_a_bad_n_samples_is_one_clear_message(http: TestClient, api: str, value: Any) -> None:
    status, message = _n_samples_message(http, api, value)
    assert status == (422 if api == "native" else 400)
    assert "n_samples: must be an integer from 1 to the server's max_n_samples" in message
    assert message.endswith(f"or 'auto'; got {json.dumps(value)}"), message
    # pydantic's names for the branches of the union stay inside
    for internal in ("function-before", "constrained-int", "literal[", "Input should"):
        assert internal not in message


@pytest.mark.parametrize(
    ("path", "body", "words"),
    [
        (
            "/models/diabetes/uncertainty",
            {"inputs": [[0.0] * 10], "max_n_samples": 10, "tolerance": 0.1},
            'send "n_samples": "auto" or leave tolerance and max_n_samples out',
        ),
        (
            "/v2/models/diabetes/infer",
            {
                "inputs": [{"name": "x", "shape": [1, 10], "datatype": "FP32", "data": [0] * 10}],
                "parameters": {"max_n_samples": 10, "tolerance": 0.1},
            },
            'send "n_samples": "auto" or leave tolerance and max_n_samples out',
        ),
    ],
)
def test_the_servers_own_explanation_is_never_cut(
    http: TestClient, path: str, body: dict[str, Any], words: str
) -> None:
    response = http.post(path, json=body)
    error = response.json()["error"]
    message = error if isinstance(error, str) else error["message"]
    assert message.endswith(words), message
    assert "Value error" not in response.text
    assert "characters)" not in message


def _v2_input(**fields: Any) -> dict[str, Any]:
    return {"name": "x", "shape": [1, 10], "datatype": "FP32", "data": [0.0] * 10, **fields}


# case -> (request body, path, a piece of the bounded echo)
V2_ECHOES: dict[str, tuple[dict[str, Any], str, str]] = {
    "many inputs": (
        # 200 inputs of 4 fields: under the 1,024 keys a body may hold (dataplane.check_keys),
        # and of one value each, under the values (check_values)
        {"inputs": [_v2_input(name="n" * 40, data=[0.0])] * 200},
        "/v2/models/diabetes/infer",
        "... and 190 more]",
    ),
    "long input name": (
        {"inputs": [_v2_input(name="n" * 100_000, shape=[1, 9])]},
        "/v2/models/diabetes/infer",
        "... (100000 characters)",
    ),
    "long shape": (
        # (under the values a body may hold here, 50 rows of 10 and 1,024 more: check_values)
        {"inputs": [_v2_input(shape=[1] * 1_000)]},
        "/v2/models/diabetes/infer",
        "... and 990 more]",
    ),
    "long datatype": (
        {"inputs": [_v2_input(datatype="F" * 5000)]},
        "/v2/models/diabetes/infer",
        "... (5000 characters)",
    ),
    "long output name": (
        {"inputs": [_v2_input()], "outputs": [{"name": "o" * 5000}]},
        "/v2/models/diabetes/infer",
        "... (5000 characters)",
    ),
    "long parameter name": (
        {"inputs": [_v2_input()], "parameters": {"p" * 5000: 1}},
        "/v2/models/diabetes/infer",
        "... (5000 characters)",
    ),
    "long version": (
        {"inputs": [_v2_input()]},
        "/v2/models/diabetes/versions/" + "9" * 5000 + "/infer",
        "... (5000 characters)",
    ),
}


@pytest.mark.parametrize("case", sorted(V2_ECHOES))
def test_v2_errors_echo_client_data_cut(http: TestClient, case: str) -> None:
    body, path, words = V2_ECHOES[case]
    response = http.post(path, json=body)
    assert 400 <= response.status_code < 500, response.text
    assert len(response.content) < 1000, response.text[:2000]
    assert words in response.json()["error"]


def test_native_errors_echo_client_data_cut(http: TestClient) -> None:
    extra = {f"{i}{'k' * 150}": 1 for i in range(1000)}
    response = http.post("/models/diabetes/uncertainty", json={"inputs": [[0.0] * 10], **extra})
    assert response.status_code == 422
    error = response.json()["error"]
    assert len(error["details"]) == 20  # of 1000
    assert error["message"].endswith("; and 995 more")
    assert all(len(d["field"]) < 150 for d in error["details"])
    assert len(response.content) < 10_000


def test_a_long_unknown_path_is_cut_but_the_advice_kept(http: TestClient) -> None:
    response = http.delete("/models/diabetes/predict")
    assert response.json()["error"]["message"].endswith("; use POST")
    response = http.get("/" + "p" * 5000)
    message = response.json()["error"]["message"]
    assert message.startswith("no route serves /ppp")
    assert message.endswith("(5001 characters)")


@pytest.mark.parametrize("path", ["/models/{}/predict", "/v2/models/{}/infer"])
def test_an_unknown_model_name_is_quoted_cut(http: TestClient, path: str) -> None:
    response = http.post(path.format("m" * 5000), json={"inputs": [[0.0] * 10]})
    assert response.status_code == 404, response.text[:300]
    assert "(5000 characters)" in response.text
    assert len(response.content) < 1000


# -- what the model's own forward raises ---------------------------------------------------------

#: A row of token ids within the :class:`factories.GatedTokens` vocabulary (10), and rows the
#: model's forward raises IndexError on: an id past the vocabulary, an id below zero.
GOOD_IDS = [1, 2, 3, 4]
BAD_IDS = {"past the vocabulary": [1, 2, 300, 4], "negative": [1, -2, 3, 4]}

#: Each native inference body (the ``inputs`` added), and its route.
NATIVE_CALLS = {
    "predict": ("predict", {}),
    "uncertainty": ("uncertainty", {"n_samples": 8, "seed": 1}),
    "auto": ("uncertainty", {"n_samples": "auto", "max_n_samples": 64, "seed": 1}),
}


@pytest.fixture(scope="module")
def token_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tokens`` (:class:`factories.GatedTokens`), ``tokens_mode`` (the same asking
    ``mcdrop.is_sampling()``: its passes run under mcdrop's torch-function mode), and
    :class:`factories.Picky` models that on a value above 100 run out of memory (``hungry``),
    raise ``StopIteration`` (``stops``) or ``SystemExit`` (``exits``)."""
    folder = tmp_path_factory.mktemp("token_models")
    factories.save_gated_tokens(folder / "tokens")
    factories.save_gated_tokens(folder / "tokens_mode", asks=True)
    torch.manual_seed(0)
    for name, error in (
        ("hungry", "memory"),
        ("stops", "stop_iteration"),
        ("exits", "system_exit"),
    ):
        mcdrop.save(
            factories.Picky(error=error), folder / name, task="regression", input_shape=[3],
            labels=["y"], factory="tests.factories:Picky", params={"error": error}, tau=1.0,
        )  # fmt: skip
    return folder


@pytest.fixture(scope="module", params=[True, False], ids=["batching", "unbatched"])
def tokens_http(request: pytest.FixtureRequest, token_models: Path) -> Iterator[TestClient]:
    settings = Settings(
        model_dir=token_models, allowed_factories=("tests.factories",), batching=request.param
    )
    with TestClient(create_app(settings)) as client:
        client.event_hooks["response"].append(check_error_body)
        wait_ready(client)
        yield client


def _rejected(response: Any, name: str = "IndexError") -> str:
    """The message of a ``model_rejected_input`` answer naming exception ``name``."""
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "model_rejected_input"
    assert error["details"] == [{"field": "inputs", "type": name}]
    assert error["request_id"] == response.headers["x-request-id"]
    message: str = error["message"]
    assert message.startswith(f"the model raised {name} on this request's inputs: ")
    assert message.endswith("e.g. token ids within its vocabulary)")
    return message


@pytest.mark.parametrize("model", ["tokens", "tokens_mode"])
@pytest.mark.parametrize("call", sorted(NATIVE_CALLS))
@pytest.mark.parametrize("ids", sorted(BAD_IDS))
def test_ids_the_model_refuses_are_a_422_naming_its_error(
    tokens_http: TestClient, caplog: pytest.LogCaptureFixture, model: str, call: str, ids: str
) -> None:
    route, options = NATIVE_CALLS[call]
    path = f"/models/{model}/{route}"
    with caplog.at_level(logging.WARNING, logger="mcdrop.service"):
        response = tokens_http.post(path, json={"inputs": [GOOD_IDS, BAD_IDS[ids]], **options})
    message = _rejected(response)
    assert "index out of range in self" in message
    assert "Traceback" not in message
    assert ".py" not in message
    # Logged as a warning, with its traceback.
    [record] = [r for r in caplog.records if r.exc_info]
    assert record.levelno == logging.WARNING
    assert record.exc_info is not None
    assert record.exc_info[0] is IndexError
    # The model still serves good ids.
    assert tokens_http.post(path, json={"inputs": [GOOD_IDS], **options}).status_code == 200


@pytest.mark.parametrize("mode", ["predict", "uncertainty"])
def test_v2_ids_the_model_refuses_are_a_400_naming_its_error(
    tokens_http: TestClient, mode: str
) -> None:
    tensor = {"name": "inputs", "shape": [1, 4], "datatype": "FP32", "data": BAD_IDS["negative"]}
    body = {"inputs": [tensor], "parameters": {"mode": mode}}
    response = tokens_http.post("/v2/models/tokens/infer", json=body)
    assert response.status_code == 400, response.text
    message = response.json()["error"]
    assert message.startswith("the model raised IndexError on this request's inputs: index out")
    tensor["data"] = GOOD_IDS
    assert tokens_http.post("/v2/models/tokens/infer", json=body).status_code == 200


@pytest.mark.parametrize("path", ["/models/hungry/predict", "/v2/models/hungry/infer"])
def test_running_out_of_memory_in_the_forward_stays_a_500(
    tokens_http: TestClient, caplog: pytest.LogCaptureFixture, path: str
) -> None:
    row = [1e3, 0.0, 0.0]
    body = (
        {"inputs": [{"name": "inputs", "shape": [1, 3], "datatype": "FP32", "data": row}]}
        if path.startswith("/v2")
        else {"inputs": [row]}
    )
    with caplog.at_level(logging.ERROR, logger="mcdrop.service"):
        response = tokens_http.post(path, json=body)
    assert response.status_code == 500, response.text
    assert "internal server error; see the server log" in response.text
    assert "allocate" not in response.text
    assert [r.levelno for r in caplog.records if r.exc_info] == [logging.ERROR]


def _call(client: TestClient, model: str, call: str, row: list[float]) -> Any:
    if call == "v2":
        tensor = {"name": "inputs", "shape": [1, 3], "datatype": "FP32", "data": row}
        return client.post(f"/v2/models/{model}/infer", json={"inputs": [tensor]})
    route, options = NATIVE_CALLS[call]
    return client.post(f"/models/{model}/{route}", json={"inputs": [row], **options})


@pytest.mark.parametrize("call", [*sorted(NATIVE_CALLS), "v2"])
def test_a_stop_iteration_of_the_model_is_answered_at_once_naming_it(
    tokens_http: TestClient, call: str
) -> None:
    """A future refuses a StopIteration (the request waited out its 60 s deadline, then a 504),
    and the chunk generator turns one into a RuntimeError (a 500): both answered as the
    model's own error on the request's inputs."""
    started = time.monotonic()
    response = _call(tokens_http, "stops", call, [1e3, 0.0, 0.0])
    assert time.monotonic() - started < 20
    if call == "v2":
        assert response.status_code == 400, response.text
        assert response.json()["error"].startswith("the model raised StopIteration on this")
    else:
        assert response.status_code == 422, response.text
        assert response.json()["error"]["details"] == [{"field": "inputs", "type": "StopIteration"}]
    assert _call(tokens_http, "stops", call, [1.0, 0.0, 0.0]).status_code == 200


@pytest.mark.parametrize("call", [*sorted(NATIVE_CALLS), "v2"])
def test_a_system_exit_of_the_model_is_a_500_and_the_server_serves_on(
    tokens_http: TestClient, call: str
) -> None:
    """A model's SystemExit is no request to stop the server (it did: uvicorn's lifespan ended
    and the process exited)."""
    response = _call(tokens_http, "exits", call, [1e3, 0.0, 0.0])
    assert response.status_code == 500, response.text
    assert "internal server error; see the server log" in response.text
    assert _call(tokens_http, "exits", call, [1.0, 0.0, 0.0]).status_code == 200
    assert tokens_http.get("/ready").status_code == 200


def test_only_the_request_whose_ids_the_model_refuses_fails(tmp_path: Path) -> None:
    # One worker, held by a large request (factories.GatedTokens' hold) while the others queue: once
    # it is released they all run as one merged batch, the bad request among the good ones;
    # that batch fails, and each request runs again alone.
    gate = tmp_path / "released"
    factories.save_gated_tokens(tmp_path / "models" / "tokens", hold=str(gate))
    settings = Settings(
        model_dir=tmp_path / "models",
        allowed_factories=("tests.factories",),
        inline_max_ms=0.0,
        max_concurrency=1,
        short_work_ms=0.0,
    )
    path = "/models/tokens/uncertainty"
    requests = [[[i % 10, 1, 2, 3]] for i in range(6)]
    requests.insert(3, [BAD_IDS["past the vocabulary"]])
    responses: list[Any] = [None] * len(requests)
    try:
        with TestClient(create_app(settings)) as http:
            wait_ready(http)
            alone = [
                http.post(path, json={"inputs": rows, "n_samples": 20, "seed": 5})
                for rows in requests
            ]
            batcher = http.app.state.registry.get("tokens").batcher

            def hold() -> None:
                rows = [GOOD_IDS] * factories.HOLD_ROWS
                assert http.post("/models/tokens/predict", json={"inputs": rows}).status_code == 200

            def call(i: int) -> None:
                body = {"inputs": requests[i], "n_samples": 20, "seed": 5}
                responses[i] = http.post(path, json=body)

            holder = threading.Thread(target=hold)
            before = batcher.batches + 1  # the holder's
            holder.start()
            wait_for(lambda: batcher.batches == before and batcher.long.running == 1)
            threads = [threading.Thread(target=call, args=(i,)) for i in range(len(requests))]
            for t in threads:
                t.start()
            wait_for(lambda: len(batcher.pending) == len(requests))
            assert holder.is_alive()  # (held: the queued requests wait for it)
            gate.touch()
            for t in [holder, *threads]:
                t.join()
            assert batcher.batches - before == 1  # the requests ran as one merged batch
            assert http.get("/health").status_code == 200
    finally:
        gate.touch()
    only_the_bad_one_rejected(responses, alone, 3, _rejected)


class _Says(torch.nn.Module):
    """A forward that raises ``kind`` (ValueError) with ``text``."""

    def __init__(self, text: str, kind: type[Exception] = ValueError) -> None:
        super().__init__()
        self.text = text
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise self.kind(self.text)


def _from_the_forward(text: str, kind: type[Exception] = ValueError) -> BaseException:
    try:
        mcdrop.predict(_Says(text, kind), torch.ones(1, 3))
    except kind as exc:
        return exc
    raise AssertionError("the forward raised nothing")


#: What model_rejected_input says to check: the values, and the ids where an index is out of
#: range (an embedding's).
CHECK_VALUES = "(check that the values are within what the model takes)"
CHECK_IDS = (
    "(check that the values are within what the model takes, e.g. token ids within its vocabulary)"
)


@pytest.mark.parametrize(
    ("kind", "text", "hint"),
    [
        (IndexError, "index out of range in self", CHECK_IDS),
        (IndexError, "list index out of range", CHECK_IDS),
        (RuntimeError, "index 7 is out of bounds for dimension 0 with size 5", CHECK_IDS),
        (ValueError, "an input above 100: out of range", CHECK_VALUES),
        (AssertionError, "", CHECK_VALUES),
        (TypeError, "expected a category in (a, b)", CHECK_VALUES),
    ],
)
def test_the_hint_fits_the_models_error(kind: type[Exception], text: str, hint: str) -> None:
    """Token ids only where an index is out of range (every message ended with them)."""
    rejected = errors.model_rejected(_from_the_forward(text, kind), "m")
    assert rejected is not None
    said = f": {text}" if text else ""
    assert rejected.message == (
        f"the model raised {kind.__name__} on this request's inputs{said} {hint}"
    )


def test_the_models_words_are_echoed_cut_first_line_only() -> None:
    text = "a value the model does not take: " + "x" * 500 + "\n  File /srv/app/net.py, line 3"
    rejected = errors.model_rejected(_from_the_forward(text), "m")
    assert rejected is not None
    assert rejected.status_code == 422
    assert "x" * errors.MAX_ECHO_CHARS not in rejected.message
    assert f"... ({len(text.splitlines()[0])} characters)" in rejected.message
    assert "net.py" not in rejected.message
    short = errors.model_rejected(_from_the_forward("see /srv/app/vocab/tokens.txt"), "m")
    assert short is not None
    assert "see tokens.txt (check" in short.message
    empty = errors.model_rejected(_from_the_forward(""), "m")
    assert empty is not None
    assert empty.message.startswith("the model raised ValueError on this request's inputs (check")


def test_an_error_of_the_services_own_code_is_not_the_models() -> None:
    # (no model on its traceback: raised by code of the service's own)
    with pytest.raises(KeyError) as raised:
        {}["a key"]
    assert errors.model_rejected(raised.value, "m") is None
