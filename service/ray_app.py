"""Scale-out on Ray Serve: the service's own FastAPI app on N replicas behind Ray's HTTP proxy.

    pip install -e '.[ray]'
    python -m service.ray_app --replicas 2 --model-dir models --port 8000

Each replica is one Ray actor running :func:`service.app.create_app` (``serve.ingress``), so the
routes, errors, limits and seeds are those of ``mcdrop serve``. A replica has its own registry,
batchers and worker threads, so requests that reach the same replica share forward passes;
``max_ongoing_requests`` lets that many reach it at once (Ray's default of 5 would starve the
batcher). It reserves ``--replica-cpus`` CPUs and runs that many torch threads unless
``torch_threads`` says otherwise. A seeded answer does not depend on the replica: masks are keyed
by the seed and the row. Every response names its replica in ``x-mcdrop-replica``.

Readiness: Ray routes to a replica only once its constructor, the app's lifespan and a first
``check_health`` have passed, and replaces a replica whose later checks fail. The models load in
the replica's background whatever ``exit_on_error`` says, and ``check_health`` waits while they
load, so a replica takes no traffic before they are ready. It then applies ``exit_on_error``
itself: on, a model that failed fails the replica's start (Ray retries, then gives up, and the
command exits with status 3 naming each model); off, ``degraded`` serves, as ``/ready`` does,
and only a replica with no model at all fails. (Loading in the lifespan, as ``mcdrop serve``
does, would also hold the replica back, but Ray reports a failed lifespan only as "ASGI
lifespan startup failed", without the reason.)

Ray's proxy, not uvicorn's protocol of ``mcdrop serve``, holds the connections, so
``header_timeout_s`` and ``shutdown_timeout_s`` do not apply; the body limit and timeout do.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import threading
import time

try:
    import ray
    from ray import serve
except ImportError as exc:
    # README.md's command, from a clone of the repository
    missing = "Ray Serve is not installed: pip install -e '.[ray]' in a clone of mcdrop"
    if __name__ == "__main__":  # the command: one line, as mcdrop's, not two tracebacks
        raise SystemExit(f"python -m service.ray_app: error: {missing}") from None
    raise ImportError(missing) from exc
import torch
from fastapi import FastAPI

from service.app import StartupError, configure_process, create_app
from service.cli import _SETTINGS_FLAGS, _add_setting_flags
from service.config import Settings
from service.registry import ServerState
from service.replicas import ReplicaHeader

#: Longest wait for models still loading in a health check (then it fails and Ray retries).
LOAD_WAIT_S = 600.0
#: The object store of a local Ray cluster: only request and response bodies pass through it.
LOCAL_OBJECT_STORE_BYTES = 256 * 1024 * 1024
#: Status of the command when the models fail to load, as ``mcdrop serve``'s.
STARTUP_FAILED = 3

log = logging.getLogger("ray.serve")


@serve.ingress()
class Replica:
    """One replica: the app for ``settings``, built after the constructor, inside the actor."""

    #: Set by Serve: the app that ``__serve_build_asgi_app__`` returned.
    app: FastAPI

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.started = time.monotonic()
        self.reported = False
        # Before any model loads; the lifespan sets the same again.
        configure_process(settings)

    def __serve_build_asgi_app__(self) -> FastAPI:
        # Background loading: check_health waits for it and applies exit_on_error (see above).
        app = create_app(self.settings.model_copy(update={"exit_on_error": False}))
        app.add_middleware(ReplicaHeader, replica=self.replica)
        return app

    def readiness(self) -> tuple[ServerState, dict[str, str]]:
        """The registry's state (set by the lifespan, which Ray runs before any health check)."""
        return self.app.state.registry.readiness()

    async def check_health(self) -> None:
        """Waits while models load; then passes if all are ready, or, without
        ``exit_on_error``, if at least one is (``degraded``)."""
        deadline = time.monotonic() + LOAD_WAIT_S
        status, states = self.readiness()
        while status == "loading" and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            status, states = self.readiness()
        registry = self.app.state.registry
        if registry.problem is not None and self.settings.exit_on_error:
            raise StartupError({}, registry.problem)
        failures = registry.failures()
        if failures and self.settings.exit_on_error:
            raise StartupError(failures)
        if status not in ("ready", "degraded"):
            raise RuntimeError(f"mcdrop replica {self.replica} is {status}: {states}")
        if not self.reported:
            self.reported = True
            log.info(
                "mcdrop replica %s %s in %.1f s: %d model(s), torch threads %d, pid %d",
                self.replica,
                status,
                time.monotonic() - self.started,
                len(states),
                torch.get_num_threads(),
                os.getpid(),
            )


