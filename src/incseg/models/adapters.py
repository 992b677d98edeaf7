"""Adapters that turn existing segmentation networks into an :class:`IncrementalSegmenter`."""

from __future__ import annotations

import warnings
from collections import OrderedDict

import torch
from torch import Tensor, nn
from torchvision.models.segmentation import DeepLabV3

from incseg.models.classifier import IncrementalClassifier
from incseg.models.segmenter import IncrementalSegmenter

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


def classifier_from_conv(conv: nn.Module) -> IncrementalClassifier:
    """Convert a 1x1 ``nn.Conv2d`` classifier into a one-step :class:`IncrementalClassifier` with its weights.

    The new classifier has fresh parameters (copies, on the device and dtype of ``conv``); a convolution
    without bias gets a zero bias.

    Args:
        conv: a ``nn.Conv2d`` with kernel size 1, stride 1, no padding and one group.

    Returns:
        ``IncrementalClassifier(conv.in_channels, [conv.out_channels])`` computing the same logits.

    Raises:
        TypeError: ``conv`` is not a ``nn.Conv2d`` (an :class:`IncrementalClassifier` is returned as is).
        ValueError: ``conv`` is not a plain 1x1 convolution.

    Example:
        >>> import torch
        >>> conv = torch.nn.Conv2d(8, 3, 1)
        >>> clf = classifier_from_conv(conv)
        >>> x = torch.randn(1, 8, 4, 4)
        >>> torch.equal(clf(x), conv(x))
        True
    """
    if isinstance(conv, IncrementalClassifier):
        return conv
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(
            "the classifier must be an IncrementalClassifier or a 1x1 nn.Conv2d, got "
            f"{type(conv).__name__}; wrap anything else (e.g. dropout + conv) so that the refiner ends before "
            "the final 1x1 convolution"
        )
    if conv.kernel_size != (1, 1) or conv.stride != (1, 1) or conv.groups != 1 or conv.padding not in ((0, 0), "valid"):
        raise ValueError(
            "the classifier convolution must be a plain 1x1 conv (kernel_size=1, stride=1, padding=0, groups=1), "
            f"got {conv}"
        )
    weight = conv.weight
    clf = IncrementalClassifier(conv.in_channels, [conv.out_channels]).to(device=weight.device, dtype=weight.dtype)
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
            "use from_named_submodules for other networks"
        )
    head = model.classifier
    if not isinstance(head, nn.Sequential) or len(head) < 2:
        raise ValueError(f"model.classifier must be an nn.Sequential ending with a 1x1 conv, got {type(head).__name__}")
    if getattr(model, "aux_classifier", None) is not None:
        warnings.warn(
            "from_torchvision_deeplabv3: the auxiliary classifier (model.aux_classifier) is dropped",
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
    z_channels: int,
    h_channels: int,
    in_channels: int | None = None,
) -> IncrementalSegmenter:
    """Adapt any network whose encoder, refiner and 1x1 classifier are named submodules.

    The parts are looked up with ``model.get_submodule`` (dotted paths allowed) and *shared* with ``model``
    (deepcopy first to keep it independent). A plain 1x1 ``nn.Conv2d`` classifier is converted into an
    :class:`IncrementalClassifier` with copied weights (see :func:`classifier_from_conv`); an
    :class:`IncrementalClassifier` is used as is. The model's own ``forward`` is not used: the segmenter
    computes ``classifier(refiner(encoder(x)))``.

    Args:
        model: the network.
        encoder: name of the encoder submodule (images to ``z``).
        refiner: name of the refiner submodule (``z`` to ``h``).
        classifier: name of the classifier submodule (``h`` to logits).
        z_channels: channels of ``z``.
        h_channels: channels of ``h``.
        in_channels: channels of the input images, checked when given.

    Returns:
        An :class:`IncrementalSegmenter`.

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` or the classifier is neither an
            :class:`IncrementalClassifier` nor a ``nn.Conv2d``.
        ValueError: a submodule name is missing, the conv is not 1x1, or channel counts disagree.

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
    return IncrementalSegmenter(enc, ref, clf, z_channels=z_channels, h_channels=h_channels, in_channels=in_channels)
