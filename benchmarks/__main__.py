"""``python -m benchmarks [--quick]`` (``make bench``): sampling speed (on the reference models
and on models of the kinds users write), memory, service load (and 1 vs 2 workers).

Prints markdown tables; every figure is a ratio against a baseline measured in the same run.
The UCI reproduction (``python -m benchmarks.uci``) and the dropout experiments
(``python -m benchmarks.experiments``) are separate: they train models for hours.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

from benchmarks import memory, sampling, service_load, user_models


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (the test suite)")
    parser.add_argument(
        "--only", choices=["sampling", "user-models", "memory", "service"], action="append"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: stable ratios on a shared machine)",
    )
    parser.add_argument(
        "--generator",
        choices=service_load.GENERATORS,
        default="raw",
        help="the service benchmark's load generator",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    chosen = args.only or ["sampling", "user-models", "memory", "service"]
    modules = {
        "sampling": sampling,
        "user-models": user_models,
        "memory": memory,
        "service": service_load,
    }
    for name in chosen:
        if name == "service":
            print(service_load.run(args.quick, args.generator), flush=True)
            print(service_load.protocols(args.quick, args.generator), flush=True)
            print(service_load.workers(args.quick, args.generator), flush=True)
        else:
            print(modules[name].run(args.quick), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
