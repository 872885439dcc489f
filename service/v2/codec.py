"""Open Inference Protocol tensors on the wire, to and from numpy and torch.

A request body is a JSON header (an :class:`~service.v2.schemas.InferenceRequest`), followed,
with the binary tensor data extension, by the tensors' raw bytes (little-endian, row-major, in
the order of the inputs that declare ``parameters.binary_data_size``); the
``Inference-Header-Content-Length`` header then gives the JSON's length. A response is built the
same way: outputs as JSON ``data`` (flat, row-major) or, when asked, as binary data.

Every malformed tensor is an :class:`~mcdrop.exceptions.InvalidInputError` (or a
:class:`~service.errors.MalformedRequestError` for a body that cannot be split) that says what
is wrong: the routes answer 400.
"""

from __future__ import annotations

import math
import struct
import zlib
from contextlib import nullcontext
from dataclasses import dataclass
from functools import lru_cache
from typing import Annotated, Any

import numpy as np
import pydantic_core
import torch
from fastapi.exceptions import RequestValidationError
from pydantic import Field, TypeAdapter, ValidationError
from torch import Tensor

from mcdrop.checkpoint import ModelSpec
from mcdrop.exceptions import InvalidArgumentError, InvalidInputError
from mcdrop.predictor import Predictor
from service.convert import longer_than, nested_shape
from service.dataplane import LARGE_BODY_BYTES, check_keys, check_values, surely_finite
from service.errors import (
    BodyTooLargeError,
    MalformedRequestError,
    echo,
    echo_list,
    summary,
    validation_details,
)
from service.schemas import FLOAT32_MAX, FiniteFloat
from service.v2.outputs import Selected
from service.v2.schemas import InferenceRequest, InferParameters, RequestInput

HEADER_LENGTH = "inference-header-content-length"
JSON_TYPE = "application/json"
BINARY_TYPE = "application/octet-stream"


@dataclass(frozen=True)
class Datatype:
    """A tensor element type: its little-endian numpy dtype and the JSON values it takes
    (``float``: finite numbers, in ``[lo, hi]`` unless both are 0; ``int``: integers in ``[lo,
    hi]``; ``bool``: true/false)."""

    numpy: str
    kind: str
    lo: int = 0
    hi: int = 0

    @property
    def itemsize(self) -> int:
        return np.dtype(self.numpy).itemsize

    @property
    def values(self) -> str:
        """What JSON ``data`` must hold, for messages."""
        if self.kind == "int":
            return f"integers in [{self.lo}, {self.hi}]"
        if self.kind == "float" and self.hi:
            return f"finite numbers in [{self.lo}, {self.hi}]"
        return {"float": "finite numbers", "bool": "true or false"}.get(self.kind, "")


def _int(numpy: str) -> Datatype:
    info = np.iinfo(numpy)
    return Datatype(numpy, "int", int(info.min), int(info.max))


#: The datatypes an input may have; the model gets float32 whatever was sent. (BYTES, strings,
#: has no meaning for a model of numbers; BF16 has no JSON form and numpy lacks it: torch reads
#: its binary form.)
DATATYPES: dict[str, Datatype] = {
    "FP32": Datatype("<f4", "float"),
    "FP64": Datatype("<f8", "float"),
    # FP16's largest finite value: a larger one is no half-precision number (as INT8's 200 is no
    # INT8), where FP32's and FP64's past float32 become inf, which the finiteness check names.
    "FP16": Datatype("<f2", "float", -65504, 65504),
    "BF16": Datatype("<u2", "bf16"),
    "INT8": _int("<i1"),
    "INT16": _int("<i2"),
    "INT32": _int("<i4"),
    "INT64": _int("<i8"),
    "UINT8": _int("<u1"),
    "UINT16": _int("<u2"),
    "UINT32": _int("<u4"),
    "UINT64": _int("<u8"),
    "BOOL": Datatype("<u1", "bool"),
}


# -- the request body ----------------------------------------------------------------------------


#: Content-Encoding (a case-insensitive name, RFC 9110 section 8.4.1; x-gzip is gzip's registered
#: alias) -> its canonical name and zlib's wbits for it.
_CODINGS = {
    "gzip": ("gzip", 16 + zlib.MAX_WBITS),
    "x-gzip": ("gzip", 16 + zlib.MAX_WBITS),
    "deflate": ("deflate", zlib.MAX_WBITS),
}
_GZIP_MAGIC = b"\x1f\x8b"
#: Most gzip members in one body. Each costs ~10 µs however small (20 bytes: 16 MB of empty
#: members would hold the event loop for seconds); block-wise compressors write one per 64 KiB
#: (bgzip), 256 for a 16 MB body.
MAX_MEMBERS = 1024
#: Compressed bytes handed to zlib at a time: the bytes past a member's end that zlib copies out
#: (``unused_data``) stay this few, so many members cost no quadratic copying.
_CHUNK = 64 * 1024


