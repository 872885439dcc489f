"""One-way dependencies and the public API."""

from __future__ import annotations

import subprocess
import sys

import pytest

import mcdrop
from service import client


def _loaded_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_library_never_imports_the_service() -> None:
    loaded = _loaded_after("import mcdrop, mcdrop.train")
    assert not {"fastapi", "starlette", "uvicorn", "service", "httpx2"} & loaded


@pytest.mark.parametrize("statement", ["import service.client", "import service.schemas"])
def test_client_loads_neither_torch_nor_fastapi(statement: str) -> None:
    loaded = _loaded_after(statement)
    assert not {"torch", "fastapi", "starlette", "mcdrop"} & loaded


@pytest.mark.parametrize("module", [mcdrop, client])
def test_public_api_is_sorted_and_real(module) -> None:
    assert module.__all__ == sorted(module.__all__)
    for name in module.__all__:
        assert hasattr(module, name)
