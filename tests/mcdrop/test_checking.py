"""``mcdrop.check``: what sampling will do with a model, and the problems that make its
uncertainty meaningless or too small."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import mcdrop
from mcdrop.checking import (
    MAX_ROWS,
    MAX_SAMPLES,
    batch_problem,
    compute_eps,
    example_inputs,
    probabilities_problem,
)
from mcdrop.checkpoint import LoadedModel, ModelSpec
from mcdrop.dropout import DropConnectLinear
from tests.conftest import MODELS, TOKEN_ROWS, save_tokens
from tests.factories import (
    AlwaysDrops,
    BatchOf,
    Logs,
    MaxBatch,
    MaxPass,
    Outputs,
    Picky,
    Returns,
    Sizes,
)
from tests.mcdrop.test_coverage import GatedAttention, OnlyGated
from tests.mcdrop.test_rnn import Last


def _codes(report: mcdrop.CheckReport) -> list[tuple[str, str]]:
    return [(p.severity, p.code) for p in report.problems]


def test_a_bundled_model_is_ok() -> None:
    report = mcdrop.check(mcdrop.load(MODELS / "digits"))
    assert report.ok
    assert report.problems == ()
    assert [(d.module, d.type, d.rate, d.calls, d.sampled) for d in report.dropouts] == [
        ("net.layers.2", "Dropout", 0.3, 1, True),
        ("net.layers.5", "Dropout", 0.3, 1, True),
    ]
    assert [str(c) for c in report.calls] == ["1. dropout (B, 256)", "2. dropout (B, 256)"]
    assert report.varies
    assert report.constant_outputs == ()
    assert report.prefix
    assert report.ms_per_row_sample is not None
    assert report.ms_per_row_sample > 0
    text = str(report)
    assert text.startswith("digits: rows [64], 10 outputs\n")
    assert "samples vary: yes, every output (16 samples of 4 rows)" in text
    assert text.endswith("result: ok")
    data = json.loads(json.dumps(report.to_dict()))
    assert data["ok"] is True
    assert data["calls"][0] == {
        "kind": "dropout",
        "shape": ["B", 256],
        "batch_dim": 0,
        "per_row": 1,
    }
    assert data["samples"] == {
        "n_samples": 16,
        "n_rows": 4,
        "vary": True,
        "constant_outputs": [],
    }


def test_example_inputs_follow_the_input_normalisation() -> None:
    spec = mcdrop.load(MODELS / "diabetes").spec
    x = torch.cat([example_inputs(spec, 50, seed) for seed in range(4)])  # (MAX_ROWS at a time)
    assert x.shape == (200, 10)
    assert spec.input_normalization is not None
    mean = torch.tensor(spec.input_normalization.mean)
    assert torch.allclose(
        x.mean(0), mean, atol=0.3 * float(torch.tensor(spec.input_normalization.std).max())
    )


def test_example_inputs_are_drawn_from_a_models_own_rows(tmp_path: Path) -> None:
    """Rows of its own, each of them before any twice, in an order the seed fixes; a model
    without them gets the standard-normal rows of its spec, as before."""
    loaded = mcdrop.load(save_tokens(tmp_path / "tokens"), allowed_factories=["tests.factories"])
    x = example_inputs(loaded, 7, seed=1)
    assert x.shape == (7, 6)
    assert torch.equal(x, example_inputs(loaded, 7, seed=1))
    rows = {tuple(r) for r in TOKEN_ROWS.tolist()}
    assert {tuple(r) for r in x[:3].tolist()} == rows  # all three first
    assert torch.equal(x[3:6], x[:3])  # then again, in that order
    assert torch.equal(x[6], x[0])
    orders = {tuple(map(tuple, example_inputs(loaded, 3, seed).tolist())) for seed in range(8)}
    assert len(orders) > 1
    diabetes = mcdrop.load(MODELS / "diabetes")
    assert torch.equal(example_inputs(diabetes, 5, 3), example_inputs(diabetes.spec, 5, 3))


def test_a_token_model_is_checked_on_its_own_rows(tmp_path: Path) -> None:
    """Without rows of its own the check's random rows are no token ids: forward_failed, with
    what to do; with them, ok."""
    without = mcdrop.load(
        save_tokens(tmp_path / "bare", example_inputs=None), allowed_factories=["tests.factories"]
    )
    report = mcdrop.check(without)
    assert _codes(report) == [("error", "forward_failed")]
    assert "index out of range" in report.problems[0].message
    assert "mcdrop.save(..., example_inputs=rows)" in report.problems[0].message
    # Rows the caller gives are theirs: no word about random ones.
    bad = mcdrop.check(without, TOKEN_ROWS * 0 + 9, timed=False)
    assert "example_inputs" not in bad.problems[0].message
    loaded = mcdrop.load(save_tokens(tmp_path / "tokens"), allowed_factories=["tests.factories"])
    report = mcdrop.check(loaded, n_rows=5, timed=False)
    assert report.ok, str(report)
    assert report.problems == ()
    assert "samples vary: yes, every output (16 samples of 5 rows)" in str(report)


class Ignored(nn.Module):
    """Dropout whose result is thrown away: every sample is the same."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: Tensor) -> Tensor:
        self.drop(x)
        return self.fc(x)


