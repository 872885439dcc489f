"""``mcdrop.save``: one call from a trained module to a model directory that always loads."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import mcdrop
from mcdrop import saving
from mcdrop.checking import warm_up_pass_flops
from mcdrop.checkpoint import LoadedModel, ModelSpec
from mcdrop.exceptions import InvalidArgumentError
from mcdrop.nets import MLP
from tests import families
from tests.conftest import TOKEN_ROWS
from tests.factories import (
    AlwaysDrops,
    BatchOf,
    Centred,
    Counting,
    Logs,
    MaxBatch,
    MaxPass,
    Noisy,
    Outputs,
    Sizes,
    Tied,
    Tokens,
    build,
    unit_rows,
)


@pytest.fixture
def net() -> nn.Module:
    torch.manual_seed(0)
    return build(in_features=3, width=5)


REGRESSOR: dict[str, Any] = {
    "task": "regression",
    "input_shape": [3],
    "labels": ["y"],
    "tau": 4.0,
}


def test_a_factory_model_saves_and_loads_with_the_opt_in(tmp_path: Path, net: nn.Module) -> None:
    loaded = mcdrop.save(
        net,
        tmp_path / "tiny",
        factory="tests.factories:build",
        params={"in_features": 3, "width": 5},
        description="three features, one target",
        **REGRESSOR,
    )
    assert sorted(p.name for p in (tmp_path / "tiny").iterdir()) == [
        "model.json",
        "weights.safetensors",
    ]
    manifest = json.loads((tmp_path / "tiny" / "model.json").read_text())
    assert manifest["name"] == "tiny"
    assert manifest["architecture"] == {
        "factory": "tests.factories:build",
        "params": {"in_features": 3, "width": 5},
    }
    assert manifest["tau"] == 4.0
    x = torch.randn(4, 3)
    again = mcdrop.load(tmp_path / "tiny", allowed_factories=["tests.factories"])
    for model in (loaded, again):
        assert torch.equal(mcdrop.predict(model.module, x), mcdrop.predict(net, x))
    with pytest.raises(mcdrop.UntrustedCodeError):
        mcdrop.load(tmp_path / "tiny")


def test_a_builtin_architecture_with_normalisation(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = MLP(2, (8, 8), 2, dropout=0.2)  # trained on standardised data: 2 means, 2 log-vars
    mean, std = torch.tensor([10.0, -3.0]), torch.tensor([2.0, 0.5])
    loaded = mcdrop.save(
        net,
        tmp_path / "hetero",
        architecture="mlp",
        params={"in_features": 2, "hidden": (8, 8), "out_features": 2, "dropout": 0.2},
        task="regression",
        likelihood="heteroscedastic",
        input_shape=(2,),
        labels=["y"],
        input_normalization={"mean": mean, "std": std},
        target_normalization={"mean": [100.0], "std": [5.0]},
    )
    assert loaded.spec.architecture["params"]["hidden"] == [8, 8]
    x = torch.tensor([[10.0, -3.0], [12.0, -2.5]])
    out = mcdrop.predict(loaded.module, x)
    raw = mcdrop.predict(net, (x - mean) / std)
    assert torch.allclose(out[:, 0], raw[:, 0] * 5 + 100)
    assert torch.allclose(out[:, 1], raw[:, 1] + 2 * torch.log(torch.tensor(5.0)))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"params": {"in_features": 3, "width": 4}}, r"0.weight: \[5, 3\] in the model, \[4, 3\]"),
        ({"params": {"in_features": 3, "width": 5, "depth": 2}}, "do not fit"),
        ({"params": {"in_features": 3, "width": 5, "f": open}}, "JSON values only"),
        ({"factory": "__main__:build"}, "__main__"),
        ({"factory": None}, "exactly one of them"),
        ({"architecture": "mlp"}, "exactly one of them"),
        ({"tau": None}, "needs 'tau'"),
        (
            {"labels": ["a", "b"]},
            r"returns \(2, 1\) for 2 rows, but its manifest \(regression, 2 labels, "
            r"homoscedastic\) says \(2, 2\)",
        ),
        (
            {"likelihood": "heteroscedastic"},
            r"returns \(2, 1\) for 2 rows, but its manifest \(regression, 1 label, "
            r"heteroscedastic\) says \(2, 2\) \(K means, then K log-variances\)",
        ),
        ({"input_shape": [4]}, "is input_shape the shape of one input row"),
        ({"input_normalization": {"mean": [0, 0, 0], "std": [1, 0, 1]}}, "positive stds"),
    ],
)
def test_mistakes_are_refused_before_anything_is_written(
    tmp_path: Path, net: nn.Module, kwargs: dict[str, Any], message: str
) -> None:
    options = {
        **REGRESSOR,
        "factory": "tests.factories:build",
        "params": {"in_features": 3, "width": 5},
        **kwargs,
    }
    with pytest.raises(InvalidArgumentError, match=message):
        mcdrop.save(net, tmp_path / "bad", **options)
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"dropout": 0.5}, r"other dropout rates \(layers.2.p: 0.2 in the model, 0.5 rebuilt"),
        ({"kind": "alpha"}, "gives other outputs"),  # SELU instead of ReLU, same weights
    ],
)
def test_a_factory_that_builds_another_network_is_refused(
    tmp_path: Path, params: dict[str, Any], message: str
) -> None:
    torch.manual_seed(0)
    net = MLP(4, (6,), 3, dropout=0.2)
    base = {"in_features": 4, "hidden": [6], "out_features": 3, "dropout": 0.2}
    with pytest.raises(InvalidArgumentError, match=message):
        mcdrop.save(
            net,
            tmp_path / "m",
            architecture="mlp",
            params={**base, **params},
            task="classification",
            input_shape=[4],
            labels=["a", "b", "c"],
        )


@pytest.mark.parametrize("tie", ["weight", "module"])
def test_a_model_with_tied_weights_saves_and_loads(tmp_path: Path, tie: str) -> None:
    """Tensors that share memory (one Parameter in two modules, or one module under two names)
    are written once per name, and the rebuilt network ties them again."""
    torch.manual_seed(0)
    net = Tied(tie=tie)
    loaded = mcdrop.save(
        net, tmp_path / "tied", factory="tests.factories:Tied", params={"tie": tie},
        task="regression", input_shape=[3], labels=["a", "b", "c"], tau=1.0,
    )  # fmt: skip
    again = mcdrop.load(tmp_path / "tied", allowed_factories=["tests.factories"])
    x = torch.randn(4, 3)
    samples = mcdrop.sample(net, x, 8, seed=0)
    for model in (loaded, again):
        assert torch.equal(mcdrop.predict(model.module, x), mcdrop.predict(net, x))
        assert torch.equal(mcdrop.sample(model.module, x, 8, seed=0), samples)
    rebuilt = again.module
    assert rebuilt.decoder.weight is rebuilt.encoder.weight  # still one Parameter


CLASSIFIER: dict[str, Any] = {"task": "classification", "input_shape": [3], "labels": ["a", "b"]}


@pytest.mark.parametrize("drop", ["F.dropout", "torch.dropout", "F.dropout2d"])
def test_a_model_that_drops_in_eval_saves_and_loads(tmp_path: Path, drop: str) -> None:
    """MC-dropout style, ``F.dropout(h, p, training=True)``: its eval pass drops, and the check
    that the factory rebuilds it compares deterministic predictions, which turn that off."""
    torch.manual_seed(0)
    net = AlwaysDrops(drop=drop)
    torch.manual_seed(0)
    twin = AlwaysDrops(drop=drop, always=False).eval()
    loaded = mcdrop.save(
        net, tmp_path / "mc", factory="tests.factories:AlwaysDrops", params={"drop": drop},
        **CLASSIFIER,
    )  # fmt: skip
    again = mcdrop.load(tmp_path / "mc", allowed_factories=["tests.factories"])
    x = torch.randn(4, 3)
    for model in (net, loaded.module, again.module):
        assert torch.equal(mcdrop.predict(model, x), twin(x))
    samples = mcdrop.sample(again.module, x, 8, seed=0)
    assert torch.equal(samples, mcdrop.sample(net, x, 8, seed=0))
    assert bool((samples.var(0) > 0).any())


@pytest.mark.parametrize(
    ("net", "cause"),
    [
        (Noisy, "randomness (e.g. torch.rand"),
        # no randomness: a count of its calls added to its outputs
        (Counting, "or state it updates and uses"),
    ],
)
def test_a_model_whose_eval_pass_is_not_deterministic_is_refused_as_such(
    tmp_path: Path, net: type[nn.Module], cause: str
) -> None:
    torch.manual_seed(0)
    with pytest.raises(InvalidArgumentError, match="eval pass is not deterministic") as caught:
        mcdrop.save(
            net(), tmp_path / "noisy", factory=f"tests.factories:{net.__name__}", **REGRESSOR
        )
    assert "two passes of the same 2 rows" in str(caught.value)
    assert cause in str(caught.value)
    assert "params" not in str(caught.value)  # not the factory's fault
    assert not (tmp_path / "noisy").exists()


@pytest.mark.parametrize(
    ("factory", "net", "examples", "message"),
    [
        ("Logs", Logs, None, r"outputs on 2 random rows of input_shape \[3\] are not finite"),
        (
            "unit_rows",
            unit_rows,
            [[1, 2, 3], [0, 0, 0]],
            r"its 2 example_inputs rows .* rows \[1\]",
        ),
    ],
)
def test_a_model_with_outputs_that_are_not_finite_is_refused_as_such(
    tmp_path: Path, factory: str, net: Any, examples: Any, message: str
) -> None:
    """NaN on the check's rows is said as such (it read as a factory that rebuilds another
    network, 'by up to nan'), with what to do: rows it answers."""
    torch.manual_seed(0)
    with pytest.raises(InvalidArgumentError, match=message) as caught:
        mcdrop.save(
            net(), tmp_path / "nan", factory=f"tests.factories:{factory}",
            example_inputs=examples, **REGRESSOR,
        )  # fmt: skip
    assert "give rows it answers with finite values as example_inputs" in str(caught.value)
    assert "params" not in str(caught.value)  # not the factory's fault
    assert not (tmp_path / "nan").exists()
    loaded = mcdrop.save(
        net(), tmp_path / "ok", factory=f"tests.factories:{factory}",
        example_inputs=torch.rand(2, 3) + 0.5, **REGRESSOR,
    )  # fmt: skip
    assert loaded.example_inputs is not None


SERVES_NOT: dict[str, tuple[nn.Module, dict[str, Any], str]] = {
    # Every rate 0: sampling has nothing to sample (the warm-up's NoDropoutError).
    "no dropout": (
        MLP(3, (5,), 1, dropout=0.0),
        {
            "architecture": "mlp",
            "params": {"in_features": 3, "hidden": [5], "out_features": 1, "dropout": 0.0},
        },
        r"MLP made no stochastic dropout call \(no dropout layer, or every rate is 0\): MC "
        "samples would all be equal. Add dropout",
    ),
    # Every sample drops all of the hidden layer (the server's warm-up refuses it too).
    "rate 1": (
        MLP(3, (5,), 1, dropout=1.0),
        {
            "architecture": "mlp",
            "params": {"in_features": 3, "hidden": [5], "out_features": 1, "dropout": 1.0},
        },
        r"dropout at rate 1 \(call 1\. dropout \(B, 5\), declared by layers\.2 \(Dropout, "
        r"p=1\)\): every sample drops all of that call's input",
    ),
    "x - x.mean(0)": (
        Centred(),
        {"factory": "tests.factories:Centred"},
        r"2 random rows of input_shape \[3\] give other outputs together than one at a time "
        r"\(by up to .*\): a row's output depends on the other rows of its batch",
    ),
    "a batch of 4 rows only": (
        BatchOf((4,)),
        {"factory": "tests.factories:BatchOf", "params": {"sizes": [4]}},
        r"the model takes a batch of 4 rows but fails on a batch of 2 rows \(ValueError: a batch "
        r"of \(4,\) rows only, got 2\): .*so the model must take batches of any size",
    ),
    "up to 2 rows": (
        BatchOf((1, 2)),
        {"factory": "tests.factories:BatchOf", "params": {"sizes": [1, 2]}},
        r"the model takes a batch of 2 rows but fails on a batch of 3 rows \(ValueError",
    ),
    "up to 8 rows": (
        MaxBatch(most=8),
        {"factory": "tests.factories:MaxBatch", "params": {"most": 8}},
        r"the model takes a batch of 2 rows but fails on a batch of 32 rows \(ValueError: at "
        "most 8 rows a batch, got 32",
    ),
    # Takes a request's 32 rows, not the warm-up's pass of 16 samples of them (which a server
    # and mcdrop check refused, and save did not run).
    "up to 64 rows": (
        MaxBatch(most=64),
        {"factory": "tests.factories:MaxBatch", "params": {"most": 64}},
        r"the model takes a batch of 2 rows but fails on a batch of 512 rows \(ValueError: at "
        "most 64 rows a batch, got 512",
    ),
    "sampling passes of up to 64 rows": (
        MaxPass(most=64),
        {"factory": "tests.factories:MaxPass", "params": {"most": 64}},
        r"the model fails on a pass of 16 samples of 32 rows, as a server's warm-up runs "
        r"\(ValueError: at most 64 rows a sampling pass, got 512\): a server runs a row's "
        "samples as rows of one pass",
    ),
}


def test_dropout_sampling_cannot_reach_is_no_reason_to_refuse_a_save(tmp_path: Path) -> None:
    # Attention that drops in training only, beside dropout sampling reaches: the plan's
    # UnsampledDropoutWarning is the server's and mcdrop check's to say (raised where warnings
    # are errors, as here, it refused the save)
    params = {"layers": 1, "sampled": False, "ffn_dropout": 0.1}
    net = families.ScaledDotProductClassifier(**params).eval()
    manifest = {"task": "classification", "input_shape": [6, 4], "labels": ["x", "y", "z"]}
    factory = "tests.families:ScaledDotProductClassifier"
    mcdrop.save(net, tmp_path / "m", factory=factory, params=params, **manifest)
    assert (tmp_path / "m" / "model.json").is_file()


@pytest.mark.parametrize("case", sorted(SERVES_NOT))
def test_a_model_a_server_would_refuse_is_refused(tmp_path: Path, case: str) -> None:
    """Folders that mcdrop.save wrote and ``mcdrop serve`` refused at its warm-up (no dropout to
    sample, rows that mix with their batch, a forward written for some batch sizes): save runs
    the warm-up's checks, and says what is wrong before it writes anything."""
    torch.manual_seed(0)
    net, architecture, message = SERVES_NOT[case]
    options = {**REGRESSOR, **architecture}
    with pytest.raises(InvalidArgumentError, match=f"^cannot save: {message}"):
        mcdrop.save(net, tmp_path / "m", **options)
    assert not (tmp_path / "m").exists()


