"""One-call adaptation of common segmentation networks into an :class:`IncrementalSegmenter`.

Recognised: torchvision's DeepLabV3, FCN and LRASPP; every segmentation_models_pytorch model (encoder,
decoder, ``segmentation_head``); transformers' SegFormer, UperNet and DPT, and every other transformers
``*ForSemanticSegmentation`` whose head ends in a classifier convolution (BEiT, Data2VecVision, MobileViT,
MobileViTV2, MobileNetV2, ...). segmentation_models_pytorch and transformers are optional: they are never
imported here, models are recognised by their class.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.segmentation import FCN, LRASPP, DeepLabV3

from incseg._wrappers import unwrap_module
from incseg.models.adapters import (
    _first_conv,
    _from_torchvision_simple,
    _warn,
    _with_child,
    classifier_from_conv,
    without_last_child,
)
from incseg.models.check import _evaluating, check_equivalent
from incseg.models.segmenter import CafLevels, IncrementalSegmenter

__all__ = ["adapt"]

_RECIPE = (
    "For another network use incseg.models.from_named_submodules(model, encoder=<name>, refiner=<name>, "
    "classifier=<name>, z_channels=..., h_channels=...): the encoder maps images to z (a tensor, or a list/dict of "
    "feature maps with z_channels a list/dict), the refiner maps z to the features h before the last convolution, "
    "and the classifier is that convolution (any k x k with padding k // 2, optionally followed by a bilinear "
    "upsampling). Wrap parts in small nn.Modules when the network's forward does more, cut a head before its "
    "classifier with incseg.models.without_last_child, and check the result with incseg.models.check_equivalent "
    "(see the how-to 'Your network' in the documentation)."
)


def adapt(model: nn.Module, *, caf_levels: CafLevels = None, check: Tensor | None = None) -> IncrementalSegmenter:
    """Turn a segmentation network into an :class:`IncrementalSegmenter` in one call.

    ==========================================  =============================================  ===========
    network                                     encoder output (what CAF sees by default)      classifier
    ==========================================  =============================================  ===========
    torchvision ``DeepLabV3``, ``FCN``          backbone ``"out"``, one tensor                 1x1
    torchvision ``LRASPP``                      ``{"low", "high"}`` (``"high"``)               1x1
    segmentation_models_pytorch, all 12 (1)     the encoder's list, fine to coarse (deepest)   1x1 or 3x3
    transformers SegFormer                      the 4 hidden states (deepest)                  1x1
    transformers UperNet                        the backbone's feature maps (deepest)          1x1
    transformers DPT                            the 4 reassembled token maps (coarsest)        1x1, x2
    other transformers ``*ForSemantic...`` (2)  what the head receives (its last map)          1x1
    ==========================================  =============================================  ===========

    LRASPP's two classifiers (on the low-level features and on the upsampled high-level branch) become one
    1x1 convolution on their concatenation, which is the refined ``h``. (1) segmentation_models_pytorch 0.6:
    Unet, UnetPlusPlus, FPN, PSPNet, Linknet, PAN, MAnet, DeepLabV3, DeepLabV3Plus, UPerNet, Segformer and DPT
    (whose prefix tokens ride along as an extra level without channels). (2) The general transformers path
    (tested: BEiT and Data2VecVision, the 4 maps of their FPN neck; MobileViT and MobileViTV2, the 5 encoder
    stages; MobileNetV2, one map): the encoder is the model run up to its head (``decode_head``,
    ``segmentation_head`` or ``head``), the refiner the head without its classifier (the child named
    ``classifier``, else its last child, a convolution possibly wrapped without normalisation or activation).
    Since that split is inferred, it is always checked: on ``check``, else on a random image of the config's
    ``image_size``, the adapted logits must equal the network's (:func:`~incseg.models.check_equivalent`).

    The encoder and refiner modules are *shared* with ``model`` (not copied; ``model`` itself is not
    modified); the classifier has new parameters copied from the network's last convolution, with the
    network's own upsampling of the logits (scale factor, ``align_corners``). In evaluation mode the adapted
    network's logits equal the original's (after upsampling to the input size where the original does).
    Auxiliary heads (torchvision ``aux_classifier``, smp ``classification_head``, transformers
    ``auxiliary_head``) are dropped with a warning. A network wrapped by ``torch.compile``, ``DataParallel`` or
    ``DistributedDataParallel`` is unwrapped first: the result is the plain adapted network (compile or wrap
    it again, or the learner's module, as you train).

    Args:
        model: the network (``deepcopy`` it first to keep an independent original).
        caf_levels: for multi-scale encoders, the levels CAF and the attentive distillation see: ``None``
            (the deepest), an index or key, a list of them, or ``"all"`` (for smp every level but the input
            image at index 0). See :class:`IncrementalSegmenter`.
        check: an example input batch ``(B, C, H, W)``: the adapted network's logits are compared with the
            network's on it (:func:`~incseg.models.check_equivalent`, which raises with the largest
            difference).

    Returns:
        The :class:`IncrementalSegmenter`, ready for :class:`~incseg.learner.IncrementalLearner`.

    Raises:
        TypeError: the network is not one of the recognised families (the message gives the recipe with
            :func:`~incseg.models.from_named_submodules`).
        ValueError: the network has a final activation or a head of another shape; ``caf_levels`` names no
            level of the encoder or is given for a single-tensor encoder; the logits differ on ``check``
            (or, for the general transformers path, on its probe image).

    Example:
        >>> import torch
        >>> from torchvision.models.segmentation import lraspp_mobilenet_v3_large
        >>> tv = lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=5).eval()
        >>> x = torch.randn(1, 3, 64, 64)
        >>> model = adapt(tv, check=x).eval()
        >>> logits = torch.nn.functional.interpolate(model(x), size=(64, 64), mode="bilinear")
        >>> torch.allclose(logits, tv(x)["out"], atol=1e-5), model.caf_levels
        (True, ('high',))
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    model = unwrap_module(model)
    if isinstance(model, IncrementalSegmenter):
        if caf_levels is not None:
            raise ValueError("model is already an IncrementalSegmenter: build it with the caf_levels you need")
        return model
    adapted = _adapt(model, caf_levels, check)
    if check is not None:
        check_equivalent(adapted, model, check)
    return adapted


