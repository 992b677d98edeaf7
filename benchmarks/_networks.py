"""Networks of the robustness benchmark: the library's own and networks written as a user would, adapted."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import Tensor, nn

from incseg.models import (
    IncrementalSegmenter,
    adapt,
    from_named_submodules,
    from_torchvision_deeplabv3,
    small_segmenter,
)

__all__ = ["NETWORKS", "build_network"]


def _small(num_classes: int) -> IncrementalSegmenter:
    return small_segmenter(num_classes)


class _Outsider(nn.Module):
    """An 8-layer conv network a user might write: GroupNorm, no BatchNorm, no residuals, plain 3x3 head."""

    def __init__(self, num_classes: int, width: int = 32) -> None:
        super().__init__()

        def block(i: int, o: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(i, o, 3, stride=stride, padding=dilation, dilation=dilation),
                nn.GroupNorm(8, o),
                nn.ReLU(inplace=True),
            )

        self.encoder = nn.Sequential(
            block(3, width, 2), block(width, width), block(width, 2 * width, 2), block(2 * width, 2 * width),
            block(2 * width, 4 * width, 2), block(4 * width, 4 * width, dilation=2),
        )  # fmt: skip
        self.refiner = nn.Sequential(block(4 * width, 2 * width, dilation=2), nn.Dropout2d(0.1))
        self.classifier = nn.Conv2d(2 * width, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.refiner(self.encoder(x)))  # type: ignore[no-any-return]


def _outsider(num_classes: int) -> IncrementalSegmenter:
    return from_named_submodules(_Outsider(num_classes), z_channels=128, h_channels=64, in_channels=3)


class _Plain(nn.Module):
    """A plain single-scale conv network: 6 conv-BN-ReLU encoder blocks to 128 channels at output stride 8, a
    2-block refiner and a 1x1 classifier, no skip connections (the network of issues 20 and 26)."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()

        def block(i: int, o: int, stride: int = 1) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(i, o, 3, stride, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True))

        self.encoder = nn.Sequential(
            block(3, 32, 2), block(32, 32), block(32, 64, 2), block(64, 64), block(64, 128, 2), block(128, 128)
        )
        self.refiner = nn.Sequential(block(128, 128), block(128, 128))
        self.classifier = nn.Conv2d(128, num_classes, 1)


def _plain(num_classes: int) -> IncrementalSegmenter:
    return from_named_submodules(_Plain(num_classes), z_channels=128, h_channels=128, in_channels=3)


def _mobilenet(num_classes: int) -> IncrementalSegmenter:
    from torchvision.models.segmentation import deeplabv3_mobilenet_v3_large

    net = deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=False)
    return from_torchvision_deeplabv3(net)


class _FCNEncoder(nn.Module):
    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)["out"]  # type: ignore[no-any-return]


def _fcn_resnet50(num_classes: int) -> IncrementalSegmenter:
    from torchvision.models.segmentation import fcn_resnet50

    net = fcn_resnet50(weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=False)
    encoder = _FCNEncoder(net.backbone)
    refiner = nn.Sequential(*list(net.classifier)[:-1])
    holder = nn.Module()
    holder.encoder, holder.refiner, holder.classifier = encoder, refiner, net.classifier[-1]
    return from_named_submodules(holder, z_channels=2048, h_channels=512, in_channels=3)


def _fcn_resnet18(num_classes: int) -> IncrementalSegmenter:
    """torchvision's FCN class on a ResNet-18 at output stride 8, adapted in one call. ResNet-18's BasicBlock
    refuses dilation (``replace_stride_with_dilation``), so layer3 and layer4 keep stride 1 without it."""
    from torchvision.models import resnet18
    from torchvision.models._utils import IntermediateLayerGetter
    from torchvision.models.segmentation.fcn import FCN, FCNHead

    backbone = resnet18(weights=None)
    for layer in (backbone.layer3, backbone.layer4):
        layer[0].conv1.stride = (1, 1)
        layer[0].downsample[0].stride = (1, 1)
    body = IntermediateLayerGetter(backbone, return_layers={"layer4": "out"})
    return adapt(FCN(body, FCNHead(512, num_classes)))


def _smp(arch: str) -> Callable[[int], IncrementalSegmenter]:
    def build(num_classes: int) -> IncrementalSegmenter:
        import segmentation_models_pytorch as smp

        net = getattr(smp, arch)(encoder_name="resnet18", encoder_weights=None, classes=num_classes)
        return adapt(net)  # CAF and attentive distillation on the deepest level (the default)

    return build


def _hf_segformer(num_classes: int) -> IncrementalSegmenter:
    """A small SegFormer (MiT, 4 stages of hidden sizes 16-64, 2 blocks each), adapted in one call."""
    import transformers

    config = transformers.SegformerConfig(
        depths=[2, 2, 2, 2],
        hidden_sizes=[16, 32, 48, 64],
        num_attention_heads=[1, 2, 2, 4],
        decoder_hidden_size=64,
        num_labels=num_classes,
    )
    return adapt(transformers.SegformerForSemanticSegmentation(config))


def _vit_config(config_class: Callable[..., object], num_classes: int, **kwargs: object) -> object:
    """A 4-layer ViT of hidden size 64 with 8 px patches (8x8 tokens on the 64 px synthetic images)."""
    return config_class(
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=128,
        image_size=64,
        patch_size=8,
        num_labels=num_classes,
        **kwargs,
    )


def _hf_dpt(num_classes: int) -> IncrementalSegmenter:
    import transformers

    config = _vit_config(
        transformers.DPTConfig,
        num_classes,
        backbone_out_indices=[0, 1, 2, 3],
        neck_hidden_sizes=[16, 32, 64, 64],
        fusion_hidden_size=32,
        use_auxiliary_head=False,
    )
    return adapt(transformers.DPTForSemanticSegmentation(config))


def _hf_beit(num_classes: int) -> IncrementalSegmenter:
    import transformers

    config = _vit_config(
        transformers.BeitConfig,
        num_classes,
        out_indices=[1, 2, 3, 4],
        pool_scales=[1, 2],
        channels=64,
        auxiliary_channels=32,
        use_auxiliary_head=False,
    )
    return adapt(transformers.BeitForSemanticSegmentation(config))


NETWORKS: dict[str, Callable[[int], IncrementalSegmenter]] = OrderedDict(
    small=_small,
    plain=_plain,
    outsider=_outsider,
    mobilenet=_mobilenet,
    fcn_resnet18=_fcn_resnet18,
    fcn_resnet50=_fcn_resnet50,
    smp_fpn=_smp("FPN"),
    smp_unet=_smp("Unet"),
    hf_segformer=_hf_segformer,
    hf_dpt=_hf_dpt,
    hf_beit=_hf_beit,
)


def build_network(name: str, num_classes: int, seed: int) -> IncrementalSegmenter:
    torch.manual_seed(seed)
    return NETWORKS[name](num_classes)