OUTPUTS: dict[str, Any] = {
    "task": "classification",
    "input_shape": [3],
    "labels": ["a", "b", "c"],
    "factory": "tests.factories:Outputs",
}


@pytest.mark.parametrize("ending", ["nn.Softmax", "torch.softmax"])
@pytest.mark.parametrize("examples", [False, True])
def test_a_classifier_that_returns_probabilities_is_refused(
    tmp_path: Path, ending: str, examples: bool
) -> None:
    """mcdrop softmaxes a classifier's outputs: probabilities were saved, served, and squashed
    toward uniform. Refused, in the words of mcdrop check (and of the server's warm-up)."""
    torch.manual_seed(0)
    net = Outputs(ending)
    x = torch.randn(5, 3) if examples else None
    with pytest.raises(InvalidArgumentError) as caught:
        mcdrop.save(net, tmp_path / "m", params={"ending": ending}, example_inputs=x, **OUTPUTS)
    assert not (tmp_path / "m").exists()
    spec = ModelSpec(
        name="m", **{k: v for k, v in OUTPUTS.items() if k != "factory"},
        architecture={"factory": OUTPUTS["factory"], "params": {"ending": ending}},
    )  # fmt: skip
    report = mcdrop.check(LoadedModel(spec, net.eval(), tmp_path, example_inputs=x), timed=False)
    assert [p.code for p in report.problems] == ["probabilities"]
    assert str(caught.value) == f"cannot save: {report.problems[0].message}"


