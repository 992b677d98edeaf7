"""Check that an adapted network computes the logits of the network it was taken from."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["check_equivalent"]


def _network_logits(output: Any) -> Tensor:
    """The logits in a segmentation network's output.

    A tensor is returned as is; torchvision's dict gives ``output["out"]``, transformers' outputs their
    ``.logits``, a tuple or list its first entry.

    Args:
        output: what the network's ``forward`` returned.

    Returns:
        The ``(B, K, H, W)`` logits.

    Raises:
        TypeError: no 4-dimensional logits tensor was found.
    """
    found: Any = output
    if isinstance(output, Mapping) and "out" in output:
        found = output["out"]
    elif isinstance(getattr(output, "logits", None), Tensor):
        found = output.logits
    elif isinstance(output, (tuple, list)) and output:
        found = output[0]
    if not isinstance(found, Tensor) or found.ndim != 4:
        got = tuple(found.shape) if isinstance(found, Tensor) else type(found).__name__
        raise TypeError(
            f"cannot find (B, K, H, W) logits in the network's output ({type(output).__name__}, found {got}); "
            "compare a module returning the logits tensor"
        )
    return found


@contextlib.contextmanager
def _evaluating(*modules: nn.Module) -> Iterator[None]:
    """Evaluation mode for ``modules`` (and everything they hold), each module's own mode restored afterwards."""
    modes = {m: m.training for root in modules for m in root.modules()}
    try:
        for root in modules:
            root.eval()
        yield
    finally:
        for m, training in modes.items():
            m.training = training


def check_equivalent(
    adapted: nn.Module, original: nn.Module, example: Tensor, *, atol: float = 1e-4, rtol: float = 1e-4
) -> float:
    """Check that ``adapted`` computes the logits of ``original`` on ``example``, in evaluation mode.

    Use it on hand-written glue (:func:`~incseg.models.from_named_submodules`) and on anything
    :func:`~incseg.models.adapt` built (``adapt(net, check=example)`` calls it). Both networks run in evaluation
    mode without gradients; every module's own mode is restored afterwards. The original's logits are its
    output tensor, torchvision's ``"out"``, a transformers output's ``.logits`` or a tuple's first entry. Where
    the original resizes its logits (torchvision to the input size), the adapted logits are resized to the
    original's size as the learner and the metrics resize them to the labels: bilinearly,
    ``align_corners=False``. A network whose
    own final resizing differs (another mode, ``align_corners=True``) therefore fails the check, as it should:
    its logits are not the ones the learner trains.

    Args:
        adapted: the adapted network (an :class:`~incseg.models.IncrementalSegmenter`, or any module returning
            logits).
        original: the network it was taken from.
        example: an input batch ``(B, C, H, W)`` both networks accept (random images are fine).
        atol: absolute tolerance.
        rtol: tolerance relative to the original's logit at each position.

    Returns:
        The largest absolute difference between the logits.

    Raises:
        ValueError: the logits differ by more than ``atol + rtol * |original|`` somewhere (the message gives the
            largest difference and where), or their number of classes differs, or the adapted logits are
            larger than the original's.
        TypeError: ``example`` is not a tensor or the original's output holds no logits tensor.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from incseg.models import from_named_submodules
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))
        >>> parts = nn.Module()
        >>> parts.encoder, parts.refiner, parts.classifier = net[0], net[1], net[2]
        >>> model = from_named_submodules(parts, z_channels=8, h_channels=8)
        >>> check_equivalent(model, net, torch.randn(2, 3, 16, 16)) < 1e-6
        True
    """
    if not isinstance(example, Tensor):
        raise TypeError(f"example must be an input batch (a tensor), got {type(example).__name__}")
    with _evaluating(adapted, original), torch.no_grad():
        expected = _network_logits(original(example))
        got = _network_logits(adapted(example))
    if got.shape[:2] != expected.shape[:2]:
        raise ValueError(
            f"the adapted network gives logits of shape {tuple(got.shape)}, the original {tuple(expected.shape)}: "
            "batch or number of classes differ"
        )
    resized = ""
    if got.shape[-2:] != expected.shape[-2:]:
        if got.shape[-2] > expected.shape[-2] or got.shape[-1] > expected.shape[-1]:
            raise ValueError(
                f"the adapted network's logits ({tuple(got.shape[-2:])}) are larger than the original's "
                f"({tuple(expected.shape[-2:])}): the adapted classifier upsamples where the network does not"
            )
        resized = (
            f" (the adapted logits, {got.shape[-2]}x{got.shape[-1]}, resized to the original's "
            f"{expected.shape[-2]}x{expected.shape[-1]} bilinearly with align_corners=False, as the learner does)"
        )
        got = F.interpolate(got.float(), size=expected.shape[-2:], mode="bilinear", align_corners=False)
    diff = (got.to(expected.dtype) - expected).abs()
    worst = float(diff.max()) if diff.numel() else 0.0
    excess = diff - (atol + rtol * expected.abs())
    if diff.numel() and (bool((excess > 0).any()) or not bool(torch.isfinite(diff).all())):
        index = tuple(
            int(i) for i in torch.unravel_index(torch.argmax(torch.nan_to_num(excess, nan=float("inf"))), diff.shape)
        )
        raise ValueError(
            f"the adapted network's logits differ from the original's by up to {worst:.4g} (at batch, class, y, x = "
            f"{index}; allowed {atol:g} + {rtol:g} x |logit|, largest |logit| {float(expected.abs().max()):.4g})"
            f"{resized}. Usual causes: a final resizing the adapted network does not reproduce (move it into the "
            "classifier only if it is a bilinear upsampling by a scale factor), work in the network's forward that "
            "the glue skips or repeats, or a classifier whose forward is not a plain convolution"
        )
    return worst
