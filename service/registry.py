"""The models being served: discovered under ``model_dir`` at start-up, then loaded.

Names are known at once (so an unknown name is a 404 straight away); each model then loads and
runs one warm-up pass. With ``exit_on_error`` (the default) the app loads them all before it
serves and refuses to start if one fails; without, they load in the background, a failed model
answers 503 with its reason, and the others serve. :meth:`Registry.get` hands out one
:class:`ModelHandle` per ready model: everything a route needs to run it.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NoReturn

import torch
from torch import Tensor

from mcdrop import checkpoint, sampling
from mcdrop.checking import (
    batch_problem,
    example_inputs,
    mixing_problem,
    probabilities_problem,
    rate_one_problem,
)
from mcdrop.checkpoint import ModelSpec
from mcdrop.exceptions import McDropError, NonFiniteOutputError
from mcdrop.predictor import Prediction, Predictor, Summary
from service.arrivals import Arrivals
from service.batching import Batcher, CostModel, Job, MCOptions
from service.config import Settings
from service.errors import (
    ModelNotFoundError,
    ModelNotReadyError,
    echo,
    model_rejected,
    public_message,
)
from service.metrics import Metrics

#: Completes when the client has gone away (see :func:`service.dataplane.disconnected`).
Gone = Callable[[], Awaitable[Any]]


@dataclass
class ModelHandle:
    """A ready model: its predictor and its batcher, and the deadline its work gets (a request
    may ask for a shorter one, ``timeout_s``)."""

    predictor: Predictor
    batcher: Batcher
    timeout_s: float

    @property
    def spec(self) -> ModelSpec:
        return self.predictor.spec

    def _job(self, x: Tensor, options: MCOptions | None, seed: int, timeout_s: float | None) -> Job:
        # A request may shorten its deadline, never lengthen it past the server's.
        timeout = self.timeout_s if timeout_s is None else min(timeout_s, self.timeout_s)
        return Job(x, options, seed, deadline=time.monotonic() + timeout)

    async def _submit(self, job: Job, gone: Gone | None) -> Any:
        """``job``'s result from the batcher; an exception the model's own forward raised on its
        rows becomes a :class:`~service.errors.ModelRejectedInputError` (422, logged here,
        within the request: its log line carries the request's ID)."""
        try:
            return await self.batcher.submit(job, gone=gone)
        except Exception as exc:
            rejected = model_rejected(exc, self.spec.name)
            if rejected is None:
                raise
            raise rejected from exc

    async def predict(
        self, x: Tensor, *, gone: Gone | None = None, timeout_s: float | None = None
    ) -> Prediction:
        """Deterministic prediction of ``x (N, *input_shape)``, through the batcher."""
        return await self._submit(self._job(x, None, 0, timeout_s), gone)

    async def uncertainty(
        self,
        x: Tensor,
        options: MCOptions,
        *,
        seed: int,
        gone: Gone | None = None,
        timeout_s: float | None = None,
    ) -> tuple[Summary, Tensor | None]:
        """MC summary (and ``(S, N, K)`` samples if asked) of ``x``, through the batcher."""
        return await self._submit(self._job(x, options, seed, timeout_s), gone)


log = logging.getLogger("mcdrop.service")

#: The server's state (``GET /ready``) and a model's (``GET /models/{name}/ready``).
ServerState = Literal["ready", "degraded", "loading", "failed"]
ModelState = Literal["ready", "loading", "failed"]


@dataclass
class Entry:
    """One model directory and where its loading stands."""

    name: str
    path: Path
    state: Literal["loading", "ready", "error"] = "loading"
    error: str | None = None  # public: paths relative to model_dir
    handle: ModelHandle | None = None


def discover(root: Path) -> tuple[list[Path], str | None]:
    """The model directories under ``root`` (those with a manifest), and why there are none
    when there are none (a missing or unreadable folder, or an empty one)."""
    try:
        with os.scandir(root):  # raises what glob would swallow: missing, not a folder, denied
            pass
    except FileNotFoundError:
        return [], f"model_dir {str(root)!r} does not exist"
    except NotADirectoryError:
        return [], f"model_dir {str(root)!r} is not a directory"
    except OSError as exc:
        return [], f"model_dir {str(root)!r} cannot be read: {exc.strerror or exc}"
    dirs = sorted(p.parent for p in root.glob(f"*/{checkpoint.MANIFEST}"))
    if not dirs:
        return [], f"model_dir {str(root)!r} holds no model directories (*/{checkpoint.MANIFEST})"
    return dirs, None


class Registry:
    """Model name -> :class:`Entry`; :meth:`get` gives a ready model's handle or a clear error."""

    def __init__(
        self, settings: Settings, arrivals: Arrivals | None = None, metrics: Metrics | None = None
    ) -> None:
        self.settings = settings
        self.arrivals = arrivals or Arrivals()
        self.metrics = metrics
        dirs, problem = discover(settings.model_dir)
        #: Why ``model_dir`` gives no model to serve (missing, unreadable, empty); else None.
        self.problem = problem
        self.entries = {d.name: Entry(name=d.name, path=d) for d in dirs}
        if self.problem is not None:
            log.warning("%s", self.problem)
        # Model work too large for the event loop runs here; its size bounds how many model
        # computations run at once (memory and CPU under load).
        self.executor = ThreadPoolExecutor(
            max_workers=settings.max_concurrency, thread_name_prefix="mcdrop-model"
        )
        # The short lane: one thread that large work never occupies (see service.batching).
        self.short_executor = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="mcdrop-short")
            if settings.short_work_ms > 0
            else None
        )

    def load_all(self) -> None:
        """Load and warm up every model (in a thread: before serving, or in the background)."""
        for entry in self.entries.values():
            try:
                loaded = checkpoint.load(
                    entry.path,
                    trust_model_code=self.settings.trust_model_code,
                    allowed_factories=self.settings.allowed_factories,
                    device=self.settings.device,
                    dtype=self.settings.dtype,
                )
                if loaded.spec.name != entry.name:
                    raise checkpoint.CheckpointError(
                        f"{entry.path / checkpoint.MANIFEST}: name {loaded.spec.name!r} does not "
                        f"match its directory {entry.name!r}"
                    )
                # Results come back to the host once per request batch, in the worker thread
                # (never on the event loop, which would wait for the GPU).
                predictor = Predictor(
                    loaded, max_pass_rows=self.settings.max_pass_rows, results_device="cpu"
                )
                cost = self._warm_up(predictor, entry.path / checkpoint.MANIFEST)
                batcher = Batcher(
                    predictor,
                    executor=self.executor,
                    cost=cost,
                    batching=self.settings.batching,
                    max_batch_rows=self.settings.max_batch_rows,
                    max_wait_ms=self.settings.batch_max_wait_ms,
                    inline_ms=self.settings.inline_max_ms,
                    max_parallel=self.settings.max_concurrency,
                    arriving=functools.partial(self.arrivals, entry.name),
                    short_executor=self.short_executor,
                    short_ms=self.settings.short_work_ms,
                    max_queue=self.settings.max_queued_requests,
                    metrics=None if self.metrics is None else self.metrics.model(entry.name),
                )
                self.arrivals.listeners[entry.name] = batcher.recheck
                entry.handle = ModelHandle(predictor, batcher, self.settings.request_timeout_s)
                entry.state = "ready"
                log.info("model %s ready on %s", entry.name, predictor.device)
            except Exception as exc:  # one broken model must not stop the others
                # The reason first: a reader that sees "error" must find it.
                entry.error = public_message(str(exc), self.settings.model_dir)
                entry.state = "error"
                log.error("model %s failed to load: %s", entry.name, exc)

    @staticmethod
    def _warm_up(predictor: Predictor, manifest: Path) -> CostModel:
        """Plan the model's sampling, then run it each way before it takes requests, timing it
        for the batcher (on the model's device, results back on the host: what a request
        costs). A failure is the model directory's to fix (see :func:`warm_up`)."""
        x = warm_up(predictor, manifest)
        with _names_the_manifest(predictor, manifest, x):
            return CostModel.measure(predictor, x)

    def close(self) -> None:
        """Stop: queued work is refused, running work stops at its next forward pass, and the
        worker threads end (after the server stops taking requests)."""
        for entry in self.entries.values():
            if entry.handle is not None:
                entry.handle.batcher.close()
        for executor in (self.executor, self.short_executor):
            if executor is not None:
                executor.shutdown(wait=True, cancel_futures=True)

    def failures(self) -> dict[str, str]:
        """Model name -> why it failed to load, for the models that did."""
        return {n: e.error or "" for n, e in self.entries.items() if e.state == "error"}

    def readiness(self) -> tuple[ServerState, dict[str, str]]:
        """The server's state and each model's (``loading``, ``ready`` or why it failed).

        ``loading`` while a model is; then ``ready`` if all loaded, ``degraded`` if some failed
        and the others serve, ``failed`` if none loaded (or ``model_dir`` holds none).
        """
        states = {
            n: (e.error if e.state == "error" else e.state) or "" for n, e in self.entries.items()
        }
        kinds = {e.state for e in self.entries.values()}
        if "loading" in kinds:
            return "loading", states
        if "ready" not in kinds:  # every model failed, or there is none to serve
            return "failed", states
        return ("degraded" if "error" in kinds else "ready"), states

    def model_readiness(self, name: str) -> tuple[ModelState, str | None]:
        """One model's state (``loading``, ``ready`` or ``failed``) and why it failed."""
        entry = self._entry(name)
        return ("failed" if entry.state == "error" else entry.state), entry.error

    def _entry(self, name: str) -> Entry:
        entry = self.entries.get(name)
        if entry is None:
            raise ModelNotFoundError(
                f"no model named {echo(name)}; available: {sorted(self.entries)} (GET /models)"
            )
        return entry

    def get(self, name: str) -> ModelHandle:
        entry = self._entry(name)
        if entry.handle is None:
            reason = (
                "is still loading, retry shortly"
                if entry.state == "loading"
                else (f"failed to load: {entry.error}")
            )
            raise ModelNotReadyError(f"model {name!r} {reason}")
        return entry.handle

    def ready_specs(self) -> list[ModelSpec]:
        return [e.handle.spec for e in self.entries.values() if e.handle is not None]


