"""benchmarks.uci.stacked: the stacked trainer and sampler against mcdrop's plain ``fit`` and
``sample``."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from benchmarks.uci.stacked import StackedMLP, fit_stacked, sample_stacked
from mcdrop import sample
from mcdrop.nets import MLP
from mcdrop.recipes.train import fit


def _regression(n: int = 300, d: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen)
    y = x[:, :1] * 2 - x[:, 1:2].square() + 0.3 * torch.randn(n, 1, generator=gen)
    return x, y


def _mlps(n: int, d: int, p: float) -> list[MLP]:
    nets = []
    for i in range(n):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(i)
            nets.append(MLP(d, [20], 1, dropout=p, input_dropout=p))
    return nets


def test_stacked_fit_matches_fit_without_dropout():
    # Without dropout both trainers are deterministic given the minibatch order, so the stack
    # must reproduce fit exactly (up to float rounding), weight decay per network included.
    x, y = _regression()
    nets = _mlps(3, x.shape[1], 0.0)
    stacked = StackedMLP.from_mlps(nets, [0.0] * 3)
    decays = torch.tensor([0.0, 1e-3, 1e-1])
    history = fit_stacked(
        stacked,
        x[None],
        y[None],
        torch.zeros(3, dtype=torch.int64),
        epochs=15,
        weight_decay=decays,
        seeds=[1, 2, 3],
        mask_seeds=[0, 0, 0],
        decay_biases=True,  # fit's Adam decays every parameter
    )
    for g, net in enumerate(nets):
        plain = copy.deepcopy(net)
        losses = fit(
            plain, x, y, nn.MSELoss(), epochs=15, weight_decay=float(decays[g]), seed=g + 1
        )
        torch.testing.assert_close(history[:, g], torch.tensor(losses, dtype=torch.float64))
        trained = stacked.to_mlp(g)
        for a, b in zip(plain.parameters(), trained.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # a training run: 2 × 6 networks, 40 epochs each
def test_stacked_fit_with_dropout_matches_fit_statistically():
    # Dropout masks come from different generators, so compare the trained networks' test
    # error over several initialisations rather than exactly.
    x, y = _regression(n=400)
    x_test, y_test = _regression(n=400, seed=1)
    p, n_nets = 0.1, 6
    nets = _mlps(n_nets, x.shape[1], p)
    stacked = StackedMLP.from_mlps(nets, [p] * n_nets)
    fit_stacked(
        stacked,
        x[None],
        y[None],
        torch.zeros(n_nets, dtype=torch.int64),
        epochs=40,
        weight_decay=torch.full((n_nets,), 1e-4),
        seeds=list(range(n_nets)),
        mask_seeds=list(range(100, 100 + n_nets)),
        decay_biases=True,
    )
    errors = {"stacked": [], "fit": []}
    for g, net in enumerate(nets):
        plain = copy.deepcopy(net)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(100 + g)
            fit(plain, x, y, nn.MSELoss(), epochs=40, weight_decay=1e-4, seed=g)
        for name, trained in (("fit", plain.eval()), ("stacked", stacked.to_mlp(g))):
            with torch.no_grad():
                errors[name].append(float((trained(x_test) - y_test).square().mean()))
    stacked_mse, fit_mse = (torch.tensor(errors[k]) for k in ("stacked", "fit"))
    se = math.hypot(stacked_mse.std() / n_nets**0.5, fit_mse.std() / n_nets**0.5)
    assert abs(float(stacked_mse.mean() - fit_mse.mean())) < 3 * se + 0.02


def test_stacked_sampler_reproduces_mcdrop_sample():
    x, _ = _regression(n=40)
    rates = [0.05, 0.1, 0.25, 0.5]  # 1/4 and 1/2: mcdrop draws those from fewer bits
    stacked = StackedMLP.from_mlps(_mlps(len(rates), x.shape[1], 0.1), rates)
    chunks = list(sample_stacked(stacked, x, 250, seed=7, max_pass_rows=1000))
    assert [c[0] for c in chunks] == [slice(s, min(s + 25, 250)) for s in range(0, 250, 25)]
    values = torch.cat([v for _, v in chunks], dim=1)  # (G, S, N)
    for g in range(len(rates)):
        expected = sample(stacked.to_mlp(g), x, 250, seed=7)[..., 0]  # (S, N)
        torch.testing.assert_close(values[g], expected, rtol=1e-5, atol=1e-5)


def test_stacked_sampler_without_input_dropout_reproduces_mcdrop_sample():
    # Without input dropout the MLP's hidden dropout is mcdrop's call 0, not 1.
    x, _ = _regression(n=30)
    rates = [0.05, 0.1]
    stacked = StackedMLP.from_mlps(_mlps(2, x.shape[1], 0.1), rates, p_in=[0.0, 0.0])
    values = torch.cat([v for _, v in sample_stacked(stacked, x, 40, seed=5)], dim=1)
    for g in range(len(rates)):
        net = stacked.to_mlp(g)
        assert not any(isinstance(m, nn.Dropout) for m in net.layers[:1])
        expected = sample(net, x, 40, seed=5)[..., 0]
        torch.testing.assert_close(values[g], expected, rtol=1e-5, atol=1e-5)
