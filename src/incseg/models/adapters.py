"""Adapters that turn existing segmentation networks into an :class:`IncrementalSegmenter`."""

from __future__ import annotations

import copy
import os
import sys
import warnings
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from types import FrameType
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.segmentation import DeepLabV3

from incseg.models.classifier import IncrementalClassifier
from incseg.models.segmenter import CafLevels, IncrementalSegmenter

__all__ = ["classifier_from_conv", "from_named_submodules", "from_torchvision_deeplabv3", "without_last_child"]


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


_RESIZE_OUTSIDE = (
    "pass the convolution alone (the learner and the metrics resize the logits to the labels bilinearly with "
    "align_corners=False; check the result with incseg.models.check_equivalent)"
)


def _upsampling_of(module: nn.Module) -> tuple[float, bool] | None:
    """``(scale, align_corners)`` of a bilinear ``nn.Upsample`` by a scale factor; ``None`` for another layer.

    Raises:
        ValueError: ``module`` is an ``nn.Upsample`` the classifier cannot reproduce (another mode, a fixed
            output size, different scales per axis).
    """
    if not isinstance(module, nn.Upsample):
        return None
    if module.mode != "bilinear":
        raise ValueError(
            f"the classifier head upsamples its logits with mode={module.mode!r} ({module}); an IncrementalClassifier "
            f"only upsamples bilinearly by a scale factor: {_RESIZE_OUTSIDE}"
        )
    if module.size is not None or module.scale_factor is None:
        raise ValueError(
            f"the classifier head resizes its logits to a fixed size ({module}); an IncrementalClassifier only "
            f"upsamples by a scale factor: {_RESIZE_OUTSIDE}"
        )
    scale = module.scale_factor
    if isinstance(scale, tuple):
        if len(set(scale)) != 1:
            raise ValueError(
                f"the classifier head upsamples its logits by different factors per axis ({module}); an "
                f"IncrementalClassifier upsamples both axes by one factor: {_RESIZE_OUTSIDE}"
            )
        scale = scale[0]
    if module.recompute_scale_factor and float(scale) != int(scale):
        raise ValueError(
            f"the classifier head upsamples by the non-integer factor {scale} with recompute_scale_factor=True "
            f"({module}); an IncrementalClassifier does not recompute it: {_RESIZE_OUTSIDE}"
        )
    return float(scale), bool(module.align_corners)


def _is_activation(module: nn.Module) -> bool:
    return type(module).__module__ == nn.ReLU.__module__ or "activation" in type(module).__name__.lower()


