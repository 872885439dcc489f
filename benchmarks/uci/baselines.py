"""Baselines on the same splits: heteroscedastic MC dropout, Concrete dropout, Deep Ensembles.

Every method fits one-hidden-layer networks with a mean-and-variance head (outputs ``(μ, s)``
per row) on standardised data, stacked along a leading ``G`` axis as in
:mod:`benchmarks.uci.stacked`; every network owns its seeds (initialisation, minibatch order,
dropout noise), so a split's result does not depend on the splits trained beside it.

``het_mc_dropout`` (Kendall & Gal 2017's aleatoric + epistemic model): ``MLP(D, [H], 2,
dropout=p, input_dropout=p)`` whose second output is the log-variance, trained on the Gaussian
NLL + ``λ‖W‖²`` with ``λ = l²(1 − p)/(2N)`` (the paper's prior with the precision moved into the
likelihood); p from ``dropout_rates.txt`` by validation LL on the paper's 80/20 split, then
retrained on all training rows. Aleatoric variance from the model, epistemic from MC sampling.

``concrete_dropout`` (Gal, Hron & Kendall 2017): the same network with both dropout rates
learned through the concrete relaxation (temperature 0.1, initial p = 0.1), with the reference
implementation's objective (yaringal/ConcreteDropout, ``concrete-dropout-pytorch.ipynb``):
``mean(e^{-s}(y − μ)² + s)`` plus, per dropout layer, ``l²/N · ‖θ‖²/(1 − p)`` over the next
layer's weights and biases and ``2/N · D_in · (p log p + (1 − p) log(1 − p))``. No grid: one
network per split on all its training rows. Sampled with Bernoulli masks at the learned rates,
so it is an ordinary mcdrop ``MLP``.

``deep_ensembles`` (Lakshminarayanan, Pritzel & Blundell 2017, §3.1 and §3.3): 5 networks of
the same shape without dropout, variance ``softplus(s) + 1e-6``, Gaussian NLL, batch 100, 40
epochs (budget ``2017``), Torch's default initialisation (PyTorch's ``nn.Linear`` default is the
same uniform ±1/√fan_in); ``--adversarial`` adds fast-gradient-sign examples with ε = 0.01 ×
each input's training range. The prediction is the uniform mixture of the members. Adam's
learning rate is chosen per split from :data:`DE_LRS` by the ensemble's validation LL on the
paper's 80/20 split (``--lr`` fixes it; ``--fine-lr`` chooses from :data:`DE_LRS_FINE`, which
naval needs): the paper's stated 0.1 ("unless otherwise specified")
does not converge in 40 epochs of 3 steps on the small datasets (yacht: training NLL ≈ 0
against ≈ −2.5 at 0.01, test RMSE 5.7 against 0.9 on splits 0–3), so taken literally it is not
the setting behind their table. A rate chosen on 80 % of the rows can still diverge when the
members are retrained on all of them (boston at 80 epochs: two splits, test RMSE 13.5): a
split whose retrained member ends worse than the constant predictor (:func:`diverged`) is
retrained at the grid's next lower rate. ``--val-epochs 1,2,3`` chooses the epochs on
validation too, from 1, 2 or 3 times the budget's (naval's members are still under-fitted at
the paper's 40: docs/uci-plan.md §3b).

Test metrics as for MC dropout: the mixture log-likelihood ``log 1/S Σ_s N(y; μ_s, σ²_s)`` in
original units, streamed through :class:`mcdrop.stats.RegressionAccumulator` (S = T MC samples,
or the M members); ``uci.json`` also keeps Deep Ensembles' own score, the log-likelihood of
the moment-matched Gaussian (``ll_moment_matched``).

Shape legend: ``G`` networks, ``B`` batch rows, ``N`` rows, ``D`` features, ``H`` hidden units,
``S`` samples.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

import mcdrop
from benchmarks.uci.data import UCISplit, read_grid, read_split
from benchmarks.uci.protocol import (
    LENGTHSCALE,
    Options,
    Part,
    budget_epochs,
    chosen_splits,
    crps_samples,
    derived_seed,
    glorot_,
    network_seed,
    progress_bar,
    test_part,
    validation_part,
)
from benchmarks.uci.results import DatasetResult, SplitResult
from mcdrop import checkpoint, predict, sample_chunks, stats
from mcdrop.nets import MLP

#: Concrete relaxation temperature and initial rate (the reference implementation's).
CONCRETE_TEMPERATURE = 0.1
CONCRETE_INIT_P = 0.1
#: Deep Ensembles' paper settings.
DE_LR = 0.1
#: Learning rates Deep Ensembles chooses from on validation (the paper's 0.1 and two smaller).
DE_LRS = (0.1, 0.01, 0.001)
#: ``--fine-lr``: half-decade steps over the same range (naval's best, 0.003, falls between).
DE_LRS_FINE = (0.1, 0.03, 0.01, 0.003, 0.001)
DE_BATCH = 100
DE_ADVERSARIAL_EPS = 0.01


@dataclass(frozen=True)
class Recipe:
    """How a method trains its networks."""

    dropout: str  # "bernoulli", "concrete" or "none"
    variance: str  # "log" (the head is log σ²) or "softplus" (σ² = softplus + 1e-6)
    lr: float = 1e-3
    batch_size: int = 128


RECIPES = {
    "het_mc_dropout": Recipe("bernoulli", "log"),
    "concrete_dropout": Recipe("concrete", "log"),
    "deep_ensembles": Recipe("none", "softplus", lr=DE_LR, batch_size=DE_BATCH),
}


class StackedGaussianMLP(nn.Module):
    """G networks ``dropout(p_in) → linear(D, H) → ReLU → dropout(p) → linear(H, 2)``.

    Args:
        nets: ``MLP(D, [H], 2, ...)`` networks whose weights are copied.
        p_in, p: ``(G,)`` initial dropout rates (learned, as logits, when ``concrete``).
        concrete: learn the rates through the concrete relaxation.
    """

    def __init__(self, nets: Sequence[MLP], p_in: Tensor, p: Tensor, concrete: bool) -> None:
        super().__init__()
        first = [[m for m in n.layers if isinstance(m, nn.Linear)] for n in nets]
        self.w1 = nn.Parameter(torch.stack([f[0].weight.detach().T for f in first]).clone())
        self.b1 = nn.Parameter(torch.stack([f[0].bias.detach()[None] for f in first]).clone())
        self.w2 = nn.Parameter(torch.stack([f[1].weight.detach().T for f in first]).clone())
        self.b2 = nn.Parameter(torch.stack([f[1].bias.detach()[None] for f in first]).clone())
        logits = torch.stack([p_in, p]).logit()[..., None, None]  # (2, G, 1, 1)
        self.concrete = concrete
        if concrete:
            self.p_logit = nn.Parameter(logits.clone())
        else:
            self.register_buffer("p_logit", logits.clone())

    @property
    def rates(self) -> Tensor:
        """``(2, G)``: input and hidden dropout rates."""
        return torch.sigmoid(self.p_logit.detach())[..., 0, 0]

    def _drop(self, x: Tensor, which: int, u: Tensor | None) -> Tensor:
        if u is None:
            return x
        p = torch.sigmoid(self.p_logit[which])  # (G, 1, 1)
        if self.concrete:
            eps = 1e-7  # the reference implementation's
            drop = torch.sigmoid(
                (
                    torch.log(p + eps)
                    - torch.log(1 - p + eps)
                    + torch.log(u + eps)
                    - torch.log(1 - u + eps)
                )
                / CONCRETE_TEMPERATURE
            )
            return x * (1 - drop) / (1 - p)
        return x * (u >= p).to(x.dtype) / (1 - p)

    def forward(self, x: Tensor, u_in: Tensor | None, u_hidden: Tensor | None) -> Tensor:
        """``x (G, B, D)``, uniforms ``(G, B, D)`` / ``(G, B, H)`` (None: no dropout) →
        ``(G, B, 2)``."""
        hidden = torch.baddbmm(self.b1, self._drop(x, 0, u_in), self.w1).relu()
        return torch.baddbmm(self.b2, self._drop(hidden, 1, u_hidden), self.w2)

    def regulariser(self, n_rows: int, lengthscale: float) -> Tensor:
        """Concrete dropout's per-network regulariser ``(G,)`` (see the module docstring)."""
        p = torch.sigmoid(self.p_logit)[..., 0, 0]  # (2, G)
        d, h = self.w1.shape[1], self.w1.shape[2]
        wr, dr = lengthscale**2 / n_rows, 2.0 / n_rows
        sq1 = self.w1.square().sum((1, 2)) + self.b1.square().sum((1, 2))
        sq2 = self.w2.square().sum((1, 2)) + self.b2.square().sum((1, 2))
        weights = wr * (sq1 / (1 - p[0]) + sq2 / (1 - p[1]))
        entropy = p * torch.log(p) + (1 - p) * torch.log(1 - p)  # (2, G)
        return weights + dr * (d * entropy[0] + h * entropy[1])

    def to_mlp(self, g: int) -> MLP:
        """Network ``g`` as a plain mcdrop ``MLP`` with Bernoulli dropout at its (learned) rates."""
        d, h = self.w1.shape[1:]
        p_in, p = (float(r) for r in self.rates[:, g])
        net = MLP(d, [h], 2, dropout=p, input_dropout=p_in)
        first, second = (m for m in net.layers if isinstance(m, nn.Linear))
        with torch.no_grad():
            first.weight.copy_(self.w1[g].T)
            first.bias.copy_(self.b1[g, 0])
            second.weight.copy_(self.w2[g].T)
            second.bias.copy_(self.b2[g, 0])
        return net.eval()


