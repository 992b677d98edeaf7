# mypy: disable-error-code="index,operator,union-attr"
# (dynamic nn.Module attribute access, e.g. model.refiner[0], is typed Tensor | Module by torch)
from __future__ import annotations

from collections import OrderedDict
from typing import Any

import pytest
import torch
from torch import nn
from torchvision.models import segmentation
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.segmentation.deeplabv3 import DeepLabHead, DeepLabV3
from torchvision.models.segmentation.fcn import FCNHead

from incseg.models import (
    IncrementalClassifier,
    IncrementalSegmenter,
    classifier_from_conv,
    from_named_submodules,
    from_torchvision_deeplabv3,
)


def _tiny_deeplab(aux: bool = False) -> DeepLabV3:
    body = nn.Sequential(OrderedDict(conv1=nn.Conv2d(3, 16, 3, stride=2, padding=1), relu=nn.ReLU()))
    backbone = IntermediateLayerGetter(body, return_layers={"relu": "out"})
    return DeepLabV3(backbone, DeepLabHead(16, 5, (1, 2, 3)), FCNHead(16, 5) if aux else None)


def test_torchvision_deeplabv3_resnet50_same_logits() -> None:
    tv = segmentation.deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=21).eval()
    model = from_torchvision_deeplabv3(tv).eval()
    assert (model.z_channels, model.h_channels, model.num_classes, model.in_channels) == (2048, 256, 21, 3)
    x = torch.randn(1, 3, 65, 49)
    with torch.no_grad():
        expected = tv.classifier(tv.backbone(x)["out"])
        out = model.forward_features(x)
    torch.testing.assert_close(out["logits"], expected, rtol=0, atol=0)
    assert out["z"].shape == (1, 2048, 9, 7)  # torchvision's deeplabv3_resnet50 has output stride 8
    assert out["h"].shape == (1, 256, 9, 7)


@pytest.mark.parametrize("batch", [1, 2])
def test_tiny_deeplab_logits_gradients_and_sharing(batch: int) -> None:
    tv = _tiny_deeplab()
    model = from_torchvision_deeplabv3(tv)
    assert model.encoder.body is tv.backbone
    assert model.refiner[0] is tv.classifier[0]
    assert list(model.refiner.state_dict()) == [k for k in tv.classifier.state_dict() if not k.startswith("4.")]
    tv.eval()
    model.eval()
    x = torch.randn(batch, 3, 9, 14)
    with torch.no_grad():
        expected = tv.classifier(tv.backbone(x)["out"])
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
        # torchvision's output is the same logits upsampled to the input size
        up = nn.functional.interpolate(model(x), size=(9, 14), mode="bilinear", align_corners=False)
        torch.testing.assert_close(up, tv(x)["out"])
    model.train()
    model.classifier.add_classes(2)
    model(torch.randn(2, 3, 9, 14)).square().sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name


def test_aux_classifier_dropped_with_warning() -> None:
    with pytest.warns(UserWarning, match="auxiliary classifier"):
        model = from_torchvision_deeplabv3(_tiny_deeplab(aux=True))
    assert not any(isinstance(m, FCNHead) for m in model.modules())


def test_torchvision_adapter_errors() -> None:
    with pytest.raises(TypeError, match="DeepLabV3"):
        from_torchvision_deeplabv3(nn.Conv2d(3, 3, 1))  # type: ignore[arg-type]


class _Net(nn.Module):
    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Module()
        self.head.refine = nn.Sequential(nn.Conv2d(8, 4, 3, padding=1), nn.ReLU())
        self.head.cls = classifier


@pytest.mark.parametrize("bias", [True, False])
def test_from_named_submodules_converts_conv(bias: bool) -> None:
    net = _Net(nn.Conv2d(4, 6, 1, bias=bias))
    model = from_named_submodules(
        net, encoder="backbone", refiner="head.refine", classifier="head.cls", z_channels=8, h_channels=4
    )
    assert isinstance(model, IncrementalSegmenter)
    assert model.encoder is net.backbone
    assert model.num_classes == 6
    x = torch.randn(2, 3, 7, 10)
    expected = net.head.cls(net.head.refine(net.backbone(x)))
    torch.testing.assert_close(model(x), expected)