def _same_padding(conv: nn.Conv2d) -> tuple[int, ...]:
    """The (symmetric) padding of ``conv``, with ``"same"`` and ``"valid"`` resolved."""
    if conv.padding == "valid":
        return (0, 0)
    if conv.padding == "same":  # PyTorch pads d * (k - 1) // 2 on the left; odd k and d = 1 are checked apart
        return tuple(d * (k - 1) // 2 for d, k in zip(conv.dilation, conv.kernel_size))
    return tuple(int(p) for p in conv.padding)


def _check_plain_conv(conv: nn.Conv2d) -> None:
    """Refuse a convolution whose logits a plain ``k x k`` head with the same weights would not reproduce."""
    cls = type(conv)
    custom = [
        name for name in ("forward", "_conv_forward", "__call__") if getattr(cls, name) is not getattr(nn.Conv2d, name)
    ]
    if custom:
        raise TypeError(
            f"the classifier {cls.__module__}.{cls.__qualname__} subclasses nn.Conv2d with its own "
            f"{custom[0]}: its logits are not conv2d(x, weight, bias) (timm's StdConv2d, for one, standardises its "
            "weight on every call), so copying its weight into an IncrementalClassifier would change the logits. "
            "Build the network with a plain nn.Conv2d classifier, or replace this layer by a nn.Conv2d computing the "
            "same map and check the result with incseg.models.check_equivalent"
        )
    if conv._forward_hooks or conv._forward_pre_hooks:
        raise ValueError(
            "the classifier convolution has forward hooks (torch.nn.utils.weight_norm and spectral_norm work so): "
            "they change its output, an IncrementalClassifier would not run them. Remove them first (e.g. "
            "torch.nn.utils.remove_weight_norm) or use torch.nn.utils.parametrize, whose weight is copied as computed"
        )
    k, stride, dilation = conv.kernel_size, conv.stride, conv.dilation
    padding = _same_padding(conv)
    problems = []
    if k[0] != k[1]:
        problems.append(f"its kernel {k[0]}x{k[1]} is not square")
    elif k[0] % 2 == 0:
        problems.append(f"its kernel size {k[0]} is even (no symmetric padding keeps the size)")
    if stride != (1, 1):
        problems.append(f"its stride {stride} changes the resolution")
    if dilation != (1, 1):
        problems.append(f"it is dilated ({dilation})")
    if conv.groups != 1:
        problems.append(f"it is grouped (groups={conv.groups})")
    if k[0] == k[1] and k[0] % 2 == 1 and dilation == (1, 1) and padding != (k[0] // 2, k[1] // 2):
        problems.append(
            f"its padding {padding} does not keep the size of a {k[0]}x{k[1]} kernel (the heads pad {k[0] // 2})"
        )
    if conv.padding_mode != "zeros" and any(padding):
        problems.append(f"it pads with padding_mode={conv.padding_mode!r} (the heads pad with zeros)")
    if problems:
        raise ValueError(
            "the classifier convolution must be a k x k convolution (odd k) with stride 1, no dilation, one group and "
            f"size-keeping zero padding k // 2, as IncrementalClassifier heads are, but {'; '.join(problems)}: {conv}. "
            "Adapt a network that ends with such a convolution (its other layers belong to the refiner)"
        )


def classifier_from_conv(
    conv: nn.Module, *, upsampling: float = 1, align_corners: bool = False
) -> IncrementalClassifier:
    """Convert a classifier convolution into a one-step :class:`IncrementalClassifier` with its weights.

    ``conv`` is a ``nn.Conv2d`` with an odd ``k x k`` kernel and size-keeping zero padding (``k // 2`` or
    ``"same"``; any ``padding_mode`` for a 1x1 kernel, which pads nothing), stride 1, no dilation, one group
    (1x1 heads, the 3x3 heads of segmentation_models_pytorch); or an ``nn.Sequential`` of such a convolution
    followed by a bilinear ``nn.Upsample`` by a scale factor and activation-free identity layers (smp's
    ``SegmentationHead`` built with ``activation=None``). The upsampling becomes the classifier's
    ``upsampling``/``align_corners``, so the logits equal the head's. The new classifier has fresh parameters
    (copies, on the device and dtype of ``conv``); a convolution without bias gets a zero bias.

    Nothing that would change the logits is accepted: a ``nn.Conv2d`` subclass with its own ``forward`` (timm's
    ``StdConv2d``), a convolution with forward hooks, another padding, or a layer after the convolution that the
    classifier cannot reproduce are refused with the reason.

    Args:
        conv: the classifier convolution or head.
        upsampling: scale factor of a bilinear upsampling that follows the convolution outside ``conv``.
        align_corners: ``align_corners`` of that upsampling.

    Returns:
        ``IncrementalClassifier(conv.in_channels, [conv.out_channels], kernel_size=k, ...)`` computing the
        same logits.

    Raises:
        TypeError: ``conv`` is neither a ``nn.Conv2d`` nor such a head (an :class:`IncrementalClassifier` is
            returned as is), or is a ``nn.Conv2d`` subclass with its own ``forward``.
        ValueError: the convolution is strided, dilated, grouped, has an even or non-square kernel, another
            padding or padding mode, or forward hooks; or the head upsamples otherwise than bilinearly by one
            scale factor, upsamples twice, or holds an activation or another layer after the convolution.

    Example:
        >>> import torch
        >>> conv = torch.nn.Conv2d(8, 3, 1)
        >>> clf = classifier_from_conv(conv)
        >>> x = torch.randn(1, 8, 4, 4)
        >>> torch.equal(clf(x), conv(x))
        True
        >>> from torch import nn
        >>> head = nn.Sequential(nn.Conv2d(8, 3, 3, padding="same"), nn.UpsamplingBilinear2d(scale_factor=4))
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
            if _passthrough(layer):
                continue
            found = _upsampling_of(layer)
            if found is not None:
                if upsampling != 1:
                    raise ValueError(
                        f"the classifier head upsamples its logits twice (by {upsampling} and with {layer}); an "
                        f"IncrementalClassifier upsamples once: {_RESIZE_OUTSIDE}"
                    )
                upsampling, align_corners = found
            elif _is_activation(layer):
                raise ValueError(
                    f"the classifier head ends with an activation ({layer}); incseg needs logits: build the network "
                    "without a final activation (e.g. smp's activation=None) or pass the convolution itself"
                )
            else:
                raise ValueError(
                    f"the classifier head has {layer} after its convolution; an IncrementalClassifier is the "
                    "convolution, optionally followed by one bilinear nn.Upsample by a scale factor: pass the "
                    "convolution itself and keep the rest out of the classifier"
                )
        conv = conv[0]
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(
            "the classifier must be an IncrementalClassifier, a nn.Conv2d or a nn.Sequential(conv, upsampling), got "
            f"{type(conv).__name__}; wrap anything else (e.g. dropout + conv) so that the refiner ends before "
            "the final convolution"
        )
    _check_plain_conv(conv)
    k = conv.kernel_size
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


def _warn(message: str) -> None:
    """A ``UserWarning`` attributed to the first caller outside ``incseg.models`` (the user's line)."""
    here = os.path.dirname(os.path.abspath(__file__))
    level = 1
    frame: FrameType | None = sys._getframe(0)
    while frame is not None and os.path.dirname(os.path.abspath(frame.f_code.co_filename)) == here:
        frame, level = frame.f_back, level + 1
    warnings.warn(message, UserWarning, stacklevel=level)


def _shallow_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` sharing its children, parameters and buffers, with its own registries and hooks.

    Replacing a child of the copy (``copy._modules[name] = ...``) leaves ``module`` untouched.
    """
    clone = copy.copy(module)
    for key, value in vars(module).items():
        if isinstance(value, (dict, set)):  # _modules, _parameters, _buffers, hook dicts, ...
            clone.__dict__[key] = copy.copy(value)
    return clone


def _with_child(module: nn.Module, name: str, child: nn.Module | None) -> nn.Module:
    """A shallow copy of ``module`` whose (dotted) child ``name`` is ``child``; ``module`` is left intact."""
    first, _, rest = name.partition(".")
    if first not in module._modules:
        children = [n for n, _ in module.named_children()]
        raise ValueError(f"{type(module).__name__} has no child {first!r}; its children are {children}")
    clone = _shallow_copy(module)
    if rest:
        inner = module._modules[first]
        assert inner is not None
        child = _with_child(inner, rest, child)
    clone._modules[first] = child
    return clone


def without_last_child(module: nn.Module, name: str | None = None) -> nn.Module:
    """This module without its last child: a shallow copy whose last child (or child ``name``) is an identity.

    The copy shares every other child (and so their parameters) with ``module``, which is not modified: it keeps
    computing its own output, the copy stops before the removed child. Use it to cut a head before its
    classifier convolution when the head's ``forward`` calls that child last and returns its output (the
    refiner of hand-written glue; check the result with :func:`~incseg.models.check_equivalent`).

    Args:
        module: the module, e.g. a decoder head whose last child is the classifier.
        name: the child to remove, a dotted path allowed (``"head.classifier"``); default: the last registered
            child. An ``nn.Sequential`` child by its index (``"4"``).

    Returns:
        The shallow copy, with ``nn.Identity()`` in place of the child.

    Raises:
        ValueError: ``module`` has no children, or no child ``name``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> class Head(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.conv, self.classifier = nn.Conv2d(8, 4, 3, padding=1), nn.Conv2d(4, 2, 1)
        ...     def forward(self, x):
        ...         return self.classifier(self.conv(x).relu())
        >>> head = Head()
        >>> features = without_last_child(head)
        >>> features(torch.randn(1, 8, 5, 5)).shape, features.conv is head.conv, type(head.classifier).__name__
        (torch.Size([1, 4, 5, 5]), True, 'Conv2d')
    """
    if name is None:
        names = list(module._modules)
        if not names:
            raise ValueError(f"{type(module).__name__} has no child to remove")
        name = names[-1]
    return _with_child(module, name, nn.Identity())


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
        _warn(f"{caller}: the auxiliary classifier (model.aux_classifier) is dropped")
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
