"""Many one-hidden-layer dropout MLPs trained and MC-sampled as one stacked network.

The UCI protocol trains |p grid| × |τ grid| networks per split. Each is tiny, so one at a time
the cost is all Python and kernel-launch overhead; stacked along a leading ``G`` axis they run as
a few ``bmm`` calls. Training is equivalent to :func:`mcdrop.recipes.train.fit` on each network
alone: the loss is the *sum* of the per-network mean squared errors, so every network gets its own
gradient, and Adam is elementwise, so one Adam over the stacked parameters is G independent
Adams. Weight decay is added to the gradient per network (coupled L2, as ``torch.optim.Adam``'s
``weight_decay`` does). Each network draws its own minibatch order from its own seeded
generator, exactly as ``fit`` does.

Shape legend: ``G`` networks, ``S`` samples, ``N`` rows, ``D`` features, ``H`` hidden units,
``P`` training sets (one per split); samples first within a network.

The network is mcdrop's ``MLP(D, [H], 1, dropout=p, input_dropout=p)``:
``dropout(p) → linear(D, H) → ReLU → dropout(p) → linear(H, 1)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from mcdrop import masks
from mcdrop.nets import MLP


class StackedMLP(nn.Module):
    """G one-hidden-layer MLPs with per-network dropout rate ``p`` on inputs and hidden units.

    Args:
        w1: ``(G, D, H)``; b1: ``(G, 1, H)``; w2: ``(G, H, 1)``; b2: ``(G, 1, 1)``.
        p: ``(G,)`` dropout rates in [0, 1) (0 only for training: mcdrop refuses to sample a
            network without dropout).
        p_in: ``(G,)`` input dropout rates (default ``p``); all zero, or none zero.
    """

    def __init__(
        self, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, p: Tensor, p_in: Tensor | None = None
    ) -> None:
        super().__init__()
        p_in = p if p_in is None else p_in
        for rates in (p, p_in):
            if not bool(((rates >= 0) & (rates < 1)).all()):
                raise ValueError(f"dropout rates must be in [0, 1), got {rates.tolist()}")
        if bool((p_in == 0).any()) and not bool((p_in == 0).all()):
            raise ValueError("input dropout must be on for every network of a stack or for none")
        self.w1 = nn.Parameter(w1)
        self.b1 = nn.Parameter(b1)
        self.w2 = nn.Parameter(w2)
        self.b2 = nn.Parameter(b2)
        self.register_buffer("p", p.to(w1.dtype))
        self.register_buffer("p_in", p_in.to(w1.dtype))

    @classmethod
    def from_mlps(
        cls, nets: Sequence[MLP], p: Sequence[float], p_in: Sequence[float] | None = None
    ) -> StackedMLP:
        """Stack ``MLP(D, [H], 1, dropout=p, input_dropout=p_in)`` networks (weights copied);
        ``p_in`` defaults to ``p``."""
        first = [_linears(net)[0] for net in nets]
        second = [_linears(net)[1] for net in nets]
        return cls(
            torch.stack([lin.weight.detach().T for lin in first]).clone(),
            torch.stack([lin.bias.detach()[None] for lin in first]).clone(),
            torch.stack([lin.weight.detach().T for lin in second]).clone(),
            torch.stack([lin.bias.detach()[None] for lin in second]).clone(),
            torch.tensor(list(p)),
            None if p_in is None else torch.tensor(list(p_in)),
        )

    @property
    def n_nets(self) -> int:
        return self.w1.shape[0]

    def subset(self, index: Sequence[int]) -> StackedMLP:
        """The networks ``index`` as a new stack (weights copied)."""
        idx = torch.as_tensor(list(index), dtype=torch.int64)
        params = (self.w1, self.b1, self.w2, self.b2)
        rates = (self.p[idx].clone(), self.p_in[idx].clone())
        return StackedMLP(*(t.detach()[idx].clone() for t in params), *rates)

    def to_mlp(self, g: int) -> MLP:
        """Network ``g`` as a plain mcdrop ``MLP`` (eval mode), for :func:`mcdrop.sample`."""
        d, h = self.w1.shape[1:]
        net = MLP(d, [h], 1, dropout=float(self.p[g]), input_dropout=float(self.p_in[g]))
        first, second = _linears(net)
        with torch.no_grad():
            first.weight.copy_(self.w1[g].T)
            first.bias.copy_(self.b1[g, 0])
            second.weight.copy_(self.w2[g].T)
            second.bias.copy_(self.b2[g, 0])
        return net.eval()

    def forward(self, x: Tensor, keep_in: Tensor, keep_hidden: Tensor) -> Tensor:
        """One pass with given dropout multipliers (0, or ``1/(1-p)`` for kept units).

        Args:
            x: ``(G, B, D)`` inputs, or ``(B, D)`` shared by all networks.
            keep_in: ``(G, B, D)``; keep_hidden: ``(G, B, H)``.

        Returns:
            ``(G, B, 1)`` outputs.
        """
        hidden = torch.baddbmm(self.b1, x * keep_in, self.w1).relu_()
        return torch.baddbmm(self.b2, hidden * keep_hidden, self.w2)


def _linears(net: MLP) -> tuple[nn.Linear, nn.Linear]:
    linears = [m for m in net.layers if isinstance(m, nn.Linear)]
    if len(linears) != 2:
        raise ValueError(f"expected a one-hidden-layer MLP, got {len(linears)} linear layers")
    return linears[0], linears[1]


def _lattice(p: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """int16 drop thresholds and keep scales ``1/(1 - p_eff)``, each ``(G, 1, 1)``.

    As in mcdrop, p is realised on a 1/65536 lattice (a 16-bit uniform below the threshold
    drops) and kept units are rescaled by the realised rate.
    """
    thresholds = torch.tensor([masks.drop_threshold(float(q)) for q in p], dtype=torch.int16)
    p_eff = (thresholds.to(torch.float64) + masks.P_RESOLUTION // 2) / masks.P_RESOLUTION
    return thresholds[:, None, None], (1.0 / (1.0 - p_eff)).to(dtype)[:, None, None]


def _random_keep(rows: int, width: int, generators: Sequence[torch.Generator]) -> Tensor:
    """Training dropout uniforms ``(G, rows, width)`` int16, compared with the thresholds.

    Each network draws from its own generator, so its masks do not depend on which networks
    share the stack. Four 16-bit uniforms per 64-bit draw: ~5× cheaper than ``torch.rand`` per
    element, which was the largest single cost of a training step.
    """
    n = rows * width
    words = (n + 3) // 4
    bits = torch.empty(len(generators), words, dtype=torch.int64)
    for row, gen in zip(bits, generators, strict=True):
        row.random_(-(2**63), None, generator=gen)
    return bits.view(torch.int16)[:, :n].view(len(generators), rows, width)


def _mcdrop_keep(keys: Tensor, call: int, n: int, p: Tensor, thresholds: Tensor) -> Tensor:
    """mcdrop's keep-masks of one dropout call for every network: ``(G, B, n)`` bool.

    Rates that mcdrop draws from full 16-bit lanes share one set of uniforms (thresholded per
    network); rates it draws from fewer bits (multiples of 1/256) take their own
    :func:`mcdrop.masks.keep_mask`, so every network's mask is exactly mcdrop's.
    """
    full = [masks.lane_bits(float(q)) == 16 for q in p]
    u = masks.uniform16(keys, call, n)[None] if any(full) else None  # (1, B, n)
    out = []
    for g, q in enumerate(p):
        if full[g]:
            out.append(u[0] >= thresholds[g])  # type: ignore[index]
        else:
            out.append(masks.keep_mask(keys, call, n, float(q)))
    return torch.stack(out)


def fit_stacked(
    net: StackedMLP,
    x: Tensor,
    y: Tensor,
    data_of: Tensor,
    *,
    epochs: int,
    weight_decay: Tensor,
    seeds: Sequence[int],
    mask_seeds: Sequence[int],
    lr: float = 1e-3,
    batch_size: int = 128,
    decay_biases: bool = False,
    on_epoch: Callable[[int], None] | None = None,
) -> Tensor:
    """Minibatch Adam on G networks at once, each on its own training set.

    Args:
        x: ``(P, N, D)`` training inputs, y: ``(P, N, 1)`` targets (all sets the same size N).
        data_of: ``(G,)`` int64, which training set each network fits.
        weight_decay: ``(G,)`` coupled L2 coefficient per network (gradient ``+ wd · w``, i.e.
            the penalty ``wd/2 · ‖w‖²``; Keras's ``l2(reg)`` is ``wd = 2 · reg``).
        seeds: one per network, seeding its minibatch order as
            ``mcdrop.recipes.train.fit(seed=)`` does.
        mask_seeds: one per network, seeding its dropout masks. A network's training depends
            only on its own seeds, data and hyper-parameters, not on the rest of the stack (the
            global RNG is never used).
        decay_biases: decay biases too (``fit``'s Adam does; the paper's Keras code does not).
        on_epoch: called with the epoch index after each epoch (progress reporting).

    Returns:
        ``(epochs, G)`` mean training loss of each network per epoch.
    """
    g_count, n = data_of.shape[0], x.shape[1]
    if len(seeds) != g_count or len(mask_seeds) != g_count or weight_decay.shape != (g_count,):
        raise ValueError("need one seed, one mask seed and one weight decay per network")
    orders = [torch.Generator().manual_seed(int(s)) for s in seeds]
    mask_gens = [torch.Generator().manual_seed(int(s)) for s in mask_seeds]
    optimiser = torch.optim.Adam(net.parameters(), lr=lr)
    decayed = [net.w1, net.w2] + ([net.b1, net.b2] if decay_biases else [])
    wd = weight_decay.to(x.dtype)[:, None, None]
    thresholds, scale = _lattice(torch.cat([net.p_in, net.p]), x.dtype)  # (2G, 1, 1)
    d, h = net.w1.shape[1:]
    rows = data_of[:, None]  # (G, 1): broadcasts against minibatch indices (G, B)
    history = torch.zeros(epochs, g_count, dtype=torch.float64)
    net.train()
    for epoch in range(epochs):
        order = torch.stack([torch.randperm(n, generator=gen) for gen in orders])  # (G, N)
        total = torch.zeros(g_count, dtype=torch.float64)
        for start in range(0, n, batch_size):
            idx = order[:, start : start + batch_size]  # (G, B)
            xb, yb = x[rows, idx], y[rows, idx]  # (G, B, D), (G, B, 1)
            keep = _random_keep(idx.shape[1], d + h, mask_gens)  # (G, B, D + H) int16
            keep_in = (keep[..., :d] >= thresholds[:g_count]).to(x.dtype) * scale[:g_count]
            keep_hidden = (keep[..., d:] >= thresholds[g_count:]).to(x.dtype) * scale[g_count:]
            out = net(xb, keep_in, keep_hidden)
            per_net = (out - yb).square().mean(dim=(1, 2))  # (G,)
            optimiser.zero_grad(set_to_none=True)
            # The sum keeps each network's gradient exactly its own loss's gradient.
            per_net.sum().backward()
            with torch.no_grad():
                for param in decayed:
                    param.grad.addcmul_(param, wd)  # type: ignore[union-attr]
            optimiser.step()
            total += per_net.detach().double() * idx.shape[1]
        history[epoch] = total / n
        if on_epoch is not None:
            on_epoch(epoch)
    net.eval()
    return history


def sample_stacked(
    net: StackedMLP,
    x: Tensor,
    n_samples: int,
    *,
    seed: int,
    max_pass_rows: int = 1 << 14,
) -> Iterator[tuple[slice, Tensor]]:
    """MC-dropout samples of all G networks on the same rows, with mcdrop's own masks.

    Network ``g``'s samples equal ``mcdrop.sample(net.to_mlp(g), x, n_samples, seed=seed)``
    (up to float rounding): the keys, the hashed uniforms and the thresholds are
    :mod:`mcdrop.masks`'s. Where mcdrop draws 16-bit lanes (every rate of the UCI grids), the
    uniforms are drawn once and shared by the networks, which differ only in their thresholds
    (common random numbers across the grid).

    Args:
        x: ``(N, D)`` inputs shared by the networks.
        max_pass_rows: the most replicated rows (samples × rows) per pass; memory
            ``G · max_pass_rows · H``.

    Yields:
        ``(samples, values)``: a slice of sample indices and ``(G, s, N)`` outputs.
    """
    if not bool((net.p > 0).all()):
        raise ValueError("every network needs a dropout rate above 0 to be MC-sampled")
    n, d = x.shape
    h = net.w1.shape[2]
    keys = masks.row_keys(x, seed)
    thresholds, scale = _lattice(net.p, x.dtype)
    in_thresholds, in_scale = _lattice(net.p_in, x.dtype)
    input_dropout = bool((net.p_in > 0).all())
    per_pass = max(1, max_pass_rows // n)
    with torch.inference_mode():
        for s0 in range(0, n_samples, per_pass):
            s = min(per_pass, n_samples - s0)
            chunk_keys = masks.sample_keys(keys, s0, s)  # (s * N,), sample-major
            # mcdrop numbers the MLP's dropout calls in order: input dropout (if any), hidden.
            if input_dropout:
                keep_in = _mcdrop_keep(chunk_keys, 0, d, net.p_in, in_thresholds) * in_scale
            else:
                keep_in = torch.ones(net.n_nets, 1, 1, dtype=x.dtype)
            hidden_call = 1 if input_dropout else 0
            keep_hidden = _mcdrop_keep(chunk_keys, hidden_call, h, net.p, thresholds) * scale
            out = net(x.repeat(s, 1), keep_in, keep_hidden)  # (G, s * N, 1)
            yield slice(s0, s0 + s), out.reshape(-1, s, n)
