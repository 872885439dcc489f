"""Checks schemathesis runs on top of its own (loaded through ``SCHEMATHESIS_HOOKS``)."""

from __future__ import annotations

import schemathesis

#: The 422 codes a request valid under the served schema can still get: its rows do not have
#: the model's input_shape (the model is a path parameter, so the schema cannot say which shape),
#: it passes a limit the settings set (rows × n_samples), finite inputs overflow the model, or
#: it asks for a decision the model does not offer (its calibration and task are its own).
SCHEMA_CANNOT_SAY = frozenset(
    {"invalid_input", "limit_exceeded", "non_finite_output", "decision_unavailable"}
)
#: ... and under a model's own path (exact shape, limits within the schema): only the overflow.
MODEL_PATH_CANNOT_SAY = frozenset({"non_finite_output"})
#: How a v2 400 begins when the request's structure, not its tensor, was refused: the request
#: model refusing what the schema allows (as ``invalid_request`` natively), or a body not JSON.
V2_STRUCTURE_REFUSED = ("invalid request:", "the request body is not valid JSON")


@schemathesis.check
def schema_valid_refused_only_for_what_schema_cannot_say(
    ctx: schemathesis.CheckContext, response: schemathesis.Response, case: schemathesis.Case
) -> bool | None:
    """A schema-valid request answered 422 carries a code the schema could not rule out: never
    ``invalid_request``, which would mean the request model refuses what the schema allows; a v2
    400 likewise. (positive_data_acceptance itself is configured to let them pass.)"""
    if case.meta is None or not case.meta.generation.mode.is_positive:
        return None
    if case.operation.path.startswith("/v2/") and response.status_code == 400:
        # The v2 routes answer 400 where the native ones answer 422; the message says why.
        message = response.json()["error"]
        if message.startswith(V2_STRUCTURE_REFUSED):
            raise AssertionError(f"schema-valid request refused: {response.text[:500]}")
        return None
    if response.status_code != 422:
        return None
    allowed = SCHEMA_CANNOT_SAY if "{name}" in case.operation.path else MODEL_PATH_CANNOT_SAY
    code = response.json()["error"]["code"]
    if code not in allowed:
        raise AssertionError(f"schema-valid request refused with {code}: {response.text[:500]}")
    return None