class PartlyConstant(nn.Module):
    """Output 1 comes from before the dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc(x)
        return torch.stack([self.drop(h)[:, 0], h[:, 1]], dim=1)


class BatchCentred(nn.Module):
    """Subtracts the batch mean: a row's output depends on its batch."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc(x)
        return self.drop(h - h.mean(0))


class Pooled(nn.Module):
    """Dropout on a tensor without a batch dimension."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x) + self.drop(x.sum(0))[:2]


@pytest.mark.parametrize(
    ("model", "shape", "problems"),
    [
        (nn.Linear(4, 2), (4, 4), [("error", "no_dropout")]),
        (OnlyGated(), (4, 4), [("error", "no_dropout")]),
        (Ignored(), (4, 4), [("error", "no_variance")]),
        (BatchCentred(), (4, 4), [("error", "batch_mixing")]),
        (Pooled(), (4, 4), [("error", "batch_mixing"), ("error", "unsupported")]),
        (nn.Sequential(nn.Dropout(0.2), nn.Linear(4, 2)), (4, 5), [("error", "forward_failed")]),
        (GatedAttention(fixed=False), (4, 5, 8), [("warning", "unsampled_dropout")]),
        (PartlyConstant(), (4, 4), [("warning", "constant_outputs")]),
        (GatedAttention(fixed=True), (4, 5, 8), []),
        # F.dropout(h, p, training=True): its deterministic prediction turns that off, so a
        # row's output is the same alone as in a batch
        (AlwaysDrops(in_features=4), (4, 4), []),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else None,
)
def test_problems(model: nn.Module, shape: tuple[int, ...], problems: list) -> None:
    torch.manual_seed(0)
    report = mcdrop.check(model.eval(), torch.randn(*shape), timed=False)
    assert _codes(report) == problems
    assert report.ok == all(severity == "warning" for severity, _ in problems)
    text = str(report)
    for problem in report.problems:
        assert f"{problem.severity} ({problem.code}): {problem.message}" in text
    assert text.splitlines()[-1].startswith(
        "result: ok" if report.ok else "result: not fit for MC dropout as it is"
    )


class _DropsAllBeside(nn.Module):
    """A residual across a dropout of rate 0.2 and one at rate 1 written as
    ``F.dropout(h, self.p, training=True)`` (no module declares it): the samples vary."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.head = nn.Linear(4, 5), nn.Linear(5, 2)
        self.drop = nn.Dropout(0.2)
        self.p = 1.0

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.fc(x))
        return self.head(self.drop(h) + F.dropout(h, self.p, training=True))


class _Encoded(nn.Module):
    """``(N, T, 8) -> (N, 2)``: a transformer encoder layer, mean over time, a linear head."""

    def __init__(self, dropout: float) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=dropout, batch_first=True)
        self.head = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.layer(x).mean(1))