def _adapt(model: nn.Module, caf_levels: CafLevels, check: Tensor | None) -> IncrementalSegmenter:
    module = type(model).__module__
    name = type(model).__name__
    if isinstance(model, (DeepLabV3, FCN)):
        _no_levels(caf_levels, name)
        return _from_torchvision_simple(model, "adapt")
    if isinstance(model, LRASPP):
        return _from_lraspp(model, caf_levels)
    if module.startswith("segmentation_models_pytorch."):
        return _from_smp(model, caf_levels)
    if module.startswith("transformers."):
        if name == "SegformerForSemanticSegmentation":
            return _from_hf_segformer(model, caf_levels)
        if name == "UperNetForSemanticSegmentation":
            return _from_hf_upernet(model, caf_levels)
        if name == "DPTForSemanticSegmentation":
            return _from_hf_dpt(model, caf_levels, check)
        if name.endswith("ForSemanticSegmentation"):
            return _from_hf_head(model, caf_levels, check)
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
        _warn(f"adapt: the classification head of the {name} (aux_params) is dropped")
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
        without_last_child(head, "classifier"),
        classifier,
        z_channels=list(config.hidden_sizes),
        h_channels=classifier.in_channels,
        in_channels=config.num_channels,
        caf_levels=caf_levels,
    )


def _from_hf_upernet(model: Any, caf_levels: CafLevels) -> IncrementalSegmenter:
    if getattr(model, "auxiliary_head", None) is not None:
        _warn("adapt: the auxiliary head of the UperNetForSemanticSegmentation is dropped")
    head = model.decode_head
    classifier = classifier_from_conv(head.classifier)
    channels = list(model.backbone.channels)
    return IncrementalSegmenter(
        _HiddenStates(model.backbone, "feature_maps"),
        without_last_child(head, "classifier"),
        classifier,
        z_channels=channels,
        h_channels=classifier.in_channels,
        in_channels=_in_channels(model.backbone),
        caf_levels=caf_levels,
    )


