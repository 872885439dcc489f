"""One obvious entry point for a loaded model: deterministic prediction and MC uncertainty.

Shape legend: ``S`` samples, ``N`` rows, ``K`` classes or regression targets.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import GeneratorType
from typing import Literal, TypeVar

import numpy as np
import torch
from torch import Tensor

from mcdrop import adaptive, sampling
from mcdrop.checkpoint import LoadedModel, ModelSpec
from mcdrop.devices import model_device, resolve_device
from mcdrop.exceptions import (
    InvalidArgumentError,
    InvalidInputError,
    NonFiniteOutputError,
    SamplingStoppedError,
)
from mcdrop.planning import SamplingPlan
from mcdrop.stats import (
    ClassificationAccumulator,
    ClassificationSummary,
    RegressionAccumulator,
    RegressionSummary,
)


@dataclass(frozen=True)
class ClassificationPrediction:
    """Deterministic classifier output: ``probabilities (N, K)`` and ``label (N,)``."""

    probabilities: Tensor
    label: Tensor


@dataclass(frozen=True)
class RegressionPrediction:
    """Deterministic regressor output in original units: ``mean (N, K)`` and the noise
    variance the model assumes, ``noise_variance (N, K)`` (``1/τ``, or predicted)."""

    mean: Tensor
    noise_variance: Tensor


Prediction = ClassificationPrediction | RegressionPrediction
_NUMPY_FLOATS = (torch.float32, torch.float64)
Summary = ClassificationSummary | RegressionSummary


def non_finite_rows(result: Prediction | Summary, samples: Tensor | None = None) -> list[int]:
    """Indices of the rows where any output is NaN or ±inf: any ``(N, ...)`` tensor of
    ``result``, or ``samples (S, N, K)`` (of a summary with ``row_n_samples``, only each row's
    own samples: an adaptive request pads the others with NaN)."""
    floats = [
        v
        for v in vars(result).values()
        if isinstance(v, Tensor) and v.dim() > 0 and v.is_floating_point()
    ]
    if samples is not None:
        floats.append(samples)
    # Almost every result is finite: one check over all of it first (a NaN padding an adaptive
    # request's samples only sends it to the row-by-row check below). On the CPU, NumPy's check
    # of each tensor costs less than a concatenation; elsewhere one read of the device is less.
    if not floats:
        return []
    if all(v.device.type == "cpu" and v.dtype in _NUMPY_FLOATS for v in floats):
        # NumPy's concatenation and check cost a third of torch's on one request's results
        try:  # (a tensor that needs grad or has its negative bit set is read through a copy)
            arrays = [v.numpy() for v in floats]
        except RuntimeError:
            arrays = [v.detach().resolve_neg().numpy() for v in floats]
        if np.isfinite(np.concatenate(arrays, axis=None)).all():  # (flattened as joined)
            return []
    elif bool(torch.isfinite(torch.cat([v.reshape(-1) for v in floats])).all()):
        return []
    bad: Tensor | None = None
    for value in vars(result).values():
        if isinstance(value, Tensor) and value.dim() > 0 and value.is_floating_point():
            rows = ~torch.isfinite(value).reshape(value.shape[0], -1).all(1)
            bad = rows if bad is None else bad | rows
    if samples is not None:
        used = getattr(result, "row_n_samples", None)
        finite = torch.isfinite(samples)
        if used is not None:
            padding = torch.arange(samples.shape[0])[:, None] >= used[None, :]  # (S, N)
            finite |= padding.reshape(*padding.shape, *[1] * (samples.dim() - 2))
        rows = ~finite.all(0).reshape(samples.shape[1], -1).all(1)
        bad = rows if bad is None else bad | rows
    return [] if bad is None else bad.nonzero().flatten().tolist()


Result = TypeVar("Result", bound=Prediction | Summary)


def to_device(
    result: Result, samples: Tensor | None, device: torch.device
) -> tuple[Result, Tensor | None]:
    """``result``'s tensors and ``samples`` on ``device``, in one copy per dtype (the statistics
    of a GPU computation come back to the host in two copies: floats and labels)."""
    fields = {k: v for k, v in vars(result).items() if isinstance(v, Tensor)}
    if samples is not None:
        fields["samples"] = samples
    if all(t.device == device for t in fields.values()):
        return result, samples
    moved: dict[str, Tensor] = {}
    for dtype in {t.dtype for t in fields.values()}:
        names = [k for k, t in fields.items() if t.dtype == dtype]
        flat = torch.cat([fields[k].reshape(-1) for k in names]).to(device)
        parts = flat.split([fields[k].numel() for k in names])
        moved |= {k: part.view(fields[k].shape) for k, part in zip(names, parts, strict=True)}
    samples = moved.pop("samples", None)
    # mypy checks replace's keywords against every class that Result's bound allows
    # (Never: no keyword fits all four); the keys are tensor fields of this result's own class.
    return dataclasses.replace(result, **moved), samples  # type: ignore[arg-type]


def check_finite(result: Prediction | Summary, samples: Tensor | None = None) -> None:
    """Raise :class:`NonFiniteOutputError` naming the rows of ``result`` (and of ``samples
    (S, N, K)``) with a NaN or ±inf output.

    Finite inputs can still overflow: a ReLU network is linear far from its data, so inputs of
    1e20 give outputs of ~1e21 whose variance (~1e42) is beyond float32, and inputs near 3e38
    overflow the first layer into inf logits, whose softmax is NaN. Such a summary means nothing,
    so it is refused rather than returned with NaN in it.
    """
    rows = non_finite_rows(result, samples)
    if rows:
        raise NonFiniteOutputError(rows)


class Predictor:
    """Serves a :class:`~mcdrop.checkpoint.LoadedModel`.

    Args:
        model: the loaded model directory.
        max_pass_rows: the most replicated rows (samples × rows) in one forward pass (None:
            :data:`~mcdrop.sampling.DEFAULT_MAX_PASS_ROWS` on the CPU; on a GPU only the
            activation budget bounds a pass).
        device: where the model runs (``cpu``, ``cuda``, ``cuda:N``, ``auto`` or a
            ``torch.device``): ``model.module`` is moved there (``nn.Module.to`` moves it in
            place). None keeps the model's own device.
        results_device: where predictions, summaries and samples are returned (one copy per
            dtype at the end of a call, see :func:`to_device`); None leaves them on the model's
            device. A server passes ``"cpu"``.

    Inputs may be on any device: they move to the model's device once per call, and every
    statistic accumulates there (in float64).

    Attributes:
        plan: the model's :class:`~mcdrop.planning.SamplingPlan` (batch dimension of every
            dropout call, shared prefix, pass sizes), made by :meth:`warm_up` or on the first
            :meth:`uncertainty`; None before.
    """

    def __init__(
        self,
        model: LoadedModel,
        *,
        max_pass_rows: int | None = None,
        device: str | torch.device | None = None,
        results_device: str | torch.device | None = None,
    ) -> None:
        self.model = model
        self.max_pass_rows = max_pass_rows
        if device is not None:
            model.module.to(resolve_device(device))
        self.results_device = None if results_device is None else resolve_device(results_device)
        self.plan: SamplingPlan | None = None

    @property
    def device(self) -> torch.device:
        """The model's device (where inputs go and statistics accumulate)."""
        return model_device(self.model.module)

    @property
    def spec(self) -> ModelSpec:
        return self.model.spec

    def check_inputs(self, x: Tensor, *, check_finite: bool = True) -> Tensor:
        """``x`` as float32 ``(N, *input_shape)``, or an :class:`InvalidInputError` that says
        what is wrong. ``check_finite`` False leaves out the scan of every value for NaN and
        ±inf, for a caller that has checked each value itself (finite in float32)."""
        expected = tuple(self.spec.input_shape)
        if not isinstance(x, Tensor):  # an array's .dim() was an AttributeError
            raise InvalidInputError(
                f"inputs must be a torch.Tensor, got {type(x).__name__} (torch.as_tensor(x) "
                "makes one of an array or nested lists)"
            )
        if x.dim() != len(expected) + 1 or tuple(x.shape[1:]) != expected:
            raise InvalidInputError(
                f"model {self.spec.name!r} expects rows of shape {list(expected)}, got a batch "
                f"of shape {list(x.shape)}"
            )
        if x.shape[0] == 0:
            raise InvalidInputError("inputs must contain at least one row")
        x = x.to(torch.float32)
        if check_finite and not sampling.all_finite(x):
            bad = (~torch.isfinite(x)).reshape(x.shape[0], -1).any(1).nonzero().flatten()
            raise InvalidInputError(
                f"inputs contain NaN or infinite values (rows {bad[:10].tolist()}); float32 "
                "holds magnitudes up to 3.4e38"
            )
        return x

    def warm_up(self, example: Tensor) -> SamplingPlan:
        """Make (or remake) :attr:`plan` from example rows ``(N, *input_shape)``, so the first
        request does not pay for it: five or six forward passes of at most four replicated rows."""
        return self._make_plan(self.check_inputs(example))

    def _make_plan(self, x: Tensor) -> SamplingPlan:
        self.plan = sampling.plan(self.model.module, x)
        return self.plan

    def _noise_variance(self, out: Tensor) -> tuple[Tensor, Tensor]:
        k = self.spec.n_outputs
        if self.spec.likelihood == "heteroscedastic":
            return out[..., :k], out[..., k:].exp()
        return out, torch.full_like(out, self._homoscedastic_noise())

    def _homoscedastic_noise(self) -> float:
        """``1/τ``, the noise variance of a homoscedastic regressor."""
        if self.spec.tau is None:  # ModelSpec.from_dict refuses this; a spec built in code may not
            raise InvalidArgumentError(
                f"model {self.spec.name!r} is a homoscedastic regressor without 'tau' (its noise "
                "variance is 1/tau)"
            )
        return 1.0 / self.spec.tau

    def predict(
        self, x: Tensor, *, check_outputs: bool = True, check_finite_inputs: bool = True
    ) -> Prediction:
        """Deterministic prediction (dropout off): ``x (N, *input_shape)``.

        Raises :class:`NonFiniteOutputError` when an output is NaN or ±inf, unless
        ``check_outputs`` is False (a caller that batches several requests checks each
        request's rows itself with :func:`check_finite`). ``check_finite_inputs`` False: the
        caller has checked every value of ``x`` finite in float32 (the service, as it decodes a
        request), so only its shape is checked here (see :meth:`check_inputs`).
        """
        x = self.check_inputs(x, check_finite=check_finite_inputs)
        # x is checked: sampling.predict's own check would repeat it.
        out = sampling.predict_of_checked_inputs(self.model.module, x).float()
        prediction: Prediction
        if self.spec.task == "classification":
            probs = torch.softmax(out, dim=-1)
            prediction = ClassificationPrediction(probabilities=probs, label=probs.argmax(-1))
        else:
            mean, noise = self._noise_variance(out)
            prediction = RegressionPrediction(mean=mean, noise_variance=noise)
        if self.results_device is not None:
            prediction, _ = to_device(prediction, None, self.results_device)
        if check_outputs:
            check_finite(prediction)
        return prediction

    def uncertainty(
        self,
        x: Tensor,
        n_samples: int | Literal["auto"] | None = None,
        *,
        seed: int | Tensor | None = None,
        level: float = 0.95,
        return_samples: bool = False,
        targets: Tensor | None = None,
        stop: Callable[[], bool] | None = None,
        check_outputs: bool = True,
        tolerance: float | None = None,
        max_n_samples: int | None = None,
        check_finite_inputs: bool = True,
    ) -> tuple[Summary, Tensor | None]:
        """MC-dropout summary of every row, computed in streaming fashion.

        Args:
            x: ``(N, *input_shape)``.
            n_samples: S; the manifest's default when None; ``"auto"``: each row samples until
                its MC standard error is within ``tolerance`` or it has ``max_n_samples``
                (see :mod:`mcdrop.adaptive`); the summary's ``row_n_samples`` says how many
                each row used.
            seed: reproducible samples (see :func:`mcdrop.sampling.sample_chunks`).
            level: central interval level (regression).
            return_samples: also return the raw samples ``(S, N, K)``: probabilities for a
                classifier, sampled means for a regressor. With ``"auto"``, S is the most
                samples any row used, and a row's samples past its own count are NaN.
            targets: ``(N, K)`` regression targets, to compute the test log-likelihood.
            stop: checked before every forward pass; when it returns True, sampling ends with
                :class:`~mcdrop.exceptions.SamplingStoppedError` (a server's client went away).
            check_outputs: raise :class:`NonFiniteOutputError` when a statistic or a returned
                sample is NaN or ±inf (see :func:`check_finite`).
            tolerance: with ``"auto"``, the MC standard error at which a row stops: a
                classifier's in probability, a regressor's (of its mean and its std) in units of
                its predictive std (default :func:`mcdrop.adaptive.default_tolerance` of the
                model's task: 0.01 and 0.05).
            max_n_samples: with ``"auto"``, the most samples a row uses (default
                :data:`mcdrop.adaptive.DEFAULT_MAX_N_SAMPLES`).
            check_finite_inputs: False when the caller has checked every value of ``x`` finite
                in float32 (only its shape is checked here then; see :meth:`check_inputs`).

        Returns:
            the summary, and the samples or None.
        """
        x = self.check_inputs(x, check_finite=check_finite_inputs)
        auto = n_samples == "auto"
        if not auto and (tolerance is not None or max_n_samples is not None):
            raise InvalidArgumentError(
                f"tolerance and max_n_samples apply to n_samples='auto' only, got n_samples="
                f"{n_samples!r}"
            )
        if isinstance(n_samples, str) and not auto:
            raise InvalidArgumentError(f"n_samples must be an integer or 'auto', got {n_samples!r}")
        if isinstance(n_samples, str):  # "auto": any other string is refused above
            tolerance = adaptive.check_tolerance(
                adaptive.default_tolerance(self.spec.task) if tolerance is None else tolerance
            )
            most = adaptive.check_max_n_samples(
                adaptive.DEFAULT_MAX_N_SAMPLES if max_n_samples is None else max_n_samples
            )
        else:
            most = self.spec.default_n_samples if n_samples is None else n_samples
        n_rows, k = x.shape[0], self.spec.n_outputs
        acc: ClassificationAccumulator | RegressionAccumulator
        if self.spec.task == "classification":
            acc = ClassificationAccumulator(n_rows, k, device=self.device)
        else:
            if targets is not None and tuple(targets.shape) != (n_rows, k):
                raise InvalidArgumentError(f"targets must have shape ({n_rows}, {k})")
            noise = (
                None if self.spec.likelihood == "heteroscedastic" else self._homoscedastic_noise()
            )
            acc = RegressionAccumulator(
                n_rows,
                k,
                noise_variance=noise,
                targets=targets,
                level=level,
                device=self.device,
                track_error=auto,
            )
        samples: Tensor | None = None
        if return_samples:
            # NaN marks an adaptive row's samples past its own count.
            samples = (
                torch.full((most, n_rows, k), math.nan, device=self.device)
                if auto
                else torch.empty(most, n_rows, k, device=self.device)
            )
        # Rows always come as float32 (n, *input_shape): one plan serves every request.
        plan = self.plan if self.plan is not None else self._make_plan(x)
        chunks: Iterator[sampling.Chunk]
        if auto:
            assert tolerance is not None
            chunks = adaptive.sample_chunks_until(
                self.model.module,
                x,
                lambda rows: acc.standard_error()[rows],
                tolerance=tolerance,
                max_n_samples=most,
                seed=seed,
                max_pass_rows=self.max_pass_rows,
                plan=plan,
            )
        else:
            # x passed check_inputs: the same checks as sample_chunks's, made once
            chunks = sampling.sample_chunks_of_checked_inputs(
                self.model.module, x, most, seed=seed, max_pass_rows=self.max_pass_rows, plan=plan
            )
        try:
            for chunk in chunks:
                if stop is not None and stop():
                    raise SamplingStoppedError("sampling stopped: its caller asked to stop")
                acc.update(chunk.values, chunk.rows)
                if samples is not None:
                    if self.spec.task == "classification":
                        values = torch.softmax(chunk.values.float(), dim=-1)
                    else:
                        values = chunk.values[..., :k]
                    samples[chunk.samples, chunk.rows] = values
        finally:
            # Stopped or failed here, the generator is left suspended inside its contexts (the
            # model in eval mode, this thread in inference mode, grad off) until collected,
            # which an exception's traceback delays, maybe to another thread: end them now.
            if isinstance(chunks, GeneratorType):
                chunks.close()
        summary = acc.result()
        if samples is not None and auto:
            samples = samples[: summary.n_samples]
        if self.results_device is not None:
            summary, samples = to_device(summary, samples, self.results_device)
        if check_outputs:
            check_finite(summary, samples)
        return summary, samples
