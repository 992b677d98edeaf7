"""One-call adaptation of common segmentation networks into an :class:`IncrementalSegmenter`.

Recognised: torchvision's DeepLabV3, FCN and LRASPP; every segmentation_models_pytorch model (encoder,
decoder, ``segmentation_head``); transformers' ``SegformerForSemanticSegmentation`` and
``UperNetForSemanticSegmentation``. segmentation_models_pytorch and transformers are optional: they are never
imported here, models are recognised by their class.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.segmentation import FCN, LRASPP, DeepLabV3

from incseg.models.adapters import _first_conv, _from_torchvision_simple, classifier_from_conv
from incseg.models.segmenter import CafLevels, IncrementalSegmenter

__all__ = ["adapt"]

_RECIPE = (
    "For another network use incseg.models.from_named_submodules(model, encoder=<name>, refiner=<name>, "
    "classifier=<name>, z_channels=..., h_channels=...): the encoder maps images to z (a tensor, or a list/dict of "
    "feature maps with z_channels a list/dict), the refiner maps z to the features h before the last convolution, "
    "and the classifier is that convolution (any k x k with padding k // 2, optionally followed by a bilinear "
    "upsampling). Wrap parts in small nn.Modules when the network's forward does more (see the how-to "
    "'Your network' in the documentation)."
)


def adapt(model: nn.Module, *, caf_levels: CafLevels = None) -> IncrementalSegmenter:
    """Turn a segmentation network into an :class:`IncrementalSegmenter` in one call.

    ==========================================  =============================================  ===========
    network                                     encoder output (what CAF sees by default)      classifier
    ==========================================  =============================================  ===========
    torchvision ``DeepLabV3``, ``FCN``          backbone ``"out"``, one tensor                 1x1
    torchvision ``LRASPP``                      ``{"low", "high"}`` (``"high"``)               1x1
    segmentation_models_pytorch, all 12 (1)     the encoder's list, fine to coarse (deepest)   1x1 or 3x3
    transformers SegFormer                      the 4 hidden states (deepest)                  1x1
    transformers UperNet                        the backbone's feature maps (deepest)          1x1
    ==========================================  =============================================  ===========

    LRASPP's two classifiers (on the low-level features and on the upsampled high-level branch) become one
    1x1 convolution on their concatenation, which is the refined ``h``. (1) segmentation_models_pytorch 0.6:
    Unet, UnetPlusPlus, FPN, PSPNet, Linknet, PAN, MAnet, DeepLabV3, DeepLabV3Plus, UPerNet, Segformer and DPT
    (whose prefix tokens ride along as an extra level without channels).

    The encoder and refiner modules are *shared* with ``model`` (not copied; ``model`` itself is not
    modified); the classifier has new parameters copied from the network's last convolution, with the
    network's own upsampling of the logits (scale factor, ``align_corners``). In evaluation mode the adapted
    network's logits equal the original's (after upsampling to the input size where the original does).
    Auxiliary heads (torchvision ``aux_classifier``, smp ``classification_head``, UperNet ``auxiliary_head``)
    are dropped with a warning.

    Args:
        model: the network (``deepcopy`` it first to keep an independent original).
        caf_levels: for multi-scale encoders, the levels CAF and the attentive distillation see: ``None``
            (the deepest), an index or key, a list of them, or ``"all"`` (for smp every level but the input
            image at index 0). See :class:`IncrementalSegmenter`.

    Returns:
        The :class:`IncrementalSegmenter`, ready for :class:`~incseg.learner.IncrementalLearner`.

    Raises:
        TypeError: the network is not one of the recognised families (the message gives the recipe with
            :func:`~incseg.models.from_named_submodules`).
        ValueError: the network has a final activation or a head of another shape; ``caf_levels`` names no
            level of the encoder or is given for a single-tensor encoder.

    Example:
        >>> import torch
        >>> from torchvision.models.segmentation import lraspp_mobilenet_v3_large
        >>> tv = lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=5).eval()
        >>> model = adapt(tv).eval()
        >>> x = torch.randn(1, 3, 64, 64)
        >>> logits = torch.nn.functional.interpolate(model(x), size=(64, 64), mode="bilinear")
        >>> torch.allclose(logits, tv(x)["out"], atol=1e-5), model.caf_levels
        (True, ('high',))
    """
    if isinstance(model, IncrementalSegmenter):
        if caf_levels is not None:
            raise ValueError("model is already an IncrementalSegmenter: build it with the caf_levels you need")
        return model
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    module = type(model).__module__
    name = type(model).__name__
    if isinstance(model, (DeepLabV3, FCN)):
        _no_levels(caf_levels, name)
        return _from_torchvision_simple(model, "adapt")
    if isinstance(model, LRASPP):
        return _from_lraspp(model, caf_levels)
    if module.startswith("segmentation_models_pytorch."):
        return _from_smp(model, caf_levels)
    if module.startswith("transformers.") and name == "SegformerForSemanticSegmentation":
        return _from_hf_segformer(model, caf_levels)
    if module.startswith("transformers.") and name == "UperNetForSemanticSegmentation":
        return _from_hf_upernet(model, caf_levels)
    raise TypeError(f"incseg.models.adapt does not recognise {module}.{type(model).__qualname__}. {_RECIPE}")


def _no_levels(caf_levels: CafLevels, name: str) -> None:
    if caf_levels is not None:
        raise ValueError(
            f"caf_levels={caf_levels!r} needs a multi-scale encoder, but the adapted {name} feeds one feature map "
            "(the backbone's 'out') to its head"
        )


def _in_channels(encoder: nn.Module) -> int | None:
    stem = _first_conv(encoder)
    return None if stem is None else stem.in_channels


def _without_child(module: nn.Module, name: str) -> nn.Module:
    """A shallow copy of ``module`` (children and parameters shared) whose child ``name`` is an ``nn.Identity``.

    The original module is left intact: it keeps computing the logits, the copy stops before its classifier.
    """
    clone = copy.copy(module)
    clone._modules = dict(module._modules)
    clone._parameters = dict(module._parameters)
    clone._buffers = dict(module._buffers)
    clone._modules[name] = nn.Identity()
    return clone


# ---------------------------------------------------------------------------------------------- torchvision
class _LRASPPRefiner(nn.Module):
    """LRASPP's head up to its classifiers: ``cat(low, upsample(cbr(high) * scale(high)))``."""

    def __init__(self, cbr: nn.Module, scale: nn.Module) -> None:
        super().__init__()
        self.cbr = cbr
        self.scale = scale

    def forward(self, features: dict[str, Tensor]) -> Tensor:
        low, high = features["low"], features["high"]
        x = self.cbr(high) * self.scale(high)
        x = F.interpolate(x, size=low.shape[-2:], mode="bilinear", align_corners=False)
        return torch.cat([low, x], dim=1)