def application(
    settings: Settings,
    *,
    replicas: int,
    replica_cpus: float = 1.0,
    max_ongoing_requests: int | None = None,
) -> serve.Application:
    """The Serve application: ``replicas`` copies of the app for ``settings``.

    Each reserves ``replica_cpus`` CPUs and, unless ``settings.torch_threads`` is set, runs as
    many torch threads (at least one). ``max_ongoing_requests`` defaults to the app's own queue
    bound plus its worker threads, so Ray never holds back what the batcher could merge.
    """
    threads = settings.torch_threads or max(1, int(replica_cpus))
    settings = settings.model_copy(
        update={"torch_threads": threads, "model_dir": settings.model_dir.resolve()}
    )
    ongoing = max_ongoing_requests or settings.max_queued_requests + settings.max_concurrency
    deployment = serve.deployment(
        name="mcdrop",
        num_replicas=replicas,
        ray_actor_options={"num_cpus": replica_cpus},
        max_ongoing_requests=ongoing,
        health_check_period_s=5.0,
    )(Replica)
    return deployment.bind(settings)


def _startup_failure() -> str | None:
    """Why the replicas failed to start, from Serve's status: the app's own start-up error
    (which names each model that failed) rather than Serve's "failed to update"."""
    try:
        deployments = serve.status().applications["mcdrop"].deployments.values()
    except Exception:  # no status to read: the caller reports Serve's own error
        return None
    for deployment in deployments:
        _, found, reason = deployment.message.rpartition("StartupError: ")
        if found:
            return reason.strip()
    return None


def parser() -> argparse.ArgumentParser:
    command = argparse.ArgumentParser(
        prog="python -m service.ray_app",
        description="Serve the models on N Ray Serve replicas of the mcdrop app. Flags override "
        "MCDROP_* environment variables; host and port are those of Ray's HTTP proxy.",
    )
    command.add_argument("--replicas", type=int, default=1, help="number of replicas")
    command.add_argument(
        "--replica-cpus",
        type=float,
        default=1.0,
        help="CPUs each replica reserves; also its torch threads unless --torch-threads is given",
    )
    command.add_argument(
        "--max-ongoing-requests",
        type=int,
        default=None,
        help="requests one replica takes at once (default: max_queued_requests + max_concurrency)",
    )
    command.add_argument(
        "--address",
        default=None,
        help="a running Ray cluster (e.g. auto); default: start a local one for this command",
    )
    _add_setting_flags(command, Settings)
    return command


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    overrides = {k: getattr(args, k) for k in _SETTINGS_FLAGS if getattr(args, k) is not None}
    settings = Settings(**overrides)
    if args.replicas < 1:
        raise SystemExit("--replicas must be at least 1")
    if settings.workers != 1:  # (a setting, so a flag here too: each replica is one process)
        raise SystemExit(
            "--workers (MCDROP_WORKERS) is mcdrop serve's; on Ray Serve give --replicas instead"
        )
    if args.address is None:
        # A local cluster sized for the replicas (Serve's own actors reserve no CPU).
        cpus = max(os.cpu_count() or 1, int(args.replicas * args.replica_cpus + 0.999))
        ray.init(
            num_cpus=cpus,
            include_dashboard=False,
            object_store_memory=LOCAL_OBJECT_STORE_BYTES,
        )
    else:
        ray.init(address=args.address)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        started = time.monotonic()
        serve.start(http_options={"host": settings.host, "port": settings.port})
        app = application(
            settings,
            replicas=args.replicas,
            replica_cpus=args.replica_cpus,
            max_ongoing_requests=args.max_ongoing_requests,
        )
        try:
            serve.run(app, name="mcdrop", route_prefix="/")
        except RuntimeError as exc:
            reason = _startup_failure() or str(exc)
            print(f"mcdrop: error: the replicas did not start: {reason}", file=sys.stderr)
            return STARTUP_FAILED
        print(
            f"mcdrop: {args.replicas} replica(s) ready in {time.monotonic() - started:.1f} s "
            f"on http://{settings.host}:{settings.port}",
            flush=True,
        )
        stop.wait()
        return 0
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    raise SystemExit(main())
