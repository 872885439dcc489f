"""``python -m benchmarks.saving``: what the warm-up's largest pass (16 samples of 32 rows) adds
to :func:`mcdrop.save`, on networks of the sizes users save.

Each model is saved with the pass (as :func:`mcdrop.save` runs it, up to
:data:`mcdrop.saving.MAX_WARM_UP_PASS_FLOPS` of work) and without it (the bound set below any
pass: what save did before it ran the pass), interleaved round by round in one run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.timing import compare, machine
from mcdrop import plan as make_plan
from mcdrop import saving
from mcdrop.checking import warm_up_pass_flops
from mcdrop.nets import CNN, MLP

#: A network and the keyword arguments that save it.
Case = tuple[nn.Module, dict[str, Any]]


def _cnn(shape: list[int], **params: Any) -> Case:
    net = CNN(**params).eval()
    kw = {"architecture": "cnn", "params": params, "input_shape": shape}
    return net, {**kw, "task": "classification", "labels": [str(i) for i in range(10)]}


def _mlp(**params: Any) -> Case:
    net = MLP(**params).eval()
    kw = {"architecture": "mlp", "params": params, "input_shape": [params["in_features"]]}
    return net, {**kw, "task": "classification", "labels": [str(i) for i in range(10)]}


def cases(quick: bool) -> dict[str, Callable[[], Case]]:
    """The built-in networks at CIFAR and MNIST sizes (tiny ones when ``quick``)."""
    if quick:
        tiny = {"image_size": 8, "channels": [4, 4], "pool": [True, False], "hidden": 8}
        return {
            "CNN 1×8×8 (4, 4), spatial 0.1": lambda: _cnn([8, 8], **tiny, spatial_dropout=0.1),
            "MLP 16→32→10": lambda: _mlp(in_features=16, hidden=[32], out_features=10),
        }
    cifar = {"in_channels": 3, "image_size": 32, "channels": [32, 64, 64]}
    fashion = {"in_channels": 1, "image_size": 28, "channels": [16, 32, 32], "hidden": 128}
    return {
        "CNN 3×32×32 (32, 64, 64), head dropout": lambda: _cnn([3, 32, 32], **cifar),
        "CNN 3×32×32 (32, 64, 64), spatial 0.1": lambda: _cnn(
            [3, 32, 32], **cifar, spatial_dropout=0.1
        ),
        "fashion's CNN 1×28×28 (16, 32, 32), spatial 0.1": lambda: _cnn(
            [28, 28], **fashion, pool=[True, True, False], spatial_dropout=0.1, dropout=0.3
        ),
        "MLP 3072→2048→2048→10": lambda: _mlp(
            in_features=3072, hidden=[2048, 2048], out_features=10, dropout=0.2
        ),
        "MLP 3072→4096×3→10, input dropout 0.2": lambda: _mlp(
            in_features=3072, hidden=[4096] * 3, out_features=10, dropout=0.2, input_dropout=0.2
        ),
    }


def run(quick: bool = False) -> str:
    rounds = 3 if quick else 7
    lines = [
        f"### mcdrop.save with the warm-up's largest pass ({machine()})",
        "",
        "| model | pass GFLOP | save without ms | save ms | added ms | save / without |",
        "|---|---|---|---|---|---|",
    ]
    bound = saving.MAX_WARM_UP_PASS_FLOPS
    with tempfile.TemporaryDirectory() as folder:
        for name, make in cases(quick).items():
            torch.manual_seed(0)
            net, kw = make()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                work = warm_up_pass_flops(make_plan(net, torch.randn(2, *kw["input_shape"])))

            def save(limit: int, kw: dict[str, Any] = kw, net: nn.Module = net) -> None:
                saving.MAX_WARM_UP_PASS_FLOPS = limit
                try:
                    saving.save(net, Path(folder) / "m", **kw)
                finally:
                    saving.MAX_WARM_UP_PASS_FLOPS = bound

            times = compare(
                {"without": lambda: save(-1), "with": lambda: save(bound)},
                rounds=rounds,
                budget_s=60.0,
            )
            added = times["with"] - times["without"]
            lines.append(
                f"| {name} | {work / 1e9:.3g} | {times['without'] * 1e3:.0f} | "
                f"{times['with'] * 1e3:.0f} | {added * 1e3:.0f} | "
                f"{times['with'] / times['without']:.2f} |"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.saving", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (the test suite)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(run(args.quick), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