#: The most a deflate stream inflates to per compressed byte (1032:1, zlib's technical details):
#: a gzip bomb of 16 KB is 16 MB of JSON.
MAX_INFLATE_RATIO = 1032


def _identity(encoding: str | None) -> bool:
    """Whether a body sent with ``encoding`` is as sent (no encoding, or ``identity``)."""
    return encoding is None or encoding.strip().lower() in ("", "identity")


def inflates_large(size: int, encoding: str | None, limit: int) -> bool:
    """Whether a body of ``size`` bytes sent with ``encoding`` may inflate past
    :data:`~service.dataplane.LARGE_BODY_BYTES` (at most ``limit`` bytes, the body limit): then
    :func:`decompress` runs in a worker thread. (zlib lets go of the GIL, but the event loop
    waits for a call made on it: 16 MB inflated from 16 KB of gzip took ~30 ms, from 9.5 MB of
    it ~170 ms, /health held all that time.)"""
    return not _identity(encoding) and min(limit, size * MAX_INFLATE_RATIO) > LARGE_BODY_BYTES


def decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    """``body`` inflated per its ``Content-Encoding`` (gzip or deflate, as Triton's client
    sends; names case-insensitive), at most ``limit`` bytes of it. A gzip body may be several
    members, inflated one after another (RFC 1952 section 2.2); any other bytes after the end of
    the compressed data are an error."""
    if encoding is None or _identity(encoding):  # as the native routes (None: for mypy)
        return body
    coding = _CODINGS.get(encoding.strip().lower())
    if coding is None:
        raise MalformedRequestError(
            f"Content-Encoding {echo(encoding)} is not supported; send gzip, deflate or none"
        )
    name, wbits = coding
    view = memoryview(body)
    pieces: list[bytes] = []
    size = 0
    fed = 0  # bytes of body handed to zlib so far
    after = b""  # bytes handed to zlib past the end of the last member
    for _ in range(MAX_MEMBERS):
        inflater = zlib.decompressobj(wbits)
        data: bytes | memoryview = after
        while not inflater.eof:
            if not data:
                if fed == len(view):
                    raise MalformedRequestError(f"the {name} body is truncated")
                data = view[fed : fed + _CHUNK]
                fed += len(data)
            try:
                plain = inflater.decompress(data, limit + 1 - size)
            except zlib.error as exc:
                raise MalformedRequestError(f"the {name} body cannot be inflated: {exc}") from None
            size += len(plain)
            if size > limit:
                raise BodyTooLargeError(
                    f"the inflated request body is larger than the limit of {limit} bytes; "
                    "send fewer rows"
                )
            pieces.append(plain)
            data = inflater.unconsumed_tail  # empty: only a full output leaves some
        after = inflater.unused_data
        trailing = len(after) + len(view) - fed
        if trailing == 0:
            return b"".join(pieces)
        if name != "gzip" or (after + view[fed : fed + 2])[:2] != _GZIP_MAGIC:
            raise MalformedRequestError(
                f"the {name} body has {trailing} bytes after the end of its compressed data; "
                "send only the compressed data"
            )
    raise MalformedRequestError(
        f"the gzip body has more than {MAX_MEMBERS} members; send it as one gzip member"
    )


@dataclass(frozen=True)
class Request:
    """A parsed infer request: its JSON header, its parameters, and its binary part."""

    header: InferenceRequest
    parameters: InferParameters
    binary: memoryview


def _invalid(exc: ValidationError) -> RequestValidationError:
    """A pydantic error as FastAPI's, so that the one handler words it (invalid JSON: 400;
    else "invalid request: field: message", 400 on v2)."""
    return RequestValidationError(exc.errors(include_url=False))


#: Most digits of an Inference-Header-Content-Length: a byte count of up to 999 TB.
MAX_LENGTH_DIGITS = 15


def header_length_of(value: str) -> int:
    """The Inference-Header-Content-Length header as a byte count: ASCII digits only (``"²"`` is a
    digit to ``str.isdigit`` but no number to ``int``), and few of them (``int`` of 5000 digits
    raises), else a 400 that says so."""
    if not (value.isascii() and value.isdigit() and len(value) <= MAX_LENGTH_DIGITS):
        raise MalformedRequestError(
            "Inference-Header-Content-Length must be a byte count (the JSON header's length, "
            f"at most {MAX_LENGTH_DIGITS} ASCII digits), got {echo(value)}"
        )
    return int(value)