def log_variance(s: Tensor, variance: str) -> Tensor:
    """The head's second output as ``log σ²``."""
    return s if variance == "log" else torch.log(F.softplus(s) + 1e-6)


def gaussian_nll(out: Tensor, y: Tensor, variance: str) -> Tensor:
    """Mean Gaussian NLL per network (constant dropped): ``out (G, B, 2)``, ``y (G, B, 1)`` →
    ``(G,)``."""
    mu, log_var = out[..., :1], log_variance(out[..., 1:], variance)
    return 0.5 * (log_var + (y - mu).square() * torch.exp(-log_var)).mean((1, 2))


def fit_gaussian_stack(
    net: StackedGaussianMLP,
    x: Tensor,
    y: Tensor,
    data_of: Tensor,
    *,
    recipe: Recipe,
    epochs: int,
    weight_decay: Tensor,
    seeds: Sequence[int],
    lengthscale: float = LENGTHSCALE,
    adversarial: bool = False,
    on_epoch: Callable[[int, StackedGaussianMLP], None] | None = None,
) -> Tensor:
    """Minibatch Adam on G networks, each on its own training set and with its own seeds.

    Args:
        x: ``(P, N, D)``; y: ``(P, N, 1)``; data_of: ``(G,)`` which set each network fits.
        weight_decay: ``(G,)`` coupled L2 on the weight matrices (Bernoulli dropout only).
        seeds: one per network: its minibatch order (``seed + 1``) and noise (``seed + 2``).
        on_epoch: called after each epoch with the number of epochs done and ``net`` (to
            score the networks as they stand).

    Returns:
        ``(epochs, G)`` mean training loss per epoch.
    """
    g_count, n = data_of.shape[0], x.shape[1]
    d, h = net.w1.shape[1:]
    orders = [torch.Generator().manual_seed(int(s) + 1) for s in seeds]
    noise = [torch.Generator().manual_seed(int(s) + 2) for s in seeds]
    optimiser = torch.optim.Adam(net.parameters(), lr=recipe.lr)
    wd = weight_decay.to(x.dtype)[:, None, None]
    rows = data_of[:, None]
    # FGSM's ε per input dimension: 0.01 × its range on the network's own training rows.
    eps = DE_ADVERSARIAL_EPS * (x.amax(1) - x.amin(1))[data_of][:, None, :]  # (G, 1, D)
    history = torch.zeros(epochs, g_count, dtype=torch.float64)
    net.train()
    for epoch in range(epochs):
        order = torch.stack([torch.randperm(n, generator=gen) for gen in orders])  # (G, N)
        total = torch.zeros(g_count, dtype=torch.float64)
        for start in range(0, n, recipe.batch_size):
            idx = order[:, start : start + recipe.batch_size]  # (G, B)
            b = idx.shape[1]
            xb, yb = x[rows, idx], y[rows, idx]
            u_in = u_hidden = None
            if recipe.dropout != "none":
                u = torch.stack([torch.rand(b, d + h, generator=gen) for gen in noise])
                u_in, u_hidden = u[..., :d], u[..., d:]
            if adversarial:
                xb = xb.clone().requires_grad_(True)
            per_net = gaussian_nll(net(xb, u_in, u_hidden), yb, recipe.variance)
            loss = per_net
            if adversarial:
                (grad,) = torch.autograd.grad(per_net.sum(), xb, retain_graph=True)
                x_adv = (xb + eps * grad.sign()).detach()
                loss = loss + gaussian_nll(net(x_adv, u_in, u_hidden), yb, recipe.variance)
            if recipe.dropout == "concrete":
                # The reference's objective: twice the NLL plus the regulariser.
                loss = 2 * loss + net.regulariser(n, lengthscale)
            optimiser.zero_grad(set_to_none=True)
            loss.sum().backward()  # a sum: each network's gradient is its own loss's
            if recipe.dropout == "bernoulli":
                with torch.no_grad():
                    for param in (net.w1, net.w2):
                        param.grad.addcmul_(param, wd)  # type: ignore[union-attr]
            optimiser.step()
            total += per_net.detach().double() * b
        history[epoch] = total / n
        if on_epoch is not None:
            on_epoch(epoch + 1, net)
    net.eval()
    return history


