"""Dropout that sampling cannot reach is named, never left to give too little variance."""

from __future__ import annotations

import threading
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mcdrop import (
    LockedDropout,
    NoDropoutError,
    UnsampledDropoutWarning,
    is_sampling,
    plan,
    predict,
    sample,
)
from mcdrop.coverage import CallCounter, declared_rates


class GatedAttention(nn.Module):
    """Self-attention through ``F.scaled_dot_product_attention``, the rate given in training
    only (``fixed=False``, the common idiom) or under MC sampling too (``fixed=True``), and an
    ``nn.Dropout`` of another rate after it."""

    def __init__(self, fixed: bool, p: float = 0.2, head_p: float = 0.1) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 24)
        self.p = p
        self.fixed = fixed
        self.drop = nn.Dropout(head_p)
        self.head = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:  # (N, L, 8) -> (N, 2)
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        p = self.p if self.training or (self.fixed and is_sampling()) else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        return self.head(self.drop(out.mean(1)))


class OnlyGated(nn.Module):
    """Its one dropout is ``F.dropout(..., self.dropout_p if self.training else 0.0)``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.dropout_p = 0.3

    def forward(self, x: Tensor) -> Tensor:
        return F.dropout(self.fc(x), self.dropout_p if self.training else 0.0, self.training)


class BorrowedAttention(nn.Module):
    """Holds an ``nn.MultiheadAttention`` with dropout but computes attention with its weights in
    its own code, without dropout: the module never runs."""

    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2, dropout=0.25, batch_first=True)
        self.drop = nn.Dropout(0.1)

    def forward(self, x: Tensor) -> Tensor:  # (N, L, 8) -> (N, 8)
        q, k, v = F.linear(x, self.mha.in_proj_weight, self.mha.in_proj_bias).chunk(3, dim=-1)
        return self.drop(F.scaled_dot_product_attention(q, k, v).mean(1))


class Block(nn.Module):
    """Keeps its rate as ``self.p`` for the ``nn.Dropout`` it builds: that rate is reached."""

    def __init__(self, p: float = 0.3) -> None:
        super().__init__()
        self.p = p
        self.fc = nn.Linear(4, 4)
        self.drop = nn.Dropout(p)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc(x))


def _plan_warnings(model: nn.Module, x: Tensor) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        made = plan(model, x)
    messages = [str(w.message) for w in caught if w.category is UnsampledDropoutWarning]
    assert len(messages) == (1 if made.unsampled else 0)
    return messages


def test_declared_rates() -> None:
    class Custom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn_pdrop = 0.1
            self.p = 2.0  # a norm's p, not a rate
            self.dropout = nn.Dropout(0.0)  # a module, and a zero rate
            self.flag = True

    model = nn.ModuleDict(
        {
            "custom": Custom(),
            "drop": nn.Dropout(0.5),
            "locked": LockedDropout(0.2),
            "mha": nn.MultiheadAttention(8, 2, dropout=0.3),
            "lstm": nn.LSTM(4, 4, num_layers=2, dropout=0.4),
            "one_layer": nn.GRU(4, 4, num_layers=1),
        }
    )
    found = {(d.name, d.type, d.attribute, d.rate) for d in declared_rates(model)}
    assert found == {
        ("custom", "Custom", "attn_pdrop", 0.1),
        ("drop", "Dropout", "p", 0.5),
        ("locked", "LockedDropout", "p", 0.2),
        ("mha", "MultiheadAttention", "dropout", 0.3),
        ("lstm", "LSTM", "dropout", 0.4),
    }


def test_a_module_with_a_key_of_another_type_in_its_dict_samples() -> None:
    """A key that is no str in a module's ``__dict__`` (which setattr cannot make, but the dict
    takes) is no declared rate, and sampling the model works."""

    class Keyed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.drop = nn.Linear(4, 2), nn.Dropout(0.3)
            vars(self)[7] = 0.5

        def forward(self, x: Tensor) -> Tensor:
            return self.drop(self.fc(x))

    model = Keyed().eval()
    assert {(d.attribute, d.rate) for d in declared_rates(model)} == {("p", 0.3)}
    x = torch.randn(3, 4)
    assert sample(model, x, 4, seed=1).var(0).gt(0).any()


@pytest.mark.parametrize("head_p", [0.1, 0.2], ids=["other_rate", "same_rate"])
def test_a_rate_given_in_training_only_is_named_with_the_fix(head_p: float) -> None:
    """Named even where a submodule drops at the same rate (one config value for attention and
    the rest): the zero-rate attention call gives it away."""
    model = GatedAttention(fixed=False, p=0.2, head_p=head_p).eval()
    x = torch.randn(3, 5, 8)
    (message,) = _plan_warnings(model, x)
    assert (
        "(model) (GatedAttention, p=0.2) called F.scaled_dot_product_attention with dropout_p=0"
        in message
    )
    assert "mcdrop.is_sampling()" in message


def test_the_fixed_form_is_sampled_without_a_warning() -> None:
    torch.manual_seed(0)
    model = GatedAttention(fixed=True, head_p=0.0).eval()
    x = torch.randn(3, 5, 8)
    assert _plan_warnings(model, x) == []
    assert [c.kind for c in plan(model, x).calls] == ["attention dropout"]
    samples = sample(model, x, 16, seed=0)
    assert samples.var(0).min() > 0
    assert torch.allclose(sample(model, x[1:2], 16, seed=0)[:, 0], samples[:, 1], atol=1e-6)
    assert torch.equal(predict(model, x), model(x))  # dropout stays off outside sampling


def test_only_unreachable_dropout_is_an_error_that_names_it() -> None:
    with pytest.raises(NoDropoutError, match=r"OnlyGated, dropout_p=0.3\) ran without"):
        sample(OnlyGated().eval(), torch.randn(2, 4), 4, seed=0)


def test_a_module_that_never_runs_is_named() -> None:
    (message,) = _plan_warnings(BorrowedAttention().eval(), torch.randn(2, 3, 8))
    assert "mha (MultiheadAttention, dropout=0.25) never ran" in message


def test_a_rate_kept_for_a_submodule_is_reached() -> None:
    assert _plan_warnings(nn.Sequential(Block(), nn.Linear(4, 2)).eval(), torch.randn(2, 4)) == []


def test_counter_counts_own_calls_and_only_this_threads_passes() -> None:
    model = nn.Sequential(Block(), nn.Dropout(0.2), nn.Linear(4, 2)).eval()
    x = torch.randn(2, 4)
    with CallCounter(model) as counter:
        sample(model, x, 3, seed=0)
    uses = {u.declared.name: (u.runs, u.calls) for u in counter.uses()}
    # plan (5 passes, and a 6th that routes the dropout modules: mcdrop.routing) + 1 sampling
    # pass; the block's own code made no call, its Dropout did.
    assert uses == {"0": (7, 0), "0.drop": (7, 7), "1": (7, 7)}
    assert counter.unsampled() == []
    # Hooks are removed on exit, and no pass outside a sampling context is counted.
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    with CallCounter(model) as counter:
        model(x)
        other = threading.Thread(target=sample, args=(model, x, 3), kwargs={"seed": 0})
        other.start()
        other.join()
    assert all(u.runs == 0 for u in counter.uses())


def test_is_sampling() -> None:
    seen: list[bool] = []

    class Spy(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            seen.append(is_sampling())
            return F.dropout(x, 0.5, self.training)

    model = Spy().eval()
    sample(model, torch.randn(2, 3), 2, seed=0)
    assert seen
    assert all(seen)
    seen.clear()
    model(torch.randn(2, 3))
    assert seen == [False]
    assert not is_sampling()
