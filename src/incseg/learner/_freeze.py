"""Freezing a module for good: no gradients, evaluation mode that survives ``.train()``."""

from __future__ import annotations

from typing import TypeVar

from torch import nn

__all__ = ["freeze", "is_frozen"]

ModuleT = TypeVar("ModuleT", bound=nn.Module)

_FROZEN_FLAG = "_incseg_frozen"


class _EvalOnly:
    """Stored as a frozen module's ``train``: whatever the mode asked for, switch to evaluation mode.

    A small class rather than a bound function so that deepcopy and pickling keep it bound to the right module.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, mode: bool = True) -> nn.Module:
        return nn.Module.train(self.module, False)


def freeze(module: ModuleT) -> ModuleT:
    """Freeze ``module`` in place: ``requires_grad=False`` everywhere and evaluation mode for good.

    This is how the learner holds the previous-step model (the teacher of the distillation losses): norm
    layers keep their running statistics and dropout stays off even if someone calls ``.train()`` on the
    module or on any of its submodules (as segmentation_models_pytorch's ``freeze_encoder``), so a training
    loop that puts "everything" in training mode cannot silently change the teacher.

    Args:
        module: the module to freeze (modified in place).

    Returns:
        The same module, for chaining.

    Raises:
        TypeError: ``module`` is not an ``nn.Module``.

    Example:
        >>> teacher = freeze(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)))
        >>> teacher.train().training, teacher[1].training
        (False, False)
        >>> any(p.requires_grad for p in teacher.parameters())
        False
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    module.requires_grad_(False)
    for sub in module.modules():
        # an instance attribute shadows the class method (nn.Module.__setattr__ is bypassed: not a submodule)
        object.__setattr__(sub, "train", _EvalOnly(sub))
        object.__setattr__(sub, _FROZEN_FLAG, True)
    module.eval()
    return module


def is_frozen(module: nn.Module) -> bool:
    """Whether ``module`` was frozen by :func:`freeze` (it then stays in evaluation mode).

    Example:
        >>> is_frozen(freeze(nn.Linear(2, 2))), is_frozen(nn.Linear(2, 2))
        (True, False)
    """
    return bool(getattr(module, _FROZEN_FLAG, False))
