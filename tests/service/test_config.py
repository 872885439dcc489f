"""Settings come from MCDROP_* variables and are validated."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from service.config import Settings


def test_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MCDROP_MAX_N_SAMPLES", "123")
    monkeypatch.setenv("MCDROP_MODEL_DIR", "/srv/models")
    monkeypatch.setenv("MCDROP_PORT", "9000")
    settings = Settings()
    assert settings.max_n_samples == 123
    assert settings.model_dir == Path("/srv/models")
    assert settings.port == 9000


@pytest.mark.parametrize(
    ("name", "value"), [("MCDROP_MAX_REQUEST_ROWS", "0"), ("MCDROP_PORT", "x")]
)
def test_invalid_values(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError):
        Settings()


def test_defaults() -> None:
    settings = Settings()
    assert (settings.host, settings.port) == ("127.0.0.1", 8000)
    assert settings.max_n_samples >= 1000


def test_trust_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MCDROP_ALLOWED_FACTORIES", "mypkg., otherpkg.nets,")
    monkeypatch.setenv("MCDROP_TRUST_MODEL_CODE", "1")
    monkeypatch.setenv("MCDROP_EXIT_ON_ERROR", "false")
    settings = Settings()
    assert settings.allowed_factories == ("mypkg.", "otherpkg.nets")
    assert settings.trust_model_code is True
    assert settings.exit_on_error is False


def test_closed_and_strict_by_default() -> None:
    settings = Settings()
    assert (settings.trust_model_code, settings.allowed_factories) == (False, ())
    assert settings.exit_on_error is True


@pytest.mark.parametrize("value", ["my pkg", "mypkg:make", "*", '["mypkg"]', "a..b"])
def test_allowed_factories_must_be_module_names(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("MCDROP_ALLOWED_FACTORIES", value)
    with pytest.raises(ValidationError, match="not module names"):
        Settings()


def test_the_api_key_never_prints(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MCDROP_API_KEY", "s3cret-key")
    settings = Settings()
    assert settings.api_key is not None
    assert settings.api_key.get_secret_value() == "s3cret-key"
    assert "s3cret" not in repr(settings)
    assert "s3cret" not in str(settings.model_dump())


@pytest.mark.parametrize("key", ["", "two words", "tab\tkey", "ключ"])
def test_an_unusable_api_key_is_refused_without_echo(
    monkeypatch: pytest.MonkeyPatch, key: str
) -> None:
    monkeypatch.setenv("MCDROP_API_KEY", key)
    with pytest.raises(ValidationError, match="MCDROP_API_KEY must be") as info:
        Settings()
    assert not key or key not in str(info.value)


@pytest.mark.parametrize(("value", "expected"), [("cpu", "cpu"), (" CPU", "cpu"), ("auto", "auto")])
def test_device_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, value: str, expected: str
) -> None:
    monkeypatch.setenv("MCDROP_DEVICE", value)
    monkeypatch.setenv("MCDROP_DTYPE", "bfloat16")
    settings = Settings()
    assert (settings.device, settings.dtype) == (expected, "bfloat16")


def test_cpu_and_float32_by_default() -> None:
    assert (Settings().device, Settings().dtype) == ("cpu", "float32")


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("MCDROP_DEVICE", "tpu", "unknown device 'tpu': give one of cpu, cuda, cuda:N, auto"),
        ("MCDROP_DEVICE", "cuda:99", "cuda:99"),
        ("MCDROP_DTYPE", "float64", "float32"),
    ],
)
def test_devices_and_dtypes_this_machine_cannot_serve(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, message: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match=message):
        Settings()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MCDROP_DEVICE", "cuda")
    with pytest.raises(ValidationError, match=r"needs a CUDA GPU, but .* use cpu, or auto"):
        Settings()