@pytest.mark.parametrize("ending", ["logits", "log_softmax", "sigmoid"])
def test_a_classifier_of_logits_log_probabilities_or_sigmoids_is_saved(
    tmp_path: Path, ending: str
) -> None:
    torch.manual_seed(0)
    mcdrop.save(Outputs(ending), tmp_path / "m", params={"ending": ending}, **OUTPUTS)
    assert (tmp_path / "m" / "model.json").is_file()


def test_save_runs_the_warm_ups_largest_pass_once_and_no_larger_one(tmp_path: Path) -> None:
    """Its cost: 16 samples of 32 rows (the whole forward replicated here: a residual across the
    dropout), once; no batch of 512 rows without dropout where the pass passes."""
    torch.manual_seed(0)
    net = Sizes()
    mcdrop.save(net, tmp_path / "m", factory="tests.factories:Sizes", **REGRESSOR)
    assert max(net.sizes) == 512
    assert net.sizes.count(512) == 1


def test_save_leaves_a_warm_up_pass_of_more_work_than_its_bound_to_the_warm_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pass of 16 samples of 32 rows of a large network takes minutes on a CPU: save runs it
    where its work (the plan's count) is at most MAX_WARM_UP_PASS_FLOPS."""
    torch.manual_seed(0)
    net = MaxBatch(most=64)
    work = warm_up_pass_flops(mcdrop.plan(net.eval(), torch.randn(2, 3)))
    architecture = {"factory": "tests.factories:MaxBatch", "params": {"most": 64}}
    monkeypatch.setattr(saving, "MAX_WARM_UP_PASS_FLOPS", work)
    with pytest.raises(InvalidArgumentError, match="fails on a batch of 512 rows"):
        mcdrop.save(net, tmp_path / "m", **architecture, **REGRESSOR)
    monkeypatch.setattr(saving, "MAX_WARM_UP_PASS_FLOPS", work - 1)
    mcdrop.save(net, tmp_path / "m", **architecture, **REGRESSOR)
    assert (tmp_path / "m" / "model.json").is_file()


def test_the_work_of_the_warm_ups_largest_pass() -> None:
    """Multiply-adds ×2: the layers before the first dropout on 32 rows where they run once per
    row, else on every one of the 512 replicated rows; the rest on 512."""
    shared = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 2)).eval()
    plan = mcdrop.plan(shared, torch.randn(2, 4))
    assert (plan.prefix, plan.prefix_flops, plan.rest_flops) == (True, 64, 32)
    assert warm_up_pass_flops(plan) == 32 * 64 + 512 * 32
    whole = mcdrop.plan(MaxBatch(most=10**9, in_features=4, width=8).eval(), torch.randn(2, 4))
    assert not whole.prefix
    assert warm_up_pass_flops(whole) == 512 * (whole.prefix_flops + whole.rest_flops)


