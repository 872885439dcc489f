"""Response bodies built straight from tensors (``convert.*_body``) are the response models' JSON:
the same bytes as ``model_dump_json(exclude_none=True)`` of the validated model, for every kind
of result (classifier, regressor, adaptive, samples, decisions), and non-finite results are
refused naming their rows."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pydantic_core
import pytest
import torch
from pydantic import BaseModel

from mcdrop import calibration, checkpoint
from mcdrop.exceptions import InvalidInputError, NonFiniteOutputError
from mcdrop.predictor import Predictor
from service import convert, schemas
from tests.conftest import MODELS


@pytest.fixture(scope="module", params=["digits", "diabetes"])
def predictor(request: pytest.FixtureRequest) -> Predictor:
    return Predictor(checkpoint.load(MODELS / request.param), results_device="cpu")


def _rows(predictor: Predictor, n: int) -> torch.Tensor:
    return torch.rand(n, *predictor.spec.input_shape, generator=torch.Generator().manual_seed(n))


def _same_json(body: dict[str, Any], model: type[BaseModel]) -> None:
    validated = model.model_validate(body)
    assert pydantic_core.to_json(body) == validated.model_dump_json(exclude_none=True).encode()


@pytest.mark.parametrize("n", [1, 3])
def test_a_prediction_body_is_the_response_models_json(predictor: Predictor, n: int) -> None:
    body = convert.predict_body(predictor, predictor.predict(_rows(predictor, n) * 10))
    _same_json(body, schemas.PredictResponse)
    assert convert.predict_response(predictor, predictor.predict(_rows(predictor, n) * 10))


def _decision(predictor: Predictor, **asked: Any) -> calibration.DecisionRequest:
    calibrated = predictor.model.calibration
    assert calibrated is not None
    return calibration.resolve(predictor.spec.task, calibrated, **asked)


@pytest.mark.parametrize("n", [1, 4])
@pytest.mark.parametrize("auto", [False, True])
@pytest.mark.parametrize("return_samples", [False, True])
@pytest.mark.parametrize("decide", [None, "rate", "threshold+coverage"])
def test_an_uncertainty_body_is_the_response_models_json(
    predictor: Predictor, n: int, auto: bool, return_samples: bool, decide: str | None
) -> None:
    x = _rows(predictor, n) * 10
    if auto:
        summary, samples = predictor.uncertainty(
            x, "auto", tolerance=0.05, max_n_samples=64, seed=3, return_samples=return_samples
        )
    else:
        summary, samples = predictor.uncertainty(x, 20, seed=3, return_samples=return_samples)
    decision = None
    if decide == "rate":
        decision = _decision(predictor, reject_rate=0.25)
    elif decide == "threshold+coverage":
        score = "entropy" if predictor.spec.task == "classification" else "std"
        decision = _decision(predictor, reject_threshold=0.5, reject_score=score, coverage=0.9)
    options: dict[str, Any] = {"tolerance": 0.05, "max_n_samples": 64} if auto else {}
    body = convert.uncertainty_body(
        predictor, summary, samples, seed=3, level=0.9, decision=decision, **options
    )
    _same_json(body, schemas.UncertaintyResponse)
    if auto:
        used = summary.row_n_samples.tolist()
        assert [r["n_samples"] for r in body["results"]] == used
        if return_samples:  # each row's own samples, no padding
            assert [len(r["samples"]) for r in body["results"]] == used


def test_a_non_finite_statistic_is_refused_naming_its_row(predictor: Predictor) -> None:
    summary, _ = predictor.uncertainty(_rows(predictor, 3), 8, seed=1)
    broken = summary.variance.clone()
    broken[1, 0] = float("nan")
    with pytest.raises(NonFiniteOutputError, match=r"\[1\]"):
        convert.uncertainty_body(
            predictor, replace(summary, variance=broken), None, seed=1, level=0.95
        )
    prediction = predictor.predict(_rows(predictor, 3))
    field = "probabilities" if predictor.spec.task == "classification" else "mean"
    values = getattr(prediction, field).clone()
    values[2, 0] = float("inf")
    with pytest.raises(NonFiniteOutputError, match=r"\[2\]"):
        convert.predict_body(predictor, replace(prediction, **{field: values}))


def test_a_non_finite_returned_sample_is_refused(predictor: Predictor) -> None:
    summary, samples = predictor.uncertainty(_rows(predictor, 2), 8, seed=1, return_samples=True)
    assert samples is not None
    samples = samples.clone()
    samples[5, 0, 0] = float("-inf")
    with pytest.raises(NonFiniteOutputError, match=r"\[0\]"):
        convert.uncertainty_body(predictor, summary, samples, seed=1, level=0.95)


def test_rows_are_refused_at_their_first_invalid_number(predictor: Predictor) -> None:
    # The rest unread: pydantic's error for each of fashion's 1000 rows of strings (784 000)
    # took 3.9-4.5 s, the GIL held and /health with it.
    rows = [["a"] * predictor.spec.input_shape[0]] * 50
    with pytest.raises(InvalidInputError) as refused:
        convert.to_tensor(rows, predictor)
    assert str(refused.value).endswith(": inputs.0.0: Input should be a valid number")


@pytest.fixture(scope="module")
def predictors() -> dict[str, Predictor]:
    return {
        name: Predictor(checkpoint.load(MODELS / name), results_device="cpu")
        for name in ("diabetes", "fashion")
    }


IMAGE = [[0.0] * 28] * 28


@pytest.mark.parametrize(
    ("model", "rows", "message"),
    [
        (
            "diabetes",
            [[0.0] * 10 + ["x"] * 1000],
            "model 'diabetes' expects rows of shape [10], got a batch of shape [1, 1010]",
        ),
        (
            "diabetes",
            [[0.0] * 10, [0.0] * 10 + ["x"]],
            "every row must have shape [10]; rows differ in length",
        ),
        (
            "fashion",
            [[["x"] * 1000]],
            "model 'fashion' expects rows of shape [28, 28], got a batch of shape [1, 1, 1000]",
        ),
        (
            "fashion",
            [IMAGE, [*IMAGE[:27], ["x"] * 29]],
            "every row must have shape [28, 28]; rows differ in length",
        ),
    ],
)
def test_rows_longer_than_the_shape_are_refused_before_their_values_are_read(
    predictors: dict[str, Predictor], model: str, rows: list[Any], message: str
) -> None:
    # The strings would be named if the values were read: one row of 785 000 numbers for
    # fashion had each validated, the event loop held, before its shape was refused.
    with pytest.raises(InvalidInputError) as refused:
        convert.to_tensor(rows, predictors[model])
    assert str(refused.value).startswith(message)
