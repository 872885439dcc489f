"""Running the app under uvicorn: one process, or worker processes under uvicorn's supervisor.

Connections are served by :class:`service.protocol.TimedHttpProtocol`, with the timeouts and
limits a public server needs (see :mod:`service.protocol`). On SIGTERM, requests in flight get
``shutdown_timeout_s`` to finish, then the server exits.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import pickle
import re
import shutil
import socket
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors import Multiprocess
from uvicorn.supervisors.multiprocess import Process

from service import logs
from service.app import create_app
from service.config import Settings
from service.listeners import listeners
from service.protocol import TimedHttpProtocol
from service.replicas import ReplicaHeader

#: The environment variable that hands ``mcdrop serve``'s settings to its worker processes.
_WORKER_SETTINGS = "MCDROP_SERVE_WORKER_SETTINGS"


def config(settings: Settings, **overrides: Any) -> uvicorn.Config:
    """The uvicorn configuration of ``mcdrop serve`` for ``settings``: the app itself for one
    worker; for more, the factory each worker process calls (:func:`worker_app`)."""
    app: Any
    if settings.workers == 1:
        app = create_app(settings)
    else:
        # Workers are spawned processes, which import the app: it is named, not handed over,
        # and the settings reach them in the environment they inherit.
        app = "service.server:worker_app"
        key = settings.api_key
        if key is not None and os.environ.get("MCDROP_API_KEY") != key.get_secret_value():
            # the workers would serve without it, every route open
            raise ValueError(
                "the workers read the API key from the environment only: set MCDROP_API_KEY "
                "to the key given"
            )
        os.environ[_WORKER_SETTINGS] = settings.model_dump_json(exclude={"api_key"})
        overrides = {"factory": True, **overrides}
    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "workers": settings.workers,
        "log_level": settings.log_level,
        "log_config": logs.config(settings.log_level, settings.log_format),
        "http": partial(
            TimedHttpProtocol,
            header_timeout_s=settings.header_timeout_s,
            max_header_bytes=settings.max_header_bytes,
            send_timeout_s=settings.send_timeout_s,
        ),
        "timeout_graceful_shutdown": settings.shutdown_timeout_s,
        # uvicorn's 5 s killed workers still importing torch on a busy machine (5.7 s to import
        # the service at load 5 on 2 cores), again and again: `--workers 2` took minutes to start
        "timeout_worker_healthcheck": settings.worker_healthcheck_timeout_s,
        **overrides,
    }
    return uvicorn.Config(app, **options)


def worker_app() -> FastAPI:
    """The app of one worker process of ``mcdrop serve --workers N``: the parent's settings (the
    API key, never written there, from the environment as the parent read it), each worker with
    ``cores ÷ N`` torch threads unless ``torch_threads`` is set, so that the workers do not
    contend for the same cores. Its answers name it in ``x-mcdrop-replica: worker-<pid>``."""
    try:
        settings = Settings(**json.loads(os.environ[_WORKER_SETTINGS]))
        if settings.torch_threads is None:
            # the cores this process may run on (a container's or taskset's), not the machine's
            cores = (
                len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
            )
            threads = max(1, (cores or 1) // settings.workers)
            settings = settings.model_copy(update={"torch_threads": threads})
        app = create_app(settings)
    except Exception:
        # uvicorn's supervisor restarts a worker that exits 1, which would fail the same way
        # again, forever: a startup failure (3) stops the server, as one process would stop.
        logging.getLogger("uvicorn.error").exception("a worker could not make its app")
        raise SystemExit(STARTUP_FAILURE) from None
    app.add_middleware(ReplicaHeader, replica=f"worker-{os.getpid()}")
    return app


#: The files prometheus_client's multiprocess mode writes: one per kind of metric and process.
_METRIC_FILE = re.compile(r"(counter|gauge_[a-z]+|histogram|summary)_\d+\.db")


def _wipe_metric_files(folder: str) -> None:
    """An earlier run's metric files out of ``folder``, a ``PROMETHEUS_MULTIPROC_DIR`` the
    environment names: their counts would add into this run's (prometheus_client asks for the
    folder to be wiped between runs). Other files are left alone."""
    for path in Path(folder).iterdir():
        if _METRIC_FILE.fullmatch(path.name):
            path.unlink(missing_ok=True)


def run(settings: Settings) -> None:
    """Serve until SIGINT/SIGTERM: one process, or ``settings.workers`` worker processes on one
    port under uvicorn's supervisor (which restarts a worker that dies), each listening on a
    socket of its own where the kernel balances them (:func:`service.listeners.listeners`)."""
    given = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if given is not None and os.path.isdir(given):
        _wipe_metric_files(given)  # before any metric of this run is made
    server_config = config(settings)
    if settings.workers == 1:
        _check_address(settings.host, settings.port)
        uvicorn.Server(server_config).run()
        return
    # (before the folder below: an address in use exits here, and left the folder behind)
    held, sockets = listeners(server_config)
    # The workers' metrics in files of a folder they share (service.metrics), one made for this
    # run unless the environment names one; the workers import prometheus_client after this.
    made = None
    if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        made = os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="mcdrop-metrics-")
    supervisor = Supervisor(server_config, sockets=sockets)
    try:
        supervisor.run()
    finally:
        held.close()
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
    # A worker that failed to start (a model that does not load, with exit_on_error) stops the
    # supervisor: exit as one process would then (uvicorn's status 3), not 0.
    if any(worker.exitcode == STARTUP_FAILURE for worker in supervisor.processes):
        raise SystemExit(STARTUP_FAILURE)


def _check_address(host: str, port: int) -> None:
    """Exit with uvicorn's start-up failure now where ``(host, port)`` cannot be bound: one
    uvicorn process binds only after its lifespan has loaded every model (seconds, minutes for
    large ones), then said "address already in use". The bind uvicorn makes, given up at once
    (a port freed in between is taken then; one taken in between fails there, as before)."""
    if port == 0:  # any free port: nothing to take
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn's own
        try:
            probe.bind((host, port))
        except OSError as error:
            logging.getLogger("uvicorn.error").error(
                "cannot listen on %s port %d: %s", host, port, error.strerror
            )
            raise SystemExit(STARTUP_FAILURE) from None


_now = time.monotonic

#: How often a health check waiting for a worker's answer looks whether the worker has died.
_DEATH_CHECK_S = 0.1


class Worker(Process):
    """uvicorn's worker process, whose health check gives up as soon as the worker has died.

    uvicorn pings a worker it finds alive and waits the whole health-check timeout for the
    answer (60 s by default here). A worker killed (SIGKILL, the OOM killer) that the kernel is
    still tearing down is alive to that check and never answers: it was restarted only after
    the whole timeout, with every worker killed the service down for that long.

    It overrides a private method of uvicorn's (``Process._healthcheck``, uvicorn 0.51 on, which
    ``ping`` and ``is_ready`` call): :func:`worker_class` checks that it is there before any
    process is made one."""

    def _healthcheck(self, timeout: float) -> bool | None:
        try:
            self.parent_conn.send(b"ping")
            deadline = _now() + timeout
            while not self.parent_conn.poll(min(_DEATH_CHECK_S, max(0.0, deadline - _now()))):
                if not self.process.is_alive() or _now() >= deadline:
                    return None
            started: bool = self.parent_conn.recv()
            return started
        except (OSError, EOFError, pickle.UnpicklingError):
            return None


#: What :class:`Worker` uses of a uvicorn ``Process``: attributes each one is given at birth.
_WORKER_ATTRIBUTES = ("parent_conn", "process")


def healthcheck_problem(process_class: type) -> str | None:
    """Why uvicorn's ``process_class`` is not what :class:`Worker` overrides (None when it is):
    a ``_healthcheck(timeout)`` that its ``ping`` calls, and an ``__init__`` that gives each
    process the attributes the override reads. (A private API, checked by its shape: a uvicorn
    that changes it gets uvicorn's own health check, not a Worker's that it never calls.)"""
    check = getattr(process_class, "_healthcheck", None)
    if not inspect.isfunction(check):
        return "it has no _healthcheck method"
    parameters = list(inspect.signature(check).parameters)
    if parameters != ["self", "timeout"]:
        return f"its _healthcheck takes ({', '.join(parameters)}), not (self, timeout)"
    ping = getattr(process_class, "ping", None)
    if not inspect.isfunction(ping) or "_healthcheck" not in ping.__code__.co_names:
        return "its ping does not call _healthcheck"
    init = getattr(process_class, "__init__", None)
    stored = init.__code__.co_names if inspect.isfunction(init) else ()
    missing = [name for name in _WORKER_ATTRIBUTES if name not in stored]
    if missing:
        return f"its __init__ sets no {', '.join(missing)}"
    return None


def worker_class(process_class: type = Process) -> type[Worker] | None:
    """:class:`Worker`, if uvicorn's ``process_class`` is what it overrides; else None, with a
    warning that says what is left: uvicorn's own health check."""
    problem = healthcheck_problem(process_class)
    if problem is None:
        return Worker
    logging.getLogger("uvicorn.error").warning(
        "uvicorn %s's worker Process is not as mcdrop expects (%s): its health check is "
        "uvicorn's own, which waits worker_healthcheck_timeout_s for a killed worker before "
        "it restarts it",
        uvicorn.__version__,
        problem,
    )
    return None


class Supervisor(Multiprocess):
    """uvicorn's supervisor, with its workers' health checks those of :class:`Worker` (uvicorn
    makes its own processes: each is made a :class:`Worker` once made, before it is checked),
    or uvicorn's own where its private API is not as expected (:func:`worker_class`)."""

    def __init__(self, config: uvicorn.Config, sockets: list[socket.socket]) -> None:
        super().__init__(config, sockets)
        self.worker_class = worker_class()

    def init_processes(self) -> None:
        super().init_processes()
        self._checked_as_workers()

    def keep_subprocess_alive(self) -> None:
        super().keep_subprocess_alive()
        self._checked_as_workers()

    def restart_all(self) -> None:
        super().restart_all()
        self._checked_as_workers()

    def _checked_as_workers(self) -> None:
        if self.worker_class is None:
            return
        for process in self.processes:
            # (a Worker adds no state: only the check differs)
            if type(process) is Process and all(hasattr(process, a) for a in _WORKER_ATTRIBUTES):
                process.__class__ = self.worker_class