def warm_up(predictor: Predictor, manifest: Path) -> torch.Tensor:
    """Plan the model's sampling on one row of its own (the first of its example rows where the
    directory has them, else its training mean, or zeros), as ``mcdrop serve`` does before a
    model takes requests, and ``mcdrop predict --model-dir`` before it reads the user's rows;
    returns that row ``(1, *input_shape)``.

    The row is the model's own, so a failure here is the model directory's to fix, never a
    request's: the :class:`~mcdrop.checkpoint.CheckpointError` names the manifest (and, for a
    shape that does not fit, its fields)."""
    x = _warm_up_input(predictor)
    with _names_the_manifest(predictor, manifest, x):
        _check_outputs(predictor, x, manifest)
        plan = predictor.warm_up(x)
        try:
            predictor.predict(x)  # finite outputs, or the row is not one to time the model on
        except NonFiniteOutputError:
            # A model may take this row for padding (all zeros, say) and give NaN on it: such a
            # model is not broken, and one row of varied values decides.
            x = _varied_input(predictor)
            plan = predictor.warm_up(x)
            predictor.predict(x)
    if problem := rate_one_problem(predictor.model.module, plan):
        raise checkpoint.CheckpointError(f"{manifest}: {problem}")
    _refuse_rows(predictor, x, manifest)
    return x


