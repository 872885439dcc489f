"""How sampling's time and peak memory grow with T (samples) and N (rows), beside the floor.

Two reference models of :mod:`benchmarks.sampling` (the UCI MLP and the wide MLP), each point
measured for ``mcdrop.sample`` (plan made beforehand) and for the floor (the layers before the
first dropout once, then one eval-mode pass over the T·N replicated rows):

- **time**: median seconds per call, the two candidates interleaved round by round;
- **peak memory**: the growth of the peak resident set of a fresh process during one call
  (the high-water mark is reset after the imports, the plan and a call of one sample of one
  row, as in :mod:`benchmarks.memory`).

The log-log plot (time and memory against T at fixed N, and against N at fixed T) goes to
``--out`` (default ``benchmarks/results/scaling.png``); the points are printed as a table.

Run: ``python -m benchmarks.scaling [--quick] [--out PATH]``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.sampling import Reference, floor, references
from benchmarks.timing import compare, machine, table
from mcdrop import plan, sample

DEFAULT_OUT = Path(__file__).parent / "results" / "scaling.png"


@dataclass(frozen=True)
class Grid:
    """The points of one model: T at fixed N, and N at fixed T."""

    model: str
    fixed_n: int
    samples: tuple[int, ...]
    fixed_t: int
    rows: tuple[int, ...]


# Sizes up to where the floor's one pass holds hundreds of MB (the wide MLP: 8 kB of
# activations per replicated row), so that memory is well above the allocator's noise.
GRIDS = (
    Grid("UCI MLP 13→50→1", 32, (100, 1_000, 10_000, 100_000), 100, (10, 100, 1_000, 10_000)),
    Grid(
        "wide MLP 784→1024→1024→10",
        4,
        (10, 100, 1_000, 4_000, 16_000),
        30,
        (1, 10, 100, 500, 2_000, 8_000),
    ),
)
QUICK_GRIDS = (
    Grid("UCI MLP 13→50→1", 2, (2, 8), 4, (1, 4)),
    Grid("wide MLP 784→1024→1024→10", 1, (2, 4), 2, (1, 2)),
)

#: Where the memory panels stop: growths below it (memory the allocator already held) are
#: drawn at it, so that they sit on a log axis.
LEAST_MIB = 0.1

CANDIDATES = ("mcdrop", "floor")

# One memory point in a fresh process: the reference, its input and plan, then one call.
SCRIPT = """
import json, sys, torch
from benchmarks.scaling import call
torch.set_num_threads(int(sys.argv[5]))
run = call(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
call(sys.argv[1], sys.argv[2], 1, 1)()  # the libraries' first-call buffers: not the call's own
def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the high-water mark (Linux >= 4.0)
base = status("VmRSS")
run()
print(json.dumps({"mib": (status("VmHWM") - base) / 1024}))
"""


def _reference(name: str) -> Reference:
    return next(ref for ref in references() if ref.name == name)


def call(model: str, candidate: str, n_rows: int, n_samples: int) -> object:
    """A no-argument function that runs ``candidate`` once on ``n_rows`` rows of ``model``."""
    ref = _reference(model)
    x = torch.randn(n_rows, *ref.input_shape, generator=torch.Generator().manual_seed(n_rows))
    if candidate == "floor":
        return lambda: floor(ref, x, n_samples)
    kept = plan(ref.model, x)
    return lambda: sample(ref.model, x, n_samples, seed=0, plan=kept)


def peak_mib(model: str, candidate: str, n_rows: int, n_samples: int) -> float:
    """The peak memory of one call, in a fresh process."""
    args = [model, candidate, str(n_rows), str(n_samples), str(torch.get_num_threads())]
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, *args], capture_output=True, text=True, check=True
    )
    return float(json.loads(out.stdout)["mib"])


def measure(grids: Sequence[Grid], quick: bool) -> list[dict[str, object]]:
    """Every point of ``grids``: model, axis ("T" or "N"), N, T, and per candidate its
    seconds and MiB."""
    points: list[dict[str, object]] = []
    for grid in grids:
        cells = [("T", grid.fixed_n, t) for t in grid.samples]
        cells += [("N", n, grid.fixed_t) for n in grid.rows]
        for axis, n, t in cells:
            runs = {c: call(grid.model, c, n, t) for c in CANDIDATES}
            seconds = compare(runs, rounds=2 if quick else 7, budget_s=1 if quick else 10)  # type: ignore[arg-type]
            point: dict[str, object] = {"model": grid.model, "axis": axis, "N": n, "T": t}
            for c in CANDIDATES:
                point[f"{c} s"] = seconds[c]
                point[f"{c} MiB"] = peak_mib(grid.model, c, n, t)
            points.append(point)
    return points


def plot(points: Sequence[dict[str, object]], out: Path, title: str) -> None:
    """Time and peak memory against T and against N, log-log, one line per model and
    candidate (the floor dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 8), layout="constrained")
    models = list(dict.fromkeys(str(p["model"]) for p in points))
    colours = dict(zip(models, ("tab:blue", "tab:orange", "tab:green"), strict=False))
    least = f"; under {LEAST_MIB} MiB drawn at it"
    for col, axis in enumerate(("T", "N")):
        for row, (what, unit) in enumerate((("s", "time per call (s)"), ("MiB", "peak MiB"))):
            ax = axes[row][col]
            for model in models:
                mine = [p for p in points if p["model"] == model and p["axis"] == axis]
                xs = [float(p[axis]) for p in mine]  # type: ignore[arg-type]
                for c, style in zip(CANDIDATES, ("-o", "--s"), strict=True):
                    ys = [float(p[f"{c} {what}"]) for p in mine]  # type: ignore[arg-type]
                    if what == "MiB":
                        ys = [max(y, LEAST_MIB) for y in ys]
                    ax.plot(xs, ys, style, color=colours[model], label=f"{model}: {c}")
            fixed = "N" if axis == "T" else "T"
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel(f"{axis} ({'samples' if axis == 'T' else 'rows'}; {fixed} fixed)")
            ax.set_ylabel(unit + (least if what == "MiB" else ""))
            ax.grid(True, which="both", alpha=0.3)
    # One legend under the panels: inside one it hid points.
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=2, fontsize=8)
    fig.suptitle(title, fontsize=10)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)


def _mib(growth: float) -> str:
    """A peak's growth as the table shows it: under :data:`LEAST_MIB` (memory the allocator
    already held, which may read a little below 0) as the plot draws it."""
    return f"< {LEAST_MIB}" if growth < LEAST_MIB else f"{growth:.1f}"


def run(quick: bool = False, out: Path = DEFAULT_OUT) -> str:
    points = measure(QUICK_GRIDS if quick else GRIDS, quick)
    title = f"mcdrop.sample against the floor ({machine()})"
    plot(points, out, title)
    header = ["model", "N", "T", "mcdrop ms", "floor ms", "mcdrop MiB", "floor MiB"]
    rows = [
        [
            p["model"],
            p["N"],
            p["T"],
            f"{float(p['mcdrop s']) * 1e3:.2f}",  # type: ignore[arg-type]
            f"{float(p['floor s']) * 1e3:.2f}",  # type: ignore[arg-type]
            _mib(float(p["mcdrop MiB"])),  # type: ignore[arg-type]
            _mib(float(p["floor MiB"])),  # type: ignore[arg-type]
        ]
        for p in points
    ]
    return f"### Scaling ({machine()})\n\n{table(header, rows)}\n\nplot: {out}\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for the test suite")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where the PNG goes")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(run(args.quick, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
