"""Timing helpers shared by the benchmarks: interleaved repetitions, medians, markdown tables.

The machines are shared and noisy, so every figure is a ratio against a baseline measured in the
same run, with the candidates interleaved round by round (a slow moment hits all of them).
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import time
from collections.abc import Callable, Sequence

import torch


def machine() -> str:
    """One line naming the machine: cores, CPU, torch threads."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    threads = torch.get_num_threads()
    return f"{os.cpu_count()} cores ({cpu}), torch {torch.__version__}, {threads} threads"


def compare(
    candidates: dict[str, Callable[[], object]],
    *,
    rounds: int,
    warmup: int = 1,
    budget_s: float = 30.0,
) -> dict[str, float]:
    """Median seconds per call of each candidate, measured round by round, the order shuffled
    every round (seeded: the same orders every run): a call finds the caches as the one before
    it left them (its model's weights warm after a call on the same model, cold after a large
    one), so each candidate follows each other as often, in expectation.

    (Turned round by one every round, as before, each candidate followed the one before it in
    the list in all but one place a round: in the fixed-cost table mcdrop ran after the plain
    pass's fused encoder layers nearly every time, and the floor after mcdrop.)

    Stops early (after at least 3 rounds) once ``budget_s`` is spent.
    """
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    order = list(candidates.items())
    shuffled = random.Random(0)
    started = time.perf_counter()
    for i in range(rounds):
        shuffled.shuffle(order)
        for name, fn in order:
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
        if i >= 2 and time.perf_counter() - started > budget_s:
            break
    return {name: statistics.median(ts) for name, ts in times.items()}


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


def run_main(run: Callable[[bool], str], doc: str | None, argv: Sequence[str] | None) -> int:
    """The command line of a benchmark module: ``[--quick]``, then print ``run``'s tables."""
    parser = argparse.ArgumentParser(description=(doc or "").split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for the test suite")
    print(run(parser.parse_args(argv).quick))
    return 0
