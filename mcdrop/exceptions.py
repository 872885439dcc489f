"""Errors raised by mcdrop.

Every error carries a message that names the bad value and says what to do about it. The tree::

    McDropError
    ├── NoDropoutError          the model has no stochastic layer: MC variance would be silently 0
    ├── UnsupportedModelError   the model does something sampling cannot handle (e.g. batch mixing)
    ├── InvalidInputError       inputs of the wrong shape, dtype or with non-finite values
    ├── InvalidArgumentError    a bad n_samples, seed, level, chunk size, ...
    ├── CheckpointError         a model directory that is missing, corrupt or inconsistent
    │   └── UntrustedCodeError  its manifest names code (a factory) the caller has not trusted
    └── SamplingStoppedError    sampling stopped early: its caller asked it to (``stop``)
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


class InvalidArgumentError(McDropError, ValueError):
    """A bad argument that is not the input tensor: n_samples, seed, level, ..."""


class CheckpointError(McDropError):
    """A model directory that cannot be loaded; the message names the file and what is wrong."""


class SamplingStoppedError(McDropError):
    """Sampling stopped between forward passes because the caller's ``stop()`` said so (e.g.
    nobody waits for the answer any more)."""


class UntrustedCodeError(CheckpointError):
    """A manifest's ``architecture.factory`` would import code that the caller has not trusted
    (``trust_model_code`` / ``allowed_factories``); nothing was imported."""
