"""Peak memory of T = 10,000 MC samples of 1,000 rows of the UCI MLP.

Each variant runs in a fresh process and reports the peak resident set size of its sampling
alone (the high-water mark is reset after the imports):

- **streaming**: mcdrop's chunked sampling into running statistics (what the service does);
- **materialised**: ``mcdrop.sample`` returning every sample, ``(S, N, 1)``;
- **one pass**: the naive batched approach, the whole replicated batch in a single forward.

Streaming is also run at T = 1,000 to show its peak is flat in T.

Run: ``python -m benchmarks.memory [--quick]``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence

import torch

from benchmarks.timing import machine, run_main, table

SCRIPT = """
import json, sys, time, torch
from mcdrop.nets import MLP
from mcdrop.sampling import sample, sample_chunks
from mcdrop.stats import RegressionAccumulator
variant, t, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(int(sys.argv[4]))
torch.manual_seed(0)
model = MLP(13, [50], 1, dropout=0.05).eval()
x = torch.randn(n, 13)
def hwm():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmHWM"))
def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS"))
# Reset the peak after imports, so the high-water mark is the sampling's own (Linux >= 4.0).
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base = rss()
started = time.perf_counter()
if variant == "streaming":
    acc = RegressionAccumulator(n, 1, noise_variance=0.1)
    for chunk in sample_chunks(model, x, t, seed=0):
        acc.update(chunk.values, chunk.rows)
    acc.result()
elif variant == "materialised":
    sample(model, x, t, seed=0)
else:
    model.train()
    with torch.no_grad():
        model(x.repeat(t, 1))
peak = hwm()
print(json.dumps({"peak_mib": peak / 1024, "extra_mib": (peak - base) / 1024,
                  "seconds": time.perf_counter() - started}))
"""


def measure(variant: str, n_samples: int, rows: int) -> dict[str, float]:
    threads = str(torch.get_num_threads())
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, variant, str(n_samples), str(rows), threads],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)


def run(quick: bool = False) -> str:
    rows = 100 if quick else 1000
    big, small = (1000, 100) if quick else (10_000, 1000)
    plan = [("streaming", small), ("streaming", big), ("materialised", big), ("one pass", big)]
    results = [
        (v, t, measure(v.split()[0] if v != "one pass" else "onepass", t, rows)) for v, t in plan
    ]
    base = results[1][2]["extra_mib"]
    lines = [
        [
            v,
            t,
            rows,
            f"{r['peak_mib']:.0f}",
            f"{r['extra_mib']:.0f}",
            f"{r['extra_mib'] / max(base, 1):.1f}",
            f"{r['seconds']:.2f}",
        ]
        for v, t, r in results
    ]
    header = ["variant", "T", "rows", "peak RSS MiB", "sampling MiB", "× streaming", "seconds"]
    return f"### Memory ({machine()})\n\n{table(header, lines)}\n"


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(run, __doc__, argv)


if __name__ == "__main__":
    raise SystemExit(main())
