"""Settings: the one place for configuration (environment variables ``MCDROP_*`` or CLI flags)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

#: An entry of ``allowed_factories``: a dotted module name, optionally with a trailing dot.
_MODULE_PREFIX = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*\.?")


class TrustSettings(BaseSettings):
    """Which code loading a model directory may run: none unless the operator opts in. Shared
    by ``mcdrop serve`` and the commands that load a model directory locally."""

    model_config = SettingsConfigDict(env_prefix="MCDROP_", extra="forbid", frozen=True)

    trust_model_code: bool = Field(
        False, description="let any model.json architecture.factory import and run its code"
    )
    # NoDecode: the environment gives "mypkg.,otherpkg.nets", not a JSON list.
    allowed_factories: Annotated[tuple[str, ...], NoDecode] = Field(
        (),
        description="comma-separated modules whose factories a model.json may name (mypkg admits "
        "mypkg and mypkg.nets, never mypkg_evil)",
    )

    @field_validator("allowed_factories", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",")]
        if isinstance(value, list | tuple):
            value = [v for v in value if v != ""]
            bad = [v for v in value if not (isinstance(v, str) and _MODULE_PREFIX.fullmatch(v))]
            if bad:
                raise ValueError(f"{bad} are not module names; give e.g. 'mypkg.,otherpkg.nets'")
        return value


class ModelSettings(TrustSettings):
    """How model directories load: which code may run (:class:`TrustSettings`), on which device
    and in which precision. Shared by ``mcdrop serve`` and the commands that load a model
    directory locally."""

    device: str = Field(
        "cpu",
        description="where models run: cpu, cuda, cuda:N, or auto (a GPU where torch finds one, "
        "else the CPU)",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32",
        description="the networks' compute dtype (bfloat16 or float16 on a GPU); inputs, outputs "
        "and statistics stay float32",
    )

    @field_validator("device")
    @classmethod
    def _device_exists(cls, value: str) -> str:
        # A device this machine lacks fails at start-up, with what it has; torch is imported
        # only when a device is given (the remote commands never load it).
        from mcdrop.devices import resolve_device
        from mcdrop.exceptions import InvalidArgumentError

        try:
            resolve_device(value)
        except InvalidArgumentError as exc:
            raise ValueError(str(exc)) from None
        return value.strip().lower()


class Settings(ModelSettings):
    """Service configuration. Every field can be set as ``MCDROP_<FIELD>`` (e.g.
    ``MCDROP_MAX_N_SAMPLES=2000``) or as the matching ``mcdrop serve`` flag."""

    # Errors never echo a value: one of them may be the API key. An infinite timeout (no
    # deadline) is written as JSON's Infinity, which json.loads reads back (mcdrop serve
    # --workers hands the settings over in JSON), not as null.
    model_config = SettingsConfigDict(
        env_prefix="MCDROP_",
        extra="forbid",
        frozen=True,
        hide_input_in_errors=True,
        ser_json_inf_nan="constants",
    )

    model_dir: Path = Field(Path("models"), description="folder of model directories to serve")
    host: str = Field("127.0.0.1", description="interface to bind")
    port: int = Field(8000, ge=0, le=65535, description="TCP port")
    default_n_samples: int | None = Field(
        None, ge=1, description="MC samples when a request gives none (default: each model's own)"
    )
    max_n_samples: int = Field(10_000, ge=1, description="largest n_samples a request may ask for")
    max_request_rows: int = Field(1_000, ge=1, description="most input rows in one request")
    # Sized so that the largest request finishes within request_timeout_s on the slowest
    # bundled model: Fashion CNN, 30 rows × 10,000 samples took 19 s on a quiet 2-core machine
    # (two at once); on a busy one the deadline ends it with a 504 instead.
    max_row_samples: int = Field(
        300_000, ge=1, description="most rows × n_samples in one uncertainty request"
    )
    max_returned_samples: int = Field(
        200_000, ge=1, description="most rows × n_samples when raw samples are returned"
    )
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="largest request body")
    max_pass_rows: int | None = Field(
        None,
        ge=1,
        description="most replicated rows (samples × rows) in one forward pass (unset: 8192 on "
        "the CPU; on a GPU only the activation budget, 1 GiB or a 32nd of its memory, bounds a "
        "pass)",
    )
    workers: int = Field(
        1,
        ge=1,
        le=64,
        description="server processes on one port, each with its own models (more cores serve "
        "more requests; each worker runs cores ÷ workers torch threads unless torch_threads is "
        "set)",
    )
    worker_healthcheck_timeout_s: int = Field(
        60,
        ge=1,
        le=3600,
        description="with workers: how long a worker may take to answer the supervisor's health "
        "check, at start-up (importing torch takes seconds on a busy machine) and after, before "
        "it is killed as hung and restarted",
    )
    max_concurrency: int = Field(
        2, ge=1, description="model computations running at once (per worker)"
    )
    batching: bool = Field(True, description="merge concurrent requests into shared passes")
    max_batch_rows: int = Field(256, ge=1, description="most rows in one merged batch")
    batch_max_wait_ms: float = Field(
        2.0, ge=0.0, le=1000.0, description="how long a request waits for others to join"
    )
    inline_max_ms: float = Field(
        2.0,
        ge=0.0,
        le=1000.0,
        description="model work estimated below this runs on the event loop (no thread handoff)",
    )
    short_work_ms: float = Field(
        200.0,
        ge=0.0,
        description="model work estimated below this runs in the short lane, which large work "
        "never occupies (0: no short lane)",
    )
    max_queued_requests: int = Field(
        64, ge=1, description="most requests waiting per model; past it 503 with Retry-After"
    )
    request_timeout_s: float = Field(
        60.0,
        gt=0.0,
        description="deadline for a request's model work, queueing included (504 past it; the "
        "work stops at its next forward pass)",
    )
    max_response_bytes: int = Field(
        16 * 1024 * 1024, ge=1024, description="largest response body (422 beyond it)"
    )
    header_timeout_s: float = Field(
        10.0, gt=0.0, description="time a client has to send a request's headers (then closed)"
    )
    max_header_bytes: int = Field(
        64 * 1024,
        ge=1024,
        description="largest request line and headers together (431 beyond it, then closed)",
    )
    send_timeout_s: float = Field(
        30.0,
        gt=0.0,
        description="time a client may read none of a response waiting for it (then dropped)",
    )
    body_timeout_s: float = Field(
        30.0, gt=0.0, description="time a client has to send a request's body (then 408)"
    )
    shutdown_timeout_s: float = Field(
        20.0,
        ge=0.0,
        description="on SIGTERM, how long requests in flight may finish before the server exits",
    )
    torch_threads: int | None = Field(None, ge=1, description="torch intra-op threads")
    cpu_mask_backend: Literal["numba", "numpy", "torch"] = Field(
        "numba",
        description="what makes dropout masks for models on the CPU: numba's compiled loops, or "
        "NumPy or torch (the same masks; slower on small requests, and numba, ~130 MiB, never "
        "loaded)",
    )
    log_level: str = Field("info", description="log level (uvicorn's names: info, debug, ...)")
    log_format: Literal["text", "json"] = Field(
        "text", description="log lines as text, or as JSON objects (one per line)"
    )
    exit_on_error: bool = Field(
        True,
        description="load every model before serving and exit non-zero if one fails (or "
        "model_dir holds none); off: serve the models that loaded",
    )
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
