"""Settings: the one place for configuration (environment variables ``MCDROP_*`` or CLI flags)."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Service configuration. Every field can be set as ``MCDROP_<FIELD>`` (e.g.
    ``MCDROP_MAX_N_SAMPLES=2000``) or as the matching ``mcdrop serve`` flag."""

    # Errors never echo a value: one of them may be the API key.
    model_config = SettingsConfigDict(
        env_prefix="MCDROP_", extra="forbid", frozen=True, hide_input_in_errors=True
    )

    model_dir: Path = Field(Path("models"), description="folder of model directories to serve")
    host: str = Field("127.0.0.1", description="interface to bind")
    port: int = Field(8000, ge=0, le=65535, description="TCP port")
    default_n_samples: int | None = Field(
        None, ge=1, description="MC samples when a request gives none (default: each model's own)"
    )
    max_n_samples: int = Field(10_000, ge=1, description="largest n_samples a request may ask for")
    max_rows: int = Field(1_000, ge=1, description="most input rows in one request")
    max_row_samples: int = Field(
        2_000_000, ge=1, description="most rows × n_samples in one uncertainty request"
    )
    max_returned_samples: int = Field(
        200_000, ge=1, description="most rows × n_samples when raw samples are returned"
    )
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="largest request body")
    chunk_rows: int = Field(
        8192, ge=1, description="most replicated rows (samples × rows) in one forward pass"
    )
    max_concurrency: int = Field(2, ge=1, description="model computations running at once")
    batching: bool = Field(True, description="merge concurrent requests into shared passes")
    batch_max_rows: int = Field(256, ge=1, description="most rows in one merged batch")
    batch_max_wait_ms: float = Field(
        2.0, ge=0.0, le=1000.0, description="how long a request waits for others to join"
    )
    inline_max_ms: float = Field(
        2.0,
        ge=0.0,
        le=1000.0,
        description="model work estimated below this runs on the event loop (no thread handoff)",
    )
    torch_threads: int | None = Field(None, ge=1, description="torch intra-op threads")
    log_level: str = Field("info", description="uvicorn log level")
    # Environment only, never a flag: a key on the command line is visible to every user in `ps`.
    api_key: SecretStr | None = Field(
        None,
        description="every route but /health and /ready needs 'Authorization: Bearer <key>'",
        json_schema_extra={"env_only": True},
    )

    @field_validator("api_key")
    @classmethod
    def _printable_key(cls, key: SecretStr | None) -> SecretStr | None:
        # The key must survive an HTTP header unchanged; an empty key would protect nothing.
        if key is not None and not re.fullmatch(r"[\x21-\x7e]+", key.get_secret_value()):
            raise ValueError(
                "MCDROP_API_KEY must be non-empty printable ASCII without spaces "
                "(unset it to serve without a key)"
            )
        return key


def env_only(name: str) -> bool:
    """Whether setting ``name`` is read from the environment only (not a ``mcdrop serve`` flag)."""
    extra = Settings.model_fields[name].json_schema_extra
    return isinstance(extra, dict) and bool(extra.get("env_only"))
