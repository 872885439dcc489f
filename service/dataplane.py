"""What every protocol's inference endpoints share: the limits a request must fit, the MC
options it resolves to, the watch for its client going away, and moving large conversions off
the event loop. The native routes (:mod:`service.routes`) and the Open Inference Protocol's
(:mod:`service.v2.routes`) each do only their own encoding around these, so both run the same
checks, with the same messages, before the same :class:`~service.registry.ModelHandle`; and
both answer HEAD on their GET routes the same way (:func:`get_and_head`). A request's own
deadline (the v2 ``timeout``; the native API has none but the server's) is :class:`Deadline`."""

from __future__ import annotations

import asyncio
import inspect
import json
import math
import time
from collections.abc import Awaitable, Callable, Collection, Coroutine
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal, TypeVar

import numpy as np
import pydantic_core
import torch
from fastapi import APIRouter, Request
from fastapi.responses import Response
from fastapi.routing import APIRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from mcdrop import adaptive, calibration, predictor
from mcdrop.checkpoint import ModelSpec
from mcdrop.predictor import Prediction, Summary
from service.batching import MCOptions
from service.config import Settings
from service.errors import DeadlineExceededError, LimitExceededError
from service.registry import ModelHandle

#: Past these sizes, parsing a request body, turning a request into a tensor or a result into a
#: response runs in a worker thread (tens of milliseconds), not on the event loop that also
#: answers ``/health``.
LARGE_BODY_BYTES = 256 * 1024
LARGE_INPUT_VALUES = 20_000
LARGE_RESPONSE_VALUES = 20_000

#: Upper bound on the JSON bytes of one float as pydantic-core writes it (``-1.2345678e-05``
#: and the separator), and of a result row's keys and scalars.
FLOAT_BYTES = 25
ROW_BYTES = 400

T = TypeVar("T")

#: Most object keys (JSON members) a request body may hold. A request has a few dozen; a body of
#: 16 MB can hold a million, each an error to build when unknown (1M of them held the event loop
#: for seconds: parsing, then validation errors, ~3 s per request), so a body past this is
#: refused before it is parsed.
MAX_BODY_KEYS = 1024


def _outside_strings(body: bytes, byte: bytes) -> int:
    """How many times ``byte`` occurs in JSON ``body`` outside its strings: ~0.1 s for 16 MB, in
    NumPy, which lets go of the GIL (the loop, if this runs in a worker thread, waits ~10 ms)."""
    # Drop escaped backslashes and quotes, then count outside the quotes. (Looked for first:
    # bytes.replace takes ~40 ms to find nothing in 14 MB, the GIL held.)
    if b"\\" in body:
        body = body.replace(b"\\\\", b"").replace(b'\\"', b"")
    text = np.frombuffer(body, np.uint8)
    in_string = np.bitwise_xor.accumulate(text == ord('"'))
    return int(np.count_nonzero((text == ord(byte)) & ~in_string))


def check_keys(body: bytes) -> None:
    """A 422 (400 on v2) for a JSON ``body`` of more than :data:`MAX_BODY_KEYS` object keys,
    counted without parsing it (~0.1 s for 16 MB, ~µs for a body of few colons)."""
    if body.count(b":") <= MAX_BODY_KEYS:  # every key is followed by a colon
        return
    keys = _outside_strings(body, b":")  # colons in strings are no keys
    if keys > MAX_BODY_KEYS:
        raise LimitExceededError(
            f"the request body has {keys} object keys, more than the limit of {MAX_BODY_KEYS}; "
            "a request has a few dozen (remove the fields the API does not define)"
        )