def test_a_model_that_takes_its_example_rows_but_not_a_row_alone_is_refused(
    tmp_path: Path,
) -> None:
    torch.manual_seed(0)
    with pytest.raises(InvalidArgumentError) as caught:
        mcdrop.save(
            BatchOf((4,)), tmp_path / "m", factory="tests.factories:BatchOf",
            params={"sizes": [4]}, example_inputs=torch.randn(4, 3), **REGRESSOR,
        )  # fmt: skip
    assert str(caught.value).startswith(
        "cannot save: the model takes a batch of 4 rows but fails on a row alone (ValueError: "
        "a batch of (4,) rows only, got 1): a server answers a row alone"
    )
    assert not (tmp_path / "m").exists()


@pytest.mark.filterwarnings("ignore:`torch.jit.\\w+` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("kind", ["script", "trace"])
def test_a_torchscript_module_is_refused_as_such(tmp_path: Path, net: nn.Module, kind: str) -> None:
    """Its layers are compiled: save read no dropout rate in it and blamed the factory's params
    ('other dropout rates (1.p: 0 in the model, 0.5 rebuilt)')."""
    net.eval()
    x = torch.randn(2, 3)
    compiled = torch.jit.script(net) if kind == "script" else torch.jit.trace(net, x)
    with pytest.raises(InvalidArgumentError) as caught:
        mcdrop.save(
            compiled, tmp_path / "m", factory="tests.factories:build",
            params={"in_features": 3, "width": 5}, **REGRESSOR,
        )  # fmt: skip
    message = str(caught.value)
    assert "is a TorchScript module" in message
    assert "pass the eager nn.Module you scripted or traced" in message
    assert "params" not in message
    assert not (tmp_path / "m").exists()


TOKENS: dict[str, Any] = {
    "task": "classification",
    "input_shape": [6],
    "labels": ["negative", "positive"],
    "factory": "tests.factories:Tokens",
    "params": {"vocab": 5, "first": 1},
}


@pytest.fixture
def tokens() -> nn.Module:
    torch.manual_seed(0)
    return Tokens(vocab=5, first=1)


def test_a_token_model_is_refused_without_example_inputs_and_saved_with_them(
    tmp_path: Path, tokens: nn.Module
) -> None:
    """Random rows are no token ids (negative, or past the vocabulary): without rows of its own
    the model cannot be checked, and the error says which argument gives them."""
    with pytest.raises(InvalidArgumentError) as caught:
        mcdrop.save(tokens, tmp_path / "tokens", **TOKENS)
    message = str(caught.value)
    assert "fails on 2 random rows of input_shape [6] (IndexError: " in message
    assert "give rows it takes as example_inputs" in message
    assert not (tmp_path / "tokens").exists()

    loaded = mcdrop.save(tokens, tmp_path / "tokens", example_inputs=TOKEN_ROWS, **TOKENS)
    assert sorted(p.name for p in (tmp_path / "tokens").iterdir()) == [
        "examples.safetensors",
        "model.json",
        "weights.safetensors",
    ]
    assert "examples" not in (tmp_path / "tokens" / "model.json").read_text()
    again = mcdrop.load(tmp_path / "tokens", allowed_factories=["tests.factories"])
    for model in (loaded, again):
        assert model.example_inputs is not None
        assert torch.equal(model.example_inputs, TOKEN_ROWS)
        assert torch.equal(
            mcdrop.predict(model.module, TOKEN_ROWS), mcdrop.predict(tokens, TOKEN_ROWS)
        )
    report = mcdrop.check(again)
    assert report.ok, str(report)
    assert report.varies


@pytest.mark.parametrize(
    "rows",
    [TOKEN_ROWS.tolist(), TOKEN_ROWS.int().numpy(), TOKEN_ROWS.double(), TOKEN_ROWS[:1]],
    ids=["nested lists", "int array", "float64 tensor", "one row"],
)
def test_example_inputs_may_be_lists_arrays_or_tensors(
    tmp_path: Path, tokens: nn.Module, rows: Any
) -> None:
    loaded = mcdrop.save(tokens, tmp_path / "tokens", example_inputs=rows, **TOKENS)
    assert loaded.example_inputs is not None
    assert loaded.example_inputs.dtype == torch.float32
    assert torch.equal(loaded.example_inputs, torch.as_tensor(rows).float())


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (TOKEN_ROWS[0], r"must be \(N, \*input_shape\) = \(N, 6\) rows, got shape \[6\]"),
        (TOKEN_ROWS[:, :5], r"\(N, 6\) rows, got shape \[3, 5\]"),
        (TOKEN_ROWS[None], r"got shape \[1, 3, 6\]"),
        (TOKEN_ROWS[:0], "must be 1 to 64 rows, got 0"),
        (TOKEN_ROWS[:1].repeat(65, 1), "must be 1 to 64 rows, got 65"),
        (torch.full((2, 6), float("nan")), "must be finite"),
        (torch.full((2, 6), float("inf")), "must be finite"),
        ([[1e39] * 6], "must be finite"),  # beyond float32: infinite once converted
        ([[1, 2, 3], [1, 2]], "must be numeric"),  # ragged
        ([["a"] * 6], "must be numeric"),
        ({"rows": 1}, "must be numeric"),
        (TOKEN_ROWS * 0 + 7, re.escape("fails on its 3 example_inputs rows (IndexError: ")),
    ],
    ids=[
        "one row without N",
        "wrong row shape",
        "extra dim",
        "no rows",
        "too many rows",
        "NaN",
        "inf",
        "overflow",
        "ragged",
        "strings",
        "a dict",
        "ids the model refuses",
    ],
)
def test_bad_example_inputs_are_refused_before_anything_is_written(
    tmp_path: Path, tokens: nn.Module, rows: Any, message: str
) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        mcdrop.save(tokens, tmp_path / "tokens", example_inputs=rows, **TOKENS)
    assert not (tmp_path / "tokens").exists()


