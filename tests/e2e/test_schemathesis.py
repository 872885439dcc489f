"""schemathesis against a real uvicorn server, with every check it has.

The served OpenAPI schema cannot say which rows a model takes (the model is a path parameter),
so generated rows almost never fit one and inference would only ever be refused. The run
therefore also gets, for each small bundled model, the same operations at the model's own path
with the exact row shape and the server's limits (:func:`per_model_schema`): there schema-valid
requests reach the model, and a 200's body is checked against the schema. The server's limits
are set so that any schema-valid rows × n_samples is within them.

Excluded: nothing. positive_data_acceptance lets a 422 through (see ``schemathesis.toml``), and
``schemathesis_hooks.py`` holds such a 422 to the codes the schema cannot rule out.

``FUZZ_EXAMPLES`` (default 25 per operation) and ``FUZZ_SEED`` (default 1; ``random`` for a fresh
one) set the run's size and seed: ``make fuzz`` runs a larger one.
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx2
import pytest

from service.schemas import FLOAT32_MAX
from tests.conftest import ROOT
from tests.e2e.server import serve

pytestmark = pytest.mark.slow

HERE = Path(__file__).parent
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "25"))
SEED = os.environ.get("FUZZ_SEED", "1")
#: Small limits: rows × n_samples of any schema-valid request is within both products.
LIMITS = {
    "MCDROP_MAX_REQUEST_ROWS": "8",
    "MCDROP_MAX_N_SAMPLES": "200",
    "MCDROP_MAX_ROW_SAMPLES": "1600",
    "MCDROP_MAX_RETURNED_SAMPLES": "1600",
}
#: Models with more input values than this get no path of their own: hypothesis cannot draw
#: rows of 784 numbers within its data budget (fashion is fuzzed through /models/{name}/...).
MAX_ROW_VALUES = 100


def _exact_row(shape: list[int]) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "number", "minimum": -FLOAT32_MAX, "maximum": FLOAT32_MAX}
    for size in reversed(shape):
        schema = {"type": "array", "items": schema, "minItems": size, "maxItems": size}
    return schema


def _decisions_of(properties: dict[str, Any], calibration: dict[str, Any] | None) -> None:
    """The decision options as the model offers them: its task's reject scores and the most
    coverage its calibration gives (the options go, but an explicit threshold, without one)."""
    if calibration is None:
        for name in ("reject_rate", "reject_score", "coverage"):
            properties.pop(name)
        return
    score = properties["reject_score"]["anyOf"][0]
    assert score["type"] == "string"
    score["enum"] = calibration["reject_scores"]
    coverage = properties["coverage"]["anyOf"][0]
    assert coverage["type"] == "number"
    coverage["maximum"] = calibration["max_coverage"]


def per_model_schema(base: str) -> dict[str, Any]:
    """The served schema plus ``/models/<name>/predict`` and ``/uncertainty`` for each model of
    at most :data:`MAX_ROW_VALUES` input values: the same operations with the model's exact row
    shape, ``max_request_rows`` and ``max_n_samples``, and the decisions it offers."""
    schema = httpx2.get(f"{base}/openapi.json").json()
    components = schema["components"]["schemas"]
    for model in httpx2.get(f"{base}/models").json()["models"]:
        if math.prod(model["input_shape"]) > MAX_ROW_VALUES:
            continue
        name = model["name"]
        for op in ("predict", "uncertainty"):
            path = copy.deepcopy(schema["paths"][f"/models/{{name}}/{op}"])
            post = path["post"]
            post["operationId"] += f"_{name}"
            post["parameters"] = [p for p in post.get("parameters", []) if p["name"] != "name"]
            body = post["requestBody"]["content"]["application/json"]["schema"]
            request = copy.deepcopy(components[body["$ref"].rsplit("/", 1)[1]])
            inputs = request["properties"]["inputs"]
            inputs["items"] = _exact_row(model["input_shape"])
            inputs["maxItems"] = model["max_request_rows"]
            for field in ("n_samples", "max_n_samples"):  # the int of int | "auto" | null
                if field in request["properties"]:
                    number = request["properties"][field]["anyOf"][0]
                    assert number["type"] == "integer"
                    number["maximum"] = model["max_n_samples"]
            if op == "uncertainty":
                _decisions_of(request["properties"], model["calibration"])
            components[f"{request['title']}_{name}"] = request
            body["$ref"] = f"#/components/schemas/{request['title']}_{name}"
            schema["paths"][f"/models/{name}/{op}"] = path
    return schema


def test_schemathesis_all_checks(tmp_path: Path) -> None:
    assert int(LIMITS["MCDROP_MAX_REQUEST_ROWS"]) * int(LIMITS["MCDROP_MAX_N_SAMPLES"]) <= min(
        int(LIMITS["MCDROP_MAX_ROW_SAMPLES"]), int(LIMITS["MCDROP_MAX_RETURNED_SAMPLES"])
    )
    with serve(tmp_path, **LIMITS) as server:
        base = server.url
        schema_path = tmp_path / "openapi.json"
        schema = per_model_schema(base)
        assert {"/models/digits/predict", "/models/diabetes/uncertainty"} <= set(schema["paths"])
        schema_path.write_text(json.dumps(schema))
        report = tmp_path / "report.json"
        seed = [] if SEED == "random" else ["--seed", SEED]
        run = subprocess.run(
            [
                *(sys.executable, "-m", "schemathesis.cli"),
                *("--config-file", str(HERE / "schemathesis.toml")),
                *("run", str(schema_path), "--url", base, "--checks", "all"),
                *("--max-examples", str(EXAMPLES), *seed, "--workers", "1"),
                *("--generation-database", "none", "--no-color"),
                *("--report", "json", "--report-json-path", str(report)),
            ],
            cwd=tmp_path,  # where schemathesis keeps its cache of crashes
            env={
                **os.environ,
                "SCHEMATHESIS_HOOKS": "tests.e2e.schemathesis_hooks",
                "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            },
            capture_output=True,
            text=True,
            timeout=max(240, 6 * EXAMPLES),
        )
    summary = json.loads(report.read_text())
    cases = summary["test_cases"]
    print(f"schemathesis: {cases['generated']} cases, {cases['with_failures']} failed")
    assert run.returncode == 0, run.stdout[-20_000:] + run.stderr[-5_000:]
    assert cases["with_failures"] == 0
    assert cases["generated"] >= 10 * EXAMPLES  # every operation ran, not just a few