RATE_ONE: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], list[str], str]] = {
    "nn.Dropout": (
        lambda: nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Dropout(1.0), nn.Linear(5, 2)),
        (4, 4),
        ["rate_one", "no_variance"],
        "call 1. dropout (B, 5), declared by 2 (Dropout, p=1)",
    ),
    "F.dropout beside another": (_DropsAllBeside, (4, 4), ["rate_one"], "call 2. dropout (B, 5)"),
    "DropConnectLinear": (
        lambda: nn.Sequential(nn.Linear(4, 5), DropConnectLinear(5, 2, p=1.0)),
        (4, 4),
        ["rate_one", "no_variance"],
        "call 1. DropConnectLinear (B, 5), declared by 1 (DropConnectLinear, p=1)",
    ),
    "nn.LSTM": (
        lambda: Last(nn.LSTM(4, 5, num_layers=2, dropout=1.0, batch_first=True)),
        (4, 6, 4),
        ["rate_one", "no_variance"],
        "declared by rnn (LSTM, dropout=1)",
    ),
    "nn.TransformerEncoderLayer": (
        lambda: _Encoded(dropout=1.0),
        (4, 5, 8),
        ["rate_one", "no_variance"],
        "declared by layer.self_attn (MultiheadAttention, dropout=1), layer.dropout (Dropout, "
        "p=1), layer.dropout1 (Dropout, p=1), layer.dropout2 (Dropout, p=1)",
    ),
}


@pytest.mark.parametrize("case", sorted(RATE_ONE))
def test_dropout_at_rate_1_is_an_error_naming_the_calls(case: str) -> None:
    """Every sample drops all of such a call's input: along its path the samples do not depend
    on the input, and a prediction (dropout off) keeps it. The check said no_variance where no
    other path varied ('the dropout calls do not reach the outputs', which they do), and ok
    where one did."""
    make, shape, codes, where = RATE_ONE[case]
    torch.manual_seed(0)
    report = mcdrop.check(make().eval(), torch.randn(*shape), timed=False)
    assert [p.code for p in report.problems] == codes
    message = report.problems[0].message
    assert message.startswith("dropout at rate 1 (")
    assert where in message
    assert message.endswith("give it the rate the model was trained with, below 1")
    assert "error (rate_one): dropout at rate 1 (" in str(report)


def test_a_rate_just_below_1_is_no_rate_one_problem() -> None:
    model = nn.Sequential(nn.Linear(4, 64), nn.ReLU(), nn.Dropout(0.9), nn.Linear(64, 2)).eval()
    torch.manual_seed(0)
    assert mcdrop.check(model, torch.randn(4, 4), timed=False).problems == ()


def test_a_model_that_refuses_a_row_alone_fails_in_the_report() -> None:
    """The check's rows pass, but a row alone raises (a model written for a fixed batch): the
    report says so (forward_failed), as for rows the model refuses, rather than the check
    raising the model's error (which mcdrop check took for the user's inputs: exit 2, no
    report). A model that takes the check's batches and the warm-up's (32 rows) samples as any
    other: a pass's replicated rows are the dropout's, not the forward's."""
    torch.manual_seed(0)
    report = mcdrop.check(BatchOf((4,)).eval(), torch.randn(4, 3), timed=False)
    assert _codes(report) == [("error", "forward_failed")]
    assert report.problems[0].message.startswith(
        "the model fails on one of its 4 example rows alone (ValueError: a batch of (4,) rows "
        "only, got 1): a row's output must not depend on its batch"
    )
    assert not report.ok
    report = mcdrop.check(BatchOf((1, 2, 3, 4, 32)).eval(), torch.randn(4, 3), timed=False)
    assert report.ok, str(report)


@pytest.mark.parametrize(
    ("most", "rows", "failed"),
    [
        (8, 4, "4 example rows (ValueError: at most 8 rows a batch, got 64)"),  # the samples'
        (2, 1, "1 example row (ValueError: at most 2 rows a batch, got 3)"),  # the plan's probe
    ],
)
def test_a_model_that_refuses_a_pass_of_samples_fails_in_the_report(
    most: int, rows: int, failed: str
) -> None:
    """A forward that takes the check's rows but not a sampling pass of them (16 samples × 4
    rows, where a residual across the dropout makes the pass replicate the rows at the input;
    or the planning probe's 3 replicated rows): forward_failed, not the model's error raised
    through the check."""
    torch.manual_seed(0)
    report = mcdrop.check(MaxBatch(most=most).eval(), torch.randn(rows, 3), timed=False)
    assert _codes(report) == [("error", "forward_failed")]
    assert report.problems[0].message.startswith(
        f"the model fails on a sampling pass of its {failed}: a pass runs several samples of "
        "each row in one batch"
    )
    # (the warm-up's largest pass: 16 samples of 32 rows, replicated at the input)
    assert mcdrop.check(MaxBatch(most=512).eval(), torch.randn(4, 3), timed=False).ok


