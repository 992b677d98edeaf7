"""Adapters that turn existing segmentation networks into an :class:`IncrementalSegmenter`."""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.segmentation import DeepLabV3

from incseg.models.classifier import IncrementalClassifier
from incseg.models.segmenter import CafLevels, IncrementalSegmenter

__all__ = ["classifier_from_conv", "from_named_submodules", "from_torchvision_deeplabv3"]


class _SelectOutput(nn.Module):
    """Wrap a module returning a dict of features (torchvision's ``IntermediateLayerGetter``) to return one entry."""

    def __init__(self, body: nn.Module, key: str) -> None:
        super().__init__()
        self.body = body
        self.key = key

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.body(x)[self.key]
        return out

    def extra_repr(self) -> str:
        return f"key={self.key!r}"


def _passthrough(module: nn.Module) -> bool:
    """Whether ``module`` is an activation-free identity: ``nn.Identity`` or a parameter-free wrapper of them
    (segmentation_models_pytorch's ``Activation(None)``)."""
    if isinstance(module, nn.Identity):
        return True
    children = list(module.children())
    return (
        bool(children)
        and not any(True for _ in module.parameters(recurse=False))
        and not any(True for _ in module.buffers(recurse=False))
        and all(_passthrough(c) for c in children)
        and type(module).__name__ in ("Activation", "Sequential")
    )


def _upsampling_of(module: nn.Module) -> tuple[float, bool] | None:
    """``(scale, align_corners)`` of a bilinear ``nn.Upsample`` by a scale factor, else ``None``."""
    if not isinstance(module, nn.Upsample) or module.mode != "bilinear" or module.size is not None:
        return None
    scale = module.scale_factor
    if isinstance(scale, tuple):
        if len(set(scale)) != 1:
            return None
        scale = scale[0]
    if scale is None:
        return None
    return float(scale), bool(module.align_corners)


