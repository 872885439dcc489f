"""Whether an exception came from the model's own forward, for a caller that must tell a
request's inputs the model refuses from a failure of its own.

A model passes its checks when it is loaded (its forward runs on rows of its ``input_shape``),
and a server checks every request's shape, dtype and finiteness before the model sees it; a
forward that still raises on a request's rows (a token id past an ``nn.Embedding``'s vocabulary
or below zero: ``IndexError: index out of range in self``; a model's own ``ValueError`` or
``assert`` on values it does not take) almost always says that those values are outside what the
model takes. :func:`raised_by_model` tells such an exception apart from one raised by mcdrop's
own code (a bug there is the server's), from mcdrop's errors raised on purpose
(:class:`~mcdrop.exceptions.McDropError`, which say what they are) and from the machine's (out of
memory, a failed CUDA kernel). It only classifies: what mcdrop raises to its callers is
unchanged.

It reads the exception's traceback: the model's forward is called by mcdrop (``model(x)``, a
sampling pass, a prediction, a routed or fast pass, the general path under a torch-function mode)
through ``nn.Module.__call__``, so an exception raised inside it has, deeper than mcdrop's
innermost frame, an ``nn.Module`` call: the model, or a module of it. One that mcdrop's code
raises itself (or that torch raises on a call mcdrop's code makes straight, ``F.linear`` of a
layer chain, a mask's product) has none. mcdrop's torch-function modes (``__torch_function__``,
which hand each torch call of the forward on, unchanged but for dropout) are not counted as
mcdrop's frames: the torch call they hand on is the model's. Code of mcdrop that runs inside the
model (a routed dropout call, a hook, and the layers mcdrop computes itself under sampling: an
``nn.MultiheadAttention`` routed to :mod:`mcdrop.attention`, encoder layers run by
:mod:`mcdrop.encoders`, recurrent layers run layer by layer by :mod:`mcdrop.rnn`) is mcdrop's: an
exception raised there is not counted as the model's, so that a bug there stays the caller's
own failure, at the price of calling such a layer's refusal of an input the same.

On a CUDA device an embedding's id out of range is no exception of the forward but a
device-side assert, reported at a later synchronisation, after which the device is unusable:
the machine's error (:func:`server_side`), whatever raised it.
"""

from __future__ import annotations

import os
import traceback
from types import CodeType

import torch
from torch import nn

from mcdrop.exceptions import McDropError

__all__ = ["cause", "raised_by_model", "server_side"]

#: mcdrop's own source files: those under this folder.
_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep

#: The code of ``nn.Module.__call__`` (``_wrapped_call_impl``, then ``_call_impl``): a frame of
#: one is a module being called.
_MODULE_CALLS: frozenset[CodeType] = frozenset(
    getattr(nn.Module, name).__code__
    for name in ("_wrapped_call_impl", "_call_impl")
    if hasattr(getattr(nn.Module, name, None), "__code__")
)

#: Words of a torch error that the machine, not the inputs, failed: memory (CPU allocator,
#: CUDA caching allocator, cuBLAS) or a CUDA kernel (a device-side assert leaves the device
#: unusable, whatever raised it).
_SERVER_SIDE = (
    "out of memory",
    "can't allocate memory",
    "CUBLAS_STATUS_ALLOC_FAILED",
    "CUDA error",
    "device-side assert",
)


def server_side(exc: BaseException) -> bool:
    """Whether ``exc`` says that the machine failed, not the inputs: ``MemoryError``, torch's
    out-of-memory error, an allocation that failed, or a CUDA error."""
    if isinstance(exc, MemoryError | torch.OutOfMemoryError):
        return True
    if not isinstance(exc, RuntimeError):
        return False
    text = str(exc)
    return any(words in text for words in _SERVER_SIDE)


def _mcdrop_code(code: CodeType) -> bool:
    # A torch-function mode's hand-on is not mcdrop's own computation (see the docstring).
    return code.co_filename.startswith(_PACKAGE) and code.co_name != "__torch_function__"


def cause(exc: BaseException) -> BaseException:
    """The ``StopIteration`` that ``exc`` stands for where it is a ``RuntimeError`` caused by
    one (Python turns a ``StopIteration`` raised in a generator, as mcdrop's chunk loop, into
    such an error, and a server wraps one so that a future takes it), else ``exc``."""
    if type(exc) is RuntimeError and isinstance(exc.__cause__, StopIteration):
        return exc.__cause__
    return exc


def raised_by_model(exc: BaseException) -> bool:
    """Whether ``exc`` was raised inside the forward of a model that mcdrop called, by the
    model's code or the torch modules it calls, on the inputs it was given (see the module
    docstring).

    False for a :class:`~mcdrop.exceptions.McDropError`, for an error of the machine
    (:func:`server_side`), for anything but an ``Exception`` (``KeyboardInterrupt``), for an
    exception raised by mcdrop's own code, and for one raised where mcdrop did not call a
    model at all."""
    exc = cause(exc)
    if not isinstance(exc, Exception) or isinstance(exc, McDropError) or server_side(exc):
        return False
    codes = [frame.f_code for frame, _ in traceback.walk_tb(exc.__traceback__)]
    last = max((i for i, code in enumerate(codes) if _mcdrop_code(code)), default=None)
    if last is None:  # mcdrop did not call it: no model of mcdrop's raised it
        return False
    return any(code in _MODULE_CALLS for code in codes[last + 1 :])