def _check_outputs(predictor: Predictor, x: torch.Tensor, manifest: Path) -> None:
    """Raise unless the model maps the warm-up row ``x`` to the ``(1, K)`` outputs its manifest
    says: a folder written with ``checkpoint.save`` was never run, and outputs of another shape
    fail later, in every request."""
    out = sampling.predict(predictor.model.module, x.to(predictor.device))
    if problem := checkpoint.outputs_problem(predictor.spec, out, x.shape[0]):
        raise checkpoint.CheckpointError(
            f"{manifest}: {problem}: fix the manifest's labels (or task, likelihood), or make "
            "the model return one row of outputs per input row"
        )


def _refuse_rows(predictor: Predictor, x: torch.Tensor, manifest: Path) -> None:
    """Raise when the warm-up row ``x`` and another row give other outputs together than one
    at a time (a normalisation over the batch, ``x - x.mean(0)``): requests are merged into
    shared passes, and a row's samples share one, so the model's answers would change with the
    traffic, silently. Or when a classifier's outputs on them are probabilities, not logits:
    softmaxed again, every answer would be wrong, silently. A model that refuses the other row
    (its values are no inputs of it) leaves nothing to compare."""
    module = predictor.model.module
    rows = torch.cat([x, _varied_input(predictor)]).to(predictor.device)
    try:
        out = sampling.predict(module, rows)
    except Exception:  # the model's own code, on a row that is no input of it
        return
    if problem := mixing_problem(module, rows, out, rows="the warm-up rows"):
        raise checkpoint.CheckpointError(
            f"{manifest}: {problem}; `mcdrop check {manifest.parent}` says more"
        )
    if problem := probabilities_problem(predictor.spec, module, rows, out):
        raise checkpoint.CheckpointError(f"{manifest}: {problem}")


