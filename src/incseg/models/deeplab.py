"""DeepLabV3 with a ResNet encoder (the network of the paper and of MiB/PLOP) built from torchvision parts."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from os import PathLike
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import resnet50, resnet101

from incseg.models.classifier import IncrementalClassifier
from incseg.models.segmenter import IncrementalSegmenter

__all__ = ["ASPP", "deeplabv3_resnet50", "deeplabv3_resnet101"]

NormLayer = Callable[[int], nn.Module]


class _ASPPPooling(nn.Sequential):
    """Image-level branch: global average pool, 1x1 conv, norm, ReLU, bilinear upsampling back."""

    def __init__(self, in_channels: int, out_channels: int, norm_layer: NormLayer) -> None:
        super().__init__(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
            norm_layer(out_channels),
            nn.ReLU(),
        )

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        for module in self:
            x = module(x)
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling of DeepLabV3 (Chen et al. 2017), torchvision's layout and parameter names.

    Branches: a 1x1 conv, one dilated 3x3 conv per rate and an image-pooling branch (each conv, norm, ReLU);
    concatenated, projected by a 1x1 conv, norm, ReLU and dropout. The state dict keys equal those of
    ``torchvision.models.segmentation.deeplabv3.ASPP``, so torchvision checkpoints load into it.

    Args:
        in_channels: channels of the input features.
        atrous_rates: dilation rates of the 3x3 branches (``(6, 12, 18)`` at output stride 16).
        out_channels: channels of every branch and of the output.
        norm_layer: normalisation layer type (``nn.BatchNorm2d`` by default).
        dropout: dropout probability after the projection.

    Shape:
        - Input: ``(B, in_channels, H, W)``.
        - Output: ``(B, out_channels, H, W)``.

    Raises:
        ValueError: no rate given or a rate ``< 1``.

    Example:
        >>> import torch
        >>> aspp = ASPP(16, (1, 2, 3), out_channels=8).eval()
        >>> aspp(torch.randn(2, 16, 5, 7)).shape
        torch.Size([2, 8, 5, 7])
    """

    def __init__(
        self,
        in_channels: int,
        atrous_rates: Sequence[int],
        out_channels: int = 256,
        *,
        norm_layer: NormLayer | None = None,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        norm = nn.BatchNorm2d if norm_layer is None else norm_layer
        rates = tuple(atrous_rates)
        if not rates or any(int(r) < 1 for r in rates):
            raise ValueError(f"atrous_rates must be a non-empty sequence of ints >= 1, got {atrous_rates!r}")
        branches: list[nn.Module] = [
            nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False), norm(out_channels), nn.ReLU())
        ]
        for rate in rates:
            branches.append(
                nn.Sequential(
                    nn.Conv2d(in_channels, out_channels, 3, padding=rate, dilation=rate, bias=False),
                    norm(out_channels),
                    nn.ReLU(),
                )
            )
        branches.append(_ASPPPooling(in_channels, out_channels, norm))
        self.convs = nn.ModuleList(branches)
        self.project = nn.Sequential(
            nn.Conv2d(len(branches) * out_channels, out_channels, 1, bias=False),
            norm(out_channels),
            nn.ReLU(),
            nn.Dropout(dropout),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.project(torch.cat([conv(x) for conv in self.convs], dim=1))


def _weights_file(path: str | PathLike[str]) -> Path:
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(
            f"backbone_weights file not found: {str(file)!r}; pass the path of a local torchvision ResNet state "
            "dict (incseg never downloads weights), or None for a randomly initialised backbone"
        )
    return file


def _load_backbone_weights(backbone: nn.Module, file: Path) -> None:
    from incseg._safe_files import load_file  # the one safe reader of checkpoints and weights

    state = load_file(file, "backbone_weights")
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"backbone_weights {str(file)!r} does not hold a state dict, got {type(state).__name__}")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    try:
        result = backbone.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise ValueError(f"backbone_weights {str(file)!r} does not match a torchvision ResNet: {err}") from None
    missing = [k for k in result.missing_keys if not k.startswith("fc.")]
    unexpected = [k for k in result.unexpected_keys if not k.startswith("fc.")]
    if missing or unexpected:
        raise ValueError(
            f"backbone_weights {str(file)!r} does not match a torchvision ResNet: missing keys {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected keys {unexpected[:5]}"
            f"{'...' if len(unexpected) > 5 else ''}"
        )


