"""Reference networks with dropout, and building a network from a manifest's architecture.

Shape legend: ``N`` rows, ``D`` features, ``K`` outputs. Every network here maps a batch-first
tensor to ``(N, K)``.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from mcdrop.dropout import DropConnectLinear, LockedDropout
from mcdrop.exceptions import CheckpointError, InvalidArgumentError, UntrustedCodeError

DropoutKind = Literal["standard", "alpha", "dropconnect"]


def _check_sizes(net: str, **sizes: int | Sequence[int]) -> None:
    """Refuse a layer size that is not a positive integer, naming it: torch builds a layer of
    width 0 without complaint, and the failure comes later, far from its cause."""
    for name, value in sizes.items():
        values = [value] if isinstance(value, int) else list(value)
        if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
            what = "a positive integer" if isinstance(value, int) else "positive integers"
            raise InvalidArgumentError(f"{net} {name} must be {what}, got {value!r}")


def _dropout(kind: str, p: float) -> nn.Module:
    if kind == "alpha":
        return nn.AlphaDropout(p)
    return nn.Dropout(p)


class MLP(nn.Module):
    """Fully connected network: ``[dropout] → (linear → activation → dropout) × L → linear``.

    Args:
        in_features: D.
        hidden: widths of the hidden layers.
        out_features: K (2K for a heteroscedastic regressor: K means, then K log-variances).
        dropout: rate after every hidden layer.
        input_dropout: rate on the inputs (Gal & Ghahramani's UCI nets drop inputs too).
        kind: "standard" (inverted dropout), "alpha" (AlphaDropout with SELU, which keeps
            self-normalisation), or "dropconnect" (hidden weights dropped instead of units).
        flatten: flatten each input row first, so images ``(N, H, W)`` go in as ``(N, H·W)``.

    Shapes: ``(N, D) -> (N, K)``, or ``(N, D...) -> (N, K)`` with ``flatten``.
    """

    def __init__(
        self,
        in_features: int,
        hidden: Sequence[int],
        out_features: int,
        dropout: float = 0.1,
        input_dropout: float = 0.0,
        kind: DropoutKind = "standard",
        flatten: bool = False,
    ) -> None:
        super().__init__()
        if kind not in ("standard", "alpha", "dropconnect"):
            raise ValueError(f"unknown dropout kind {kind!r}")
        _check_sizes("MLP", in_features=in_features, hidden=hidden, out_features=out_features)
        # A flag, not an nn.Flatten layer: the state-dict keys of existing models stay the same.
        self.flatten = flatten
        layers: list[nn.Module] = []
        if input_dropout > 0:
            layers.append(_dropout(kind, input_dropout))
        width = in_features
        for h in hidden:
            if kind == "dropconnect":
                layers += [DropConnectLinear(width, h, p=dropout), nn.ReLU()]
            else:
                act: nn.Module = nn.SELU() if kind == "alpha" else nn.ReLU()
                layers += [nn.Linear(width, h), act, _dropout(kind, dropout)]
            width = h
        layers.append(nn.Linear(width, out_features))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        if self.flatten:
            x = x.flatten(1)  # (N, D...) -> (N, D)
        return self.layers(x)


class CNN(nn.Module):
    """Small convolutional classifier for ``H × W`` images.

    ``conv3x3 → ReLU [→ Dropout2d] [→ maxpool2]`` per entry of ``channels``, then
    ``dropout → linear(hidden) → ReLU → dropout → linear(K)``.

    Args:
        in_channels: C.
        image_size: H (= W).
        channels: output channels of the conv layers.
        pool: whether each conv layer is followed by 2×2 max-pooling.
        spatial_dropout: Dropout2d rate after each conv layer (0 for none).
        hidden: width of the hidden linear layer.
        dropout: rate of the two dropouts in the head.
        n_classes: K.

    Shapes: ``(N, C, H, W)`` or ``(N, H, W)`` for one channel -> ``(N, K)``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 28,
        channels: Sequence[int] = (32, 64, 64),
        pool: Sequence[bool] = (False, True, True),
        spatial_dropout: float = 0.0,
        hidden: int = 256,
        dropout: float = 0.5,
        n_classes: int = 10,
    ) -> None:
        super().__init__()
        if len(pool) != len(channels):
            raise ValueError("pool needs one entry per conv layer")
        _check_sizes(
            "CNN",
            in_channels=in_channels,
            image_size=image_size,
            channels=channels,
            hidden=hidden,
            n_classes=n_classes,
        )
        self.in_channels = in_channels
        layers: list[nn.Module] = []
        width, size = in_channels, image_size
        for c, p in zip(channels, pool, strict=True):
            layers += [nn.Conv2d(width, c, 3, padding=1), nn.ReLU()]
            if spatial_dropout > 0:
                layers.append(nn.Dropout2d(spatial_dropout))
            if p:
                layers.append(nn.MaxPool2d(2))
                size //= 2
            width = c
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(width * size * size, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, n_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 3 and self.in_channels == 1:
            x = x.unsqueeze(1)  # (N, H, W) -> (N, 1, H, W)
        return self.head(self.features(x))


class RowLSTM(nn.Module):
    """An LSTM that reads an image row by row, with variational (locked) dropout.

    Shapes: ``(N, T, D)`` (T rows of D pixels) -> ``(N, K)``.
    """

    def __init__(
        self, in_features: int = 28, hidden: int = 128, n_classes: int = 10, dropout: float = 0.25
    ) -> None:
        super().__init__()
        _check_sizes("RowLSTM", in_features=in_features, hidden=hidden, n_classes=n_classes)
        self.input_dropout = LockedDropout(dropout)
        self.lstm = nn.LSTM(in_features, hidden, batch_first=True)
        self.output_dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.lstm(self.input_dropout(x))
        return self.head(self.output_dropout(out[:, -1]))


class Standardized(nn.Module):
    """Wraps a network with input standardisation and, for regression, output de-standardisation,
    so the wrapped model takes and returns original units.

    The statistics are non-persistent buffers: the manifest is their one source, and the weights
    file holds only the network.

    Args:
        net: the network, trained on standardised data.
        input_mean, input_std: broadcastable to one input row.
        target_mean, target_std: ``(K,)``, or None for classifiers.
        heteroscedastic: the net returns K means then K log-variances (standardised units).
    """

    # The buffers (register_buffer keeps them on the module's device), each pair both or None.
    input_mean: Tensor | None
    input_std: Tensor | None
    target_mean: Tensor | None
    target_std: Tensor | None

    def __init__(
        self,
        net: nn.Module,
        input_mean: Tensor | None = None,
        input_std: Tensor | None = None,
        target_mean: Tensor | None = None,
        target_std: Tensor | None = None,
        heteroscedastic: bool = False,
    ) -> None:
        super().__init__()
        for what, mean, std in (
            ("input", input_mean, input_std),
            ("target", target_mean, target_std),
        ):
            if (mean is None) != (std is None):
                raise InvalidArgumentError(f"{what}_mean and {what}_std are given together or not")
        self.net = net
        self.heteroscedastic = heteroscedastic
        self.register_buffer("input_mean", input_mean, persistent=False)
        self.register_buffer("input_std", input_std, persistent=False)
        self.register_buffer("target_mean", target_mean, persistent=False)
        self.register_buffer("target_std", target_std, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.destandardize(self.net(self.standardize(x)))

    def standardize(self, x: Tensor) -> Tensor:
        """Inputs in original units -> the units the network was trained in."""
        # Both of a pair or neither (__init__); the second test only narrows the type.
        if self.input_mean is not None and self.input_std is not None:
            x = (x - self.input_mean) / self.input_std
        return x

    def destandardize(self, y: Tensor) -> Tensor:
        """The network's outputs -> original units."""
        if self.target_mean is None or self.target_std is None:
            return y
        if self.heteroscedastic:
            k = y.shape[-1] // 2
            mean = y[..., :k] * self.target_std + self.target_mean
            log_var = y[..., k:] + 2 * torch.log(self.target_std)
            return torch.cat([mean, log_var], dim=-1)
        return y * self.target_std + self.target_mean


class ReducedPrecision(nn.Module):
    """Runs ``net`` in a reduced precision (``bfloat16`` or ``float16``) with float32 in and out.

    Floating inputs are cast to ``dtype`` on the way in and the outputs back to float32 on the
    way out, so everything around the network (normalisation, row keys, masks' decisions, the
    statistics) is what it is at float32: the same seed drops the same units at every dtype.

    Shapes: those of ``net``.
    """

    def __init__(self, net: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.net = net.to(dtype)
        self.dtype = dtype

    def forward(self, x: Tensor) -> Tensor:
        y = self.net(x.to(self.dtype) if x.is_floating_point() else x)
        return y.float()

    def extra_repr(self) -> str:
        return f"dtype={self.dtype}"


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "mlp": MLP,
    "cnn": CNN,
    "row_lstm": RowLSTM,
}


#: A module name as a manifest or an allow-list may give it: dotted identifiers.
_MODULE = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")


def _check_allowed(allowed_factories: Sequence[str]) -> tuple[str, ...]:
    """The allow-list as module names without a trailing dot; a bad entry is an error, since a
    typo would otherwise silently allow nothing (or, as a string, each of its letters)."""
    if isinstance(allowed_factories, str):
        raise InvalidArgumentError(
            f"allowed_factories must be a list of module names, got the string "
            f"{allowed_factories!r}; e.g. ['mypkg', 'otherpkg.nets']"
        )
    entries = []
    for entry in allowed_factories:
        name = entry.removesuffix(".") if isinstance(entry, str) else entry
        if not isinstance(name, str) or not _MODULE.fullmatch(name):
            raise InvalidArgumentError(
                f"allowed_factories entry {entry!r} is not a module name like 'mypkg', 'mypkg.' "
                "or 'otherpkg.nets'"
            )
        entries.append(name)
    return tuple(entries)


def factory_allowed(module: str, allowed_factories: Sequence[str]) -> bool:
    """Whether ``module`` is an entry of ``allowed_factories`` or inside one.

    Entries match whole dotted components: ``mypkg`` (or ``mypkg.``) admits ``mypkg`` and
    ``mypkg.nets`` but never ``mypkg_evil``; ``otherpkg.nets`` admits that module and the ones
    below it, not ``otherpkg`` itself.
    """
    return any(
        module == entry or module.startswith(entry + ".")
        for entry in _check_allowed(allowed_factories)
    )


def _untrusted(factory: str, module: str | None, why: str) -> UntrustedCodeError:
    """The refusal, saying exactly how to opt in (service and CLI settings, and the library)."""
    allow = (
        ""
        if module is None
        else f"To allow this module, set MCDROP_ALLOWED_FACTORIES={module} (flag "
        f"--allowed-factories {module}; in Python allowed_factories=[{module!r}]); to allow "
    )
    return UntrustedCodeError(
        f"factory {factory!r} {why}, and a model directory runs no code unless you trust it. "
        f"{allow or 'To allow '}any factory, set MCDROP_TRUST_MODEL_CODE=1 (flag "
        "--trust-model-code; in Python trust_model_code=True)"
    )


def resolve_factory(
    path: str, *, trust_model_code: bool = False, allowed_factories: Sequence[str] = ()
) -> Callable[..., nn.Module]:
    """Import ``package.module:factory`` (a class or function that returns a module), if trusted.

    Importing a module runs its code, so the module must be admitted first: by
    ``trust_model_code`` (any module), or by ``allowed_factories`` (see
    :func:`factory_allowed`), in which case the callable must also be defined in an admitted
    module (an allowed module cannot pass on ``os.system`` by importing it).

    Raises:
        UntrustedCodeError: the factory is not admitted; nothing was imported.
        CheckpointError: a malformed path, or a module or callable that is not there.
    """
    allowed = _check_allowed(allowed_factories)
    module_name, sep, attr = path.partition(":") if isinstance(path, str) else ("", "", "")
    if not (sep and _MODULE.fullmatch(module_name) and attr.isidentifier()):
        raise CheckpointError(f"factory must look like 'package.module:factory', got {path!r}")
    if attr.startswith("__"):
        raise CheckpointError(f"factory {path!r} names a dunder attribute, not a factory")
    if not trust_model_code and not factory_allowed(module_name, allowed):
        raise _untrusted(path, module_name, f"would import and run module {module_name!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise CheckpointError(f"cannot import {module_name!r} for factory {path!r}: {exc}") from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise CheckpointError(f"{path!r}: {module_name} has no callable {attr!r}")
    origin = getattr(factory, "__module__", None)
    if not isinstance(origin, str) or not _MODULE.fullmatch(origin):
        origin = None
    if not trust_model_code and not (origin and factory_allowed(origin, allowed)):
        raise _untrusted(path, origin, f"is defined in module {origin!r}")
    return factory


def build(
    architecture: dict[str, Any],
    *,
    trust_model_code: bool = False,
    allowed_factories: Sequence[str] = (),
) -> nn.Module:
    """A network from a manifest's ``architecture``: ``{"name": "mlp", "params": {...}}`` for a
    built-in, or ``{"factory": "package.module:factory", "params": {...}}`` for your own.

    A built-in runs no code but this module's; a factory is imported only when
    ``trust_model_code`` or ``allowed_factories`` admits it (see :func:`resolve_factory`).
    """
    params = architecture.get("params", {})
    name = architecture.get("name")
    if isinstance(name, str) and name in ARCHITECTURES:
        if "factory" in architecture:
            # Never import anything for a manifest that says it is a built-in.
            raise CheckpointError(
                f"architecture names both the built-in {name!r} and factory "
                f"{architecture['factory']!r}; give one"
            )
        factory = ARCHITECTURES[name]
    elif "factory" in architecture:
        factory = resolve_factory(
            architecture["factory"],
            trust_model_code=trust_model_code,
            allowed_factories=allowed_factories,
        )
    else:
        raise CheckpointError(
            f"unknown architecture {name!r}; built-ins are {sorted(ARCHITECTURES)}, or give "
            "'factory': 'package.module:factory'"
        )
    try:
        net = factory(**params)
    except TypeError as exc:
        raise CheckpointError(f"architecture params {params} do not fit: {exc}") from exc
    except Exception as exc:  # a trusted factory's own failure is still a model that won't load
        raise CheckpointError(f"the architecture raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(net, nn.Module):
        raise CheckpointError(
            f"the architecture returned a {type(net).__name__}, not a torch.nn.Module"
        )
    return net