def build_stack(
    parts_n_features: int,
    n_hidden: int,
    rates: Sequence[float],
    seeds: Sequence[int],
    recipe: Recipe,
    init: str,
) -> StackedGaussianMLP:
    """Networks initialised from their own seeds (``MLP(D, [H], 2)``)."""
    nets = []
    for seed in seeds:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = MLP(parts_n_features, [n_hidden], 2, dropout=0.0)
            nets.append(glorot_(net) if init == "glorot" else net)
    p = torch.tensor(list(rates), dtype=torch.float32)
    return StackedGaussianMLP(nets, p.clone(), p, concrete=recipe.dropout == "concrete")


def original_units(values: Tensor, part: Part) -> Tensor:
    """``(s, n, 2)`` standardised ``(μ, log σ²)`` → original units, float64."""
    values = values.double()
    mean = values[..., :1] * part.y_std + part.y_mean
    log_var = values[..., 1:] + 2 * math.log(part.y_std)
    return torch.cat([mean, log_var], dim=-1)


def mixture_metrics(
    samples: Sequence[Tensor] | Tensor, part: Part, opts: Options, rmse_det: float
) -> dict[str, float]:
    """Test metrics of a Gaussian mixture given as ``(s, N, 2)`` chunks of (μ, log σ²) in
    original units: the same mixture LL, PICP95, width and CRPS as the MC-dropout rows, plus the
    moment-matched Gaussian's LL (Deep Ensembles' score)."""
    y = part.y_eval
    n = y.shape[0]
    acc = stats.RegressionAccumulator(n, 1, noise_variance=None, targets=y, level=0.95)
    kept: list[Tensor] = []
    n_crps, held = crps_samples(opts, n), 0
    for chunk in samples:
        acc.update(chunk)
        if held < n_crps:
            kept.append(chunk[: n_crps - held])
            held += kept[-1].shape[0]
    summary = acc.result()
    assert summary.log_likelihood is not None
    inside = (y >= summary.lower) & (y <= summary.upper)
    var = summary.variance.double()
    gaussian = -0.5 * (torch.log(2 * math.pi * var) + (y - summary.mean.double()).square() / var)
    both = torch.cat(kept)  # (S', N, 2)
    means, noise = both[..., :1].float(), both[..., 1:].exp().float()
    total_crps = 0.0
    rows = max(1, (1 << 22) // both.shape[0] ** 2)
    for r0 in range(0, n, rows):
        part_crps = stats.mixture_crps(
            y[r0 : r0 + rows].float(), means[:, r0 : r0 + rows], noise[:, r0 : r0 + rows]
        )
        total_crps += float(part_crps.sum())
    return {
        "rmse": float((summary.mean.double() - y).square().mean().sqrt()),
        "rmse_deterministic": rmse_det,
        "ll": float(summary.log_likelihood.double().mean()),
        "picp95": float(inside.double().mean()),
        "width95": float((summary.upper - summary.lower).double().mean()),
        "crps": total_crps / n,
        "crps_samples": both.shape[0],
        "ll_moment_matched": float(gaussian.mean()),
    }


def mc_metrics(net: MLP, part: Part, opts: Options, seed: int) -> dict[str, float]:
    """Test metrics of a heteroscedastic MC-dropout network (T = ``--n-samples``)."""
    chunks = (
        original_units(c.values, part)
        for c in sample_chunks(net, part.x_eval, opts.n_samples, seed=seed, max_pass_rows=1 << 16)
    )
    det = original_units(predict(net, part.x_eval)[None], part)[0, :, :1]
    rmse_det = float((det - part.y_eval).square().mean().sqrt())
    return mixture_metrics(chunks, part, opts, rmse_det)


def validation_ll(net: MLP, part: Part, opts: Options, seed: int) -> float:
    """Mixture LL on the validation rows with ``--val-samples`` MC samples."""
    acc = stats.RegressionAccumulator(
        part.y_eval.shape[0], 1, noise_variance=None, targets=part.y_eval
    )
    for c in sample_chunks(net, part.x_eval, opts.val_samples, seed=seed, max_pass_rows=1 << 16):
        acc.update(original_units(c.values, part))
    ll = acc.result().log_likelihood
    assert ll is not None
    value = float(ll.double().mean())
    return value if math.isfinite(value) else -math.inf


def _train(
    parts: Sequence[Part],
    rates: Sequence[Sequence[float]],
    seeds: Sequence[Sequence[int]],
    n_hidden: int,
    recipe: Recipe,
    epochs: int,
    opts: Options,
    lengthscale: float,
    on_epoch: Callable[[int, StackedGaussianMLP], None] | None = None,
) -> tuple[StackedGaussianMLP, Tensor]:
    """One stack: for each part, one network per rate (part-major order), and its training
    history ``(epochs, G)`` (:func:`fit_gaussian_stack`)."""
    flat_rates = [r for rs in rates for r in rs]
    flat_seeds = [s for ss in seeds for s in ss]
    data_of = torch.tensor([i for i, rs in enumerate(rates) for _ in rs])
    stack = build_stack(
        parts[0].x_train.shape[1], n_hidden, flat_rates, flat_seeds, recipe, opts.init
    )
    n_rows = parts[0].x_train.shape[0]
    # λ = l²(1 − p)/(2N) on ‖W‖²; Adam's coupled weight decay is 2λ (see protocol.weight_decay).
    decay = torch.tensor([lengthscale**2 * (1 - p) / n_rows for p in flat_rates])
    history = fit_gaussian_stack(
        stack,
        torch.stack([p.x_train for p in parts]),
        torch.stack([p.y_train for p in parts]),
        data_of,
        recipe=recipe,
        epochs=epochs,
        weight_decay=decay,
        seeds=flat_seeds,
        lengthscale=lengthscale,
        adversarial=opts.adversarial,
        on_epoch=on_epoch,
    )
    return stack, history


def run_baseline(name: str, opts: Options) -> DatasetResult:
    """``opts.method`` (a key of :data:`RECIPES`) on the chosen splits of one dataset."""
    started = time.perf_counter()
    recipe = RECIPES[opts.method]
    grid = read_grid(opts.data / name)
    epochs = opts.epochs or budget_epochs(opts.budget, grid)
    lengthscale = LENGTHSCALE if opts.lengthscale is None else opts.lengthscale
    method = opts.row_method(opts.method)
    result = DatasetResult(name, epochs, {method: []})
    chosen = chosen_splits(name, opts)
    with progress_bar(name, len(chosen), opts) as bar:
        for g0 in range(0, len(chosen), opts.split_batch):
            group = chosen[g0 : g0 + opts.split_batch]
            splits = [read_split(opts.data, name, s) for s in group]
            test_parts = [test_part(s) for s in splits]
            val_lls = [math.nan] * len(splits)
            if recipe.dropout == "bernoulli":
                # p by validation LL, as the MC-dropout protocol chooses it.
                rates = grid.dropout_rates
                val_parts = [validation_part(s) for s in splits]
                seeds = [
                    [
                        network_seed(opts, name, s.split, opts.method, epochs, "grid", p)
                        for p in rates
                    ]
                    for s in splits
                ]
                bar.set_postfix_str(f"grid {len(splits) * len(rates)} nets")
                stack, _ = _train(
                    val_parts,
                    [rates] * len(splits),
                    seeds,
                    grid.n_hidden,
                    recipe,
                    epochs,
                    opts,
                    lengthscale,
                )
                finals = []
                for i, (split, part) in enumerate(zip(splits, val_parts, strict=True)):
                    seed = derived_seed(opts.seed, name, split.split, "validation")
                    lls = [
                        validation_ll(stack.to_mlp(i * len(rates) + j), part, opts, seed)
                        for j in range(len(rates))
                    ]
                    best = max(range(len(rates)), key=lambda j: lls[j])
                    finals.append([rates[best]])
                    val_lls[i] = lls[best]
            elif recipe.dropout == "concrete":
                finals = [[CONCRETE_INIT_P] for _ in splits]
            else:
                bar.set_postfix_str(f"ensembles of {opts.n_networks}")
                for row in run_ensembles(name, splits, grid.n_hidden, epochs, opts):
                    result.splits[method].append(row)
                    bar.update(1)
                continue
            seeds = [
                [
                    network_seed(opts, name, s.split, opts.method, epochs, "final", k, p)
                    for k, p in enumerate(rs)
                ]
                for s, rs in zip(splits, finals, strict=True)
            ]
            bar.set_postfix_str(f"final {sum(map(len, finals))} nets")
            stack, _ = _train(
                test_parts, finals, seeds, grid.n_hidden, recipe, epochs, opts, lengthscale
            )
            start = 0
            for i, (split, part) in enumerate(zip(splits, test_parts, strict=True)):
                members = range(start, start + len(finals[i]))
                start += len(finals[i])
                seed = derived_seed(opts.seed, name, split.split, "test")
                net = stack.to_mlp(members[0])
                metrics = mc_metrics(net, part, opts, seed)
                p_used = float(stack.rates[1, members[0]])
                if opts.save_models is not None:
                    save_model(opts.save_models, name, split.split, method, net, part, split)
                result.splits[method].append(
                    SplitResult(split.split, p_used, math.nan, val_ll=val_lls[i], **metrics)
                )
                bar.update(1)
    result.seconds = time.perf_counter() - started
    return result


def run_ensembles(
    name: str, splits: Sequence[UCISplit], n_hidden: int, epochs: int, opts: Options
) -> list[SplitResult]:
    """Deep Ensembles on a group of splits: the learning rate (and, with ``opts.val_epochs``,
    the epochs) per split by the ensemble's validation LL, unless ``opts.lr``; then M members
    retrained on all training rows with them; a split whose retrain :func:`diverged` is
    trained again at the grid's next lower rate."""
    base = RECIPES["deep_ensembles"]
    m = opts.n_networks
    lrs = (opts.lr,) if opts.lr is not None else DE_LRS_FINE if opts.fine_lr else DE_LRS
    epoch_grid = tuple(epochs * k for k in opts.val_epochs) or (epochs,)

    def train(
        group: Sequence[UCISplit],
        parts: Sequence[Part],
        phase: str,
        lr: float,
        n_epochs: int,
        on_epoch: Callable[[int, StackedGaussianMLP], None] | None = None,
    ) -> tuple[StackedGaussianMLP, Tensor]:
        seeds = [
            [
                network_seed(opts, name, s.split, opts.method, n_epochs, phase, k, lr)
                for k in range(m)
            ]
            for s in group
        ]
        recipe = dataclasses.replace(base, lr=lr)
        rates = [[0.0] * m] * len(parts)
        return _train(parts, rates, seeds, n_hidden, recipe, n_epochs, opts, 0.0, on_epoch)

    # Per split: the (rate, epochs) chosen, and its validation LL.
    chosen = [(lrs[0], epoch_grid[0])] * len(splits)
    val_lls = [math.nan] * len(splits)
    if len(lrs) * len(epoch_grid) > 1:
        val_parts = [validation_part(s) for s in splits]
        scores: dict[tuple[float, int], list[float]] = {}
        for lr in lrs:

            def score(done: int, stack: StackedGaussianMLP, lr: float = lr) -> None:
                if done in epoch_grid:
                    scores[(lr, done)] = [
                        ensemble_metrics(stack, range(i * m, (i + 1) * m), part, opts, base)["ll"]
                        for i, part in enumerate(val_parts)
                    ]

            # One run to the largest epochs, scored as it passes each count of the grid.
            train(splits, val_parts, "validation", lr, max(epoch_grid), score)
        for i in range(len(splits)):
            finite = {c: sc[i] if math.isfinite(sc[i]) else -math.inf for c, sc in scores.items()}
            best = max(scores, key=lambda c: finite[c])  # the first of equals: grid order
            chosen[i], val_lls[i] = best, finite[best]
    # A split whose retrain on all its rows diverged at its rate steps down the grid.
    pending = dict(enumerate(chosen))
    backoffs = [0] * len(splits)
    rows: dict[int, SplitResult] = {}
    while pending:
        lr, n_epochs = max(pending.values())
        group = sorted(i for i, c in pending.items() if c == (lr, n_epochs))
        parts = [test_part(splits[i]) for i in group]
        stack, history = train([splits[i] for i in group], parts, "final", lr, n_epochs)
        for j, (i, part) in enumerate(zip(group, parts, strict=True)):
            del pending[i]
            slower = [r for r in lrs if r < lr]
            if slower and diverged(history[:, j * m : (j + 1) * m]):
                pending[i] = (max(slower), n_epochs)
                backoffs[i] += 1
                continue
            metrics = ensemble_metrics(stack, range(j * m, (j + 1) * m), part, opts, base)
            rows[i] = SplitResult(
                splits[i].split,
                0.0,
                math.nan,
                val_ll=val_lls[i],
                lr=lr,
                lr_backoffs=backoffs[i],
                n_epochs=n_epochs,
                **metrics,
            )
    return [rows[i] for i in range(len(splits))]


#: The mean training NLL (standardised units, constant dropped) of the constant predictor: the
#: training mean with unit variance. A member that ends above it has learnt nothing: diverged.
CONSTANT_NLL = 0.5


def diverged(history: Tensor) -> bool:
    """Whether any member's last epoch of training ``history`` ``(epochs, M)`` ended worse
    than :data:`CONSTANT_NLL` (or not finite): its learning rate is too high for it."""
    last = history[-1]
    return bool((~torch.isfinite(last) | (last > CONSTANT_NLL)).any())


def ensemble_metrics(
    stack: StackedGaussianMLP, members: range, part: Part, opts: Options, recipe: Recipe
) -> dict[str, float]:
    """The M members' uniform Gaussian mixture on the test rows."""
    x = part.x_eval.expand(len(members), -1, -1)  # (M, N, D)
    m = slice(members.start, members.stop)
    with torch.inference_mode():
        hidden = torch.baddbmm(stack.b1[m], x, stack.w1[m]).relu()
        out = torch.baddbmm(stack.b2[m], hidden, stack.w2[m])  # (M, N, 2)
    values = torch.cat([out[..., :1], log_variance(out[..., 1:], recipe.variance)], dim=-1)
    values = original_units(values, part)  # (M, N, 2)
    rmse_det = float((values[..., 0].mean(0, keepdim=True).T - part.y_eval).square().mean().sqrt())
    return mixture_metrics([values], part, opts, rmse_det)


def save_model(
    root: Path, name: str, split: int, method: str, net: MLP, part: Part, data: UCISplit
) -> Path:
    """A served-as-usual model directory for a heteroscedastic network, written by
    :func:`mcdrop.save` (which checks that the folder rebuilds the network): built-in ``mlp``
    ``(D, [H], 2)``, ``likelihood: heteroscedastic`` and the split's standardisation in the
    manifest, so it takes and returns original units."""
    x_mean, x_std = data.x_train.mean(0), data.x_train.std(0)
    x_std = [float(s) if s > 0 else 1.0 for s in x_std]
    linears = [m for m in net.layers if isinstance(m, nn.Linear)]
    p_in = next((m.p for m in net.layers if isinstance(m, nn.Dropout)), 0.0)
    p_hidden = [m.p for m in net.layers if isinstance(m, nn.Dropout)][-1]
    model_name = f"uci-{name}-{method}-split{split}".replace("+", "-")
    mcdrop.save(
        net,
        Path(root) / model_name,
        task="regression",
        input_shape=[linears[0].in_features],
        labels=["y"],
        architecture="mlp",
        params={
            "in_features": linears[0].in_features,
            "hidden": [linears[0].out_features],
            "out_features": 2,
            "dropout": p_hidden,
            "input_dropout": p_in,
        },
        likelihood="heteroscedastic",
        dropout=p_hidden,
        input_normalization=checkpoint.Normalization([float(v) for v in x_mean], x_std),
        target_normalization=checkpoint.Normalization([part.y_mean], [part.y_std]),
        training={"benchmark": "benchmarks.uci", "dataset": name, "split": split},
        description=f"{method} on UCI {name}, split {split} (benchmarks.uci)",
    )
    return Path(root) / model_name