def check_values(body: bytes, spec: ModelSpec, max_rows: int) -> None:
    """A 422 (400 on v2) for a JSON ``body`` that holds more values than any request to the
    model of ``spec`` can: ``max_rows`` rows of its ``input_shape``, and its options (at most
    :data:`MAX_BODY_KEYS` fields). Counted without parsing it, by the commas between values
    (~3 ms for 16 MB; the string-aware count of :func:`check_keys` only past the limit).

    Parsing holds the GIL, in a worker thread too (``pydantic_core.from_json`` and
    ``json.loads`` alike): one row of 7 M numbers, 14 MB, held ``/health`` for ~0.5 s to parse,
    where a full request to a model of 10 inputs per row holds 10 000 numbers."""
    limit = max_rows * math.prod(spec.input_shape) + MAX_BODY_KEYS
    if body.count(b",") <= limit:  # values in a list, and fields, are separated by commas
        return
    commas = _outside_strings(body, b",")
    if commas > limit:
        raise LimitExceededError(
            f"the request body holds {commas + 1} or more JSON values, more than a request to "
            f"model {spec.name!r} can: at most {max_rows} rows (the server's max_request_rows) "
            f"of {math.prod(spec.input_shape)} values (shape {list(spec.input_shape)}), and its "
            f"options, {limit} in all; send fewer rows, each of shape {list(spec.input_shape)}"
        )


def loads(body: bytes) -> Any:
    """``json.loads(body)``, the same value and the same errors, in a fifth of its time on a
    one-row request (a 64-number row: ~12 µs to ~2.5): pydantic-core's parser first, which
    gives ``json.loads``'s value for every body it accepts (NaN, ±Infinity and 1e400 as
    ``float``, integers of any size as ``int``, the last of repeated keys); a body it refuses
    (malformed, not UTF-8 or with a byte-order mark, a lone surrogate, nested past its depth
    limit) is parsed again by ``json.loads``, whose answer, value or exception, is the one
    given."""
    try:
        return pydantic_core.from_json(body)
    except ValueError:
        return json.loads(body)


async def off_loop(large: bool, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)``: in a worker thread when ``large``, else right here."""
    if not large:
        return fn(*args, **kwargs)
    return await asyncio.get_running_loop().run_in_executor(None, partial(fn, *args, **kwargs))


def disconnected(request: Request) -> Callable[[], Awaitable[None]]:
    """An awaitable factory that completes when the client goes away (the body is read by
    then, so the next ASGI message is the disconnect)."""

    async def wait() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    return wait


def respond(handler: Callable[[Request], Awaitable[Response]]) -> ASGIApp:
    """A route's ASGI app: ``handler(request)``, then its response. FastAPI's own wraps each
    call in two exit stacks, for dependencies with ``yield`` (the inference routes have no
    dependencies), and in a second round of exception handling, whose handlers are the app's:
    an exception raised here reaches the app's ExceptionMiddleware, which answers it with the
    same handlers. Without them: ~5 µs and two send wrappers less per request."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        response = await handler(Request(scope, receive, send))
        await response(scope, receive, send)

    return app


class RequestRoute(APIRoute):
    """A route whose endpoint takes only the request, called with it directly: without
    FastAPI's per-request dependency solving and telemetry (~20 µs), for routes that read their
    own body (the Open Inference Protocol's infer); see :func:`respond`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.app = respond(self.get_route_handler())

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        endpoint = self.endpoint
        assert list(inspect.signature(endpoint).parameters) == ["request"]
        return endpoint


class HeadRoute(APIRoute):
    """HEAD of a GET route: the GET's status and headers (its Content-Length included), no
    body (RFC 9110 §9.3.2)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        get = super().get_route_handler()

        async def head(request: Request) -> Response:
            response = await get(request)
            return Response(status_code=response.status_code, headers=dict(response.headers))

        return head


