"""The two distributions: ``mcdrop`` (library, service, CLI) and ``mcdrop-client`` (the typed
client and the HTTP contract, in deploy/client), which ``mcdrop`` depends on. A caller of the
service installs the client alone: no torch, FastAPI, scikit-learn or numpy."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from service.client import Client
from tests.conftest import BUNDLED, CLIENT_DIST, ROOT
from tests.e2e.server import serve

#: What the client alone must not bring (distribution names as pip lists them, lower case).
HEAVY = {"torch", "fastapi", "starlette", "uvicorn", "scikit-learn", "numpy", "mcdrop"}
#: Megabytes the client and its dependencies may take, beyond the bare venv's pip and setuptools
#: (14.2 MB measured: pydantic-core 5.3, pydantic 4.3, anyio 1.6, httpx2 1.1, httpcore2, ...).
MAX_MB = 25
PATIENT = [59, 2, 32.1, 101, 157, 93.2, 38, 4, 4.8598, 87]

#: Run by the fresh venv's interpreter: the installed client against the server at argv[1].
CALL = f"""
import json, sys
from importlib.metadata import distributions

import mcdrop_client
from mcdrop_client import Client

with Client(sys.argv[1]) as mc:
    models = [m.name for m in mc.models()]
    result = mc.uncertainty("diabetes", [{PATIENT}], n_samples=50, seed=7)
bare = {{"pip", "setuptools"}}  # what every venv has
size = sum(
    f.locate().stat().st_size
    for d in distributions() if d.metadata["Name"].lower() not in bare
    for f in d.files or () if f.locate().is_file()
)
print(json.dumps({{
    "file": mcdrop_client.__file__,
    "models": models,
    "result": result.model_dump(mode="json"),
    "modules": sorted(sys.modules),
    "mb": size / 1e6,
}}))
"""


def _project(pyproject: Path) -> dict[str, Any]:
    return tomllib.loads(pyproject.read_text())["project"]


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0].lower()


def test_the_service_depends_on_its_client_at_the_same_version() -> None:
    main, client = _project(ROOT / "pyproject.toml"), _project(CLIENT_DIST / "pyproject.toml")
    assert main["version"] == client["version"]
    assert f"{client['name']}=={client['version']}" in main["dependencies"]


def test_the_client_needs_only_pydantic_and_httpx2() -> None:
    # anyio and httpcore2 come with httpx2; the client names them because it imports them (its
    # whole-request deadline), so they add nothing to an install.
    client = _project(CLIENT_DIST / "pyproject.toml")
    assert {_name(r) for r in client["dependencies"]} == {
        "pydantic",
        "httpx2",
        "anyio",
        "httpcore2",
    }


@pytest.mark.parametrize("pyproject", [ROOT / "pyproject.toml", CLIENT_DIST / "pyproject.toml"])
def test_the_license_is_an_spdx_expression(pyproject: Path) -> None:
    # license = { text = "MIT" } made every install print setuptools' deprecation, four times
    # over 60 lines: "By 2027-Feb-18, you need to update your project ... or your builds will
    # no longer be supported". An SPDX string needs setuptools 77.
    with pyproject.open("rb") as file:
        document = tomllib.load(file)
    assert document["project"]["license"] == "MIT"
    assert document["build-system"]["requires"] == ["setuptools>=77"]


@pytest.mark.slow
def test_the_client_alone_installs_without_torch_and_answers_as_the_repos(tmp_path: Path) -> None:
    # The README's install line, from a copy: pip builds in the source folder, and the checkout
    # stays clean. pip fetches pydantic, httpx2 (and setuptools, to build) from the package index.
    source = tmp_path / "client"
    shutil.copytree(
        CLIENT_DIST, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__")
    )
    venv = tmp_path / "venv"
    # No PYTHONPATH: nothing of this checkout may leak into the fresh environment.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("MCDROP")}
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, env=env)
    python = str(venv / "bin" / "python")
    pip = [python, "-m", "pip", "--disable-pip-version-check"]
    install = subprocess.run(
        [*pip, "install", "--quiet", str(source)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert install.returncode == 0, install.stderr
    listed = subprocess.run(
        [*pip, "list", "--format=json"], env=env, capture_output=True, text=True, check=True
    )
    installed = {p["name"].lower().replace("_", "-") for p in json.loads(listed.stdout)}
    assert {"mcdrop-client", "pydantic", "httpx2"} <= installed
    assert not installed & HEAVY

    with serve(tmp_path) as server:
        # -I: the installed client only, never this checkout's (no PYTHONPATH, no cwd on the path).
        called = subprocess.run(
            [python, "-I", "-c", CALL, server.url],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert called.returncode == 0, called.stderr
        with Client(server.url) as mc:
            expected = mc.uncertainty("diabetes", [PATIENT], n_samples=50, seed=7)
    answer = json.loads(called.stdout)
    print(f"mcdrop-client and its dependencies: {answer['mb']:.1f} MB; {sorted(installed)}")
    assert Path(answer["file"]).is_relative_to(venv)
    assert set(answer["models"]) == BUNDLED
    assert answer["result"] == expected.model_dump(mode="json")
    assert not {"torch", "numpy", "fastapi", "service", "mcdrop"} & set(answer["modules"])
    assert answer["mb"] < MAX_MB
