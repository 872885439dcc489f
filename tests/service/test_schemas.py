"""The HTTP contract's models: what they take, and what a response may carry."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from mcdrop import masks
from mcdrop_client import schemas


def test_seed_range_is_the_librarys() -> None:
    assert schemas.MAX_SEED == masks.MAX_SEED
    schemas.UncertaintyRequest(inputs=[[0.0]], seed=masks.MAX_SEED)
    with pytest.raises(ValidationError):
        schemas.UncertaintyRequest(inputs=[[0.0]], seed=masks.MAX_SEED + 1)


@pytest.mark.parametrize(("text", "value"), [("5", 5), ("5.0", 5), ("1e3", 1000)])
def test_integers_as_json_schema_counts_them(text: str, value: int) -> None:
    """JSON Schema's ``integer`` includes ``5.0``; the request model takes what it promises."""
    body = f'{{"inputs": [[0]], "n_samples": {text}, "seed": {text}}}'
    request = schemas.UncertaintyRequest.model_validate_json(body)
    assert (request.n_samples, request.seed) == (value, value)


@pytest.mark.parametrize("text", ['"5"', "true", "5.5", "1e400", "NaN", "Infinity", "0", "-1.0"])
def test_not_an_integer_or_out_of_range_is_refused(text: str) -> None:
    with pytest.raises(ValidationError):
        schemas.UncertaintyRequest.model_validate_json(f'{{"inputs": [[0]], "n_samples": {text}}}')


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_response_never_carries_a_non_finite_number(bad: float) -> None:
    with pytest.raises(ValidationError):
        schemas.ClassificationPrediction(label="0", label_index=0, probabilities=[bad, 0.5])
    with pytest.raises(ValidationError):
        schemas.RegressionUncertainty(
            mean=[1.0],
            variance=[bad],
            std=[1.0],
            epistemic_variance=[1.0],
            aleatoric_variance=[1.0],
            lower=[0.0],
            upper=[2.0],
        )