# The general transformers path: the model run up to its head is the encoder, the head without its classifier
# the refiner. Heads and auxiliary heads are looked up under these names.
_HF_HEADS = ("decode_head", "segmentation_head", "head")
_HF_AUXILIARY = ("auxiliary_head",)


class _HeadInput(nn.Module):
    """A transformers segmentation model run up to its head: returns what the head would receive.

    ``model`` is a shallow copy of the user's network (sharing its modules) whose head is an ``nn.Identity``,
    so the network's own ``forward`` (token reshaping, FPN necks, hidden-state selection) computes the
    encoder's output and returns it in place of the logits.
    """

    def __init__(self, model: nn.Module, head: str) -> None:
        super().__init__()
        self.model = model
        self.head = head

    def forward(self, x: Tensor) -> Any:
        out = self.model(x)
        return out[0] if isinstance(out, tuple) else out.logits

    def extra_repr(self) -> str:
        return f"up to {self.head!r}"


def _wrapped_conv(module: nn.Module) -> nn.Conv2d | None:
    """The convolution of a parameter-free wrapper holding only one (transformers' ``*ConvLayer`` built without
    normalisation and activation), else ``None``. Its ``forward`` is trusted only because the split is checked."""
    children = list(module.children())
    if (
        len(children) == 1
        and isinstance(children[0], nn.Conv2d)
        and not any(True for _ in module.parameters(recurse=False))
        and not any(True for _ in module.buffers(recurse=False))
    ):
        return children[0]
    return None


def _classifier_part(module: nn.Module) -> nn.Module:
    """``module`` with a wrapped classifier convolution unwrapped (alone or first in an ``nn.Sequential``)."""
    if isinstance(module, nn.Sequential) and len(module) > 0:
        inner = _wrapped_conv(module[0])
        return module if inner is None else nn.Sequential(inner, *list(module)[1:])
    return _wrapped_conv(module) or module


def _is_conv(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) or _wrapped_conv(module) is not None


def _split_head(head: nn.Module, where: str) -> tuple[nn.Module, nn.Module]:
    """``(head without its classifier, the classifier)``: the classifier is the child named ``classifier``, else
    the last child; in an ``nn.Sequential`` the last convolution and what follows it (an upsampling)."""
    if isinstance(head, nn.Sequential):
        convs = [i for i, layer in enumerate(head) if _is_conv(layer)]
        if not convs:
            raise TypeError(f"{where} holds no convolution to be the classifier. {_RECIPE}")
        i = convs[-1]
        return head[:i], head[i] if i == len(head) - 1 else head[i:]
    names = list(head._modules)
    name = "classifier" if "classifier" in names else names[-1] if names else None
    child = None if name is None else head._modules[name]
    if name is None or child is None:
        raise TypeError(f"{where} ({type(head).__name__}) has no classifier child. {_RECIPE}")
    if isinstance(child, nn.Sequential):  # e.g. DPT's head: (conv, bn, relu, dropout, classifier, upsample)
        refiner, classifier = _split_head(child, f"{where}.{name}")
        return _with_child(head, name, refiner), classifier
    return without_last_child(head, name), child


def _channels(z: Any) -> Any:
    """``z_channels`` of an encoder output: an int, or a list/dict with ``None`` for entries that are no maps."""

    def one(t: Any) -> int | None:
        return int(t.shape[1]) if isinstance(t, Tensor) and t.ndim == 4 else None

    if isinstance(z, Tensor):
        return one(z)
    if isinstance(z, dict):
        return {k: one(v) for k, v in z.items()}
    if isinstance(z, (list, tuple)):
        return [one(v) for v in z]
    raise TypeError(f"the head receives a {type(z).__name__}, not feature maps. {_RECIPE}")


def _probe_image(model: nn.Module) -> Tensor:
    """A random image of the size and channels of a transformers model's config (a fixed seed)."""
    config = getattr(model, "config", None)
    size = getattr(config, "image_size", 224)
    height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    channels = int(getattr(config, "num_channels", 3))
    image = torch.randn(1, channels, height, width, generator=torch.Generator().manual_seed(0))
    weight = next(iter(model.parameters()), None)
    return image if weight is None else image.to(device=weight.device, dtype=weight.dtype)