def _from_lraspp(model: LRASPP, caf_levels: CafLevels) -> IncrementalSegmenter:
    head = model.classifier
    low_conv, high_conv = head.low_classifier, head.high_classifier
    low_ch, inter_ch, high_ch = low_conv.in_channels, high_conv.in_channels, head.cbr[0].in_channels
    joint = nn.Conv2d(low_ch + inter_ch, low_conv.out_channels, 1).to(low_conv.weight)
    assert joint.bias is not None and low_conv.bias is not None and high_conv.bias is not None
    with torch.no_grad():  # low(l) + high(x) == one 1x1 conv on cat(l, x)
        joint.weight.copy_(torch.cat([low_conv.weight, high_conv.weight], dim=1))
        joint.bias.copy_(low_conv.bias + high_conv.bias)
    return IncrementalSegmenter(
        model.backbone,
        _LRASPPRefiner(head.cbr, head.scale),
        classifier_from_conv(joint),
        z_channels={"low": low_ch, "high": high_ch},
        h_channels=low_ch + inter_ch,
        in_channels=_in_channels(model.backbone),
        caf_levels=caf_levels,
    )


# ---------------------------------------------------------------------------- segmentation_models_pytorch
class _DPTEncoder(nn.Module):
    """smp's DPT encoder returns ``(features, prefix_tokens)``: one list, the tokens as its last entry."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, x: Tensor) -> list[Any]:
        features, prefix_tokens = self.encoder(x)
        return [*features, prefix_tokens]


class _DPTDecoder(nn.Module):
    def __init__(self, decoder: nn.Module) -> None:
        super().__init__()
        self.decoder = decoder

    def forward(self, features: Sequence[Any]) -> Tensor:
        out: Tensor = self.decoder(list(features[:-1]), features[-1])
        return out


def _smp_levels(caf_levels: CafLevels, channels: Sequence[int | None], first: int) -> CafLevels:
    if caf_levels == "all":  # CNN encoders: level 0 is the input image itself, not a feature map
        return [i for i, c in enumerate(channels) if i >= first and c]
    return caf_levels


def _check_activation(activation: nn.Module, name: str) -> None:
    if not _is_identity(activation):
        raise ValueError(
            f"the {name} ends with an activation ({activation}); incseg needs logits: build the model with "
            "activation=None"
        )


def _is_identity(module: nn.Module) -> bool:
    return all(isinstance(m, nn.Identity) for m in module.modules() if not list(m.children()))


def _from_smp(model: Any, caf_levels: CafLevels) -> IncrementalSegmenter:
    name = type(model).__name__
    parts = [getattr(model, part, None) for part in ("encoder", "decoder", "segmentation_head")]
    if not all(isinstance(p, nn.Module) for p in parts):
        raise TypeError(
            f"{name} from segmentation_models_pytorch has no encoder/decoder/segmentation_head modules. {_RECIPE}"
        )
    encoder, decoder, head = parts
    assert encoder is not None and decoder is not None and head is not None
    if getattr(model, "classification_head", None) is not None:
        warnings.warn(
            f"adapt: the classification head of the {name} (aux_params) is dropped", UserWarning, stacklevel=3
        )
    channels: list[int | None] = list(encoder.out_channels)
    in_channels = _in_channels(encoder)
    refiner: nn.Module
    first = 0 if name == "DPT" else 1
    if name == "DPT":
        channels.append(None)  # the prefix tokens (or None) are not a feature map
        encoder, refiner = _DPTEncoder(encoder), _DPTDecoder(decoder)
        _check_activation(head.activation, "segmentation head")
        convs = list(head.head)
        refiner = nn.Sequential(refiner, *convs[:-1])
        classifier = classifier_from_conv(convs[-1], upsampling=head.upsampling_factor, align_corners=True)
    else:
        refiner = decoder
        classifier = classifier_from_conv(head)
    return IncrementalSegmenter(
        encoder,
        refiner,
        classifier,
        z_channels=channels,
        h_channels=classifier.in_channels,
        in_channels=in_channels,
        caf_levels=_smp_levels(caf_levels, channels, first),
    )


# ------------------------------------------------------------------------------------------- transformers
class _HiddenStates(nn.Module):
    """A transformers encoder as a module returning the tuple of its feature maps."""

    def __init__(self, model: nn.Module, attribute: str) -> None:
        super().__init__()
        self.model = model
        self.attribute = attribute

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        if self.attribute == "hidden_states":
            out = self.model(x, output_hidden_states=True, return_dict=True)
        else:
            out = self.model(x, return_dict=True)
        return tuple(getattr(out, self.attribute))

    def extra_repr(self) -> str:
        return f"output={self.attribute!r}"


def _from_hf_segformer(model: Any, caf_levels: CafLevels) -> IncrementalSegmenter:
    config = model.config
    if not getattr(config, "reshape_last_stage", True):
        raise ValueError("adapt needs a SegformerConfig with reshape_last_stage=True (feature maps at every stage)")
    head = model.decode_head
    classifier = classifier_from_conv(head.classifier)
    return IncrementalSegmenter(
        _HiddenStates(model.segformer, "hidden_states"),
        _without_child(head, "classifier"),
        classifier,
        z_channels=list(config.hidden_sizes),
        h_channels=classifier.in_channels,
        in_channels=config.num_channels,
        caf_levels=caf_levels,
    )


def _from_hf_upernet(model: Any, caf_levels: CafLevels) -> IncrementalSegmenter:
    if getattr(model, "auxiliary_head", None) is not None:
        warnings.warn(
            "adapt: the auxiliary head of the UperNetForSemanticSegmentation is dropped", UserWarning, stacklevel=3
        )
    head = model.decode_head
    classifier = classifier_from_conv(head.classifier)
    channels = list(model.backbone.channels)
    return IncrementalSegmenter(
        _HiddenStates(model.backbone, "feature_maps"),
        _without_child(head, "classifier"),
        classifier,
        z_channels=channels,
        h_channels=classifier.in_channels,
        in_channels=_in_channels(model.backbone),
        caf_levels=caf_levels,
    )
