"""Sampling passes replayed as CUDA graphs, for kept plans on a CUDA GPU.

A small MC pass on a GPU waits on the host: each of its few dozen kernels (the layers, one mask
kernel per dropout call, the multiplies) costs microseconds of Python and launch while the GPU
does less than that of work. A CUDA graph records the pass's kernels once and replays them all
with one call, so the host cost of a pass no longer grows with the model's depth.

A pass is a pure function of its rows ``(n, D...)``, their keys ``(n,)`` and the index of its
first sample: sample keys and masks are hashed on the device, and nothing is read back to the
host. So a graph captured for one shape serves every later pass of that shape: the rows, keys
and index are written into the graph's own input buffers on the device (kernels, never a copy
from the host that would wait for the passes before it), the graph is replayed, and its output
is copied out. Samples are the eager pass's (the same kernels on the same inputs).

What a graph bakes in is checked on every replay: the pass's shape, dtype and options, and the
model's parameters and buffers (their storage, so weights updated in place, as
``load_state_dict`` and optimisers do, are seen; a parameter replaced by another tensor makes a
new capture) and its dropout rates. Only a plan kept between calls (``plan=`` given, as
:class:`~mcdrop.Predictor` and the service do) keeps graphs, at most :data:`MAX_GRAPHS` of them,
captured on the second pass of a shape (:data:`CAPTURE_ON_PASS`), and only for passes whose
largest dropout input is within :data:`GRAPH_BYTES`: larger passes are bound by the GPU's
arithmetic, which a graph does not speed up, and each graph holds the memory of its pass.
:data:`ENABLED` turns them off.
"""

from __future__ import annotations

import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from mcdrop import masks

if TYPE_CHECKING:
    from mcdrop.planning import SamplingPlan

#: Whether kept plans replay their small passes on CUDA as graphs.
ENABLED = True
#: Graphs one plan keeps (pass shapes); the least recently used is dropped first.
MAX_GRAPHS = 8
#: The largest dropout input (bytes, over the pass's replicated rows) of a pass that is graphed.
GRAPH_BYTES = 64 << 20
#: A pass shape is captured on its second pass: a shape seen once (a one-off batch size) runs
#: eagerly rather than paying a capture (a warm-up pass, a synchronisation and a collection).
CAPTURE_ON_PASS = 2
#: Pass shapes whose passes are counted, most recent kept.
_SEEN = 64


def _state(modules: list[nn.Module]) -> tuple[object, ...]:
    """What a captured pass reads of the model beside its inputs: the storage of every
    parameter and buffer of ``modules`` (the model's), and every float dropout rate (``p``, or
    ``dropout`` as :class:`torch.nn.MultiheadAttention` keeps it). Read straight from each
    module's own dicts: walking the module tree every call would cost more than a replay."""
    found: list[object] = []
    for module in modules:
        found += [t.data_ptr() for t in module._parameters.values() if t is not None]
        found += [t.data_ptr() for t in module._buffers.values() if t is not None]
        for name in ("p", "dropout"):
            value = module.__dict__.get(name)
            if isinstance(value, float):
                found.append(value)
    return tuple(found)


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    x: Tensor  # (n, D...): the graph's input rows
    row_keys: Tensor  # (n,): their keys
    first: Tensor  # (1,) int64: the index of the pass's first sample
    out: Tensor  # (S, n, K...): its output, overwritten by every replay
    state: tuple[object, ...]