@pytest.mark.parametrize(
    ("most", "rows", "problem"),
    [
        # the warm-up's 16 samples of 32 rows, replicated at the input (a residual)
        (64, 4, "takes a batch of 4 rows but fails on a batch of 512 rows"),
        (16, 1, "takes a row alone but fails on a batch of 32 rows"),  # its 32 rows
    ],
)
def test_a_batch_size_the_warm_up_runs_and_the_model_fails_on_is_an_error(
    most: int, rows: int, problem: str
) -> None:
    """A forward that takes the check's rows and the passes of their samples, but not a batch
    a server's warm-up runs: the check said ok, and the server refused to load the model. Now
    the check says so, in the words of the warm-up (batch_problem's)."""
    torch.manual_seed(0)
    x = torch.randn(rows, 3)
    model = MaxBatch(most=most).eval()
    assert not mcdrop.check(model, x, timed=False).ok  # (it was ok)
    report = mcdrop.check(model, x, timed=True)
    assert _codes(report) == [("error", "batch_size")]
    message = report.problems[0].message
    assert message.startswith(f"the model {problem} (ValueError: at most {most} rows a batch")
    assert message == batch_problem(model, x)
    assert f"error (batch_size): {message}" in str(report)
    assert report.ms_per_row_sample is None  # (a timing's passes would fail as well)


def test_a_sampling_pass_the_warm_up_runs_and_the_model_fails_on_is_an_error() -> None:
    torch.manual_seed(0)
    report = mcdrop.check(MaxPass(most=64).eval(), torch.randn(4, 3), timed=False)
    assert _codes(report) == [("error", "batch_size")]
    assert report.problems[0].message.startswith(
        "the model fails on a pass of 16 samples of 32 rows, as a server's warm-up runs "
        "(ValueError: at most 64 rows a sampling pass, got 512): "
    )


def test_the_check_runs_no_batch_larger_than_the_warm_up_runs() -> None:
    """Its cost: the warm-up's largest pass once (16 samples of 32 rows, the whole forward
    replicated here), no larger batch, and no batch of 512 rows without dropout."""
    model = Sizes().eval()
    torch.manual_seed(0)
    assert mcdrop.check(model, torch.randn(4, 3), timed=False).ok
    assert max(model.sizes) == 512
    assert model.sizes.count(512) == 1


@pytest.mark.parametrize(
    ("model", "rows"),
    [
        (Picky(bound=0.0), 4),  # fails on the rows themselves
        (BatchOf((4,)), 4),  # fails on a row alone
        (MaxBatch(most=1), 1),  # fails on the plan's probe of replicated rows, its first pass
    ],
    ids=["rows", "a row alone", "the plan's first pass"],
)
def test_a_check_that_stops_early_does_not_say_the_model_has_no_dropout(
    model: nn.Module, rows: int
) -> None:
    """Each model declares dropout p=0.5, but the check stopped at forward_failed before a pass
    that counts it: the report said 'dropout: none declared' (or, where the plan's first probe
    failed, '0 calls: NOT SAMPLED')."""
    torch.manual_seed(0)
    report = mcdrop.check(model.eval(), torch.randn(rows, 3), timed=False)
    assert _codes(report) == [("error", "forward_failed")]
    assert report.dropouts is None
    assert report.to_dict()["dropouts"] is None
    text = str(report)
    assert "dropout: not counted (the check stopped before a pass that counts it)" in text
    assert "none declared" not in text
    assert "NOT SAMPLED" not in text


def test_a_check_that_fails_on_the_samples_counts_the_dropout_of_the_plan() -> None:
    """The plan's passes ran whole: their counts stand where the samples' pass failed."""
    torch.manual_seed(0)
    report = mcdrop.check(MaxBatch(most=8).eval(), torch.randn(4, 3), timed=False)
    assert _codes(report) == [("error", "forward_failed")]
    assert [(d.module, d.calls, d.sampled) for d in report.dropouts or ()] == [("drop", 1, True)]


