"""Whether torch would run a module hook: the paths that skip module calls (a layer chain, an
encoder's direct run) may run only where none is registered."""

from __future__ import annotations

from torch import nn
from torch.nn.modules import module as _module_hooks


def global_hooks() -> bool:
    """Whether any hook is registered for every module (``register_module_forward_hook`` and
    the like)."""
    return bool(
        _module_hooks._global_forward_hooks
        or _module_hooks._global_forward_pre_hooks
        or _module_hooks._global_backward_hooks
        or _module_hooks._global_backward_pre_hooks
    )


def has_hooks(module: nn.Module) -> bool:
    """Whether ``module`` has a forward, forward-pre or backward hook of its own."""
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
    )
