"""Error messages fit for responses: no absolute server paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.errors import public_message

ROOT = Path("/srv/app/models")


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
    assert public_message(message, ROOT) == public


def test_a_relative_model_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    message = f"{tmp_path}/models/a/model.json, models/b/model.json, mymodels/c/model.json"
    expected = "a/model.json, b/model.json, mymodels/c/model.json"
    assert public_message(message, Path("models")) == expected