@contextmanager
def _names_the_manifest(predictor: Predictor, manifest: Path, x: torch.Tensor) -> Iterator[None]:
    """The warm-up's errors (on ``x``, the warm-up row, and batches made of it) as
    CheckpointErrors that name the manifest and the likely fix."""
    try:
        yield
    except NonFiniteOutputError:
        raise checkpoint.CheckpointError(
            f"{manifest}: the warm-up rows ({_warm_up_row(predictor)}, then a row of varied "
            "values) give outputs that are not finite (NaN or beyond float32): check "
            "target_normalization and the weights"
        ) from None
    except checkpoint.CheckpointError:  # names the file already
        raise
    except McDropError as exc:  # says what is wrong (no dropout, ...): name the file
        raise checkpoint.CheckpointError(f"{manifest}: the warm-up pass: {exc}") from exc
    except Exception as exc:
        # A model that takes a batch of the row of one size but not of another (a row alone
        # but not the timings' 32 rows): the batch's size is at fault, not input_shape nor the
        # row's values.
        if batch := batch_problem(predictor.model.module, x.to(predictor.device)):
            raise checkpoint.CheckpointError(
                f"{manifest}: the warm-up pass on {_warm_up_row(predictor)} failed: {batch}"
            ) from exc
        _refuse_row(predictor, manifest, exc)


def _refuse_row(predictor: Predictor, manifest: Path, exc: Exception) -> NoReturn:
    """Raise the warm-up's error ``exc`` on its row (torch's, or the model's own) as a
    CheckpointError."""
    if isinstance(exc, RuntimeError):  # torch's shape errors name no file: name the fields
        raise checkpoint.CheckpointError(
            f"{manifest}: the warm-up pass on one row of input_shape "
            f"{list(predictor.spec.input_shape)} failed, so input_shape (or "
            f"input_normalization) does not fit the architecture: {exc}"
        ) from exc
    # The model's own code refuses the row (an id past a vocabulary).
    own = predictor.model.example_inputs is not None
    hint = (
        ""
        if own
        else "; a model that takes other values (token ids, counts, pixels in [0, 255]) "
        "needs rows of its own: save it with mcdrop.save(..., example_inputs=rows)"
    )
    raise checkpoint.CheckpointError(
        f"{manifest}: the warm-up pass on {_warm_up_row(predictor)} failed "
        f"({type(exc).__name__}: {exc}){hint}"
    ) from exc


def _warm_up_row(predictor: Predictor) -> str:
    if predictor.model.example_inputs is not None:
        return "its example rows"
    if predictor.spec.input_normalization is not None:
        return "input_normalization's mean"
    return "zeros"


def _varied_input(predictor: Predictor) -> torch.Tensor:
    """Another row than :func:`_warm_up_input`'s: the model's second example row where it has
    more than one, else standard normal values (fixed) on the scale of the training data where
    the model records it (:func:`mcdrop.checking.example_inputs`)."""
    own = predictor.model.example_inputs
    if own is not None:
        return own[1:2].clone() if own.shape[0] > 1 else own[:1].clone()
    return example_inputs(predictor.model, 1)


def _warm_up_input(predictor: Predictor) -> torch.Tensor:
    """One typical row: the model's first example row, or the training mean where the model
    records it, or zeros."""
    if predictor.model.example_inputs is not None:
        return predictor.model.example_inputs[:1].clone()
    x = torch.zeros(1, *predictor.spec.input_shape)
    norm = predictor.spec.input_normalization
    if norm is not None:
        x = torch.tensor(norm.mean, dtype=torch.float32).expand_as(x).clone()
    return x
