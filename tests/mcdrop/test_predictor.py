"""The Predictor over the bundled models."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from functools import partial

import pytest
import torch

from mcdrop import checkpoint
from mcdrop.exceptions import (
    InvalidArgumentError,
    InvalidInputError,
    NonFiniteOutputError,
    SamplingStoppedError,
)
from mcdrop.predictor import (
    ClassificationPrediction,
    Predictor,
    RegressionPrediction,
    check_finite,
    non_finite_rows,
)
from mcdrop.stats import ClassificationSummary, RegressionSummary
from tests.conftest import MODELS


@pytest.fixture(scope="module")
def digits() -> Predictor:
    return Predictor(checkpoint.load(MODELS / "digits"))


@pytest.fixture(scope="module")
def diabetes() -> Predictor:
    return Predictor(checkpoint.load(MODELS / "diabetes"))


def test_classifier(digits: Predictor) -> None:
    x = torch.rand(5, 64) * 16
    det = digits.predict(x)
    assert isinstance(det, ClassificationPrediction)
    assert torch.allclose(det.probabilities.sum(-1), torch.ones(5), atol=1e-5)
    summary, samples = digits.uncertainty(x, 30, seed=0, return_samples=True)
    assert isinstance(summary, ClassificationSummary)
    assert samples is not None
    assert samples.shape == (30, 5, 10)
    assert torch.allclose(samples.mean(0), summary.probabilities, atol=1e-5)
    assert bool((summary.variance.sum(-1) > 0).all())


def test_regressor_in_original_units(diabetes: Predictor) -> None:
    x = torch.tensor([[59, 2, 32.1, 101, 157, 93.2, 38, 4, 4.8598, 87]])
    det = diabetes.predict(x)
    assert isinstance(det, RegressionPrediction)
    assert 25 < det.mean.item() < 350  # the target's range in the data
    summary, _ = diabetes.uncertainty(x, 200, seed=0)
    assert isinstance(summary, RegressionSummary)
    assert summary.aleatoric_variance.item() == pytest.approx(1 / diabetes.spec.tau, rel=1e-5)
    assert summary.epistemic_variance.item() > 0
    assert summary.lower.item() < summary.mean.item() < summary.upper.item()


def test_a_homoscedastic_regressor_without_tau_is_explained(diabetes: Predictor) -> None:
    """A spec built in code (not read by ModelSpec.from_dict, which refuses it) without tau."""
    spec = replace(diabetes.spec, tau=None)
    untuned = Predictor(replace(diabetes.model, spec=spec))
    x = torch.zeros(2, 10)
    with pytest.raises(InvalidArgumentError, match="without 'tau'"):
        untuned.predict(x)
    with pytest.raises(InvalidArgumentError, match="without 'tau'"):
        untuned.uncertainty(x, 4, seed=0)


@pytest.mark.parametrize(
    "bad", [torch.zeros(2, 63), torch.zeros(64), torch.zeros(0, 64), torch.full((1, 64), 3e38) * 10]
)
def test_bad_inputs_are_explained(digits: Predictor, bad: torch.Tensor) -> None:
    with pytest.raises(InvalidInputError):
        digits.predict(bad)


@pytest.mark.parametrize("method", ["predict", "uncertainty"])
def test_rows_that_are_not_a_tensor_are_explained(digits: Predictor, method: str) -> None:
    # An array was an AttributeError ('numpy.ndarray' object has no attribute 'dim').
    rows = torch.zeros(2, 64).numpy()
    with pytest.raises(InvalidInputError, match=r"inputs must be a torch\.Tensor, got ndarray"):
        getattr(digits, method)(rows)


@pytest.mark.parametrize("bad", [torch.zeros(2, 63), torch.zeros(64), torch.zeros(0, 64)])
def test_a_caller_that_checked_the_values_still_gets_the_shape_checked(
    digits: Predictor, bad: torch.Tensor
) -> None:
    with pytest.raises(InvalidInputError):
        digits.predict(bad, check_finite_inputs=False)
    with pytest.raises(InvalidInputError):
        digits.uncertainty(bad, 4, seed=0, check_finite_inputs=False)


def test_leaving_out_the_finiteness_scan_changes_no_result(digits: Predictor) -> None:
    x = torch.rand(3, 64) * 16
    assert torch.equal(
        digits.predict(x, check_finite_inputs=False).probabilities, digits.predict(x).probabilities
    )
    unscanned, _ = digits.uncertainty(x, 20, seed=4, check_finite_inputs=False)
    scanned, _ = digits.uncertainty(x, 20, seed=4)
    assert torch.equal(unscanned.variance, scanned.variance)


def test_targets_shape_checked(diabetes: Predictor) -> None:
    with pytest.raises(InvalidArgumentError):
        diabetes.uncertainty(torch.zeros(2, 10), 4, targets=torch.zeros(3, 1))


BUNDLED_SHAPES = {"digits": (64,), "diabetes": (10,), "fashion": (28, 28)}


@pytest.fixture(scope="module", params=sorted(BUNDLED_SHAPES))
def bundled(request: pytest.FixtureRequest) -> Predictor:
    return Predictor(checkpoint.load(MODELS / request.param))


@pytest.mark.parametrize("extreme", [1e20, -1e20, 3e38, -3e38])
def test_outputs_are_finite_or_the_overflowing_rows_are_named(
    bundled: Predictor, extreme: float
) -> None:
    shape = BUNDLED_SHAPES[bundled.spec.name]
    x = torch.stack([torch.zeros(shape), torch.full(shape, extreme), torch.ones(shape)])
    det = bundled.predict(x, check_outputs=False)
    summary, samples = bundled.uncertainty(x, 20, seed=0, return_samples=True, check_outputs=False)
    for bad, call in [
        (non_finite_rows(det), lambda: bundled.predict(x)),
        (non_finite_rows(summary, samples), lambda: bundled.uncertainty(x, 20, seed=0)),
    ]:
        assert bad in ([], [1])  # only the extreme row can overflow
        if bad:
            with pytest.raises(NonFiniteOutputError, match=r"rows \[1\]") as info:
                call()
            assert info.value.rows == [1]
        else:
            call()


@pytest.mark.parametrize(
    ("name", "value", "endpoint"),
    [
        ("digits", 3e38, "predict"),
        ("digits", 3e38, "uncertainty"),
        ("diabetes", 1e20, "uncertainty"),
    ],
)
def test_known_overflows_raise(name: str, value: float, endpoint: str) -> None:
    """digits at 3e38: inf logits, NaN probabilities; diabetes at 1e20: a finite mean of ~1e21
    whose variance (~1e42) is beyond float32."""
    predictor = Predictor(checkpoint.load(MODELS / name))
    x = torch.full((2, *BUNDLED_SHAPES[name]), value)
    call = predictor.predict if endpoint == "predict" else partial(predictor.uncertainty, seed=0)
    with pytest.raises(NonFiniteOutputError) as info:
        call(x)
    assert info.value.rows == [0, 1]
    assert isinstance(info.value, InvalidInputError)


def test_check_finite_names_rows_of_summaries_and_samples() -> None:
    pred = RegressionPrediction(
        mean=torch.tensor([[1.0], [math.inf], [2.0]]), noise_variance=torch.ones(3, 1)
    )
    assert non_finite_rows(pred) == [1]
    samples = torch.zeros(4, 3, 1)
    samples[2, 2, 0] = math.nan
    assert non_finite_rows(pred, samples) == [1, 2]
    with pytest.raises(NonFiniteOutputError, match=r"rows \[1, 2\]"):
        check_finite(pred, samples)
    check_finite(RegressionPrediction(mean=torch.ones(2, 1), noise_variance=torch.ones(2, 1)))


def test_the_plan_is_made_once_and_kept(diabetes: Predictor) -> None:
    x = torch.tensor([[59, 2, 32.1, 101, 157, 93.2, 38, 4, 4.8598, 87]] * 3)
    fresh = Predictor(diabetes.model)
    assert fresh.plan is None
    made = fresh.warm_up(x[:1])
    assert fresh.plan is made
    assert made.prefix
    summary, _ = fresh.uncertainty(x, 50, seed=3)
    assert fresh.plan is made  # kept, not remade per request
    # A predictor that plans on its first request gives the same bits.
    again, _ = Predictor(diabetes.model).uncertainty(x, 50, seed=3)
    assert torch.equal(again.mean, summary.mean)
    assert torch.equal(again.variance, summary.variance)


def _fails() -> bool:
    raise RuntimeError("the caller's stop failed")


@pytest.mark.parametrize("stop", [lambda: True, _fails], ids=["stopped", "stop-raises"])
@pytest.mark.parametrize("n_samples", [8, "auto"])
def test_sampling_stopped_or_failed_leaves_no_context_behind(
    diabetes: Predictor, stop: Callable[[], bool], n_samples: int | str
) -> None:
    # While its exception is still held (a server hands it to another thread), the thread that
    # sampled is back in its own modes, and so is the model.
    x = torch.zeros(2, 10)
    modes = [m.training for m in diabetes.model.module.modules()]
    with pytest.raises((SamplingStoppedError, RuntimeError)) as raised:
        diabetes.uncertainty(x, n_samples, seed=0, stop=stop)  # type: ignore[arg-type]
    assert raised.value is not None
    assert torch.is_grad_enabled()
    assert not torch.is_inference_mode_enabled()
    assert [m.training for m in diabetes.model.module.modules()] == modes
