"""Self-describing model directories: a JSON manifest and safetensors weights, never pickle.

A model directory holds::

    model.json            the manifest (:class:`ModelSpec`)
    weights.safetensors   the network's state dict (tensors only; reading it runs no code)
    calibration.json      optional: held-out scores for decisions (``mcdrop calibrate``)

A model directory is data. Loading one parses JSON, reads safetensors (never pickle) and builds
a built-in architecture; it imports code only for an ``architecture.factory`` that the caller
trusts (``trust_model_code``, or ``allowed_factories``; see :func:`mcdrop.nets.resolve_factory`).
An optional ``calibration.json`` (held-out statistics for rejection thresholds and conformal
prediction, :mod:`mcdrop.calibration`) is read and validated with it, as JSON; other files in
the directory are never read.

The manifest says everything needed to rebuild and serve the model: its task, input shape,
output labels, architecture and hyper-parameters, dropout rate, τ for regressors, input/target
normalisation, default n_samples, and the test metrics recorded at training time.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from mcdrop import calibration as calibration_
from mcdrop.devices import resolve_device, resolve_dtype
from mcdrop.exceptions import CheckpointError
from mcdrop.nets import ReducedPrecision, Standardized, build

MANIFEST = "model.json"
WEIGHTS = "weights.safetensors"
FORMAT_VERSION = 1

Task = Literal["classification", "regression"]


@dataclass(frozen=True)
class Normalization:
    """Per-feature ``mean`` and ``std`` (nested like one input row, or ``(K,)`` for targets)."""

    mean: list[Any]
    std: list[Any]


@dataclass(frozen=True)
class ModelSpec:
    """The manifest of a model directory (``model.json``).

    Attributes:
        name, version: identify the model.
        task: "classification" (outputs are logits) or "regression".
        input_shape: shape of one input row, e.g. ``[64]`` or ``[28, 28]``.
        labels: class names (classification) or target names (regression); K of them.
        architecture: ``{"name" or "factory": ..., "params": {...}}``, see
            :func:`mcdrop.nets.build`.
        dropout: the dropout rate the model was trained with (documentation; the rate that is
            used lives in ``architecture.params``).
        tau: model precision τ of a homoscedastic regressor, in target units⁻²; noise variance
            is ``1/τ``.
        likelihood: "homoscedastic" (noise 1/τ) or "heteroscedastic" (the net predicts a
            log-variance for every output).
        input_normalization, target_normalization: applied inside the loaded model, so it takes
            and returns original units.
        default_n_samples: MC samples when a request does not say.
        metrics: held-out metrics recorded at training time.
        training: how the model was trained (command, seed, epochs, ...).
        description: one line for people.
    """

    name: str
    task: Task
    input_shape: list[int]
    labels: list[str]
    architecture: dict[str, Any]
    version: str = "1"
    dropout: float | None = None
    tau: float | None = None
    likelihood: Literal["homoscedastic", "heteroscedastic"] = "homoscedastic"
    input_normalization: Normalization | None = None
    target_normalization: Normalization | None = None
    default_n_samples: int = 100
    metrics: dict[str, float] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    format_version: int = FORMAT_VERSION

    @property
    def n_outputs(self) -> int:
        """K: classes, or regression targets."""
        return len(self.labels)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any, *, source: str = MANIFEST) -> ModelSpec:
        """Validate a parsed manifest; errors name ``source`` and the offending field."""

        def fail(message: str) -> CheckpointError:
            return CheckpointError(f"{source}: {message}")

        if not isinstance(data, dict):
            raise fail("the manifest must be a JSON object")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise fail(f"unknown field(s) {unknown}")
        missing = sorted(
            f for f in ("name", "task", "input_shape", "labels", "architecture") if f not in data
        )
        if missing:
            raise fail(f"missing field(s) {missing}")
        if data.get("format_version", FORMAT_VERSION) != FORMAT_VERSION:
            raise fail(f"format_version {data['format_version']} is not {FORMAT_VERSION}")
        if not isinstance(data["name"], str) or not data["name"]:
            raise fail("'name' must be a non-empty string")
        if data["task"] not in ("classification", "regression"):
            raise fail(f"'task' must be 'classification' or 'regression', got {data['task']!r}")
        shape = data["input_shape"]
        if not (
            isinstance(shape, list)
            and shape
            and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)
        ):
            raise fail(f"'input_shape' must be a list of positive integers, got {shape!r}")
        labels = data["labels"]
        if not (isinstance(labels, list) and labels and all(isinstance(s, str) for s in labels)):
            raise fail("'labels' must be a non-empty list of strings")
        arch = data["architecture"]
        if not isinstance(arch, dict) or not ("name" in arch or "factory" in arch):
            raise fail("'architecture' must be an object with 'name' or 'factory'")
        if not isinstance(arch.get("params", {}), dict):
            raise fail("'architecture.params' must be an object")
        tau = data.get("tau")
        if tau is not None and not (
            isinstance(tau, int | float) and tau > 0 and math.isfinite(tau)
        ):
            raise fail(f"'tau' must be a positive number, got {tau!r}")
        likelihood = data.get("likelihood", "homoscedastic")
        if likelihood not in ("homoscedastic", "heteroscedastic"):
            raise fail(f"'likelihood' must be homoscedastic or heteroscedastic, got {likelihood!r}")
        if data["task"] == "regression" and likelihood == "homoscedastic" and tau is None:
            raise fail("a homoscedastic regressor needs 'tau' (its noise variance is 1/tau)")
        n = data.get("default_n_samples", 100)
        if not (isinstance(n, int) and not isinstance(n, bool) and n >= 1):
            raise fail(f"'default_n_samples' must be a positive integer, got {n!r}")
        norms: dict[str, Normalization | None] = {}
        for key in ("input_normalization", "target_normalization"):
            value = data.get(key)
            if value is None:
                norms[key] = None
                continue
            if not (isinstance(value, dict) and set(value) == {"mean", "std"}):
                raise fail(f"'{key}' must be an object with exactly 'mean' and 'std'")
            norms[key] = Normalization(mean=value["mean"], std=value["std"])
        fields = {**data, **norms, "tau": None if tau is None else float(tau)}
        return cls(**fields)


@dataclass
class LoadedModel:
    """A model directory in memory: its spec, the ready-to-run module (eval mode, original
    units in and out), and its calibration if the directory has one."""

    spec: ModelSpec
    module: nn.Module
    path: Path
    calibration: calibration_.Calibration | None = None


def _norm_tensors(
    norm: Normalization | None, what: str, source: str
) -> tuple[Tensor | None, Tensor | None]:
    if norm is None:
        return None, None
    try:
        mean = torch.tensor(norm.mean, dtype=torch.float32)
        std = torch.tensor(norm.std, dtype=torch.float32)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{source}: {what} must be numeric arrays: {exc}") from exc
    if mean.shape != std.shape:
        raise CheckpointError(
            f"{source}: {what} mean {tuple(mean.shape)} and std {tuple(std.shape)} differ in shape"
        )
    if not bool(torch.isfinite(mean).all()) or not bool((std > 0).all()):
        raise CheckpointError(f"{source}: {what} needs finite means and positive stds")
    return mean, std


def wrap(spec: ModelSpec, net: nn.Module, *, source: str = MANIFEST) -> nn.Module:
    """``net`` wrapped in the spec's normalisation (original units in and out)."""
    in_mean, in_std = _norm_tensors(spec.input_normalization, "input_normalization", source)
    out_mean, out_std = _norm_tensors(spec.target_normalization, "target_normalization", source)
    if in_mean is None and out_mean is None:
        return net
    return Standardized(
        net,
        in_mean,
        in_std,
        out_mean,
        out_std,
        heteroscedastic=spec.likelihood == "heteroscedastic",
    )


