"""Sampling on a GPU: ``python -m benchmarks.gpu [--quick] [--device cuda] [--out DIR]``.

The one prepared script for a session with the GPU machine (benchmarks/README.md has the exact
command). In one run it prints, and writes to ``DIR/gpu.md`` when ``--out`` is given:

1. **Checks on the device**, before any timing: torch masks made on the device equal the NumPy
   masks bit for bit (every lane width, sizes off the lane boundaries, four dtypes); sampling
   each reference model makes no host-device synchronisation after its first pass
   (``torch.cuda.set_sync_debug_mode("error")``); the device's samples agree with the CPU's.
2. **The sampling table** on the reference models of :mod:`benchmarks.sampling`, batches 1 and
   32: ``floor``, ``naive``, ``mcdrop`` (float32, and with the network in bfloat16), and
   ``baal-style`` (:func:`benchmarks.sampling.baal_style`: baal is not on that machine), and on
   a GPU ``eager`` (no CUDA graphs) and ``eager, torch masks`` (nor Triton's mask kernels), with
   the ratios; the target is ``mcdrop / floor`` within 1.2 at batch 32. Every candidate starts
   from rows on the host and ends when the device is done (``torch.cuda.synchronize``).
3. **Where mcdrop's time goes** at batch 32: kernel launches per call, the ops that take the
   most device and host time (``torch.profiler``) and the Python functions that take the most
   host time (``cProfile``), so what the table shows can be fixed.

Without a CUDA GPU it says why and exits 0 (``--device cpu`` runs the same on the CPU, which is
how the test suite keeps it from rotting).
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import pstats
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from benchmarks.sampling import Reference, baal_style, floor, naive_loop, references
from benchmarks.timing import compare, ms, table
from mcdrop import cuda_graphs, masks, plan, sample, sample_chunks
from mcdrop.nets import ReducedPrecision

TARGET = 1.2  # mcdrop / floor at batch 32, issue 13
_LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel")


def describe(device: torch.device) -> str:
    """One line naming the device, torch and CUDA."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        what = f"{props.name}, {props.total_memory >> 30} GiB, {props.multi_processor_count} SMs"
        made = " and ".join(device_backends(device))
        return (
            f"{what}; torch {torch.__version__}, CUDA {torch.version.cuda}; masks by {made} "
            f"(default {made.split(' and ')[-1]})"
        )
    return f"{device}; torch {torch.__version__}, {torch.get_num_threads()} threads"


def _synced(device: torch.device, fn: Callable[[], object]) -> Callable[[], object]:
    """``fn``, returning only once the device has finished its work."""
    if device.type != "cuda":
        return fn

    def run() -> object:
        out = fn()
        torch.cuda.synchronize(device)
        return out

    return run


def device_backends(device: torch.device) -> list[masks.Backend]:
    """The mask implementations that run on ``device``: torch, and Triton on a CUDA GPU where
    it builds and runs there (what sampling uses by default)."""
    found: list[masks.Backend] = ["torch"]
    keys = torch.zeros(1, dtype=torch.int64, device=device)
    if device.type == "cuda" and masks.backend_for(keys) == "triton":
        found.append("triton")
    return found


def check_masks(device: torch.device, quick: bool = False) -> str:
    rows = torch.arange(-20, 20, dtype=torch.int64) * 0x9E3779B97F
    keys = masks.sample_keys(rows, 3, 2 if quick else 25)
    on_device = keys.to(device)
    cases = 0
    backends = device_backends(device)
    for backend in backends:
        got_keys = masks.sample_keys(on_device[:40], 11, 7, backend=backend).cpu()
        if not torch.equal(got_keys, masks.sample_keys(keys[:40], 11, 7, backend="numpy")):
            return f"FAILED: {backend} sample_keys differ"
    for p in (0.0, 1.0, 1 / 65536, 0.05, 0.1, 0.25, 0.3, 0.5, 0.75, 3 / 256, 0.999):
        for n in (1, 3, 7, 8, 9, 17, 63, 65, 1000, 3136):
            for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
                expected = masks.keep_scale(keys, 5, n, p, dtype, backend="numpy")
                for backend in backends:
                    got = masks.keep_scale(on_device, 5, n, p, dtype, backend=backend)
                    if not torch.equal(got.cpu(), expected):
                        return f"FAILED: {backend} keep_scale differs at p={p}, n={n}, {dtype}"
                cases += 1
            keep = masks.keep_mask(on_device, 9, n, p).cpu()
            if not torch.equal(keep, masks.keep_mask(keys, 9, n, p, backend="numpy")):
                return f"FAILED: keep_mask differs at p={p}, n={n}"
    return (
        f"ok: {cases} multiplier cases ({' and '.join(backends)}), their keep masks and sample "
        "keys equal NumPy's bit for bit"
    )


