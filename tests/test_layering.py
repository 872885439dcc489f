"""One-way dependencies and the public API."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import mcdrop
import mcdrop_client
from mcdrop_client import client as client_module
from mcdrop_client import schemas as contract
from service import client, schemas


def _loaded_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


#: Core modules that need an optional package, imported only where it is there: Triton's mask
#: kernels, for keys on a CUDA GPU (mcdrop.masks imports them on the first such keys).
OPTIONAL = {"triton_masks"}
#: Every module of the core: the package minus its recipes (found, so a new module is covered).
CORE = sorted(
    f"mcdrop.{m.name}"
    for m in pkgutil.iter_modules(mcdrop.__path__)
    if m.name != "recipes" and m.name not in OPTIONAL
)
#: What the core never needs: the recipes' extras, plotting, the service's stack, and Triton
#: (on the CPU).
HEAVY = (
    "sklearn", "tqdm", "matplotlib", "fastapi", "starlette", "uvicorn", "httpx2", "service",
    "triton",
)  # fmt: skip


def _loaded_by_each(*statements: str) -> list[set[str]]:
    """The top-level packages and the mcdrop modules each statement adds to ``sys.modules``,
    run one after the other in a fresh interpreter."""
    step = "out.append(sorted(set(sys.modules) - seen)); seen = set(sys.modules)"
    code = "import json, sys; seen = set(sys.modules); out = []\n"
    code += "".join(f"{statement}\n{step}\n" for statement in statements)
    code += "print(json.dumps(out))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return [
        {n for n in names if "." not in n or n.startswith("mcdrop.")}
        for names in json.loads(out.stdout)
    ]


# The core's two checks each start an interpreter that imports torch (about 2 s): slow.
@pytest.mark.slow
def test_core_loads_no_recipe_plotting_or_service_module() -> None:
    # torch itself imports tqdm when it is installed (torch.hub): what counts is what the core
    # adds on top of torch.
    _, core, recipes = _loaded_by_each(
        "import torch",
        "import " + ", ".join(["mcdrop", *CORE]),
        "import mcdrop.recipes.train, mcdrop.recipes.evaluate",
    )
    assert {"mcdrop.predictor", "mcdrop.checkpoint", "mcdrop.stats"} <= set(CORE) <= core
    assert not core & set(HEAVY)
    assert not {name for name in core if name.startswith("mcdrop.recipes")}
    assert "mcdrop.recipes.train" in recipes
    assert not recipes & {"fastapi", "starlette", "uvicorn", "service", "httpx2"}


@pytest.mark.slow
def test_core_imports_without_the_heavy_packages() -> None:
    # A module set to None in sys.modules cannot be imported: the core must not need it.
    blocked = "; ".join(f"sys.modules[{name!r}] = None" for name in HEAVY)
    code = f"import sys; {blocked}; import " + ", ".join(["mcdrop", *CORE])
    subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)


@pytest.mark.parametrize(
    "statement",
    [
        "import service.client",
        "import service.schemas",
        "import mcdrop_client",
        "import mcdrop_client.schemas",
    ],
)
def test_client_loads_neither_torch_nor_fastapi(statement: str) -> None:
    loaded = _loaded_after(statement)
    assert not {"torch", "fastapi", "starlette", "mcdrop", "numpy"} & loaded


def test_client_package_stands_alone() -> None:
    # What an install of mcdrop-client alone lacks: mcdrop_client must import without any of it.
    absent = ("torch", "numpy", "fastapi", "starlette", "uvicorn", "sklearn", "mcdrop", "service")
    blocked = "; ".join(f"sys.modules[{name!r}] = None" for name in absent)
    code = f"import sys; {blocked}; import mcdrop_client, mcdrop_client.schemas"
    subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)


def test_service_names_are_the_clients_objects() -> None:
    """``service.client`` and ``service.schemas`` are the same client and contract, not copies."""
    assert client.__all__ == mcdrop_client.__all__ == client_module.__all__
    assert all(getattr(client, n) is getattr(mcdrop_client, n) for n in client.__all__)
    assert schemas.__all__ == contract.__all__
    assert all(getattr(schemas, n) is getattr(contract, n) for n in contract.__all__)


@pytest.mark.parametrize("module", [mcdrop, client, mcdrop_client])
def test_public_api_is_sorted_and_real(module) -> None:
    # ruff's order (RUF022): constants first, then the rest as sorted() orders them.
    assert module.__all__ == sorted(module.__all__, key=lambda n: (not n.isupper(), n))
    for name in module.__all__:
        assert hasattr(module, name)


@pytest.mark.slow
def test_service_serves_the_bundled_models_without_the_recipe_extras(root: Path) -> None:
    # What the Dockerfile installs: the package without extras (no scikit-learn, tqdm, matplotlib).
    code = f"""
import sys, time
for name in ("sklearn", "tqdm", "matplotlib"):
    sys.modules[name] = None
from fastapi.testclient import TestClient
from service.app import create_app
from service.config import Settings
with TestClient(create_app(Settings(model_dir={str(root / "models")!r}))) as http:
    deadline = time.monotonic() + 60
    while http.get("/ready").status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.05)
    response = http.post("/models/digits/uncertainty", json={{"inputs": [[0.0] * 64], "seed": 1}})
    print(http.get("/ready").status_code, response.status_code)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["200", "200"]
