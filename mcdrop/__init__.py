"""mcdrop: MC-dropout uncertainty for PyTorch models.

Keep dropout on at inference, run S stochastic passes, and read the model's uncertainty off the
spread (Gal & Ghahramani 2016). Only dropout is switched on (BatchNorm stays in eval), samples
are batched, memory-bounded and seeded per row, and the statistics are pure functions.

    >>> samples = mcdrop.sample(model, x, n_samples=100, seed=0)   # (S, N, K)
    >>> mcdrop.stats.mutual_information(samples)                   # (N,)
"""

from mcdrop import adaptive, calibration, metrics, stats
from mcdrop.calibration import Calibration, calibrate
from mcdrop.checking import CheckReport, check
from mcdrop.checkpoint import LoadedModel, ModelSpec, load
from mcdrop.dropout import DropConnectLinear, LockedDropout, dropout_modules
from mcdrop.exceptions import (
    CheckpointError,
    DecisionUnavailableError,
    InvalidArgumentError,
    InvalidInputError,
    McDropError,
    NoDropoutError,
    NonFiniteOutputError,
    NotCalibratedError,
    SamplingStoppedError,
    UnsampledDropoutWarning,
    UnsupportedModelError,
    UntrustedCodeError,
)
from mcdrop.masks import MAX_SEED, fresh_seed
from mcdrop.planning import SamplingPlan
from mcdrop.predictor import Predictor
from mcdrop.sampling import is_sampling, plan, predict, sample, sample_chunks
from mcdrop.saving import save

__all__ = [
    "MAX_SEED",
    "Calibration",
    "CheckReport",
    "CheckpointError",
    "DecisionUnavailableError",
    "DropConnectLinear",
    "InvalidArgumentError",
    "InvalidInputError",
    "LoadedModel",
    "LockedDropout",
    "McDropError",
    "ModelSpec",
    "NoDropoutError",
    "NonFiniteOutputError",
    "NotCalibratedError",
    "Predictor",
    "SamplingPlan",
    "SamplingStoppedError",
    "UnsampledDropoutWarning",
    "UnsupportedModelError",
    "UntrustedCodeError",
    "adaptive",
    "calibrate",
    "calibration",
    "check",
    "dropout_modules",
    "fresh_seed",
    "is_sampling",
    "load",
    "metrics",
    "plan",
    "predict",
    "sample",
    "sample_chunks",
    "save",
    "stats",
]
__version__ = "0.1.0"
