"""Seeded dropout between the layers of torch's recurrent networks (``nn.LSTM``, ``nn.GRU``,
``nn.RNN`` with ``num_layers > 1`` and ``dropout > 0``).

torch applies that dropout inside its fused multi-layer kernel (``torch.lstm`` and friends), and
only in training mode, so an MC-sampling pass in eval mode would never drop anything between the
layers and its variance would be too small, silently. Under MC sampling the handlers here run
such a network one layer at a time through the same kernel (``num_layers=1``, dropout off) and
drop the output of every layer but the last with the context's seeded masks: the dropout torch
applies in training, keyed per row. With dropout off the layered run equals the fused kernel
(:func:`layered`; tested), and networks without inter-layer dropout take the fused kernel
unchanged.

Shape legend: ``N`` rows (replicated), ``T`` time steps, ``F`` features, ``H`` hidden size,
``L`` layers, ``D`` directions (2 if bidirectional).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from mcdrop.exceptions import UnsupportedModelError

if TYPE_CHECKING:
    from mcdrop.sampling_context import SamplingContext

#: The fused kernels, by the name their dropout calls carry in a sampling plan.
_KERNELS: dict[Callable[..., Any], str] = {
    torch.lstm: "LSTM",
    torch.gru: "GRU",
    torch.rnn_tanh: "RNN",
    torch.rnn_relu: "RNN",
}


def layered(
    kernel: Callable[..., Any],
    x: Tensor,
    hx: Tensor | Sequence[Tensor],
    params: Sequence[Tensor],
    has_biases: bool,
    num_layers: int,
    bidirectional: bool,
    batch_first: bool,
    between: Callable[[Tensor], Tensor],
) -> tuple[Tensor, ...]:
    """A multi-layer recurrent network run one layer at a time, ``between`` applied to the
    output of every layer but the last (where torch's kernel applies its dropout).

    Args:
        kernel: ``torch.lstm``, ``torch.gru``, ``torch.rnn_tanh`` or ``torch.rnn_relu``.
        x: ``(N, T, F)`` if ``batch_first`` else ``(T, N, F)``.
        hx: ``(L·D, N, H)`` initial state; for an LSTM the pair ``(h0, c0)``.
        params: the kernel's flat weights, layer by layer and direction by direction.
        between: maps a layer's output ``(N, T, D·H)`` (or ``(T, N, D·H)``) to the next layer's
            input; it may return more rows than it was given (a sampling context replicates
            the rows at its first dropout), and the states follow, sample-major.

    Returns:
        What the kernel returns: the last layer's output and the final states ``(L·D, N, H)``
        (``h_n``; for an LSTM ``h_n, c_n``).
    """
    from mcdrop.sampling_context import replicate  # (a cycle at import time otherwise)

    dirs = 2 if bidirectional else 1
    per = len(params) // (num_layers * dirs)  # weights per layer and direction
    lstm = kernel is torch.lstm
    states = [hx] if isinstance(hx, Tensor) else list(hx)  # an LSTM's (h0, c0)
    batch_dim = 0 if batch_first else 1
    finals: list[list[Tensor]] = [[] for _ in states]
    for layer in range(num_layers):
        if layer:
            x = between(x)
            rows = x.shape[batch_dim]
            states = [_with_rows(s, rows, replicate) for s in states]
        own = slice(layer * dirs, (layer + 1) * dirs)
        weights = list(params[layer * dirs * per : (layer + 1) * dirs * per])
        layer_hx = [s[own] for s in states] if lstm else states[0][own]
        out = kernel(x, layer_hx, weights, has_biases, 1, 0.0, False, bidirectional, batch_first)
        x = out[0]
        for kept, state in zip(finals, out[1:], strict=True):
            kept.append(state)
    rows = x.shape[batch_dim]
    return (x, *(torch.cat([_with_rows(s, rows, replicate) for s in f]) for f in finals))


def _with_rows(state: Tensor, rows: int, replicate: Callable[..., Tensor]) -> Tensor:
    """``state (L·D, n, H)`` for ``rows`` rows, replicated sample-major if ``rows`` is a
    multiple of ``n`` (the layers before a context's first dropout ran once per row)."""
    if state.shape[1] == rows:
        return state
    return replicate(state, rows // state.shape[1], 1)


def _handler(func: Callable[..., Any]) -> Callable[..., Any]:
    """The handler of the fused kernel ``func`` under MC sampling: ``handle(ctx, args, kwargs)``."""
    name = _KERNELS[func]

    def handle(ctx: SamplingContext, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        # nn.RNNBase calls the kernel positionally: (input, hx, params, has_biases, num_layers,
        # dropout, train, bidirectional, batch_first), or, for a PackedSequence, (data,
        # batch_sizes, hx, params, has_biases, num_layers, dropout, train, bidirectional).
        if kwargs or len(args) != 9:
            return func(*args, **kwargs)
        packed = not isinstance(args[3], bool)
        num_layers, dropout = (args[5], args[6]) if packed else (args[4], args[5])
        if num_layers < 2 or float(dropout) == 0.0:
            return func(*args)
        if packed:
            raise UnsupportedModelError(
                f"an {name} with dropout {dropout} between its {num_layers} layers was given a "
                "PackedSequence: mcdrop samples that dropout layer by layer on padded batches "
                "only; pad the sequences, or set the dropout between layers to 0"
            )
        x, hx, params, has_biases, _, p, _, bidirectional, batch_first = args
        kind = f"{name} dropout between layers"
        return layered(
            func,
            x,
            hx,
            params,
            has_biases,
            num_layers,
            bidirectional,
            batch_first,
            lambda out: ctx.dropout(out, float(p), kind=kind),
        )

    return handle


#: ``{kernel: handler(ctx, args, kwargs)}`` for a sampling context's torch-function mode.
HANDLERS: dict[Callable[..., Any], Callable[..., Any]] = {func: _handler(func) for func in _KERNELS}


def train_off(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], bool]:
    """A fused kernel's positional arguments (as nn.RNNBase passes them, see :func:`_handler`)
    with ``train`` False, for deterministic prediction, and whether the call as given drops
    between its layers (``train`` on, two layers or more, a rate above 0). A call of another
    form is left as it is."""
    if kwargs or len(args) != 9:
        return args, False
    at = 6 if isinstance(args[3], bool) else 7  # (a PackedSequence's: batch_sizes first)
    drops = bool(args[at]) and args[at - 2] > 1 and float(args[at - 1]) > 0.0
    return (*args[:at], False, *args[at + 1 :]), drops
