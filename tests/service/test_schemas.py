"""The HTTP contract's models: what they take, and what a response may carry."""

from __future__ import annotations

import json
import math

import jsonschema
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


@pytest.mark.parametrize("field", ["level", "coverage", "reject_rate", "tolerance"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_float_option_that_is_not_finite_is_named_so(field: str, bad: float) -> None:
    # (a NaN level was told "Input should be less than 1")
    with pytest.raises(ValidationError) as refused:
        schemas.UncertaintyRequest.model_validate({"inputs": [[0.0]], field: bad})
    assert refused.value.errors()[0]["msg"] == "Input should be a finite number"


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


MODEL_INFO = {
    "name": "m",
    "version": "1",
    "task": "regression",
    "description": "d",
    "input_shape": [2],
    "labels": [],
    "likelihood": "homoscedastic",
    "tau": 2.0,
    "dropout": 0.1,
    "default_n_samples": 10,
    "max_n_samples": 100,
    "max_request_rows": 10,
    "metrics": {"rmse": 0.5},
}


CALIBRATION = {
    "n_rows": 100,
    "n_samples": 50,
    "seed": 1,
    "data": "validation split",
    "reject_scores": ["std"],
    "default_reject_score": "std",
    "conformal_method": "normalized_residual",
    "max_coverage": 0.99,
}


@pytest.mark.parametrize("bad", ["NaN", "Infinity", "-Infinity"])
@pytest.mark.parametrize(
    "changed",
    [
        {"tau": 0.0},
        {"dropout": 0.0},
        {"metrics": {"rmse": 0.0}},
        {"calibration": CALIBRATION | {"max_coverage": 0.0}},
    ],
)
def test_a_model_description_never_carries_a_non_finite_number(
    changed: dict[str, object], bad: str
) -> None:
    """As the results: pydantic's JSON parser reads NaN and Infinity, which a client then took
    from a server that is not mcdrop as a model's tau or metrics."""
    assert schemas.ModelInfo.model_validate(MODEL_INFO | {"calibration": CALIBRATION})
    text = json.dumps(MODEL_INFO | changed).replace("0.0", bad)
    with pytest.raises(ValidationError, match="finite"):
        schemas.ModelInfo.model_validate_json(text)


# -- n_samples "auto" ---------------------------------------------------------------------------

AUTO_BODIES = [
    ({"n_samples": "auto"}, True),
    ({"n_samples": "auto", "tolerance": 0.01, "max_n_samples": 500}, True),
    ({"n_samples": "auto", "tolerance": 1}, True),
    ({"n_samples": "auto", "max_n_samples": 5.0}, True),
    ({"n_samples": 20}, True),
    ({"tolerance": 0.01}, False),  # adaptive options without "auto"
    ({"max_n_samples": 100}, False),
    ({"n_samples": 20, "tolerance": 0.01}, False),
    ({"n_samples": None, "max_n_samples": 100}, False),
    ({"n_samples": "Auto"}, False),
    ({"n_samples": "auto "}, False),
    ({"n_samples": "auto", "tolerance": 0}, False),
    ({"n_samples": "auto", "tolerance": -0.1}, False),
    ({"n_samples": "auto", "tolerance": "0.01"}, False),
    ({"n_samples": "auto", "max_n_samples": 0}, False),
    ({"n_samples": "auto", "max_n_samples": 2.5}, False),
]


@pytest.mark.parametrize(("options", "valid"), AUTO_BODIES)
def test_auto_options_and_the_schema_agree(options: dict[str, object], valid: bool) -> None:
    """The request model and its JSON schema (what a client or a fuzzer reads) accept the same
    adaptive options: the schema's dependentSchemas state that tolerance and max_n_samples need
    n_samples "auto"."""
    body = {"inputs": [[0.0]], **options}
    try:
        schemas.UncertaintyRequest.model_validate_json(json.dumps(body))
        accepted = True
    except ValidationError:
        accepted = False
    assert accepted == valid
    schema = schemas.UncertaintyRequest.model_json_schema()
    assert jsonschema.Draft202012Validator(schema).is_valid(body) == valid


def test_a_fixed_response_carries_no_adaptive_fields() -> None:
    row = schemas.RegressionUncertainty(
        mean=[1.0],
        variance=[2.0],
        std=[1.4],
        epistemic_variance=[1.0],
        aleatoric_variance=[1.0],
        lower=[0.0],
        upper=[2.0],
    )
    fixed = schemas.UncertaintyResponse(
        model="m", task="regression", n_samples=10, seed=1, level=0.9, results=[row]
    )
    assert set(json.loads(fixed.model_dump_json(exclude_none=True))) == {
        "model",
        "task",
        "n_samples",
        "seed",
        "level",
        "results",
    }