@pytest.mark.parametrize(
    ("model", "rows", "problem"),
    [
        (BatchOf((4,)), 4, "takes a batch of 4 rows but fails on a row alone"),
        (BatchOf((4,)), 2, "takes a batch of 4 rows but fails on a batch of 2 rows"),
        (BatchOf((1, 2)), 1, "takes a row alone but fails on a batch of 3 rows"),
        (MaxBatch(most=100), 2, "takes a batch of 2 rows but fails on a batch of 512 rows"),
        (MaxBatch(most=512), 2, None),  # the largest probed
        (Picky(bound=0.0), 2, None),  # fails on any batch: the values are at fault
    ],
    ids=["4 of 4", "4 of 2", "1 or 2", "up to 100", "up to 512", "no batch"],
)
def test_batch_problem_names_a_size_the_model_fails_on(
    model: nn.Module, rows: int, problem: str | None
) -> None:
    torch.manual_seed(0)
    found = batch_problem(model.eval(), torch.randn(rows, 3) + 1)
    if problem is None:
        assert found is None
    else:
        assert found is not None
        assert found.startswith(f"the model {problem} (ValueError: ")
        assert found.endswith("so the model must take batches of any size")


class _RefusesEveryRow(nn.Module):
    """Refuses any batch, noting its size."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 1)
        self.sizes: list[int] = []

    def forward(self, x: Tensor) -> Tensor:
        self.sizes.append(x.shape[0])
        raise ValueError("no value of these is an input")


def test_batch_problem_runs_no_large_batch_of_rows_no_size_takes() -> None:
    # The rows' values at fault: a batch of 32 or 512 of them is memory spent for nothing
    # (after a large network's failed warm-up)
    model = _RefusesEveryRow().eval()
    assert batch_problem(model, torch.randn(1, 3)) is None
    assert model.sizes == [1, 2, 3, 4]


def test_outputs_that_are_nan_alone_and_in_a_batch_mix_no_rows() -> None:
    """A row the model answers with NaN (a log of a negative value) gets NaN alone and in a
    batch: the same, not a row mixed with its batch (batch_mixing, an error, read NaN != NaN)."""
    x = torch.tensor([[1.0, 2.0, 3.0], [-1.0, 2.0, 3.0], [0.5, 0.5, 0.5], [4.0, -1.0, 1.0]])
    torch.manual_seed(0)
    report = mcdrop.check(Logs().eval(), x, timed=False)
    assert "batch_mixing" not in [p.code for p in report.problems], str(report)


def test_unreached_dropout_is_listed_with_the_fix() -> None:
    report = mcdrop.check(GatedAttention(fixed=False).eval(), torch.randn(4, 5, 8), timed=False)
    found = {d.module: (d.calls, d.sampled) for d in report.dropouts}
    assert found == {"(model)": (0, False), "drop": (1, True)}
    assert "(model)  GatedAttention  p=0.2: 0 calls: NOT SAMPLED" in str(report)
    assert "called F.scaled_dot_product_attention with dropout_p=0" in report.problems[0].message
    assert "mcdrop.is_sampling()" in report.problems[0].message
    only = mcdrop.check(OnlyGated().eval(), torch.randn(4, 4), timed=False)
    assert [(d.module, d.sampled) for d in only.dropouts] == [("(model)", False)]
    assert "OnlyGated, dropout_p=0.3) ran without a dropout call" in only.problems[0].message


def test_constant_outputs_are_named() -> None:
    report = mcdrop.check(PartlyConstant().eval(), torch.randn(4, 4), timed=False)
    assert report.constant_outputs == ("output 1",)
    assert "samples vary: yes, but not output 1" in str(report)


def _loaded(net: nn.Module, **spec: object) -> LoadedModel:
    fields = {"name": "m", "input_shape": [4], "architecture": {"name": "mlp"}, **spec}
    return LoadedModel(ModelSpec(**fields), net.eval(), Path("m"))  # type: ignore[arg-type]


def test_a_manifest_that_does_not_fit_the_outputs() -> None:
    net = nn.Sequential(nn.Dropout(0.2), nn.Linear(4, 3))
    report = mcdrop.check(_loaded(net, task="classification", labels=["a", "b"]), timed=False)
    assert _codes(report) == [("error", "output_shape")]
    assert "returns (4, 3) for 4 rows" in report.problems[0].message


@pytest.mark.parametrize("ending", ["nn.Softmax", "torch.softmax"])
def test_a_classifier_that_returns_probabilities_is_an_error(ending: str) -> None:
    """A forward that ends in a softmax: mcdrop softmaxes its outputs again, squashing every
    probability toward uniform, and the check said ok."""
    torch.manual_seed(0)
    loaded = _loaded(Outputs(ending, in_features=4), task="classification", labels=["a", "b", "c"])
    report = mcdrop.check(loaded, timed=False)
    assert _codes(report) == [("error", "probabilities")]
    message = report.problems[0].message
    x = example_inputs(loaded)
    assert message == probabilities_problem(loaded.spec, loaded.module, x, loaded.module(x))
    assert message.startswith(
        "the model returns probabilities, not logits: its 3 outputs lie in [0, 1] and sum to 1 "
        "on every row probed"
    )
    assert "drop the final softmax" in message
    assert "log-probabilities (log_softmax)" in message
    assert f"error (probabilities): {message}" in str(report)
    assert report.varies  # (the rest of the check ran)


@pytest.mark.parametrize("ending", ["logits", "log_softmax", "sigmoid"])
def test_logits_log_probabilities_and_sigmoids_are_no_probabilities(ending: str) -> None:
    torch.manual_seed(0)
    loaded = _loaded(Outputs(ending, in_features=4), task="classification", labels=["a", "b", "c"])
    report = mcdrop.check(loaded, timed=False)
    assert report.problems == (), str(report)


_SPEC = ModelSpec(
    name="m", task="classification", input_shape=[4], labels=["a", "b", "c"],
    architecture={"name": "mlp"},
)  # fmt: skip
_ROWS = torch.randn(4, 4, generator=torch.Generator().manual_seed(0))
_PROBS = torch.softmax(3 * torch.randn(4, 3, generator=torch.Generator().manual_seed(1)), 1)


@pytest.mark.parametrize(
    ("case", "x", "out", "flagged"),
    [
        ("softmax", _ROWS, _PROBS, True),
        ("two rows", _ROWS[:2], _PROBS[:2], True),
        ("one-hot", _ROWS, F.one_hot(torch.tensor([0, 2, 1, 0]), 3).float(), True),
        ("float64", _ROWS, _PROBS.double(), True),
        ("log_softmax", _ROWS, _PROBS.log(), False),
        ("sigmoid", _ROWS, torch.sigmoid(_PROBS * 5), False),
        ("zeros", _ROWS, torch.zeros(4, 3), False),
        ("one row sums to 1.001", _ROWS, _PROBS * torch.tensor([[1.001], [1], [1], [1]]), False),
        ("below 0", _ROWS, torch.cat([torch.tensor([[-1e-3, 0.501, 0.5]]), _PROBS[1:]]), False),
        ("NaN", _ROWS, torch.cat([_PROBS[:3], torch.full((1, 3), torch.nan)]), False),
        ("one row", _ROWS[:1], _PROBS[:1], False),
        ("one input repeated", _ROWS[:1].expand(4, 4), _PROBS, False),
        ("one label", _ROWS, torch.ones(4, 1), False),
    ],
)
def test_which_outputs_are_probabilities(case: str, x: Tensor, out: Tensor, flagged: bool) -> None:
    """In [0, 1] and summing to 1 (within 1e-4) in every row, K >= 2, on rows of at least two
    different inputs: one row (or one input) is no evidence against a genuine classifier's
    logits, and a classifier of one label's softmax is 1 whatever it returns."""
    spec = _SPEC if out.shape[1] == 3 else ModelSpec(**{**vars(_SPEC), "labels": ["a"]})
    assert (probabilities_problem(spec, nn.Linear(4, 3), x, out) is not None) is flagged
    regression = ModelSpec(**{**vars(spec), "task": "regression", "tau": 1.0})
    assert probabilities_problem(regression, nn.Linear(4, 3), x, out) is None


