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
model: its submodules, the storage of its parameters and buffers (weights updated in
place, as ``load_state_dict`` and optimisers do, are seen; a parameter or submodule replaced by
another makes a new capture), its hooks (counted), and its float dropout rates (attributes
``p``, and ``dropout`` as :class:`torch.nn.MultiheadAttention` keeps it; a rate kept under
another name is not seen: make a new plan after changing one).

Only a plan kept between calls (``plan=`` given, as :class:`~mcdrop.Predictor` and the service
do, or the plan a call given none keeps on the model: :mod:`mcdrop.plan_cache`) keeps graphs:
at most :data:`MAX_GRAPHS` (sharing one memory pool), captured on the second pass of a shape
(:data:`CAPTURE_ON_PASS`), at most :data:`MAX_CAPTURES` captures in all, and only for passes
whose largest dropout input is within :data:`GRAPH_BYTES`: larger passes are bound by the GPU's
arithmetic, which a graph does not speed up; none under autocast. A model whose pass cannot be
captured (it reads a value back to the host, say) warns once and runs eagerly from then on. The
graphs hold the model's modules, so its weights live as long as the plan. :data:`ENABLED` turns
them off.
"""

from __future__ import annotations

import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _module_hooks

from mcdrop import masks

if TYPE_CHECKING:
    from mcdrop.planning import SamplingPlan

#: Whether kept plans replay their small passes on CUDA as graphs.
ENABLED = True
#: Graphs one plan keeps (pass shapes); the least recently used is dropped first.
MAX_GRAPHS = 8
#: Captures one plan makes in all: a plan whose pass shapes keep changing (more than
#: MAX_GRAPHS of them in turn) stops capturing rather than capture again and again.
MAX_CAPTURES = 32
#: The largest dropout input (bytes, over the pass's replicated rows) of a pass that is graphed.
#: Measured on an H200: passes with 25 and 38 MiB (the transformer and CNN references at 32 rows ×
#: 100 samples) ran 1.5–1.7× faster as graphs, and one with 61 MiB (an MLP of 50 hidden units at
#: 32 × 10,000, a few kernels on large tensors) ran faster eagerly.
GRAPH_BYTES = 48 << 20
#: A pass shape is captured on its second pass: a shape seen once (a one-off batch size) runs
#: eagerly rather than paying a capture (a warm-up pass and the capture).
CAPTURE_ON_PASS = 2
#: Pass shapes whose passes are counted, most recent kept.
_SEEN = 64


def _state(modules: list[nn.Module]) -> tuple[object, ...]:
    """What a captured pass reads of the model beside its inputs, for ``modules`` (the model's):
    each module's children (their identity: a replaced submodule), the storage of every
    parameter and buffer, how many hooks it has, and its float dropout rates (``p``, or
    ``dropout`` as :class:`torch.nn.MultiheadAttention` keeps it); and the global module hooks.
    Read straight from each module's own dicts: walking the module tree every call would cost
    more than a replay."""
    found: list[object] = []
    for module in modules:
        found += [id(child) for child in module._modules.values()]
        found += [t.data_ptr() for t in module._parameters.values() if t is not None]
        found += [t.data_ptr() for t in module._buffers.values() if t is not None]
        found.append(len(module._forward_hooks) + len(module._forward_pre_hooks))
        for name in ("p", "dropout"):
            value = module.__dict__.get(name)
            if isinstance(value, float):
                found.append(value)
    found.append(len(_module_hooks._global_forward_hooks))
    found.append(len(_module_hooks._global_forward_pre_hooks))
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
        self._modules: list[nn.Module] | None = None  # the model's, listed at each capture
        self._graphs: OrderedDict[tuple[object, ...], _Captured] = OrderedDict()
        self._seen: OrderedDict[tuple[object, ...], int] = OrderedDict()  # passes per shape
        self._lock = threading.Lock()  # one replay at a time: the buffers are shared
        self._pool: Any = None  # the graphs' shared memory pool (torch.cuda.graph_pool_handle)
        self._done: torch.cuda.Event | None = None  # recorded after the last replay
        self.captures = 0  # how many graphs were captured (for tests and benchmarks)
        #: Why a capture failed, after which this plan captures no more (None: none failed).
        self.failed: str | None = None

    def __len__(self) -> int:
        """How many captured pass shapes are held."""
        return len(self._graphs)

    def takes(self, plan: SamplingPlan, rows: int) -> bool:
        """Whether a pass of ``rows`` replicated rows is replayed as a graph."""
        # Not under autocast: its cache of cast weights does not outlive the context, and a
        # graph would keep reading them (torch asks for autocast without a cache in graphs).
        return (
            ENABLED
            and self.failed is None
            and rows * plan.row_bytes <= GRAPH_BYTES
            and not torch.is_autocast_enabled("cuda")
        )

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
        with self._lock:
            captured = self._graphs.get(key)
            if captured is not None:
                self._graphs.move_to_end(key)
                assert self._modules is not None  # listed when it was captured
                if captured.state != _state(self._modules):  # the model changed: capture anew
                    del self._graphs[key]
                    captured = self._capture(
                        key, model, x, row_keys, n_samples, prefix, plan, chain
                    )
            elif self._count(key) >= CAPTURE_ON_PASS and self.captures < MAX_CAPTURES:
                captured = self._capture(key, model, x, row_keys, n_samples, prefix, plan, chain)
            if captured is not None:
                current = torch.cuda.current_stream(self.device)
                if self._done is not None:  # a replay on another stream may still read them
                    current.wait_event(self._done)
                # Kernels, not copies from the host: no pass waits for the previous one.
                captured.x.copy_(x)
                captured.row_keys.copy_(row_keys)
                captured.first.fill_(first_sample)
                captured.graph.replay()
                out = captured.out.clone()
                self._done = self._done or torch.cuda.Event()
                self._done.record(current)
                return out
        # Not captured (yet, or ever): an eager pass, outside the lock.
        keys = masks.sample_keys(row_keys, first_sample, n_samples)
        return run_pass(model, x, keys, n_samples, prefix, plan, chain=chain)

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
        model: nn.Module,
        x: Tensor,
        row_keys: Tensor,
        n_samples: int,
        prefix: bool,
        plan: SamplingPlan,
        chain: bool | None,
    ) -> _Captured | None:
        """Capture the pass of shape ``key`` (None if it cannot be: then no more captures)."""
        from mcdrop.planning import run_pass

        while len(self._graphs) >= MAX_GRAPHS:
            evicted, _ = self._graphs.popitem(last=False)
            self._seen.pop(evicted, None)  # seen twice more before it is captured again
        self._modules = list(model.modules())
        state = _state(self._modules)
        static_x, static_keys = x.clone(), row_keys.clone()
        first = torch.zeros(1, dtype=torch.int64, device=x.device)
        current = torch.cuda.current_stream(x.device)
        side = torch.cuda.Stream(x.device)
        side.wait_stream(current)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()

        def graphed_pass() -> Tensor:  # the sample keys too: the graph's inputs are the rows
            keys = masks.sample_keys(static_keys, first, n_samples)
            return run_pass(model, static_x, keys, n_samples, prefix, plan, chain=chain)

        with torch.cuda.stream(side):
            # A warm-up pass first, as torch asks: kernels compile (Triton's), libraries make
            # their handles and workspaces, and caches fill, all outside the graph. Its errors
            # are the pass's own, raised as an eager pass would raise them.
            graphed_pass()
        try:
            with torch.cuda.stream(side):
                # Not torch.cuda.graph(), which synchronises the device and collects garbage
                # first: the capture stream waits on the caller's, which is all it needs.
                # thread_local: another thread's CUDA work (another model's) does not break it.
                graph.capture_begin(pool=self._pool, capture_error_mode="thread_local")
                try:
                    out = graphed_pass()
                finally:
                    graph.capture_end()
        except Exception as exc:  # an op a graph cannot hold (a read back to the host, say)
            self.failed = f"{type(exc).__name__}: {exc}"
            _end_capture_state(x.device)
            warnings.warn(
                f"mcdrop: a sampling pass of {type(model).__name__} could not be captured as a "
                f"CUDA graph ({self.failed}); its passes run eagerly",
                RuntimeWarning,
                stacklevel=4,
            )
            return None
        finally:
            current.wait_stream(side)  # replays, on the caller's stream, follow the capture
        self.captures += 1
        captured = _Captured(graph, static_x, static_keys, first, out, state)
        self._graphs[key] = captured
        return captured


def _end_capture_state(device: torch.device) -> None:
    """Leave torch's CUDA random generators as a successful capture would. When a capture
    fails at its end, torch never tells its generators that the capture is over, and every
    later CUDA random op (``torch.randn``, training-mode dropout) in the process raises; a
    capture of one small kernel begins and ends one cleanly."""
    try:
        scratch = torch.zeros(1, device=device)
        with warnings.catch_warnings(), torch.cuda.stream(torch.cuda.Stream(device)):
            warnings.simplefilter("ignore")
            graph = torch.cuda.CUDAGraph()
            graph.capture_begin(capture_error_mode="thread_local")
            scratch.add_(1)
            graph.capture_end()
    except Exception:  # nothing more to restore from here
        pass