def save(directory: str | Path, spec: ModelSpec, net: nn.Module) -> Path:
    """Write ``net``'s weights and ``spec`` into ``directory`` (created if needed)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    # One metadata key: safetensors writes its map in hash order, and files should be
    # byte-for-byte reproducible.
    save_file(state, str(directory / WEIGHTS), metadata={"format": "pt"})
    text = json.dumps(spec.to_dict(), indent=2, sort_keys=False) + "\n"
    (directory / MANIFEST).write_text(text)
    return directory


def read_spec(directory: str | Path) -> ModelSpec:
    """Parse and validate ``directory/model.json``."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{path}: no manifest (is {Path(directory)} a model directory?)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON: {exc}") from exc
    return ModelSpec.from_dict(data, source=str(path))


def load(
    directory: str | Path,
    *,
    trust_model_code: bool = False,
    allowed_factories: Sequence[str] = (),
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "float32",
    read_calibration: bool = True,
) -> LoadedModel:
    """Load a model directory: validate the manifest, build the architecture, load the weights
    (safetensors, no unpickling) strictly, and return the model in eval mode.

    Args:
        directory: the model directory.
        trust_model_code: let ``architecture.factory`` import and call any module's code.
        allowed_factories: modules (and their submodules) whose factories may be imported, e.g.
            ``["mypkg", "otherpkg.nets"]``; see :func:`mcdrop.nets.factory_allowed`.
        device: where the model runs: ``cpu``, ``cuda``, ``cuda:N``, ``auto`` or a
            ``torch.device`` (see :func:`mcdrop.devices.resolve_device`).
        dtype: the network's compute dtype, ``float32``, ``bfloat16`` or ``float16``; below
            float32 the network is wrapped in :class:`~mcdrop.nets.ReducedPrecision` (float32
            in and out, normalisation in float32).

    Raises:
        UntrustedCodeError: the manifest names a factory neither option admits (nothing ran).
        CheckpointError: anything else wrong with the directory; the message names the file.
        InvalidArgumentError: a device this machine does not have, or an unknown dtype.
    """
    # Before any file is read: a wrong device is the caller's to fix, whatever the directory.
    target = resolve_device(device)
    compute = resolve_dtype(dtype)
    directory = Path(directory)
    spec = read_spec(directory)
    source = str(directory / MANIFEST)
    try:
        net = build(
            spec.architecture,
            trust_model_code=trust_model_code,
            allowed_factories=allowed_factories,
        )
    except CheckpointError as exc:
        raise type(exc)(f"{source}: {exc}") from exc
    weights = directory / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{weights}: weights file is missing")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{weights}: not a readable safetensors file: {exc}") from exc
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(
            f"{weights}: does not match the architecture in {source}: {exc}"
        ) from exc
    calibration = calibration_.read(directory) if read_calibration else None
    if calibration is not None:
        calibration.check_fits(
            spec.task, spec.n_outputs, weights, source=str(directory / calibration_.CALIBRATION)
        )
    if compute != torch.float32:
        net = ReducedPrecision(net, compute)
    module = wrap(spec, net, source=source).eval().to(target)
    return LoadedModel(spec=spec, module=module, path=directory, calibration=calibration)
