"""Errors raised by mcdrop.

Every error carries a message that names the bad value and says what to do about it. The tree::

    McDropError
    ├── NoDropoutError          the model has no stochastic layer: MC variance would be silently 0
    ├── UnsupportedModelError   the model does something sampling cannot handle (e.g. batch mixing)
    ├── InvalidInputError       inputs of the wrong shape, dtype or with non-finite values
    │   └── NonFiniteOutputError  finite inputs so far out that the model's outputs overflow
    ├── InvalidArgumentError    a bad n_samples, seed, level, chunk size, ...
    │   └── DecisionUnavailableError  a decision the model cannot make (see mcdrop.calibration)
    │       └── NotCalibratedError        ... because it has no calibration at all
    ├── CheckpointError         a model directory that is missing, corrupt or inconsistent
    │   └── UntrustedCodeError  its manifest names code (a factory) the caller has not trusted
    └── SamplingStoppedError    sampling stopped early: its caller asked it to (``stop``)

and one warning, :class:`UnsampledDropoutWarning`: the model declares dropout that sampling
cannot reach (it samples, with too little variance).
"""

from __future__ import annotations


class McDropError(Exception):
    """Base class of every error mcdrop raises on purpose."""


class NoDropoutError(McDropError):
    """The model ran without a single stochastic dropout call, so MC samples would all be equal."""


class UnsupportedModelError(McDropError):
    """The model's forward pass cannot be sampled correctly (and we refuse rather than guess)."""


class InvalidInputError(McDropError, ValueError):
    """Inputs that do not fit the model: wrong shape, dtype, or NaN/inf values."""


class NonFiniteOutputError(InvalidInputError):
    """Finite inputs whose outputs are NaN or ±inf (beyond float32): far outside the data the
    model was trained on. ``rows`` are the offending row indices of the batch."""

    def __init__(self, rows: list[int]) -> None:
        self.rows = rows
        shown = f"{rows[:10]}" if len(rows) <= 10 else f"{rows[:10]} and {len(rows) - 10} more"
        super().__init__(
            f"the model's outputs for rows {shown} are not finite (NaN or beyond float32's "
            "range): those inputs are far outside what the model was trained on; send values on "
            "the scale of its training data"
        )


class InvalidArgumentError(McDropError, ValueError):
    """A bad argument that is not the input tensor: n_samples, seed, level, ..."""


class DecisionUnavailableError(InvalidArgumentError):
    """A decision the model cannot make: a reject score its task does not have, a coverage
    beyond what its calibration's rows can give, or (:class:`NotCalibratedError`) a rate or
    coverage without a calibration. What a model offers is its own, not the request's shape."""


class NotCalibratedError(DecisionUnavailableError):
    """A rejection rate or a conformal coverage asked of a model directory without
    ``calibration.json`` (see :mod:`mcdrop.calibration`)."""


class CheckpointError(McDropError):
    """A model directory that cannot be loaded; the message names the file and what is wrong."""


class SamplingStoppedError(McDropError):
    """Sampling stopped between forward passes because the caller's ``stop()`` said so (e.g.
    nobody waits for the answer any more)."""


class UntrustedCodeError(CheckpointError):
    """A manifest's ``architecture.factory`` would import code that the caller has not trusted
    (``trust_model_code`` / ``allowed_factories``); nothing was imported."""


class UnsampledDropoutWarning(UserWarning):
    """The model declares a dropout rate that made no stochastic call (e.g. a forward that
    passes ``dropout_p=self.p if self.training else 0.0``): MC samples vary less than the
    model's uncertainty. See :mod:`mcdrop.coverage`."""
