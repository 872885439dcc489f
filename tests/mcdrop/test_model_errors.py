"""Telling an exception of the model's own forward from mcdrop's and the machine's."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

import mcdrop
from mcdrop import checkpoint
from mcdrop.exceptions import InvalidInputError
from mcdrop.model_errors import raised_by_model, server_side
from mcdrop.predictor import Predictor
from tests import factories

#: Ids within the vocabulary (10), and rows with one past it and one below zero.
GOOD = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 9.0, 9.0, 0.0]])
PAST = torch.tensor([[1.0, 2.0, 300.0, 4.0]])
NEGATIVE = torch.tensor([[1.0, -2.0, 3.0, 4.0]])


@pytest.fixture(scope="module", params=[False, True], ids=["routed", "under-the-mode"])
def tokens(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Predictor:
    """A token model, warmed up on good ids; its passes routed (the fast pass), or run under
    mcdrop's torch-function mode (its forward asks ``mcdrop.is_sampling()``)."""
    folder = factories.save_gated_tokens(
        tmp_path_factory.mktemp("tokens") / "tokens", asks=request.param
    )
    # (at most 64 replicated rows a pass: a request of many rows or samples takes several)
    predictor = Predictor(checkpoint.load(folder, trust_model_code=True), max_pass_rows=64)
    predictor.warm_up(GOOD[:1])
    return predictor


def _raised(call: Callable[[], Any]) -> BaseException:
    try:
        call()
    except BaseException as exc:
        return exc
    raise AssertionError("the call raised nothing")


#: Every way the predictor calls the model on a request's rows: deterministic prediction,
#: sampling (in one pass; the bad row after good ones, in several passes), and adaptive
#: sampling.
CALLS: dict[str, Callable[[Predictor, torch.Tensor], Any]] = {
    "predict": lambda p, x: p.predict(x),
    "uncertainty": lambda p, x: p.uncertainty(x, 8, seed=0),
    "merged rows": lambda p, x: p.uncertainty(torch.cat([x.new_zeros(20, *x.shape[1:]), x]), 30),
    "auto": lambda p, x: p.uncertainty(x, "auto", seed=3),
}


@pytest.mark.parametrize("call", CALLS.values(), ids=CALLS.keys())
@pytest.mark.parametrize("x", [PAST, NEGATIVE], ids=["past-vocabulary", "negative"])
def test_an_embedding_index_error_is_the_models(
    tokens: Predictor, call: Callable[[Predictor, torch.Tensor], Any], x: torch.Tensor
) -> None:
    exc = _raised(lambda: call(tokens, x))
    assert isinstance(exc, IndexError), exc
    assert raised_by_model(exc)
    call(tokens, GOOD)  # and the model still answers good ids


@pytest.fixture(scope="module")
def picky(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Predictor]:
    """:class:`factories.Picky` failing as ``error`` says on a value above 100."""
    folder = tmp_path_factory.mktemp("picky")

    def make(error: str) -> Predictor:
        torch.manual_seed(0)
        loaded = mcdrop.save(
            factories.Picky(error=error), folder / error, task="regression", input_shape=[3],
            labels=["y"], factory="tests.factories:Picky", params={"error": error}, tau=1.0,
        )  # fmt: skip
        return Predictor(loaded)

    return make


@pytest.mark.parametrize(("error", "raised"), [("value", ValueError), ("assert", AssertionError)])
def test_an_error_of_the_models_own_code_is_the_models(
    picky: Callable[[str], Predictor], error: str, raised: type[Exception]
) -> None:
    predictor = picky(error)
    for call in CALLS.values():
        exc = _raised(lambda c=call: c(predictor, torch.full((1, 3), 1e3)))
        assert type(exc) is raised
        assert raised_by_model(exc)


@pytest.mark.parametrize("error", ["memory", "memory_error"])
def test_running_out_of_memory_in_the_forward_is_the_machines(
    picky: Callable[[str], Predictor], error: str
) -> None:
    exc = _raised(lambda: picky(error).predict(torch.full((1, 3), 1e3)))
    assert isinstance(exc, MemoryError | RuntimeError)
    assert server_side(exc)
    assert not raised_by_model(exc)


@pytest.mark.parametrize(
    "exc",
    [
        MemoryError(),
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError("CUDA error: device-side assert triggered"),
        RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes"),
    ],
)
def test_the_machines_errors_are_server_side(exc: BaseException) -> None:
    assert server_side(exc)


def test_an_input_error_is_mcdrops_own(tokens: Predictor) -> None:
    # mcdrop refuses a row of the wrong shape itself, before the model: its own error and code
    exc = _raised(lambda: tokens.predict(torch.zeros(1, 5)))
    assert isinstance(exc, InvalidInputError)
    assert not raised_by_model(exc)


def test_an_error_raised_by_mcdrops_code_is_not_the_models(tokens: Predictor) -> None:
    # The sampling loop calls ``stop`` between passes (after the model has run): what it raises
    # is raised in mcdrop's frame, deeper than no module call.
    exc = _raised(lambda: tokens.uncertainty(GOOD, 8, seed=0, stop="no callable"))
    assert isinstance(exc, TypeError)
    assert not raised_by_model(exc)


def _broken_stop() -> bool:
    raise RuntimeError("a caller's callback failed")


def test_an_error_of_a_callback_mcdrop_calls_is_not_the_models(tokens: Predictor) -> None:
    # Raised deeper than mcdrop's frames, but in no module call: not the model's forward.
    exc = _raised(lambda: tokens.uncertainty(GOOD, 8, seed=0, stop=_broken_stop))
    assert isinstance(exc, RuntimeError)
    assert not raised_by_model(exc)


class _CallsMcdropWrongly(torch.nn.Module):
    """A forward that calls mcdrop's code with a value it does not take: the error is raised in
    mcdrop's frame, inside the model."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mcdrop.checking.example_inputs(x)  # (a spec, not a tensor: AttributeError)
        return x


def test_mcdrops_code_inside_the_model_is_mcdrops() -> None:
    exc = _raised(lambda: mcdrop.predict(_CallsMcdropWrongly(), torch.ones(2, 3)))
    assert not isinstance(exc, mcdrop.McDropError)
    assert not raised_by_model(exc)


def test_an_error_where_mcdrop_called_no_model_is_not_the_models() -> None:
    model = factories.GatedTokens()
    exc = _raised(lambda: model(PAST))  # the model's own error, but not called by mcdrop
    assert isinstance(exc, IndexError)
    assert not raised_by_model(exc)
    assert not raised_by_model(KeyboardInterrupt())