def test_too_many_bytes_of_example_inputs_are_refused(tmp_path: Path) -> None:
    """64 rows at most, and 64 MiB at most: rows of a large input shape are refused beyond it."""
    torch.manual_seed(0)
    net = build(in_features=300_000, width=1)
    rows = torch.zeros(60, 300_000)  # 72 MB
    with pytest.raises(InvalidArgumentError, match="more than 67_108_864: give fewer rows"):
        mcdrop.save(
            net, tmp_path / "wide", factory="tests.factories:build",
            params={"in_features": 300_000, "width": 1}, example_inputs=rows,
            **{**REGRESSOR, "input_shape": [300_000]},
        )  # fmt: skip
    assert not (tmp_path / "wide").exists()


def test_saving_again_without_example_inputs_removes_the_old_ones(
    tmp_path: Path, net: nn.Module
) -> None:
    """Rows of an earlier model need not suit the one saved over it."""
    options = {**REGRESSOR, "factory": "tests.factories:build", "params": {"in_features": 3}}
    rows = torch.randn(4, 3)
    assert (
        mcdrop.save(net, tmp_path / "m", example_inputs=rows, **options).example_inputs is not None
    )
    assert (tmp_path / "m" / "examples.safetensors").exists()
    assert mcdrop.save(net, tmp_path / "m", **options).example_inputs is None
    assert not (tmp_path / "m" / "examples.safetensors").exists()
