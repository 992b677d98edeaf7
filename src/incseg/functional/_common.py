"""Private helpers shared by the loss functionals: argument checks, dtype promotion, resizing, reductions."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from incseg._checks import check_num_old_classes

__all__ = [
    "ClassReduction",
    "Reduction",
    "check_batch",
    "check_choice",
    "check_mask",
    "check_num_old_classes",
    "reduce_pixels",
    "resize_to",
    "upcast",
]

Reduction = Literal["none", "mean", "sum"]
ClassReduction = Literal["mean", "sum"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def check_choice(value: object, name: str, choices: Sequence[object]) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def check_batch(a: Tensor, b: Tensor, name_a: str, name_b: str) -> None:
    """Check that two tensors have the same batch size (dim 0)."""
    if a.shape[0] != b.shape[0]:
        raise ValueError(
            f"{name_a} and {name_b} must have the same batch size, got shapes {tuple(a.shape)} and {tuple(b.shape)}"
        )


def check_mask(mask: object, shape: Sequence[int]) -> Tensor:
    """Check an optional pixel mask: a bool tensor of shape ``(B, H, W)`` equal to ``shape``."""
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a bool torch.Tensor of shape (B, H, W), got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor (True = pixel counts), got dtype {mask.dtype}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(
            f"mask must have shape (B, H, W) = {tuple(shape)} (batch and spatial size of logits), "
            f"got {tuple(mask.shape)}"
        )
    return mask


def upcast(x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """Return ``x`` in float32 if it is half or bfloat16 (or in ``dtype`` when given); other floats unchanged."""
    if dtype is not None:
        return x.to(dtype)
    return x.float() if x.dtype in _LOW_PRECISION else x


def resize_to(x: Tensor, size: Sequence[int]) -> Tensor:
    """Bilinearly resize ``(B, C, h, w)`` to spatial ``size`` (``align_corners=False``); no-op if equal."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=(int(size[0]), int(size[1])), mode="bilinear", align_corners=False)


def reduce_pixels(per_pixel: Tensor, valid: Tensor | None, reduction: str) -> Tensor:
    """Reduce a per-pixel loss ``(B, H, W)`` over the valid pixels.

    Invalid pixels are replaced by zero with :func:`torch.where` (so their value and gradient cannot leak);
    ``"mean"`` divides by the number of valid pixels (at least one), so an all-invalid batch gives a 0 that
    stays connected to the graph. No host synchronisation.
    """
    if valid is not None:
        per_pixel = torch.where(valid, per_pixel, torch.zeros((), dtype=per_pixel.dtype, device=per_pixel.device))
    if reduction == "none":
        return per_pixel
    if reduction == "sum":
        return per_pixel.sum()
    if valid is None:
        return per_pixel.sum() / max(per_pixel.numel(), 1)
    count = valid.sum().to(per_pixel.dtype).clamp_min(1.0)
    return per_pixel.sum() / count