def test_probabilities_in_a_coarse_dtype_are_found() -> None:
    """bfloat16 rounds a softmax's sum by more than 1e-4: the tolerance is the dtype's."""
    probs = _PROBS.bfloat16()
    assert float((probs.double().sum(1) - 1).abs().max()) > 1e-4
    module = nn.Linear(4, 3).bfloat16()
    assert probabilities_problem(_SPEC, module, _ROWS.bfloat16(), probs) is not None


@pytest.mark.parametrize("kind", ["tuple", "dict"])
def test_outputs_that_are_no_tensor_are_reported(kind: str) -> None:
    """A forward that returns a tuple or a dict: output_shape, said as such (the check ended in
    an AttributeError: 'dict' object has no attribute 'dim')."""
    torch.manual_seed(0)
    report = mcdrop.check(Returns(kind).eval(), torch.randn(4, 3), timed=False)
    assert _codes(report) == [("error", "output_shape")]
    assert report.problems[0].message.startswith(f"the model returns {kind} for 4 rows, not")


def test_heteroscedastic_outputs_are_named() -> None:
    net = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.2), nn.Linear(8, 2))
    report = mcdrop.check(
        _loaded(net, task="regression", labels=["y"], likelihood="heteroscedastic"), timed=False
    )
    assert report.ok
    assert report.outputs == ("y", "y (log-variance)")


