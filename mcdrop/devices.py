"""Where a model runs and in which precision: the names the service, the CLI and the library take.

A device is ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (CUDA when torch finds a GPU, else the
CPU), or any ``torch.device``. A name that torch cannot serve here (``cuda`` on a machine without
a GPU or with a CPU-only torch, ``cuda:3`` with two GPUs) is refused with a message that says
what is there, before any model loads.

A dtype is ``float32`` (the default), ``bfloat16`` or ``float16``: the network computes in it,
while inputs, outputs and every statistic stay float32 or wider (see
:class:`mcdrop.nets.ReducedPrecision`).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from mcdrop.exceptions import InvalidArgumentError

#: The device names accepted, for messages and help texts.
DEVICE_NAMES = ("cpu", "cuda", "cuda:N", "auto")

#: Compute dtypes by name.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

_DEVICE = re.compile(r"cpu|cuda(?::(\d+))?|auto")


def _no_cuda_reason() -> str:
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is a build without CUDA"
    return f"torch {torch.__version__} (CUDA {torch.version.cuda}) finds no usable GPU"


def resolve_device(device: str | torch.device) -> torch.device:
    """The ``torch.device`` for a device name (see the module docstring).

    Raises:
        InvalidArgumentError: an unknown name, or a CUDA device this machine does not have.
    """
    if isinstance(device, torch.device):
        if device.type == "cuda":
            return resolve_device(str(device))
        return device
    name = device.strip().lower() if isinstance(device, str) else device
    match = _DEVICE.fullmatch(name) if isinstance(name, str) else None
    if match is None:
        raise InvalidArgumentError(
            f"unknown device {device!r}: give one of {', '.join(DEVICE_NAMES)}"
        )
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise InvalidArgumentError(
            f"device {name!r} needs a CUDA GPU, but {_no_cuda_reason()}; use cpu, or auto to "
            "take a GPU only where there is one"
        )
    count = torch.cuda.device_count()
    if match.group(1) is not None and int(match.group(1)) >= count:
        raise InvalidArgumentError(
            f"device {name!r} does not exist: torch sees {count} GPU(s), cuda:0 to cuda:{count - 1}"
        )
    return torch.device(name)


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """The ``torch.dtype`` for a compute dtype name (``float32``, ``bfloat16``, ``float16``).

    Raises:
        InvalidArgumentError: any other name or dtype.
    """
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPES.values():
            return dtype
    elif isinstance(dtype, str) and dtype.strip().lower() in DTYPES:
        return DTYPES[dtype.strip().lower()]
    raise InvalidArgumentError(f"unknown dtype {dtype!r}: give one of {', '.join(DTYPES)}")


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (or buffer); the CPU for a model with neither."""
    # A walk of the modules' own dicts, in the order of model.parameters(): that generator
    # costs ~8 µs a call, as much as a small model's forward pass.
    for kind in ("_parameters", "_buffers"):
        found = _first_tensor(model, kind)
        if found is not None:
            return found.device
    return torch.device("cpu")


def model_device_slot(model: nn.Module) -> tuple[dict[str, torch.Tensor | None], str] | None:
    """Where :func:`model_device` finds its tensor: the ``_parameters`` or ``_buffers`` dict of
    its module, and its name there; None for a model with neither. Reading the dict on each
    call follows the model to any device (``model.to`` may replace the tensor) for as long as
    its modules stay as they are."""
    for kind in ("_parameters", "_buffers"):
        found = _first_slot(model, kind)
        if found is not None:
            return found
    return None


def first_parameter_path(model: nn.Module) -> list[nn.Module] | None:
    """The modules :func:`model_device` visits in turn until it finds the model's first
    parameter, which is the first entry of the last one's ``_parameters`` (every other one's is
    empty); None where it finds none, or finds a ``None`` entry first (it then reads on, and a
    caller that follows this path to the device reads :func:`model_device` instead)."""
    path: list[nn.Module] = []

    def visit(module: nn.Module) -> bool | None:  # found; None: a None entry first
        path.append(module)
        if module._parameters:
            return next(iter(module._parameters.values())) is not None or None
        for child in module._modules.values():
            if child is not None:
                found = visit(child)
                if found is not False:
                    return found
        return False

    return path if visit(model) else None


def _first_tensor(module: nn.Module, kind: str) -> torch.Tensor | None:
    """The first parameter (``kind`` ``"_parameters"``) or buffer of ``module`` in
    ``module.modules()`` order."""
    slot = _first_slot(module, kind)
    return None if slot is None else slot[0][slot[1]]


def _first_slot(module: nn.Module, kind: str) -> tuple[dict[str, torch.Tensor | None], str] | None:
    """:func:`_first_tensor`'s dict and name."""
    tensors: dict[str, torch.Tensor | None] = getattr(module, kind)
    for name, tensor in tensors.items():
        if tensor is not None:
            return tensors, name
    for child in module._modules.values():
        if child is not None:
            found = _first_slot(child, kind)
            if found is not None:
                return found
    return None