class PassGraphs:
    """The captured passes of one kept plan, by pass shape (made by
    :func:`mcdrop.planning.probe` for models on a CUDA device)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._modules: list[nn.Module] | None = None  # the model's, listed once
        self._graphs: OrderedDict[tuple[object, ...], _Captured | None] = OrderedDict()
        self._seen: OrderedDict[tuple[object, ...], int] = OrderedDict()  # passes per shape
        self._lock = threading.Lock()  # one replay at a time: the buffers are shared
        self.captures = 0  # how many graphs were captured (for tests and benchmarks)

    def __len__(self) -> int:
        """How many pass shapes are held (captured, or failed to capture and run eagerly)."""
        return len(self._graphs)

    def takes(self, plan: SamplingPlan, rows: int) -> bool:
        """Whether a pass of ``rows`` replicated rows is replayed as a graph."""
        return ENABLED and rows * plan.row_bytes <= GRAPH_BYTES

    def run(
        self,
        model: nn.Module,
        x: Tensor,
        row_keys: Tensor,
        first_sample: int,
        n_samples: int,
        prefix: bool,
        plan: SamplingPlan,
        chain: bool | None,
    ) -> Tensor:
        """The pass of samples ``first_sample ..`` of the rows ``x`` ``(n, D...)`` with keys
        ``row_keys`` ``(n,)``, both on :attr:`device`, as :func:`mcdrop.masks.sample_keys` and
        :func:`mcdrop.planning.run_pass` make it, replayed from a graph (captured on the
        :data:`CAPTURE_ON_PASS`-th pass of its shape). Returns a new ``(S, n, K...)`` tensor."""
        from mcdrop.planning import run_pass

        key = (tuple(x.shape), x.dtype, n_samples, prefix, chain)
        if self._modules is None:
            self._modules = list(model.modules())
        state = _state(self._modules)
        with self._lock:
            captured = self._graphs.get(key)
            if key in self._graphs:
                self._graphs.move_to_end(key)
                if captured is not None and captured.state != state:
                    captured = self._capture(
                        key, state, model, x, row_keys, n_samples, prefix, plan, chain
                    )
            elif self._count(key) >= CAPTURE_ON_PASS:
                captured = self._capture(
                    key, state, model, x, row_keys, n_samples, prefix, plan, chain
                )
            if captured is None:  # not captured (yet, or ever): this pass runs eagerly
                keys = masks.sample_keys(row_keys, first_sample, n_samples)
                return run_pass(model, x, keys, n_samples, prefix, plan, chain=chain)
            # Kernels, not copies from the host: no pass waits for the previous one.
            captured.x.copy_(x)
            captured.row_keys.copy_(row_keys)
            captured.first.fill_(first_sample)
            captured.graph.replay()
            return captured.out.clone()

    def _count(self, key: tuple[object, ...]) -> int:
        """Count a pass of shape ``key``; the passes of that shape so far, this one included."""
        count = self._seen.pop(key, 0) + 1
        self._seen[key] = count
        if len(self._seen) > _SEEN:
            self._seen.popitem(last=False)
        return count

    def _capture(
        self,
        key: tuple[object, ...],
        state: tuple[object, ...],
        model: nn.Module,
        x: Tensor,
        row_keys: Tensor,
        n_samples: int,
        prefix: bool,
        plan: SamplingPlan,
        chain: bool | None,
    ) -> _Captured | None:
        from mcdrop.planning import run_pass

        self._graphs.pop(key, None)  # a stale graph's memory goes before the new one's
        while len(self._graphs) >= MAX_GRAPHS:
            self._graphs.popitem(last=False)
        static_x, static_keys = x.clone(), row_keys.clone()
        first = torch.zeros(1, dtype=torch.int64, device=x.device)
        current = torch.cuda.current_stream(x.device)
        side = torch.cuda.Stream(x.device)
        side.wait_stream(current)
        graph = torch.cuda.CUDAGraph()

        def graphed_pass() -> Tensor:  # the sample keys too: the graph's inputs are the rows
            keys = masks.sample_keys(static_keys, first, n_samples)
            return run_pass(model, static_x, keys, n_samples, prefix, plan, chain=chain)

        try:
            with torch.cuda.stream(side):
                # A warm-up pass first, as torch asks: kernels compile (Triton's), libraries
                # make their handles and workspaces, and caches fill, all outside the graph.
                graphed_pass()
                # Not torch.cuda.graph(), which synchronises the device and collects garbage
                # first: the capture stream waits on the caller's, which is all it needs.
                # thread_local: another thread's CUDA work (another model's) does not break it.
                graph.capture_begin(capture_error_mode="thread_local")
                try:
                    out = graphed_pass()
                finally:
                    graph.capture_end()
        except Exception as exc:  # an op a graph cannot hold: this shape runs eagerly
            warnings.warn(
                f"mcdrop: a sampling pass of {type(model).__name__} could not be captured as a "
                f"CUDA graph ({type(exc).__name__}: {exc}); its passes run eagerly",
                RuntimeWarning,
                stacklevel=3,
            )
            self._graphs[key] = None
            return None
        finally:
            current.wait_stream(side)  # replays, on the caller's stream, follow the capture
        self.captures += 1
        captured = _Captured(graph, static_x, static_keys, first, out, state)
        self._graphs[key] = captured
        return captured