def _eager(fn: Callable[[], object], backend: masks.Backend | None = None) -> Callable[[], object]:
    """``fn`` with every pass launched eagerly (no CUDA graphs), and CUDA masks made by
    ``backend`` when given."""

    def run() -> object:
        kept = masks.CUDA_BACKEND, cuda_graphs.ENABLED
        masks.CUDA_BACKEND = backend or kept[0]
        cuda_graphs.ENABLED = False
        try:
            return fn()
        finally:
            masks.CUDA_BACKEND, cuda_graphs.ENABLED = kept

    return run


def check_sync(ref: Reference, device: torch.device) -> str:
    if device.type != "cuda":
        return "not checked (no CUDA device)"
    x = torch.randn(8, *ref.input_shape, generator=torch.Generator().manual_seed(0))
    kept = plan(ref.model, x)
    chunks = sample_chunks(ref.model, x, 64, seed=0, max_pass_rows=64, plan=kept)
    next(chunks)  # inputs and keys move here, once
    torch.cuda.set_sync_debug_mode("error")
    try:
        rest = list(chunks)
    except RuntimeError as exc:
        return f"FAILED: {str(exc).splitlines()[0]}"
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return f"ok: no synchronisation in {len(rest)} passes after the first"


def check_agreement(ref: Reference, device: torch.device) -> str:
    """The device's samples against the CPU's, in full float32 (cuDNN would use TF32)."""
    x = torch.randn(4, *ref.input_shape, generator=torch.Generator().manual_seed(1))
    kept = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        got = sample(ref.model, x, 16, seed=3).cpu()
    finally:
        torch.backends.cudnn.allow_tf32 = kept
    cpu = copy.deepcopy(ref.model).cpu()
    expected = sample(cpu, x, 16, seed=3)
    diff = float((got - expected).abs().max())
    scale = float(expected.abs().max())
    verdict = "ok" if diff <= 1e-3 * max(1.0, scale) else "FAILED"
    return (
        f"{verdict}: largest difference from the CPU's samples {diff:.2e} (values to {scale:.3g})"
    )


def checks(refs: list[Reference], device: torch.device, quick: bool = False) -> str:
    lines = [f"- masks on {device}: {check_masks(device, quick)}"]
    for ref in refs:
        lines.append(f"- {ref.name}: sync {check_sync(ref, device)}")
        lines.append(f"- {ref.name}: {check_agreement(ref, device)}")
    return "\n".join(lines)


def _bf16(ref: Reference) -> torch.nn.Module:
    return ReducedPrecision(copy.deepcopy(ref.model), torch.bfloat16).eval()


def sampling_table(refs: list[Reference], device: torch.device, quick: bool) -> str:
    rows = []
    verdicts = []
    # On a GPU, mcdrop as it was before CUDA graphs (eager) and before Triton's masks.
    torch_masks = "triton" in device_backends(device)
    extra = []
    if device.type == "cuda":
        extra = ["eager", "eager, torch masks"] if torch_masks else ["eager"]
    for ref in refs:
        half = _bf16(ref)
        batch = 2 if quick else 32  # quick: the test suite, on a CPU
        cases = [(1, 100), (batch, 100)]
        if ref.name.startswith("UCI"):
            cases += [(1, 10_000), (batch, 10_000)]
        for n, t in cases:
            t = min(t, 20) if quick else t
            x = torch.randn(n, *ref.input_shape, generator=torch.Generator().manual_seed(n))
            kept, kept_half = plan(ref.model, x), plan(half, x)
            # Rows start on the host for every candidate, as a service's do.
            candidates: dict[str, Callable[[], object]] = {
                "floor": lambda ref=ref, x=x, t=t: floor(ref, x.to(device), t),
                "naive": lambda ref=ref, x=x, t=t: naive_loop(ref.model, x.to(device), t),
                "mcdrop": lambda ref=ref, x=x, t=t, kept=kept: sample(
                    ref.model, x, t, seed=0, plan=kept
                ),
                "mcdrop bf16": lambda half=half, x=x, t=t, kept=kept_half: sample(
                    half, x, t, seed=0, plan=kept
                ),
                "baal-style": lambda ref=ref, x=x, t=t: baal_style(ref.model, x.to(device), t),
            }
            if device.type == "cuda":  # what graphs and Triton's masks each bring
                candidates["eager"] = _eager(candidates["mcdrop"])
                if torch_masks:
                    candidates["eager, torch masks"] = _eager(candidates["mcdrop"], "torch")
            synced = {name: _synced(device, fn) for name, fn in candidates.items()}
            got = compare(synced, rounds=2 if quick else 30, warmup=1 if quick else 3, budget_s=5)
            ratio = got["mcdrop"] / got["floor"]
            rows.append(
                [
                    ref.name,
                    n,
                    t,
                    *(ms(got[k]) for k in candidates),
                    f"{ratio:.2f}",
                    f"{got['mcdrop bf16'] / got['mcdrop']:.2f}",
                    f"{got['naive'] / got['mcdrop']:.1f}",
                    f"{got['baal-style'] / got['mcdrop']:.2f}",
                    *(f"{got[k] / got['mcdrop']:.2f}" for k in extra),
                ]
            )
            if n == 32 and t >= 100:
                met = "met" if ratio <= TARGET else "**not met**"
                verdicts.append(f"- {ref.name}, N = 32, T = {t}: {ratio:.2f}× the floor, {met}")
    header = [
        "model",
        "N",
        "T",
        "floor ms",
        "naive ms",
        "mcdrop ms",
        "mcdrop bf16 ms",
        "baal-style ms",
        "mcdrop / floor",
        "bf16 / fp32",
        "naive / mcdrop",
        "baal-style / mcdrop",
    ]
    header[8:8] = [f"{k} ms" for k in extra]
    header += [f"{k} / mcdrop" for k in extra]
    target = "\n".join(verdicts) or "- (quick run: no batch-32 row at T >= 100)"
    return (
        f"{table(header, rows)}\n\nTarget: mcdrop within {TARGET}× of the floor at batch 32.\n"
        f"{target}\n"
    )