def get_and_head(
    router: APIRouter, path: str, **kwargs: Any
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``router.get(path, **kwargs)`` that also answers HEAD. The HEAD twin is a route of its
    own, kept out of the OpenAPI schema (one route with both methods would document HEAD too,
    under the same operation id as GET)."""

    def register(endpoint: Callable[..., Any]) -> Callable[..., Any]:
        router.add_api_route(
            path,
            endpoint,
            methods=["HEAD"],
            include_in_schema=False,
            route_class_override=HeadRoute,
            **kwargs,
        )
        return router.get(path, **kwargs)(endpoint)

    return register


def surely_finite(t: torch.Tensor) -> bool:
    """True when every element of ``t`` is finite; False when one may not be (or the sum of a
    small tensor overflowed): then the exact check decides."""
    if not t.is_floating_point():
        return True
    if t.numel() <= SMALL_TENSOR:  # a sum in Python: no per-op dispatch, no array wrappers
        if t.dim() == 1:
            return math.isfinite(sum(t.tolist()))
        if t.dim() == 2:  # a result's (N, K): no reshape (torch's dispatch, ~1 µs)
            return math.isfinite(sum(map(sum, t.tolist())))
        return math.isfinite(sum(t.reshape(-1).tolist()))
    return bool(np.logical_and.reduce(np.isfinite(t.numpy()), axis=None))


#: Up to this many elements, a tensor's finiteness is checked through its Python floats.
SMALL_TENSOR = 256

#: The name :func:`check_finite` gives the raw samples (as the v2 output that returns them).
SAMPLES = "samples"


def check_finite(
    result: Prediction | Summary,
    samples: torch.Tensor | None = None,
    *,
    seen_finite: Collection[str] = (),
) -> None:
    """:func:`mcdrop.predictor.check_finite` (a NonFiniteOutputError naming the rows with a NaN
    or ±inf output, of this request only: a merged batch is not checked whole), with a fast
    path for the usual answer, all finite: a few µs for a one-row result, where torch's per-row
    check costs ~50. ``seen_finite``: the names of ``result``'s fields (and ``"samples"``) the
    caller has seen finite already (the v2 encoder, summing the JSON it wrote): only the others
    are checked here, unless one of them is not finite (then the exact check covers all)."""
    tensors = [
        v for k, v in vars(result).items() if isinstance(v, torch.Tensor) and k not in seen_finite
    ]
    if samples is not None and SAMPLES not in seen_finite:
        tensors.append(samples)
    try:
        if all(surely_finite(t) for t in tensors):
            return
    except (TypeError, RuntimeError):  # a dtype numpy lacks (bfloat16), or not on the CPU
        pass
    predictor.check_finite(result, samples)


@dataclass(frozen=True)
class Deadline:
    """A request's own deadline, ``at`` (``time.monotonic``), from a timeout it sent in µs (the
    Open Inference Protocol's ``timeout`` parameter; 0 or none: only the server's
    request_timeout_s applies, as Triton reads 0). It counts from when the server has read the
    request, and it holds whatever path the work takes: an answer not ready by then is a 504,
    whether the work waited in the batcher's queue (which stops waiting at the deadline) or ran
    at once on arrival (which nothing interrupts: checked when it is done, so that a timeout
    shorter than the work is a 504 however small the work)."""

    at: float | None = None
    timeout_us: int = 0

    @classmethod
    def of(cls, timeout_us: int | None, read_at: float) -> Deadline:
        """The deadline of a request read at ``read_at`` with ``timeout_us`` (None: none)."""
        if not timeout_us:
            return cls()
        return cls(read_at + timeout_us / 1e6, timeout_us)

    def exceeded(self) -> DeadlineExceededError:
        return DeadlineExceededError(
            f"the answer was not ready within the request's deadline, its timeout of "
            f"{self.timeout_us} µs (parameters.timeout); allow more time, or send fewer rows or "
            "ask for fewer samples"
        )

    async def keep(self, work: Callable[[float | None], Awaitable[T]]) -> T:
        """``await work(timeout_s)`` given the seconds left (None: no deadline of its own), or
        a 504 when none are left before it starts or after it is done."""
        if self.at is None:
            return await work(None)
        left = self.at - time.monotonic()
        if left <= 0:
            raise self.exceeded()
        try:
            result = await work(left)
        except DeadlineExceededError:
            if time.monotonic() >= self.at:  # this deadline ran out, not the server's
                raise self.exceeded() from None
            raise
        if time.monotonic() > self.at:
            raise self.exceeded()
        return result


def check_rows(rows: int, settings: Settings) -> None:
    if rows > settings.max_request_rows:
        raise LimitExceededError(
            f"{rows} rows is more than the limit of {settings.max_request_rows} per request; "
            "split the batch"
        )


def default_n_samples(spec: ModelSpec, settings: Settings) -> int:
    """The samples a request that names none gets: the server's default, else the model's, never
    above the limit (the one place this is decided: requests and model metadata both use it)."""
    return min(settings.default_n_samples or spec.default_n_samples, settings.max_n_samples)


def mc_options(
    rows: int,
    n_samples: int | Literal["auto"] | None,
    level: float,
    return_samples: bool,
    handle: ModelHandle,
    settings: Settings,
    *,
    tolerance: float | None = None,
    max_n_samples: int | None = None,
) -> MCOptions:
    """The MC options of an uncertainty request of ``rows`` rows: ``n_samples`` (the default
    when None), or with ``"auto"`` the most a row may use (``max_n_samples``) and its
    ``tolerance`` (the default of the model's task when None), checked against the sample
    limits (an adaptive request is held to them as if every row used ``max_n_samples``)."""
    auto = n_samples == "auto"
    what = "max_n_samples" if auto else "n_samples"
    if auto:
        asked = max_n_samples
        most = min(adaptive.DEFAULT_MAX_N_SAMPLES, settings.max_n_samples)
        tolerance = adaptive.default_tolerance(handle.spec.task) if tolerance is None else tolerance
    else:
        asked = n_samples if isinstance(n_samples, int) else None
        most = default_n_samples(handle.spec, settings)
        tolerance = None
    if asked is not None and asked > settings.max_n_samples:
        raise LimitExceededError(f"{what}={asked} is above the limit of {settings.max_n_samples}")
    count = most if asked is None else asked
    total = rows * count
    if total > settings.max_row_samples:
        raise LimitExceededError(
            f"rows × {what} = {rows} × {count} = {total} is above the limit "
            f"of {settings.max_row_samples}; send fewer rows or ask for fewer samples"
        )
    if return_samples and total > settings.max_returned_samples:
        raise LimitExceededError(
            f"returned samples (return_samples, or the samples output): rows × {what} = {rows} "
            f"× {count} = {total} is above the limit of {settings.max_returned_samples}; send "
            "fewer rows, ask for fewer samples, or leave the samples out"
        )
    return MCOptions(count, level, return_samples, tolerance)


def check_response_size(
    rows: int, values_per_row: int, limit: int, *, binary_values_per_row: int = 0
) -> None:
    """Refuse up front a response whose estimated size is above the limit (before computing):
    ``values_per_row`` JSON numbers and ``binary_values_per_row`` binary ones (at most 8
    bytes each) per row."""
    estimate = rows * (ROW_BYTES + values_per_row * FLOAT_BYTES + binary_values_per_row * 8)
    if estimate > limit:
        raise LimitExceededError(
            f"the response would be about {estimate} bytes, above the limit of {limit} "
            "(max_response_bytes); send fewer rows, or ask for fewer samples or none returned"
        )


def check_response_bytes(size: int, limit: int) -> None:
    """Refuse a rendered response of ``size`` bytes above ``limit``."""
    if size > limit:
        raise LimitExceededError(
            f"the response would be {size} bytes, above the limit of {limit} "
            "(max_response_bytes); send fewer rows or ask for fewer samples"
        )


def decision_request(
    handle: ModelHandle,
    *,
    reject_rate: float | None,
    reject_threshold: float | None,
    reject_score: str | None,
    coverage: float | None,
) -> calibration.DecisionRequest:
    """A request's decision options (reject flags, conformal output) resolved against the
    model's calibration, before any sampling: a model without one, a score the task does not
    have, or a coverage its calibration cannot give is refused here, the same for every
    protocol."""
    return calibration.resolve(
        handle.spec.task,
        handle.predictor.model.calibration,
        reject_rate=reject_rate,
        reject_threshold=reject_threshold,
        reject_score=reject_score,
        coverage=coverage,
        model=f"model {handle.spec.name!r}",
    )
