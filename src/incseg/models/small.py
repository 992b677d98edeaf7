"""A small CPU-friendly encoder-refiner-classifier network for the demo and the tests."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn

from incseg.models.classifier import IncrementalClassifier
from incseg.models.segmenter import IncrementalSegmenter

__all__ = ["small_segmenter"]


def _conv_bn_relu(in_channels: int, out_channels: int, *, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    kernel = 1 if dilation == 0 else 3
    padding = 0 if kernel == 1 else dilation
    return nn.Sequential(
        nn.Conv2d(
            in_channels,
            out_channels,
            kernel,
            stride=stride,
            padding=padding,
            dilation=max(dilation, 1),
            bias=False,
        ),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class _SmallASPP(nn.Module):
    """Light ASPP: a 1x1 and two dilated 3x3 branches, concatenated and projected (conv, BN, ReLU)."""

    def __init__(self, in_channels: int, branch_channels: int, out_channels: int, rates: tuple[int, int]) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            [_conv_bn_relu(in_channels, branch_channels, dilation=0)]
            + [_conv_bn_relu(in_channels, branch_channels, dilation=r) for r in rates]
        )
        self.project = _conv_bn_relu(len(self.branches) * branch_channels, out_channels, dilation=0)

    def forward(self, z: Tensor) -> Tensor:
        return self.project(torch.cat([branch(z) for branch in self.branches], dim=1))


def small_segmenter(num_classes: int, *, width: int = 32, in_channels: int = 3) -> IncrementalSegmenter:
    """Build a small segmenter (about 190k parameters at ``width=32``) that trains in seconds on a CPU.

    Encoder: four conv-BN-ReLU stages (3x3, strides 2, 1, 2, 2; output stride 8) with ``width``,
    ``width``, ``2*width`` and ``4*width`` channels (``z_channels = 4*width``). Refiner: a light ASPP with a
    1x1 and two 3x3 branches dilated 2 and 4 (``width`` channels each), concatenated and projected by a
    1x1 conv, BN and ReLU to ``h_channels = 2*width``. Classifier: ``IncrementalClassifier(2*width,
    [num_classes])``. Convolutions use Kaiming-normal (fan out) initialisation from the global RNG, so
    ``torch.manual_seed`` makes the network deterministic.

    Args:
        num_classes: classes of step 0 (background included).
        width: base channel count.
        in_channels: channels of the input images.

    Returns:
        An :class:`IncrementalSegmenter` with ``z_channels = 4*width`` and ``h_channels = 2*width``.

    Raises:
        TypeError: a non-integer argument.
        ValueError: an argument ``< 1``.

    Example:
        >>> import torch
        >>> model = small_segmenter(5, width=8)
        >>> model(torch.randn(2, 3, 64, 64)).shape
        torch.Size([2, 5, 8, 8])
    """
    for name, value in (("num_classes", num_classes), ("width", width), ("in_channels", in_channels)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    z_channels, h_channels = 4 * width, 2 * width
    encoder = nn.Sequential(
        OrderedDict(
            stem=_conv_bn_relu(in_channels, width, stride=2),
            stage1=_conv_bn_relu(width, width),
            stage2=_conv_bn_relu(width, 2 * width, stride=2),
            stage3=_conv_bn_relu(2 * width, z_channels, stride=2),
        )
    )
    refiner = _SmallASPP(z_channels, width, h_channels, rates=(2, 4))
    for module in (encoder, refiner):
        for m in module.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    classifier = IncrementalClassifier(h_channels, [num_classes])
    return IncrementalSegmenter(
        encoder, refiner, classifier, z_channels=z_channels, h_channels=h_channels, in_channels=in_channels
    )