def profile(refs: list[Reference], device: torch.device, quick: bool) -> str:
    """Kernel launches per mcdrop call and the top ops, at batch 32 and T = 100."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    n, t, calls = (2, 20, 2) if quick else (32, 100, 5)
    parts = []
    for ref in refs:
        x = torch.randn(n, *ref.input_shape, generator=torch.Generator().manual_seed(32))
        kept = plan(ref.model, x)
        run = _synced(
            device, lambda ref=ref, x=x, kept=kept: sample(ref.model, x, t, seed=0, plan=kept)
        )
        run()
        with torch_profile(activities=activities) as prof:
            for _ in range(calls):
                run()
        events = prof.key_averages()
        # cudaLaunchKernel, cudaLaunchKernelExC, cuLaunchKernel... as the CUDA version names it.
        launches = sum(e.count for e in events if e.key.startswith(_LAUNCHES))
        started = time.perf_counter()
        run()
        wall = time.perf_counter() - started
        parts.append(
            f"#### {ref.name}, N = {n}, T = {t}: {launches / calls:.0f} kernel launches per call, "
            f"{wall * 1e3:.2f} ms per call unprofiled\n\n```text\n"
            f"{events.table(sort_by=sort, row_limit=12, max_name_column_width=50)}\n```\n\n"
            f"Host (Python) time per call over {calls * 4} calls, by function:\n\n```text\n"
            f"{host_profile(run, calls * 4)}\n```"
        )
    return "\n\n".join(parts)


def host_profile(run: Callable[[], object], calls: int, rows: int = 16) -> str:
    """cProfile's top functions by own time over ``calls`` calls of ``run``, in µs per call: on
    a GPU a small pass waits on the host, so this is where its time goes."""
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        run()
    profiler.disable()
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    top = sorted(stats.items(), key=lambda item: -item[1][2])[:rows]
    lines = [f"{'own µs':>8} {'total µs':>9} {'calls':>6}  function"]
    for (path, line, name), (_, ncalls, own, total, _) in top:
        where = f"{Path(path).name}:{line}" if line else "built-in"
        lines.append(
            f"{own / calls * 1e6:8.1f} {total / calls * 1e6:9.1f} {ncalls / calls:6.1f}  "
            f"{name} ({where})"
        )
    return "\n".join(lines)


def run(device: torch.device, quick: bool = False) -> str:
    refs = references()
    for ref in refs:
        ref.model.to(device)
    sections = [
        f"### Sampling on {describe(device)}",
        "#### Checks\n\n" + checks(refs, device, quick),
        "#### Sampling\n\n" + sampling_table(refs, device, quick),
        "#### Where mcdrop's time goes\n\n" + profile(refs, device, quick),
    ]
    return "\n\n".join(sections) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__)
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (the test suite)")
    parser.add_argument("--out", type=Path, default=None, help="also write DIR/gpu.md")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        build = "a build without CUDA" if torch.version.cuda is None else "no usable GPU"
        print(
            f"benchmarks.gpu: no CUDA GPU here (torch {torch.__version__}: {build}); nothing "
            "measured. Run it on a machine with one (see benchmarks/README.md), or pass "
            "--device cpu."
        )
        return 0
    text = run(device, args.quick)
    print(text, flush=True)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