def _deeplabv3_resnet(
    depth: int,
    num_classes: int,
    *,
    output_stride: int,
    backbone_weights: str | PathLike[str] | None,
    norm_layer: NormLayer | None,
) -> IncrementalSegmenter:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int):
        raise TypeError(f"num_classes must be an int, got {type(num_classes).__name__}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if output_stride not in (8, 16):
        raise ValueError(f"output_stride must be 8 or 16, got {output_stride!r}")
    weights_file = None if backbone_weights is None else _weights_file(backbone_weights)
    dilate = [False, output_stride == 8, True]
    build = resnet101 if depth == 101 else resnet50
    resnet = build(weights=None, replace_stride_with_dilation=dilate, norm_layer=norm_layer)
    if weights_file is not None:
        _load_backbone_weights(resnet, weights_file)
    encoder = nn.Sequential(
        OrderedDict(
            (name, getattr(resnet, name))
            for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
        )
    )
    rates = (6, 12, 18) if output_stride == 16 else (12, 24, 36)
    norm = nn.BatchNorm2d if norm_layer is None else norm_layer
    refiner = nn.Sequential(
        ASPP(2048, rates, 256, norm_layer=norm_layer),
        nn.Conv2d(256, 256, 3, padding=1, bias=False),
        norm(256),
        nn.ReLU(),
    )
    classifier = IncrementalClassifier(256, [num_classes])
    return IncrementalSegmenter(encoder, refiner, classifier, z_channels=2048, h_channels=256, in_channels=3)


def deeplabv3_resnet101(
    num_classes: int,
    *,
    output_stride: int = 16,
    backbone_weights: str | PathLike[str] | None = None,
    norm_layer: NormLayer | None = None,
) -> IncrementalSegmenter:
    """Build DeepLabV3 with a ResNet-101 encoder, the network of the paper (Sec. IV-A) and of MiB/PLOP.

    Encoder: torchvision's ResNet-101 up to ``layer4`` (``z``: 2048 channels), with the last stage (output
    stride 16) or the last two stages (output stride 8) dilated instead of strided. Refiner: ASPP with rates
    6/12/18 (doubled at output stride 8) and 256 channels, then a 3x3 conv, norm and ReLU, i.e. torchvision's
    ``DeepLabHead`` without its last conv (``h``: 256 channels, same parameter names). Classifier:
    ``IncrementalClassifier(256, [num_classes])``.

    Args:
        num_classes: classes of step 0 (background included).
        output_stride: 16 (default, as the paper) or 8.
        backbone_weights: path of a local torchvision ResNet-101 state dict (e.g. ImageNet weights saved with
            ``torch.save(resnet101(weights=...).state_dict(), path)``); ``None`` keeps the random
            initialisation. Nothing is ever downloaded. The ``fc`` layer is ignored.
        norm_layer: normalisation layer type for the backbone and the refiner (default ``nn.BatchNorm2d``;
            e.g. ``torchvision.ops.FrozenBatchNorm2d``). Use ``nn.SyncBatchNorm.convert_sync_batchnorm`` for DDP.

    Returns:
        An :class:`IncrementalSegmenter` with ``z_channels=2048`` and ``h_channels=256``.

    Raises:
        TypeError: ``num_classes`` is not an int.
        ValueError: ``num_classes < 1``, ``output_stride`` not in ``{8, 16}``, or a weights file that is not a
            ResNet-101 state dict (:class:`~incseg.learner.CheckpointError` for an empty, corrupt or unsafe file:
            a pickle holding code is refused without running anything).
        FileNotFoundError: ``backbone_weights`` does not exist.

    Example:
        >>> model = deeplabv3_resnet101(16)
        >>> model.z_channels, model.h_channels, model.num_classes
        (2048, 256, 16)
    """
    return _deeplabv3_resnet(
        101, num_classes, output_stride=output_stride, backbone_weights=backbone_weights, norm_layer=norm_layer
    )


def deeplabv3_resnet50(
    num_classes: int,
    *,
    output_stride: int = 16,
    backbone_weights: str | PathLike[str] | None = None,
    norm_layer: NormLayer | None = None,
) -> IncrementalSegmenter:
    """Build DeepLabV3 with a ResNet-50 encoder; otherwise identical to :func:`deeplabv3_resnet101`.

    Args:
        num_classes: classes of step 0 (background included).
        output_stride: 16 (default) or 8.
        backbone_weights: path of a local torchvision ResNet-50 state dict, or ``None``.
        norm_layer: normalisation layer type (default ``nn.BatchNorm2d``).

    Returns:
        An :class:`IncrementalSegmenter` with ``z_channels=2048`` and ``h_channels=256``.

    Raises:
        TypeError: ``num_classes`` is not an int.
        ValueError: ``num_classes < 1``, ``output_stride`` not in ``{8, 16}``, or a mismatching weights file.
        FileNotFoundError: ``backbone_weights`` does not exist.

    Example:
        >>> deeplabv3_resnet50(21, output_stride=8).num_classes
        21
    """
    return _deeplabv3_resnet(
        50, num_classes, output_stride=output_stride, backbone_weights=backbone_weights, norm_layer=norm_layer
    )
