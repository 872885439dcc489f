"""Self-describing model directories: a JSON manifest and safetensors weights, never pickle.

A model directory holds::

    model.json            the manifest (:class:`ModelSpec`)
    weights.safetensors   the network's state dict (tensors only; reading it runs no code)
    calibration.json      optional: held-out scores for decisions (``mcdrop calibrate``)
    examples.safetensors  optional: example input rows, ``(N, *input_shape)`` float32

A model directory is data. Loading one parses JSON, reads safetensors (never pickle) and builds
a built-in architecture; it imports code only for an ``architecture.factory`` that the caller
trusts (``trust_model_code``, or ``allowed_factories``; see :func:`mcdrop.nets.resolve_factory`).
An optional ``calibration.json`` (held-out statistics for rejection thresholds and conformal
prediction, :mod:`mcdrop.calibration`) is read and validated with it, as JSON, and an optional
``examples.safetensors`` (rows the model takes, :func:`mcdrop.save`'s ``example_inputs``) as
safetensors; other files in the directory are never read. Where a model directory has example
rows, everything that probes the model with rows of its own (``mcdrop check``, the save-time
check, the service's warm-up) uses them rather than random ones: a model of token ids, counts or
pixels in [0, 255] fails on standard-normal rows.

The manifest says everything needed to rebuild and serve the model: its task, input shape,
output labels, architecture and hyper-parameters, dropout rate, τ for regressors, input/target
normalisation, default n_samples, and the test metrics recorded at training time.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from numbers import Real
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as load_bytes
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from mcdrop import _files
from mcdrop import calibration as calibration_
from mcdrop.devices import resolve_device, resolve_dtype
from mcdrop.exceptions import CheckpointError, UntrustedCodeError
from mcdrop.nets import ReducedPrecision, Standardized, build

MANIFEST = "model.json"
WEIGHTS = "weights.safetensors"
EXAMPLES = "examples.safetensors"
#: The most example rows a model directory holds: a few to probe the model on, not a dataset.
MAX_EXAMPLE_ROWS = 64
#: The most bytes those rows take (64 rows of a [3, 224, 224] image take 37 MiB).
MAX_EXAMPLE_BYTES = 64 * 2**20
#: The one tensor of ``examples.safetensors``.
_EXAMPLES_KEY = "inputs"
#: Bytes of a safetensors file beyond its tensor's data: the header's length and its JSON
#: (about 140 bytes for one tensor), with room to spare.
_HEADER_SLACK = 4096
FORMAT_VERSION = 1
#: The most samples a manifest may make a model's default: far above any service limit (10_000
#: by default), so a larger value is a typo (10**30 would otherwise be capped silently).
MAX_DEFAULT_N_SAMPLES = 1_000_000

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
        name, version: identify the model; the version is a string without ``/`` (``"1"``).
        task: "classification" (outputs are logits) or "regression".
        input_shape: shape of one input row, e.g. ``[64]`` or ``[28, 28]``.
        labels: class names (classification) or target names (regression); K of them.
        architecture: ``{"name" or "factory": ..., "params": {...}}``, see
            :func:`mcdrop.nets.build`.
        dropout: the dropout rate the model was trained with, in [0, 1) (documentation; the
            rate that is used lives in ``architecture.params``).
        tau: model precision τ of a homoscedastic regressor, in target units⁻²; noise variance
            is ``1/τ``.
        likelihood: "homoscedastic" (noise 1/τ) or "heteroscedastic" (the net predicts a
            log-variance for every output).
        input_normalization, target_normalization: applied inside the loaded model, so it takes
            and returns original units.
        default_n_samples: MC samples when a request does not say (1 to
            :data:`MAX_DEFAULT_N_SAMPLES`; a service caps it at its max_n_samples).
        metrics: held-out metrics recorded at training time (finite numbers).
        training: how the model was trained (command, seed, epochs, ...), an object.
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
        fmt = data.get("format_version", FORMAT_VERSION)
        if not _is_int(fmt) or fmt != FORMAT_VERSION:
            raise fail(f"format_version {fmt!r} is not {FORMAT_VERSION}")
        if not isinstance(data["name"], str) or not data["name"]:
            raise fail("'name' must be a non-empty string")
        version = data.get("version", "1")
        # A string, as every protocol sends it ("1", never 1: the v2 path compares strings),
        # and one path segment, so /v2/models/{name}/versions/{version} can name it.
        if not (isinstance(version, str) and version and "/" not in version):
            raise fail(
                f"'version' must be a non-empty string without '/' (write \"1\", not 1), "
                f"got {version!r}"
            )
        description = data.get("description", "")
        if not isinstance(description, str):
            raise fail(f"'description' must be a string, got {description!r}")
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
        if data["task"] == "classification" and len(labels) < 2:
            # a softmax over one output is 1 whatever the model says
            raise fail(
                "a classifier needs at least 2 labels, one logit each (a binary classifier "
                "returns 2 logits): the softmax of one output is always 1, so its probabilities "
                "and uncertainty would say nothing"
            )
        arch = data["architecture"]
        if not isinstance(arch, dict) or not ("name" in arch or "factory" in arch):
            raise fail("'architecture' must be an object with 'name' or 'factory'")
        if not isinstance(arch.get("params", {}), dict):
            raise fail("'architecture.params' must be an object")
        tau = data.get("tau")
        if tau is not None and not (_is_number(tau) and tau > 0):
            raise fail(f"'tau' must be a positive number, got {tau!r}")
        dropout = data.get("dropout")
        if dropout is not None and not (_is_number(dropout) and 0 <= dropout < 1):
            raise fail(f"'dropout' must be a number in [0, 1) or null, got {dropout!r}")
        likelihood = data.get("likelihood", "homoscedastic")
        if likelihood not in ("homoscedastic", "heteroscedastic"):
            raise fail(f"'likelihood' must be homoscedastic or heteroscedastic, got {likelihood!r}")
        if data["task"] == "regression" and likelihood == "homoscedastic" and tau is None:
            raise fail("a homoscedastic regressor needs 'tau' (its noise variance is 1/tau)")
        n = data.get("default_n_samples", 100)
        if not (_is_int(n) and 1 <= n <= MAX_DEFAULT_N_SAMPLES):
            # repr of an integer of more than 4300 digits raises; a long value is cut.
            big = _is_int(n) and abs(n).bit_length() > 128
            shown = "an integer of more than 38 digits" if big else repr(n)[:60]
            raise fail(
                f"'default_n_samples' must be an integer from 1 to {MAX_DEFAULT_N_SAMPLES:_}, "
                f"got {shown}"
            )
        metrics = data.get("metrics", {})
        if not isinstance(metrics, dict):
            raise fail(f"'metrics' must be an object of names to numbers, got {metrics!r}")
        for key, value in metrics.items():
            if not _is_number(value):
                raise fail(f"'metrics.{key}' must be a finite number, got {value!r}")
        training = data.get("training", {})
        if not isinstance(training, dict):
            raise fail(f"'training' must be an object, got {training!r}")
        norms: dict[str, Normalization | None] = {}
        for key in ("input_normalization", "target_normalization"):
            value = data.get(key)
            if value is None:
                norms[key] = None
                continue
            if not (isinstance(value, dict) and set(value) == {"mean", "std"}):
                raise fail(f"'{key}' must be an object with exactly 'mean' and 'std'")
            norms[key] = Normalization(mean=value["mean"], std=value["std"])
        fields = {
            **data,
            **norms,
            "tau": None if tau is None else float(tau),
            "dropout": None if dropout is None else float(dropout),
            "metrics": {k: float(v) for k, v in metrics.items()},
        }
        return cls(**fields)


def _is_int(value: Any) -> bool:
    """An integer, not a bool (JSON's true is not 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    """A finite real number, not a bool."""
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class LoadedModel:
    """A model directory in memory: its spec, the ready-to-run module (eval mode, original
    units in and out), its calibration if the directory has one, and its example rows
    ``(M, *input_shape)`` float32 on the CPU (``examples.safetensors``) if it has them."""

    spec: ModelSpec
    module: nn.Module
    path: Path
    calibration: calibration_.Calibration | None = None
    example_inputs: Tensor | None = None


def examples_problem(x: Tensor, input_shape: Sequence[int]) -> str | None:
    """What is wrong with ``x`` as a model directory's example rows, or None: they must be
    ``(M, *input_shape)`` float32 with M from 1 to :data:`MAX_EXAMPLE_ROWS`, finite, and take at
    most :data:`MAX_EXAMPLE_BYTES`."""
    shape = [int(d) for d in input_shape]
    if x.dtype != torch.float32:
        return f"example inputs must be float32, got {x.dtype}"
    if x.dim() != len(shape) + 1 or list(x.shape[1:]) != shape:
        return (
            f"example inputs must be (N, *input_shape) = (N, {', '.join(map(str, shape))}) rows, "
            f"got shape {list(x.shape)}"
        )
    if not 1 <= x.shape[0] <= MAX_EXAMPLE_ROWS:
        return f"example inputs must be 1 to {MAX_EXAMPLE_ROWS} rows, got {x.shape[0]}"
    if x.numel() * x.element_size() > MAX_EXAMPLE_BYTES:
        return (
            f"example inputs take {x.numel() * x.element_size():_} bytes, more than "
            f"{MAX_EXAMPLE_BYTES:_}: give fewer rows"
        )
    if not bool(torch.isfinite(x).all()):
        return "example inputs must be finite (no NaN or infinity, within float32's range)"
    return None


def outputs_problem(spec: ModelSpec, out: object, n_rows: int) -> str | None:
    """What is wrong with ``out`` as the model's outputs for ``n_rows`` rows, or None: they
    must be ``(n_rows, K)``, K the manifest's labels (twice that for a heteroscedastic
    regressor: K means, then K log-variances)."""
    k = spec.n_outputs * (2 if spec.likelihood == "heteroscedastic" else 1)
    got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
    if got == (n_rows, k):
        return None
    rows = f"{n_rows} row{'s' * (n_rows != 1)}"
    labels = f"{spec.n_outputs} label{'s' * (spec.n_outputs != 1)}"
    hint = " (K means, then K log-variances)" if k != spec.n_outputs else ""
    return (
        f"the model returns {got} for {rows}, but its manifest ({spec.task}, {labels}, "
        f"{spec.likelihood}) says ({n_rows}, {k}){hint}"
    )


def read_examples(directory: str | Path, spec: ModelSpec) -> Tensor | None:
    """``directory/examples.safetensors``: the model's example rows ``(M, *input_shape)``
    float32, checked (:func:`examples_problem`), or None when the directory has none. A file
    larger than the most rows ``input_shape`` allows is refused before it is read, and no more
    than that is ever read (the file may change meanwhile)."""
    path = Path(directory) / EXAMPLES
    if not _files.is_present(path, "example inputs"):
        return None
    row_bytes = 4 * math.prod(spec.input_shape)
    most = min(MAX_EXAMPLE_ROWS * row_bytes, MAX_EXAMPLE_BYTES) + _HEADER_SLACK
    # One descriptor for the checks and the read (_files.opened), so that a file swapped in
    # since is_present's check (a FIFO; a gigabyte) is refused, not read: at most ``most`` bytes.
    with _files.opened(path, "example inputs") as (file, _):
        found = os.fstat(file.fileno())
        if found.st_size > most:
            raise CheckpointError(
                f"{path}: {found.st_size:_} bytes, more than {MAX_EXAMPLE_ROWS} example rows of "
                f"input_shape {spec.input_shape} take ({most:_} bytes at most)"
            )
        data = file.read(most + 1)
    if len(data) > most:  # grown since
        raise CheckpointError(
            f"{path}: more than {most:_} bytes, more than {MAX_EXAMPLE_ROWS} example rows of "
            f"input_shape {spec.input_shape} take"
        )
    try:
        tensors = load_bytes(data)
    except (SafetensorError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file: {exc}") from exc
    if list(tensors) != [_EXAMPLES_KEY]:
        raise CheckpointError(
            f"{path}: must hold one tensor named {_EXAMPLES_KEY!r}, holds {list(tensors)}"
        )
    x = tensors[_EXAMPLES_KEY]
    if problem := examples_problem(x, spec.input_shape):
        raise CheckpointError(f"{path}: {problem}")
    return x


def _norm_tensors(
    norm: Normalization | None, what: str, source: str, fits: tuple[int, ...], fits_what: str
) -> tuple[Tensor | None, Tensor | None]:
    """``norm`` as float32 tensors, checked: same shape, broadcasting to ``fits`` (one input
    row, or ``(K,)`` targets), finite means, positive finite stds."""
    if norm is None:
        return None, None
    try:
        mean = torch.tensor(norm.mean, dtype=torch.float32)
        std = torch.tensor(norm.std, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
        raise CheckpointError(f"{source}: {what} must be numeric arrays: {exc}") from exc
    if mean.shape != std.shape:
        raise CheckpointError(
            f"{source}: {what} mean {tuple(mean.shape)} and std {tuple(std.shape)} differ in shape"
        )
    # Values beyond float32's range are inf here.
    finite = bool(torch.isfinite(mean).all()) and bool(torch.isfinite(std).all())
    if not finite or not bool((std > 0).all()):
        raise CheckpointError(
            f"{source}: {what} needs finite means and positive stds (within float32's range)"
        )
    # Broadcasts to ``fits`` (torch.broadcast_shapes would import sympy: a second per process).
    fitted = mean.dim() <= len(fits) and all(
        m in (1, f) for m, f in zip(reversed(mean.shape), reversed(fits), strict=False)
    )
    if not fitted:
        raise CheckpointError(
            f"{source}: {what} has shape {list(mean.shape)}, which does not fit {fits_what} "
            f"{list(fits)}"
        )
    return mean, std


def wrap(spec: ModelSpec, net: nn.Module, *, source: str = MANIFEST) -> nn.Module:
    """``net`` wrapped in the spec's normalisation (original units in and out)."""
    in_mean, in_std = _norm_tensors(
        spec.input_normalization,
        "input_normalization",
        source,
        tuple(spec.input_shape),
        "input_shape",
    )
    out_mean, out_std = _norm_tensors(
        spec.target_normalization,
        "target_normalization",
        source,
        (spec.n_outputs,),
        "the outputs (one per label)",
    )
    if out_std is not None and not bool(torch.isfinite(out_std.square()).all()):
        # Variances are scaled by std², which must stay a float32 (< 3.4e38).
        raise CheckpointError(
            f"{source}: target_normalization std {out_std.max().item():g} is too large: "
            "variances scale by its square, which overflows float32 (keep it below 1.8e19)"
        )
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


def save(
    directory: str | Path,
    spec: ModelSpec,
    net: nn.Module,
    *,
    example_inputs: Tensor | None = None,
) -> Path:
    """Write ``net``'s weights and ``spec`` into ``directory`` (created if needed), and its
    ``example_inputs`` ``(M, *input_shape)`` float32 if given (checked, see
    :func:`examples_problem`; without, an examples file left from an earlier model is removed:
    its rows need not suit this one).

    No file is ever half-written (see :func:`mcdrop._files.write_files`): each is written beside
    its name and renamed over it once all are written, the manifest last, so a failed save (a
    full disk) leaves the directory as it was, and a symlink in the directory is replaced, never
    written through."""
    directory = Path(directory)
    if example_inputs is not None:
        example_inputs = example_inputs.detach().cpu().contiguous()
        if problem := examples_problem(example_inputs, spec.input_shape):
            raise CheckpointError(f"{directory / EXAMPLES}: {problem}")
    directory.mkdir(parents=True, exist_ok=True)
    state = _own_memory(net.state_dict())
    # One metadata key: safetensors writes its map in hash order, and files should be
    # byte-for-byte reproducible.
    metadata = {"format": "pt"}
    text = json.dumps(spec.to_dict(), indent=2, sort_keys=False) + "\n"
    files: dict[Path, _files.Writer | None] = {
        directory / WEIGHTS: lambda name: _save_tensors(state, name, metadata),
        directory / EXAMPLES: None,
        directory / MANIFEST: lambda name: Path(name).write_text(text),
    }
    if example_inputs is not None:
        rows = {_EXAMPLES_KEY: example_inputs}
        files[directory / EXAMPLES] = lambda name: _save_tensors(rows, name, metadata)
    _files.write_files(files)
    return directory


def _save_tensors(tensors: dict[str, Tensor], name: str, metadata: dict[str, str]) -> None:
    """safetensors' ``save_file``, its failure to write (a full disk, a quota) an OSError as
    Python's own writes raise, which :func:`mcdrop._files.write_files` names the file in: it was
    a SafetensorError naming no file ("I/O error: File too large (os error 27)"), and a
    traceback of ``mcdrop train``."""
    try:
        save_file(tensors, name, metadata=metadata)
    except SafetensorError as exc:
        found = re.search(r"os error (\d+)", str(exc))
        if found is None:
            raise
        code = int(found[1])
        raise OSError(code, os.strerror(code), name) from exc


def _own_memory(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """``state``'s tensors, detached and contiguous, none sharing memory with another.

    Why: safetensors refuses tensors that share memory, and tied weights do (one Parameter in
    two modules, as a language model ties its output layer to its embedding, or one module
    under two names). Each name after the first gets a copy: the file holds the tensor once per
    name, and loading writes the same values into the tied parameter once per name."""
    seen: set[tuple[torch.device, int]] = set()
    own = {}
    for key, value in state.items():
        tensor = value.detach()
        memory = (tensor.device, tensor.untyped_storage().data_ptr())
        own[key] = (
            tensor.clone(memory_format=torch.contiguous_format)
            if memory in seen
            else tensor.contiguous()
        )
        seen.add(memory)
    return own


def read_spec(directory: str | Path) -> ModelSpec:
    """Parse and validate ``directory/model.json``."""
    path = Path(directory) / MANIFEST
    if not _files.is_present(path, "manifest"):
        raise CheckpointError(f"{path}: no manifest (is {Path(directory)} a model directory?)")
    return ModelSpec.from_dict(_files.read_json(path, "manifest"), source=str(path))


def _build(spec: ModelSpec, source: str, device: str | None = None, **trust: Any) -> nn.Module:
    """The manifest's architecture, built (under ``torch.device(device)`` if given)."""
    try:
        if device is None:
            return build(spec.architecture, **trust)
        with torch.device(device):
            return build(spec.architecture, **trust)
    except CheckpointError as exc:
        raise type(exc)(f"{source}: {exc}") from exc


def _weight_shapes(weights: Path, name: str) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape in the safetensors file ``weights``, opened as ``name``, from its
    header (no tensor data is read)."""
    try:
        with safe_open(name, framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{weights}: not a readable safetensors file: {exc}") from exc


def _few(items: Sequence[str], most: int = 5) -> str:
    shown = ", ".join(items[:most])
    return shown if len(items) <= most else f"{shown} and {len(items) - most} more"


def _check_shapes(
    skeleton: nn.Module, found: dict[str, tuple[int, ...]], weights: Path, source: str
) -> None:
    """Raise unless the file's tensors are exactly the architecture's, shape for shape."""
    wanted = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    problems = []
    if missing := sorted(wanted.keys() - found.keys()):
        problems.append(f"tensors the file lacks: {_few([repr(k) for k in missing])}")
    if extra := sorted(found.keys() - wanted.keys()):
        problems.append(f"tensors the architecture lacks: {_few([repr(k) for k in extra])}")
    shapes = [
        f"{k!r} is {list(found[k])} in the file, {list(wanted[k])} in the architecture"
        for k in sorted(found.keys() & wanted.keys())
        if found[k] != wanted[k]
    ]
    if shapes:
        problems.append(f"shapes differ: {_few(shapes, 3)}")
    if problems:
        raise CheckpointError(
            f"{weights}: does not match the architecture in {source}: {'; '.join(problems)}"
        )


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
    trust: dict[str, Any] = {
        "trust_model_code": trust_model_code,
        "allowed_factories": allowed_factories,
    }
    # First without memory ("meta" tensors have shapes, no data), to check the weights file's
    # shapes before allocating: else a manifest of a few bytes ("hidden": [16000, 16000])
    # allocates gigabytes before its weights fail to fit.
    try:
        skeleton: nn.Module | None = _build(spec, source, "meta", **trust)
    except UntrustedCodeError:
        raise
    except CheckpointError:
        skeleton = None  # code that cannot run on meta: the real build below decides
    built = _build(spec, source, **trust) if skeleton is None else None
    weights = directory / WEIGHTS
    if not _files.is_present(weights, "weights file"):
        raise CheckpointError(f"{weights}: weights file is missing")
    # the shapes and the tensors read from the file checked regular (_files.opened)
    with _files.opened(weights, "weights file") as (_, name):
        if skeleton is not None:
            _check_shapes(skeleton, _weight_shapes(weights, name), weights, source)
        net = built if built is not None else _build(spec, source, **trust)
        try:
            state = load_file(name)
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
    examples = read_examples(directory, spec)
    if compute != torch.float32:
        net = ReducedPrecision(net, compute)
    module = wrap(spec, net, source=source).eval().to(target)
    return LoadedModel(
        spec=spec,
        module=module,
        path=directory,
        calibration=calibration,
        example_inputs=examples,
    )