def test_a_plain_module_needs_example_rows() -> None:
    with pytest.raises(mcdrop.InvalidArgumentError, match="needs example rows"):
        mcdrop.check(nn.Dropout(0.5))


@pytest.mark.parametrize(
    ("counts", "message"),
    [
        ({"n_rows": 10**12}, f"n_rows=1000000000000 is above a check's limit of {MAX_ROWS}"),
        ({"n_rows": MAX_ROWS + 1}, f"n_rows={MAX_ROWS + 1} is above a check's limit"),
        ({"n_rows": 0}, "n_rows must be at least 1, got 0"),
        ({"n_rows": 2.0}, "n_rows must be an integer, got float"),
        (
            {"n_samples": 10**12},
            f"n_samples=1000000000000 is above a check's limit of {MAX_SAMPLES:_}",
        ),
        ({"n_samples": 0}, "n_samples must be at least 1, got 0"),
    ],
)
def test_check_bounds_its_rows_and_samples(counts: dict[str, object], message: str) -> None:
    """A clear error naming the limit, before a row is made or the model runs (n_rows=10**12
    tried to allocate terabytes of random rows)."""
    loaded = mcdrop.load(MODELS / "diabetes")
    with pytest.raises(mcdrop.InvalidArgumentError) as refused:
        mcdrop.check(loaded, **counts)  # type: ignore[arg-type]
    assert str(refused.value).startswith(message)
    if "n_rows" in counts:
        with pytest.raises(mcdrop.InvalidArgumentError, match=message):
            example_inputs(loaded, counts["n_rows"])  # type: ignore[arg-type]
    # The limits themselves are allowed.
    assert mcdrop.check(loaded, n_rows=MAX_ROWS, n_samples=2, timed=False).n_rows == MAX_ROWS


def test_the_rounding_a_batch_may_change_is_that_of_the_arithmetic() -> None:
    # float32 on a CUDA device runs cuDNN's convolutions in TensorFloat-32 (torch's default):
    # a row alone may round 2**-10 otherwise than in a batch, which is no batch mixing
    net = nn.Linear(3, 2)
    assert compute_eps(net, torch.device("cpu")) == torch.finfo(torch.float32).eps
    assert compute_eps(net.to(torch.bfloat16), torch.device("cpu")) == 2.0**-7
    cuda = torch.device("cuda")
    assert compute_eps(nn.Linear(3, 2), cuda) == 2.0**-10  # (no GPU needed: flags are read)
    allowed = torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = False
        if torch.get_float32_matmul_precision() == "highest":
            assert compute_eps(nn.Linear(3, 2), cuda) == torch.finfo(torch.float32).eps
    finally:
        torch.backends.cudnn.allow_tf32 = allowed
