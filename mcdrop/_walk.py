"""Every module of a model, walked without ``nn.Module.modules()``' generator and names."""

from __future__ import annotations

from torch import nn


def every_module(model: nn.Module) -> list[nn.Module]:
    """Every module of ``model``, ``model`` first, a shared one once: ``list(model.modules())``
    in one loop (the generator costs several times as much per module, on paths that run on
    every sampling call)."""
    found: dict[int, nn.Module] = {}
    stack = [model]
    while stack:
        m = stack.pop()
        if id(m) not in found:
            found[id(m)] = m
            stack.extend(c for c in m._modules.values() if c is not None)
    return list(found.values())
