"""The models being served: discovered under ``model_dir`` at start-up, then loaded.

Names are known at once (so an unknown name is a 404 straight away); each model then loads and
runs one warm-up pass. With ``exit_on_error`` (the default) the app loads them all before it
serves and refuses to start if one fails; without, they load in the background, a failed model
answers 503 with its reason, and the others serve.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from mcdrop import checkpoint
from mcdrop.checkpoint import ModelSpec
from mcdrop.predictor import Prediction, Predictor, Summary
from service.batching import Arrivals, Batcher, CostModel, Job
from service.config import Settings
from service.errors import ModelNotFoundError, ModelNotReadyError, public_message

log = logging.getLogger("mcdrop.service")


@dataclass
class Entry:
    """One model directory and where its loading stands."""

    name: str
    path: Path
    state: str = "loading"  # loading | ready | error
    error: str | None = None  # public: paths relative to model_dir
    predictor: Predictor | None = None
    batcher: Batcher | None = None


class Registry:
    """Model name -> :class:`Entry`; :meth:`get` gives a ready predictor or a clear error."""

    def __init__(self, settings: Settings, arrivals: Arrivals | None = None) -> None:
        self.settings = settings
        self.arrivals = arrivals or Arrivals()
        root = settings.model_dir
        dirs = (
            sorted(p.parent for p in root.glob(f"*/{checkpoint.MANIFEST}")) if root.is_dir() else []
        )
        self.entries = {d.name: Entry(name=d.name, path=d) for d in dirs}
        if not self.entries:
            log.warning("no model directories (*/%s) under %s", checkpoint.MANIFEST, root)
        # Model work too large for the event loop runs here; its size bounds how many model
        # computations run at once (memory and CPU under load).
        self.executor = ThreadPoolExecutor(
            max_workers=settings.max_concurrency, thread_name_prefix="mcdrop-model"
        )

    def load_all(self) -> None:
        """Load and warm up every model (in a thread: before serving, or in the background)."""
        for entry in self.entries.values():
            try:
                loaded = checkpoint.load(
                    entry.path,
                    trust_model_code=self.settings.trust_model_code,
                    allowed_factories=self.settings.allowed_factories,
                )
                if loaded.spec.name != entry.name:
                    raise checkpoint.CheckpointError(
                        f"{entry.path / checkpoint.MANIFEST}: name {loaded.spec.name!r} does not "
                        f"match its directory {entry.name!r}"
                    )
                predictor = Predictor(loaded, max_rows=self.settings.chunk_rows)
                cost = self._warm_up(predictor)
                entry.batcher = Batcher(
                    predictor,
                    executor=self.executor,
                    cost=cost,
                    batching=self.settings.batching,
                    max_rows=self.settings.batch_max_rows,
                    max_wait_ms=self.settings.batch_max_wait_ms,
                    inline_ms=self.settings.inline_max_ms,
                    max_parallel=self.settings.max_concurrency,
                    arriving=lambda name=entry.name: self.arrivals(name),
                )
                self.arrivals.listeners[entry.name] = entry.batcher.recheck
                entry.predictor = predictor
                entry.state = "ready"
                log.info("model %s ready", entry.name)
            except Exception as exc:  # one broken model must not stop the others
                # The reason first: a reader that sees "error" must find it.
                entry.error = public_message(str(exc), self.settings.model_dir)
                entry.state = "error"
                log.error("model %s failed to load: %s", entry.name, exc)

    @staticmethod
    def _warm_up(predictor: Predictor) -> CostModel:
        """Run the model each way before it takes requests, timing it for the batcher."""
        return CostModel.measure(predictor, Registry._warm_up_input(predictor))

    @staticmethod
    def _warm_up_input(predictor: Predictor) -> torch.Tensor:
        """One typical row (the training mean where the model records it)."""
        x = torch.zeros(1, *predictor.spec.input_shape)
        norm = predictor.spec.input_normalization
        if norm is not None:
            x = torch.tensor(norm.mean, dtype=torch.float32).expand_as(x).clone()
        return x

    def close(self) -> None:
        """Stop the worker threads (after the server stops taking requests)."""
        self.executor.shutdown(wait=True, cancel_futures=True)

    def failures(self) -> dict[str, str]:
        """Model name -> why it failed to load, for the models that did."""
        return {n: e.error or "" for n, e in self.entries.items() if e.state == "error"}

    def readiness(self) -> tuple[str, dict[str, str]]:
        """The server's state and each model's (``loading``, ``ready`` or why it failed).

        ``loading`` while a model is; then ``ready`` if all loaded, ``degraded`` if some failed
        and the others serve, ``failed`` if none loaded.
        """
        states = {
            n: (e.error if e.state == "error" else e.state) or "" for n, e in self.entries.items()
        }
        kinds = {e.state for e in self.entries.values()}
        if "loading" in kinds:
            return "loading", states
        if "error" not in kinds:
            return "ready", states
        return ("degraded" if "ready" in kinds else "failed"), states

    def model_readiness(self, name: str) -> tuple[str, str | None]:
        """One model's state (``loading``, ``ready`` or ``failed``) and why it failed."""
        entry = self._entry(name)
        return ("failed" if entry.state == "error" else entry.state), entry.error

    def _entry(self, name: str) -> Entry:
        entry = self.entries.get(name)
        if entry is None:
            raise ModelNotFoundError(
                f"no model named {name!r}; available: {sorted(self.entries)} (GET /models)"
            )
        return entry

    def get(self, name: str) -> Predictor:
        entry = self._entry(name)
        if entry.predictor is None:
            reason = (
                "is still loading, retry shortly"
                if entry.state == "loading"
                else (f"failed to load: {entry.error}")
            )
            raise ModelNotReadyError(f"model {name!r} {reason}")
        return entry.predictor

    def _batcher(self, predictor: Predictor) -> Batcher:
        batcher = self.entries[predictor.spec.name].batcher
        assert batcher is not None  # set before the entry's predictor
        return batcher

    async def predict(self, predictor: Predictor, x: Tensor) -> Prediction:
        """Deterministic prediction, through the model's batcher."""
        return await self._batcher(predictor).submit(Job(x, None))

    async def uncertainty(
        self,
        predictor: Predictor,
        x: Tensor,
        n_samples: int,
        *,
        seed: int,
        level: float,
        return_samples: bool,
    ) -> tuple[Summary, Tensor | None]:
        """MC summary (and samples), through the model's batcher."""
        job = Job(x, (n_samples, level, return_samples), seed)
        return await self._batcher(predictor).submit(job)

    def ready_specs(self) -> list[ModelSpec]:
        return [e.predictor.spec for e in self.entries.values() if e.predictor is not None]