def parse_request(
    body: bytes, header_length: str | None, spec: ModelSpec, max_rows: int
) -> Request:
    """Split and parse an infer request body (``header_length``: the
    Inference-Header-Content-Length header, if sent) to the model of ``spec``, whose JSON may
    hold no more values than ``max_rows`` of its rows (:func:`~service.dataplane.check_values`)."""
    if header_length is None:
        header, binary = body, memoryview(b"")
    else:
        length = header_length_of(header_length)
        if length == 0:
            raise MalformedRequestError(
                "raw binary requests (Inference-Header-Content-Length: 0) are not supported; "
                "send the JSON inference header before the tensor data"
            )
        if length > len(body):
            raise MalformedRequestError(
                f"Inference-Header-Content-Length is {length}, past the end of the "
                f"{len(body)}-byte body"
            )
        header, binary = body[:length], memoryview(body)[length:]
    check_keys(header)  # before parsing: a million unknown keys cost seconds
    check_values(header, spec, max_rows)  # and 7 M numbers ~0.5 s, the GIL held
    try:
        request = InferenceRequest.model_validate_json(header)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        if all(e["loc"][:1] == ("parameters",) for e in errors):
            wrong = summary(validation_details(errors), len(errors))
            if any(e["type"] == "extra_forbidden" for e in errors):
                # A parameter mcdrop does not read: say which ones it does.
                known = ", ".join(InferParameters.model_fields)
                wrong = f"{wrong} (mcdrop reads the parameters {known})"
            raise InvalidArgumentError(wrong) from None
        raise _invalid(exc) from None
    return Request(request, request.parameters, binary)


def _batch_shape(predictor: Predictor) -> str:
    return f"[N, {', '.join(map(str, predictor.spec.input_shape))}]"


def rows_of(tensor: RequestInput, predictor: Predictor) -> int:
    """The rows ``N`` of the one input tensor, once its declared shape is ``(N,
    *input_shape)`` of non-negative sizes and its datatype one mcdrop reads."""
    expected = predictor.spec.input_shape
    shape = tensor.shape
    if any(d < 0 for d in shape):
        raise InvalidInputError(
            f"input {echo(tensor.name)} has shape {echo_list(shape)}: sizes must not be negative"
        )
    if len(shape) != len(expected) + 1 or shape[1:] != expected:
        raise InvalidInputError(
            f"model {predictor.spec.name!r} expects input shape {_batch_shape(predictor)} (N "
            f"rows), got {echo_list(shape)} for input {echo(tensor.name)}"
        )
    if shape[0] == 0:
        raise InvalidInputError("inputs must contain at least one row (shape[0] is 0)")
    if tensor.datatype not in DATATYPES:
        supported = ", ".join(DATATYPES)
        raise InvalidInputError(
            f"input {echo(tensor.name)} has datatype {echo(tensor.datatype)}; mcdrop models take "
            f"numbers: {supported}"
        )
    return shape[0]


def the_input(request: InferenceRequest, predictor: Predictor) -> RequestInput:
    """The request's one input tensor (any name)."""
    if len(request.inputs) != 1:
        raise InvalidInputError(
            f"model {predictor.spec.name!r} takes one input tensor (e.g. 'inputs', shape "
            f"{_batch_shape(predictor)}), got {len(request.inputs)}: "
            f"{echo_list([t.name for t in request.inputs])}"
        )
    return request.inputs[0]


@lru_cache(maxsize=64)
def _adapter(kind: str, rank: int, lo: int = 0, hi: int = 0) -> TypeAdapter[Any]:
    """Validator of JSON ``data`` nested ``rank`` deep holding values of ``kind``."""
    element: Any = {
        "float": Annotated[FiniteFloat, Field(ge=lo, le=hi)] if hi else FiniteFloat,
        "int": Annotated[int, Field(ge=lo, le=hi)],
        "bool": bool,
    }[kind]
    for _ in range(rank):
        # At the first invalid value (an error for each of 784 000 strings took 6-6.5 s).
        element = Annotated[list[element], Field(fail_fast=True)]
    return TypeAdapter(element)


