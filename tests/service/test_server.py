"""The uvicorn setup of ``mcdrop serve`` (:mod:`service.server`); its runs over real HTTP are in
tests/e2e/ (test_uvicorn.py, test_workers.py)."""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
import pickle
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors.multiprocess import SIGNALS, Process

from service.config import Settings
from service.listeners import listeners
from service.server import (
    Supervisor,
    Worker,
    config,
    healthcheck_problem,
    run,
    worker_app,
    worker_class,
)
from tests.conftest import MODELS

WORKER_SETTINGS = "MCDROP_SERVE_WORKER_SETTINGS"


@pytest.mark.parametrize(
    "given",
    [
        {"request_timeout_s": math.inf, "send_timeout_s": math.inf},
        {"allowed_factories": ("mypkg.", "other.nets"), "trust_model_code": True},
        {"dtype": "float16", "cpu_mask_backend": "numpy", "log_format": "json"},
        {"default_n_samples": 7, "max_pass_rows": 64, "torch_threads": 3},
    ],
)
def test_workers_get_the_settings_of_the_parent(
    given: dict[str, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(WORKER_SETTINGS, raising=False)  # (config writes it: undone after)
    settings = Settings(workers=2, **given)  # type: ignore[arg-type]
    config(settings)
    handed = Settings(**json.loads(os.environ[WORKER_SETTINGS]))
    assert handed == settings


def test_one_process_on_an_address_in_use_stops_before_loading_a_model(
    capfd: pytest.CaptureFixture[str],
) -> None:
    # uvicorn binds after the lifespan: every model loaded and warmed up (the bundled ones: 3 s
    # here), then "address already in use", exit 3.
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        settings = Settings(model_dir=MODELS, port=other.getsockname()[1])
        with pytest.raises(SystemExit) as exited:
            run(settings)
    assert exited.value.code == STARTUP_FAILURE
    err = capfd.readouterr().err
    assert f"cannot listen on 127.0.0.1 port {settings.port}: Address already in use" in err
    assert "ready on" not in err  # no model was loaded
    assert "startup" not in err  # no lifespan began


def test_a_worker_that_cannot_make_its_app_stops_the_server(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # uvicorn's supervisor restarts a worker that exits 1 (forever); one that exits 3 stops it
    monkeypatch.setenv(WORKER_SETTINGS, json.dumps({"workers": 2, "port": -1}))
    with pytest.raises(SystemExit) as exited:
        worker_app()
    assert exited.value.code == STARTUP_FAILURE


def test_workers_refuse_an_api_key_they_would_not_read(monkeypatch: pytest.MonkeyPatch) -> None:
    # The workers read the key from the environment only: one given otherwise (settings made in
    # Python) would leave them serving every route without it.
    monkeypatch.delenv(WORKER_SETTINGS, raising=False)
    monkeypatch.delenv("MCDROP_API_KEY", raising=False)
    with pytest.raises(ValueError, match="set MCDROP_API_KEY"):
        config(Settings(workers=2, api_key="s3cret-key"))  # type: ignore[arg-type]
    monkeypatch.setenv("MCDROP_API_KEY", "s3cret-key")
    config(Settings(workers=2))
    assert json.loads(os.environ[WORKER_SETTINGS])["workers"] == 2


def test_the_supervisor_waits_as_long_as_the_setting_for_a_worker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(WORKER_SETTINGS, raising=False)
    assert config(Settings(workers=2)).timeout_worker_healthcheck == 60
    timed = config(Settings(workers=2, worker_healthcheck_timeout_s=7))
    assert timed.timeout_worker_healthcheck == 7


def test_a_health_check_gives_up_once_the_worker_has_died_unanswered() -> None:
    # A worker killed while the kernel tears it down is alive to the supervisor's first look,
    # then never answers the ping: uvicorn's check waited out the whole timeout (60 s here)
    # before it started another worker.
    worker = Worker(config(Settings(port=0)), [])
    # a process that lives a second and never reads the ping: the dying worker
    worker.process = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(1.0,))
    worker.process.start()
    started = time.monotonic()
    try:
        assert not worker.is_alive(timeout=60)
        assert time.monotonic() - started < 30
    finally:
        worker.process.kill()
        worker.process.join()


class _PingedDirectly:
    """A worker process shaped as uvicorn's before 0.51: ``ping`` waits for the answer itself,
    with no ``_healthcheck`` for a Worker to override."""

    def __init__(self) -> None:
        self.parent_conn, self.child_conn = multiprocessing.Pipe()
        self.process = None

    def ping(self, timeout: float = 5) -> bool:
        self.parent_conn.send(b"ping")
        return self.parent_conn.poll(timeout)


class _OtherSignature(_PingedDirectly):
    def _healthcheck(self, timeout: float, retries: int) -> bool | None:
        return None

    def ping(self, timeout: float = 5) -> bool:
        return self._healthcheck(timeout, 1) is not None


class _NotCalled(_PingedDirectly):
    def _healthcheck(self, timeout: float) -> bool | None:
        return None


class _NoPipe:
    def __init__(self) -> None:
        self.connection = None

    def _healthcheck(self, timeout: float) -> bool | None:
        return None

    def ping(self, timeout: float = 5) -> bool:
        return self._healthcheck(timeout) is not None


def test_uvicorns_worker_process_is_what_the_worker_overrides() -> None:
    # Fails on a uvicorn whose private Process API has changed: then pyproject's bound, and
    # Worker, need a look (the server itself falls back to uvicorn's own check, as below).
    assert healthcheck_problem(Process) is None
    assert worker_class() is Worker


@pytest.mark.parametrize(
    ("process_class", "problem"),
    [
        (_PingedDirectly, "it has no _healthcheck method"),
        (_OtherSignature, "its _healthcheck takes (self, timeout, retries), not (self, timeout)"),
        (_NotCalled, "its ping does not call _healthcheck"),
        (_NoPipe, "its __init__ sets no parent_conn, process"),
    ],
)
def test_a_worker_process_of_another_shape_keeps_uvicorns_health_check(
    process_class: type, problem: str, caplog: pytest.LogCaptureFixture
) -> None:
    assert healthcheck_problem(process_class) == problem
    with caplog.at_level(logging.WARNING, logger="uvicorn.error"):
        assert worker_class(process_class) is None
    assert f"not as mcdrop expects ({problem}): its health check is uvicorn's own" in caplog.text


@pytest.fixture
def supervisor(monkeypatch: pytest.MonkeyPatch) -> Iterator[Supervisor]:
    """A Supervisor of two worker processes, made but not started; the signal handlers
    uvicorn's supervisor installs are undone after."""
    monkeypatch.delenv(WORKER_SETTINGS, raising=False)
    handlers = {sig: signal.getsignal(sig) for sig in SIGNALS}
    server_config = config(Settings(workers=2, port=0))
    processes = [Process(server_config, []) for _ in range(2)]
    try:
        made = Supervisor(server_config, sockets=[])
        made.processes = list(processes)
        yield made
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        for process in processes:
            process.parent_conn.close()
            process.child_conn.close()


def test_the_supervisor_makes_its_processes_workers(supervisor: Supervisor) -> None:
    supervisor._checked_as_workers()
    assert [type(p) for p in supervisor.processes] == [Worker, Worker]


def test_the_supervisor_leaves_processes_of_another_shape_uvicorns(
    supervisor: Supervisor,
) -> None:
    # What Supervisor.__init__ holds where worker_class found uvicorn's Process changed.
    supervisor.worker_class = worker_class(_PingedDirectly)
    supervisor._checked_as_workers()
    assert [type(p) for p in supervisor.processes] == [Process, Process]


def test_a_worker_reads_its_config_without_importing_torch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A spawned worker unpickles its uvicorn config before it starts the thread that answers
    # the supervisor's health check, which kills a worker silent for 5 s: a config whose
    # objects import torch (3.7-5 s at load 4.5 on 2 cores) had workers killed at start, three
    # times before two came up, and a slower machine would never have come up.
    monkeypatch.delenv(WORKER_SETTINGS, raising=False)
    pickled = tmp_path / "config.pickle"
    server_config = config(Settings(workers=2, port=0))
    held, sockets = listeners(server_config)  # each worker unpickles a socket of its own
    code = (
        "import pickle, sys; pickle.loads(open(sys.argv[1], 'rb').read()); "
        "print([m for m in ('torch', 'mcdrop', 'numba', 'service.app') if m in sys.modules])"
    )
    with held:  # (the parent holds the address while its workers bind it)
        pickled.write_bytes(pickle.dumps((server_config, sockets)))
        out = subprocess.run(
            [sys.executable, "-c", code, str(pickled)], capture_output=True, text=True, check=True
        )
    assert out.stdout.strip() == "[]"


def test_workers_on_a_port_in_use_exit_3_and_leave_no_metrics_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(WORKER_SETTINGS, raising=False)
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where run makes its folder
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        with pytest.raises(SystemExit) as refused:
            run(Settings(workers=2, port=other.getsockname()[1]))
    assert refused.value.code == STARTUP_FAILURE
    assert list(tmp_path.iterdir()) == []