def classifier_from_conv(
    conv: nn.Module, *, upsampling: float = 1, align_corners: bool = False
) -> IncrementalClassifier:
    """Convert a classifier convolution into a one-step :class:`IncrementalClassifier` with its weights.

    ``conv`` is a ``nn.Conv2d`` with an odd ``k x k`` kernel and ``k // 2`` zero padding (1x1 heads, the 3x3
    heads of segmentation_models_pytorch), stride 1, no dilation, one group; or an ``nn.Sequential`` of such a
    convolution followed by a bilinear ``nn.Upsample`` by a scale factor and activation-free identity layers
    (smp's ``SegmentationHead`` built with ``activation=None``). The upsampling becomes the classifier's
    ``upsampling``/``align_corners``, so the logits equal the head's. The new classifier has fresh
    parameters (copies, on the device and dtype of ``conv``); a convolution without bias gets a zero bias.

    Args:
        conv: the classifier convolution or head.
        upsampling: scale factor of a bilinear upsampling that follows the convolution outside ``conv``.
        align_corners: ``align_corners`` of that upsampling.

    Returns:
        ``IncrementalClassifier(conv.in_channels, [conv.out_channels], kernel_size=k, ...)`` computing the
        same logits.

    Raises:
        TypeError: ``conv`` is neither a ``nn.Conv2d`` nor such a head (an :class:`IncrementalClassifier` is
            returned as is).
        ValueError: the convolution is strided, dilated, grouped, has an even kernel or another padding, or
            the head holds an activation or a layer that is not an upsampling or an identity.

    Example:
        >>> import torch
        >>> conv = torch.nn.Conv2d(8, 3, 1)
        >>> clf = classifier_from_conv(conv)
        >>> x = torch.randn(1, 8, 4, 4)
        >>> torch.equal(clf(x), conv(x))
        True
        >>> from torch import nn
        >>> head = nn.Sequential(nn.Conv2d(8, 3, 3, padding=1), nn.UpsamplingBilinear2d(scale_factor=4))
        >>> classifier_from_conv(head)
        IncrementalClassifier(
          in_channels=8, classes_per_step=[3], kernel_size=3, upsampling=4.0, align_corners=True
          (heads): ModuleList(
            (0): Conv2d(8, 3, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1))
          )
        )
    """
    if isinstance(conv, IncrementalClassifier):
        return conv
    if isinstance(conv, nn.Sequential) and len(conv) > 0 and isinstance(conv[0], nn.Conv2d):
        for layer in list(conv)[1:]:
            found = _upsampling_of(layer)
            if found is not None and upsampling == 1:
                upsampling, align_corners = found
            elif not _passthrough(layer):
                raise ValueError(
                    "a classifier head may only follow its convolution with one bilinear nn.Upsample (by a scale "
                    f"factor) and identity layers, got {layer}; build the network without a final activation "
                    "(e.g. smp's activation=None) or pass the convolution itself"
                )
        conv = conv[0]
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(
            "the classifier must be an IncrementalClassifier, a nn.Conv2d or a nn.Sequential(conv, upsampling), got "
            f"{type(conv).__name__}; wrap anything else (e.g. dropout + conv) so that the refiner ends before "
            "the final convolution"
        )
    k = conv.kernel_size
    padding = (0, 0) if conv.padding == "valid" else conv.padding
    if (
        k[0] != k[1]
        or k[0] % 2 == 0
        or padding != (k[0] // 2, k[1] // 2)
        or conv.stride != (1, 1)
        or conv.dilation != (1, 1)
        or conv.groups != 1
        or conv.padding_mode != "zeros"
    ):
        raise ValueError(
            "the classifier convolution must be a plain k x k conv with odd k and zero padding k // 2 (stride 1, no "
            f"dilation, groups=1), got {conv}"
        )
    weight = conv.weight
    clf = IncrementalClassifier(
        conv.in_channels, [conv.out_channels], kernel_size=k[0], upsampling=upsampling, align_corners=align_corners
    ).to(device=weight.device, dtype=weight.dtype)
    head = clf.head(0)
    assert head.bias is not None
    with torch.no_grad():
        head.weight.copy_(weight)
        if conv.bias is not None:
            head.bias.copy_(conv.bias)
        else:
            head.bias.zero_()
    return clf


def _first_conv(module: nn.Module) -> nn.Conv2d | None:
    return next((m for m in module.modules() if isinstance(m, nn.Conv2d)), None)


def from_torchvision_deeplabv3(model: DeepLabV3) -> IncrementalSegmenter:
    """Adapt a torchvision DeepLabV3 (``deeplabv3_resnet50/101``, ``deeplabv3_mobilenet_v3_large``).

    Encoder: ``model.backbone`` returning its ``"out"`` features (``z``); refiner: ``model.classifier[:-1]``
    (ASPP, 3x3 conv, BN, ReLU; ``h``); classifier: an :class:`IncrementalClassifier` initialised from the last
    1x1 convolution ``model.classifier[-1]``. In eval mode the segmenter's logits equal the torchvision
    model's ``"out"`` before its final upsampling to the input size.

    Note:
        The encoder and refiner modules are *shared* with ``model`` (not copied); the classifier has new
        parameters. Use ``copy.deepcopy(model)`` first to keep the original independent. The auxiliary
        classifier (``model.aux_classifier``), if any, is dropped with a warning: the incremental methods
        do not use it.

    Args:
        model: a ``torchvision.models.segmentation.DeepLabV3``.

    Returns:
        An :class:`IncrementalSegmenter` (``z_channels`` 2048 for ResNets, ``h_channels`` 256).

    Raises:
        TypeError: ``model`` is not a torchvision ``DeepLabV3``.
        ValueError: ``model.classifier`` does not end with a plain 1x1 convolution.

    Example:
        >>> from torchvision.models.segmentation import deeplabv3_resnet50
        >>> tv = deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=21)
        >>> model = from_torchvision_deeplabv3(tv)
        >>> model.z_channels, model.h_channels, model.num_classes
        (2048, 256, 21)
    """
    if not isinstance(model, DeepLabV3):
        raise TypeError(
            f"model must be a torchvision.models.segmentation.DeepLabV3, got {type(model).__name__}; "
            "use incseg.models.adapt for other networks"
        )
    return _from_torchvision_simple(model, "from_torchvision_deeplabv3")


def _from_torchvision_simple(model: Any, caller: str) -> IncrementalSegmenter:
    """torchvision's ``_SimpleSegmentationModel`` (DeepLabV3, FCN): backbone ``"out"``, head minus its last conv."""
    head = model.classifier
    if not isinstance(head, nn.Sequential) or len(head) < 2:
        raise ValueError(f"model.classifier must be an nn.Sequential ending with a 1x1 conv, got {type(head).__name__}")
    if getattr(model, "aux_classifier", None) is not None:
        warnings.warn(
            f"{caller}: the auxiliary classifier (model.aux_classifier) is dropped",
            UserWarning,
            stacklevel=2,
        )
    classifier = classifier_from_conv(head[-1])
    refiner = nn.Sequential(OrderedDict(list(head.named_children())[:-1]))
    first = _first_conv(refiner)
    stem = _first_conv(model.backbone)
    if first is None:
        raise ValueError("model.classifier[:-1] holds no convolution; cannot infer the encoder channels")
    return IncrementalSegmenter(
        _SelectOutput(model.backbone, "out"),
        refiner,
        classifier,
        z_channels=first.in_channels,
        h_channels=classifier.in_channels,
        in_channels=None if stem is None else stem.in_channels,
    )


def _get_part(model: nn.Module, name: object, role: str) -> nn.Module:
    if not isinstance(name, str):
        raise TypeError(f"{role} must be the name (str) of a submodule, got {type(name).__name__}")
    try:
        return model.get_submodule(name)
    except AttributeError:
        children = [n for n, _ in model.named_children()]
        raise ValueError(
            f"model has no submodule {name!r} for the {role}; its children are {children}. "
            f"Pass {role}=<name> (dotted paths allowed)"
        ) from None


def from_named_submodules(
    model: nn.Module,
    *,
    encoder: str = "encoder",
    refiner: str = "refiner",
    classifier: str = "classifier",
    z_channels: int | Sequence[int | None] | Mapping[str, int | None],
    h_channels: int,
    in_channels: int | None = None,
    caf_levels: CafLevels = None,
) -> IncrementalSegmenter:
    """Adapt any network whose encoder, refiner and classifier convolution are named submodules.

    The parts are looked up with ``model.get_submodule`` (dotted paths allowed) and *shared* with ``model``
    (deepcopy first to keep it independent). A classifier convolution (or head) is converted into an
    :class:`IncrementalClassifier` with copied weights (see :func:`classifier_from_conv`); an
    :class:`IncrementalClassifier` is used as is. The model's own ``forward`` is not used: the segmenter
    computes ``classifier(refiner(encoder(x)))``.

    Args:
        model: the network.
        encoder: name of the encoder submodule (images to ``z``).
        refiner: name of the refiner submodule (``z`` to ``h``).
        classifier: name of the classifier submodule (``h`` to logits).
        z_channels: channels of ``z``; a list or dict of channel counts for an encoder returning a list or
            dict of feature maps (see :class:`IncrementalSegmenter`).
        h_channels: channels of ``h``.
        in_channels: channels of the input images, checked when given.
        caf_levels: multi-scale encoders: the levels CAF sees (default the deepest, or a list, or ``"all"``).

    Returns:
        An :class:`IncrementalSegmenter`.

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` or the classifier is neither an
            :class:`IncrementalClassifier` nor a ``nn.Conv2d``.
        ValueError: a submodule name is missing, the convolution is not a classifier (see
            :func:`classifier_from_conv`), or channel counts disagree.

    Example:
        >>> from torch import nn
        >>> net = nn.Module()
        >>> net.encoder, net.refiner = nn.Conv2d(3, 8, 3, stride=2), nn.Conv2d(8, 4, 1)
        >>> net.classifier = nn.Conv2d(4, 6, 1)
        >>> from_named_submodules(net, z_channels=8, h_channels=4).num_classes
        6
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    enc = _get_part(model, encoder, "encoder")
    ref = _get_part(model, refiner, "refiner")
    clf = classifier_from_conv(_get_part(model, classifier, "classifier"))
    return IncrementalSegmenter(
        enc, ref, clf, z_channels=z_channels, h_channels=h_channels, in_channels=in_channels, caf_levels=caf_levels
    )