def _within_float32(values: list[Any], rank: int) -> bool:
    """Whether the numbers of ``values`` (validated finite numbers, nested ``rank`` deep) are
    within float32's range, so that their float32s are finite too; False when unsure (nesting
    past 2): the caller converts with care and checks."""
    if rank == 2:
        values = [v for row in values for v in row]
    elif rank != 1:
        return False
    return not values or (min(values) >= -FLOAT32_MAX and max(values) <= FLOAT32_MAX)


def _misnested(tensor: RequestInput, found: list[int]) -> InvalidInputError:
    """The error for nested data that does not fit its shape, found nested as ``found`` along
    its first items (the shape itself: another row differs)."""
    if found == tensor.shape:
        return InvalidInputError(
            f"input {echo(tensor.name)}: nested data must be rectangular, of shape {tensor.shape}"
        )
    return InvalidInputError(
        f"input {echo(tensor.name)}: data is nested as shape {found}, but its shape is "
        f"{tensor.shape}"
    )


def _from_json(tensor: RequestInput, dtype: Datatype) -> tuple[Tensor, bool]:
    """The tensor of a JSON input, and whether its values are known finite (numbers validated
    finite and within float32's range)."""
    data = tensor.data
    assert data is not None
    shape, count = tensor.shape, math.prod(tensor.shape)
    if dtype.kind == "bf16":
        raise InvalidInputError(
            f"input {echo(tensor.name)}: BF16 has no JSON form; send it as binary data, or as FP32"
        )
    nested = bool(data) and isinstance(data[0], list)
    rank = len(shape) if nested else 1
    # Data longer than its shape is refused by its lengths, its values unread: the work is then
    # bounded by the shape, which the row limit bounds (7 M values sent for a shape of 10 were
    # validated on the event loop, holding its other requests ~1.1 s, then refused).
    if not nested and len(data) != count:
        raise InvalidInputError(
            f"input {echo(tensor.name)}: shape {shape} needs {count} values, data has {len(data)}"
        )
    if nested and longer_than(data, shape):
        raise _misnested(tensor, nested_shape(data, rank))
    try:
        values = _adapter(dtype.kind, rank, dtype.lo, dtype.hi).validate_python(data, strict=True)
    except ValidationError as exc:
        details = validation_details(exc.errors())
        where = "; ".join(f"data.{d['field']}: {d['message']}" for d in details[:3])
        layout = f"nested {rank} deep as the shape {shape}" if nested else "flat"
        raise InvalidInputError(
            f"input {echo(tensor.name)} ({tensor.datatype}) must hold {dtype.values}, {layout}: "
            f"{where}"
        ) from None
    # Validated finite; within float32's range too (integers of every datatype are, and FP16's
    # bounds), their float32s are finite: no overflow to silence, none to scan for.
    finite = dtype.kind != "float" or bool(dtype.hi) or _within_float32(values, rank)
    try:
        # Through NumPy: a fifth of torch.tensor's time on a list of a few hundred numbers.
        # A value past float32's range becomes inf, which the finiteness check names.
        if finite:
            array = np.array(values, dtype=np.float32)
        else:
            with np.errstate(over="ignore"):  # ~2 µs: only when a value may overflow
                array = np.array(values, dtype=np.float32)
    except ValueError:  # ragged rows
        raise _misnested(tensor, shape) from None
    if nested:
        if list(array.shape) != shape:
            raise _misnested(tensor, list(array.shape))
        return torch.from_numpy(array), finite
    # NumPy's reshape: a µs less than torch's.
    return torch.from_numpy(array.reshape(shape)), finite


def _from_binary(tensor: RequestInput, dtype: Datatype, raw: memoryview) -> Tensor:
    shape, count = tensor.shape, math.prod(tensor.shape)
    if len(raw) != count * dtype.itemsize:
        raise InvalidInputError(
            f"input {echo(tensor.name)}: shape {shape} of {tensor.datatype} needs "
            f"{count * dtype.itemsize} bytes, binary_data_size is {len(raw)}"
        )
    if dtype.kind == "bf16":
        return torch.frombuffer(bytearray(raw), dtype=torch.bfloat16).float().reshape(shape)
    array = np.frombuffer(raw, dtype=dtype.numpy)
    if dtype.kind == "bool" and bool((array > 1).any()):
        raise InvalidInputError(f"input {echo(tensor.name)}: BOOL bytes must be 0 or 1")
    # astype copies: torch gets a writable array of its own. Only FP64 values can be past
    # float32's range: they become inf, which the finiteness check names, without NumPy's
    # warning (a line on stderr, outside the server's log format).
    quiet = np.errstate(over="ignore") if dtype.numpy == "<f8" else nullcontext()
    with quiet:
        return torch.from_numpy(array.astype(np.float32)).reshape(shape)


