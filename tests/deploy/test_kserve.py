"""deploy/kserve: the InferenceService agrees with the image and the app it runs.

No cluster here: these checks are static (the manifest against the Dockerfile, the settings and
the paths of the app's OpenAPI document); `make image-test` runs the image as the manifest does
(port 8080, read-only root file system, no capabilities, a non-root user).
"""

from __future__ import annotations

import os
import re
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient

from service.app import create_app
from service.config import Settings
from tests.conftest import MODELS, ROOT

MANIFEST = ROOT / "deploy" / "kserve" / "inferenceservice.yaml"
#: The Open Inference Protocol's health routes (issue 11), which the probes use.
V2_HEALTH = {"/v2/health/live", "/v2/health/ready"}
PROBES = ("startupProbe", "livenessProbe", "readinessProbe")


@pytest.fixture(scope="module")
def service() -> dict[str, Any]:
    return yaml.safe_load(MANIFEST.read_text())


@pytest.fixture(scope="module")
def container(service: dict[str, Any]) -> dict[str, Any]:
    (container,) = service["spec"]["predictor"]["containers"]
    return container


@pytest.fixture(scope="module")
def env(container: dict[str, Any]) -> dict[str, str]:
    names = [e["name"] for e in container["env"]]
    assert len(names) == len(set(names)), "a variable set twice"
    return {e["name"]: e["value"] for e in container["env"]}


def _dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def test_is_a_v2_custom_predictor(service: dict[str, Any], container: dict[str, Any]) -> None:
    assert service["apiVersion"] == "serving.kserve.io/v1beta1"
    assert service["kind"] == "InferenceService"
    # KServe's container for a custom predictor, and the protocol it reads for one.
    assert container["name"] == "kserve-container"
    assert {"name": "PROTOCOL", "value": "v2"} in container["env"]


def test_every_mcdrop_variable_is_a_setting_with_a_valid_value(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    ours = {k: v for k, v in env.items() if k.startswith("MCDROP_")}
    unknown = {k for k in ours if k.removeprefix("MCDROP_").lower() not in Settings.model_fields}
    assert not unknown, f"not settings: {unknown}"
    for name in [n for n in os.environ if n.startswith("MCDROP_")]:
        monkeypatch.delenv(name)
    for name, value in ours.items():
        assert isinstance(value, str), f"{name}: Kubernetes wants strings, quote {value!r}"
        monkeypatch.setenv(name, value)
    settings = Settings()  # read from the environment, as in the container
    assert settings.port == 8080
    assert settings.host == "0.0.0.0"
    assert str(settings.model_dir) == re.search(r"MCDROP_MODEL_DIR=(\S+)", _dockerfile())[1]


def test_one_port_and_every_probe_on_it(container: dict[str, Any], env: dict[str, str]) -> None:
    (port,) = container["ports"]
    assert port["containerPort"] == int(env["MCDROP_PORT"])
    for probe in PROBES:
        assert container[probe]["httpGet"]["port"] == port["containerPort"], probe


def test_probes_use_routes_the_app_serves(container: dict[str, Any]) -> None:
    paths = {container[probe]["httpGet"]["path"] for probe in PROBES}
    served = set(create_app(Settings(model_dir=MODELS)).openapi()["paths"])
    assert paths <= served | V2_HEALTH
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    # Models load before the server listens: the startup probe must wait longer than the
    # image's own health check does (its --start-period).
    startup = container["startupProbe"]
    start_period = int(re.search(r"--start-period=(\d+)s", _dockerfile())[1])
    assert startup["periodSeconds"] * startup["failureThreshold"] >= start_period


def test_probe_routes_answer_once_ready(container: dict[str, Any]) -> None:
    """Where this build serves the v2 health routes, they answer 200 once the models are ready
    (until then only the paths are checked, above)."""
    with TestClient(create_app(Settings(model_dir=MODELS))) as http:
        served = set(http.app.openapi()["paths"])
        assert http.get("/ready").status_code == 200  # exit_on_error: loaded before serving
        for probe in PROBES:
            path = container[probe]["httpGet"]["path"]
            if path in served:
                assert http.get(path).status_code == 200, path


def test_runs_as_the_image_user_with_a_read_only_root(container: dict[str, Any]) -> None:
    user = re.search(r"^USER (\d+):(\d+)$", _dockerfile(), re.MULTILINE)
    assert user, "the Dockerfile's USER must be numeric for runAsNonRoot"
    security = container["securityContext"]
    assert security["runAsNonRoot"] is True
    assert (security["runAsUser"], security["runAsGroup"]) == (int(user[1]), int(user[2]))
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]


def test_a_writable_tmp_beside_the_read_only_root(
    service: dict[str, Any], container: dict[str, Any]
) -> None:
    """numba loads the image's mask loops from a copy of their cache in /tmp (else it compiles
    them at every start): /tmp must be an emptyDir volume."""
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in service["spec"]["predictor"]["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]


def _cpus(value: str) -> float:
    return float(value[:-1]) / 1000 if value.endswith("m") else float(value)


def _bytes(value: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    return int(value[:-2]) * units[value[-2:]] if value[-2:] in units else int(value)


def test_resources_fit_the_settings(container: dict[str, Any], env: dict[str, str]) -> None:
    requests, limits = container["resources"]["requests"], container["resources"]["limits"]
    assert _cpus(requests["cpu"]) <= _cpus(limits["cpu"])
    assert _bytes(requests["memory"]) <= _bytes(limits["memory"])
    # As many torch threads and model computations as the CPUs the replica may use.
    assert int(env["MCDROP_TORCH_THREADS"]) <= _cpus(limits["cpu"])
    assert int(env["MCDROP_MAX_CONCURRENCY"]) <= _cpus(limits["cpu"])
    # Above what the server was measured to use (make image-test: ~430 MiB).
    assert _bytes(requests["memory"]) >= 512 * 2**20