def test_from_named_submodules_keeps_incremental_classifier() -> None:
    clf = IncrementalClassifier(4, [2, 3])
    model = from_named_submodules(
        _Net(clf), encoder="backbone", refiner="head.refine", classifier="head.cls", z_channels=8, h_channels=4
    )
    assert model.classifier is clf


def test_from_named_submodules_errors() -> None:
    names: dict[str, Any] = {"encoder": "backbone", "refiner": "head.refine", "classifier": "head.cls"}
    with pytest.raises(TypeError, match=r"nn\.Conv2d or a nn\.Sequential\(conv, upsampling\), got Linear"):
        from_named_submodules(_Net(nn.Linear(4, 6)), **names, z_channels=8, h_channels=4)
    with pytest.raises(ValueError, match="zero padding k // 2"):
        from_named_submodules(_Net(nn.Conv2d(4, 6, 3)), **names, z_channels=8, h_channels=4)
    with pytest.raises(ValueError, match=r"no submodule 'encoder'.*\['backbone', 'head'\]"):
        from_named_submodules(_Net(nn.Conv2d(4, 6, 1)), z_channels=8, h_channels=4)
    with pytest.raises(ValueError, match="h_channels"):
        from_named_submodules(_Net(nn.Conv2d(4, 6, 1)), **names, z_channels=8, h_channels=5)
    with pytest.raises(TypeError, match=r"model must be an nn\.Module"):
        from_named_submodules("net", z_channels=8, h_channels=4)  # type: ignore[arg-type]
    wrong_z = from_named_submodules(_Net(nn.Conv2d(4, 6, 1)), **names, z_channels=16, h_channels=4)
    with pytest.raises(ValueError, match="z_channels=16"):
        wrong_z(torch.randn(1, 3, 4, 4))


def test_classifier_from_conv_copies_weights() -> None:
    conv = nn.Conv2d(8, 3, 1).double()
    clf = classifier_from_conv(conv)
    assert clf.head(0).weight.dtype == torch.float64
    assert clf.head(0).weight is not conv.weight
    x = torch.randn(2, 8, 3, 5, dtype=torch.float64)
    torch.testing.assert_close(clf(x), conv(x), rtol=0, atol=0)


@pytest.mark.parametrize("kernel", [1, 3, 5])
@pytest.mark.parametrize("bias", [True, False])
def test_classifier_from_kxk_conv(kernel: int, bias: bool) -> None:
    conv = nn.Conv2d(6, 4, kernel, padding=kernel // 2, bias=bias).double()
    clf = classifier_from_conv(conv)
    assert clf.kernel_size == kernel
    x = torch.randn(2, 6, 5, 7, dtype=torch.float64)
    torch.testing.assert_close(clf(x), conv(x), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("upsample", "scale", "align_corners"),
    [
        (nn.UpsamplingBilinear2d(scale_factor=4), 4.0, True),
        (nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False), 2.0, False),
        (nn.Identity(), 1, False),
    ],
)
def test_classifier_from_head_with_upsampling(upsample: nn.Module, scale: float, align_corners: bool) -> None:
    head = nn.Sequential(nn.Conv2d(6, 4, 3, padding=1), upsample, nn.Sequential(nn.Identity())).double()
    clf = classifier_from_conv(head)
    assert (clf.upsampling, clf.align_corners) == (scale, align_corners)
    x = torch.randn(2, 6, 5, 7, dtype=torch.float64)
    torch.testing.assert_close(clf(x), head(x), rtol=0, atol=1e-12)
    clf.add_classes(2)  # growth keeps the upsampling
    assert clf(x).shape == (2, 6, int(5 * scale), int(7 * scale))


@pytest.mark.parametrize(
    ("head", "match"),
    [
        (nn.Sequential(nn.Conv2d(6, 4, 1), nn.Sigmoid()), "activation"),
        (nn.Sequential(nn.Conv2d(6, 4, 1), nn.Upsample(size=(8, 8), mode="bilinear")), "Upsample"),
        (nn.Sequential(nn.Conv2d(6, 4, 1), nn.Upsample(scale_factor=2, mode="nearest")), "Upsample"),
        (nn.Conv2d(6, 4, 3, stride=2, padding=1), "stride 1"),
        (nn.Conv2d(6, 4, 2), "odd k"),
    ],
)
def test_classifier_from_conv_refuses_other_heads(head: nn.Module, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        classifier_from_conv(head)