def decode_input(request: Request, predictor: Predictor) -> Tensor:
    """The input tensor as float32 ``(N, *input_shape)``, from its JSON data or its binary
    bytes, checked by the model (finite values)."""
    tensor = the_input(request.header, predictor)
    dtype = DATATYPES[tensor.datatype]
    size = tensor.parameters.binary_data_size
    if size is None:
        if request.binary:
            raise InvalidInputError(
                f"the body has {len(request.binary)} bytes after the JSON header, but input "
                f"{echo(tensor.name)} declares no parameters.binary_data_size"
            )
        if tensor.data is None:
            raise InvalidInputError(
                f"input {echo(tensor.name)} has no data: give 'data', or binary data with "
                "parameters.binary_data_size"
            )
        x, finite = _from_json(tensor, dtype)
    else:
        if tensor.data is not None:
            raise InvalidInputError(
                f"input {echo(tensor.name)} has both 'data' and parameters.binary_data_size; "
                "give one"
            )
        if size != len(request.binary):
            raise InvalidInputError(
                f"input {echo(tensor.name)} declares binary_data_size {size}, but the body has "
                f"{len(request.binary)} bytes after the JSON header"
            )
        x, finite = _from_binary(tensor, dtype, request.binary), False
    shape_fits = x.shape[0] > 0 and list(x.shape[1:]) == predictor.spec.input_shape
    if shape_fits and (finite or surely_finite(x)):
        # The predictor's check finds nothing wrong either, and costs more (torch's per-op
        # dispatch, ~15 µs for a row).
        return x
    return predictor.check_inputs(x)  # says what is wrong


# -- the response body ---------------------------------------------------------------------------


def _bytes_tensor(array: np.ndarray) -> bytes:
    """BYTES elements (``str``, as UTF-8, or ``bytes``) as binary data: each a little-endian
    uint32 length, then its bytes."""
    elements = (e.encode() if isinstance(e, str) else e for e in array.ravel())
    return b"".join(struct.pack("<I", len(b)) + b for b in elements)


def _json_data(array: Tensor | np.ndarray) -> tuple[list[Any], list[int], bool]:
    """The JSON ``data`` of ``array`` (flat, row-major), its shape, and whether it holds numbers
    all seen finite (a float array whose sum is finite)."""
    shape = list(array.shape)
    if isinstance(array, np.ndarray):
        values = array.ravel().tolist()
        if array.dtype == object:  # BYTES: str (or bytes)
            return [e.decode() if isinstance(e, bytes) else e for e in values], shape, False
        floating = array.dtype.kind == "f"
    else:
        if len(shape) == 1:
            values = array.tolist()
        elif len(shape) == 2 and shape[0] <= 16:  # a few rows: cheaper than torch's reshape
            values = [v for row in array.tolist() for v in row]
        else:
            values = array.reshape(-1).tolist()
        floating = array.is_floating_point()
    if not floating:
        return values, shape, False
    if math.isfinite(sum(values)):
        return values, shape, True
    # A NaN (or a sum that overflowed). JSON has no NaN: the samples an adaptive row did not
    # draw are null.
    return [None if v != v else v for v in values], shape, False


def encode_response(
    header: dict[str, Any], outputs: list[tuple[Selected, Tensor | np.ndarray]]
) -> tuple[bytes, int | None, set[str]]:
    """The response body: ``header`` with its ``outputs``, JSON or binary as each asks, the
    JSON header's length when binary data follows it (else None), and the names of the float
    outputs written as JSON whose values were all seen finite (on the way: see
    :func:`service.dataplane.check_finite`)."""
    finite: set[str] = set()
    blobs: list[bytes] = []
    entries: list[dict[str, Any]] = []
    for selected, array in outputs:
        name, datatype = selected.name, selected.info.datatype
        if not selected.binary:
            data, shape, seen_finite = _json_data(array)
            entries.append({"name": name, "datatype": datatype, "shape": shape, "data": data})
            if seen_finite:
                finite.add(name)
            continue
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if isinstance(array, Tensor):
            array = array.numpy()
        blob = (
            _bytes_tensor(array)
            if array.dtype == object
            else array.astype(array.dtype.newbyteorder("<")).tobytes()
        )
        entry["parameters"] = {"binary_data_size": len(blob)}
        blobs.append(blob)
        entries.append(entry)
    body = pydantic_core.to_json({**header, "outputs": entries})
    if not blobs:
        return body, None, finite
    return b"".join([body, *blobs]), len(body), finite