def _from_hf_head(
    model: Any,
    caf_levels: CafLevels,
    check: Tensor | None,
    *,
    neck: tuple[str, nn.Module, nn.Module] | None = None,
) -> IncrementalSegmenter:
    """The general transformers path; ``neck``: ``(child, encoder part, refiner part)`` splitting a neck too."""
    name = type(model).__name__
    head_name = next((n for n in _HF_HEADS if isinstance(model._modules.get(n), nn.Module)), None)
    if head_name is None:
        raise TypeError(f"{name} has none of the heads {list(_HF_HEADS)} that adapt looks for. {_RECIPE}")
    refiner, classifier_module = _split_head(model._modules[head_name], f"{name}.{head_name}")
    classifier = classifier_from_conv(_classifier_part(classifier_module))
    encoder_model = _with_child(model, head_name, nn.Identity())
    dropped = [n for n in _HF_AUXILIARY if model._modules.get(n) is not None]
    for aux in dropped:
        encoder_model._modules[aux] = None
    if dropped:
        _warn(f"adapt: the auxiliary head of the {name} ({', '.join(dropped)}) is dropped")
    if neck is not None:
        encoder_model._modules[neck[0]] = neck[1]
        refiner = nn.Sequential(neck[2], refiner)
    encoder = _HeadInput(encoder_model, head_name)
    example = _probe_image(model) if check is None else check
    try:
        with _evaluating(encoder), torch.no_grad():
            z_channels = _channels(encoder(example))
    except (TypeError, ValueError, RuntimeError, AttributeError, IndexError) as err:
        raise TypeError(f"adapt could not run {name} up to its {head_name}: {err}. {_RECIPE}") from err
    adapted = IncrementalSegmenter(
        encoder,
        refiner,
        classifier,
        z_channels=z_channels,
        h_channels=classifier.in_channels,
        in_channels=getattr(model.config, "num_channels", None),
        caf_levels=caf_levels,
    )
    if check is None:  # adapt() checks on `check` itself
        try:
            check_equivalent(adapted, model, example)
        except ValueError as err:
            raise ValueError(f"adapt's split of {name} does not reproduce its logits: {err}. {_RECIPE}") from err
    return adapted


class _DPTReassemble(nn.Module):
    """DPT's neck up to its reassembled feature maps, fine to coarse (the encoder's ``z``)."""

    def __init__(self, reassemble_stage: nn.Module | None) -> None:
        super().__init__()
        self.reassemble_stage = reassemble_stage

    def forward(
        self, hidden_states: list[Tensor], patch_height: int | None = None, patch_width: int | None = None
    ) -> list[Tensor]:
        if self.reassemble_stage is None:  # hierarchical backbones give feature maps already
            return list(hidden_states)
        out: list[Tensor] = self.reassemble_stage(hidden_states, patch_height, patch_width)
        return out


class _DPTFusion(nn.Module):
    """DPT's neck after the reassembly: a 3x3 convolution per level, then the fusion stage."""

    def __init__(self, convs: nn.ModuleList, fusion_stage: nn.Module) -> None:
        super().__init__()
        self.convs = convs
        self.fusion_stage = fusion_stage

    def forward(self, features: Sequence[Tensor]) -> Any:
        return self.fusion_stage([conv(f) for conv, f in zip(self.convs, features)])


def _from_hf_dpt(model: Any, caf_levels: CafLevels, check: Tensor | None) -> IncrementalSegmenter:
    """DPT: the ViT and the neck's reassembly are the encoder (4 maps; the coarsest by default, cheap for CAF),
    the neck's fusion and the head the refiner. The fused maps the head receives are at up to half the input
    resolution, too fine for CAF."""
    neck = model.neck
    return _from_hf_head(
        model,
        caf_levels,
        check,
        neck=("neck", _DPTReassemble(neck.reassemble_stage), _DPTFusion(neck.convs, neck.fusion_stage)),
    )
