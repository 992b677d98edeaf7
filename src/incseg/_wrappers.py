"""Wrappers around a module that hold the real one: DDP, DataParallel and ``torch.compile``."""

from __future__ import annotations

from torch import nn

__all__ = ["unwrap_module"]


def unwrap_module(module: nn.Module) -> nn.Module:
    """Strip wrappers that hold the real module: ``DistributedDataParallel``/``DataParallel`` (``.module``) and
    ``torch.compile`` (``._orig_mod``), nested in any order.

    Args:
        module: a module, possibly wrapped.

    Returns:
        The innermost module.

    Example:
        >>> lin = nn.Linear(2, 2)
        >>> unwrap_module(nn.DataParallel(lin)) is lin
        True
    """
    while True:
        if isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            module = module.module
        elif isinstance(getattr(module, "_orig_mod", None), nn.Module):
            module = module._orig_mod  # type: ignore[assignment]
        else:
            return module
