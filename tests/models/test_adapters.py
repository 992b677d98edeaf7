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
    without_last_child,
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
    with pytest.warns(UserWarning, match="auxiliary classifier") as record:
        model = from_torchvision_deeplabv3(_tiny_deeplab(aux=True))
    assert not any(isinstance(m, FCNHead) for m in model.modules())
    assert [w.filename for w in record] == [__file__]  # the warning points at the caller's line


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
        (nn.Sequential(nn.Conv2d(6, 4, 1), nn.Sigmoid()), "ends with an activation"),
        (nn.Sequential(nn.Conv2d(6, 4, 1), nn.Upsample(size=(8, 8), mode="bilinear")), "to a fixed size"),
        (nn.Sequential(nn.Conv2d(6, 4, 1), nn.Upsample(scale_factor=2, mode="nearest")), "mode='nearest'"),
        (nn.Sequential(nn.Conv2d(6, 4, 1), nn.UpsamplingNearest2d(scale_factor=2)), "mode='nearest'"),
        (nn.Sequential(nn.Conv2d(6, 4, 1), nn.Upsample(scale_factor=(2, 4), mode="bilinear")), "per axis"),
        (nn.Sequential(nn.Conv2d(6, 4, 1), nn.UpsamplingBilinear2d(scale_factor=2)), "twice"),
        (nn.Sequential(nn.Conv2d(6, 4, 1), nn.Dropout2d(0.1)), r"Dropout2d.*after its convolution"),
        (nn.Conv2d(6, 4, 3, stride=2, padding=1), r"stride \(2, 2\) changes the resolution"),
        (nn.Conv2d(6, 4, 2), "kernel size 2 is even"),
        (nn.Conv2d(6, 4, (1, 3), padding=(0, 1)), "not square"),
        (nn.Conv2d(6, 4, 3, padding=2, dilation=2), "dilated"),
        (nn.Conv2d(6, 4, 1, groups=2), "grouped"),
        (nn.Conv2d(6, 4, 3), r"padding \(0, 0\) does not keep the size"),
        (nn.Conv2d(6, 4, 3, padding=1, padding_mode="reflect"), "padding_mode='reflect'"),
    ],
)
def test_classifier_from_conv_refuses_other_heads(head: nn.Module, match: str) -> None:
    upsampling = 2 if "twice" in match else 1
    with pytest.raises(ValueError, match=match) as info:
        classifier_from_conv(head, upsampling=upsampling)
    if "activation" not in match:
        assert "activation" not in str(info.value)  # the message names the real problem


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(6, 4, 3, padding="same"),
        nn.Conv2d(6, 4, 5, padding="same", bias=False),
        nn.Conv2d(6, 4, 1, padding="same"),
        nn.Conv2d(6, 4, 1, padding="valid"),
        nn.Conv2d(6, 4, 1, padding_mode="reflect"),
        nn.Conv2d(6, 4, 1, padding_mode="circular"),
        nn.Conv2d(6, 4, 1, padding_mode="replicate"),
    ],
    ids=["same3", "same5", "same1", "valid1", "reflect1", "circular1", "replicate1"],
)
def test_classifier_from_conv_accepts_paddings_that_keep_the_logits(conv: nn.Conv2d) -> None:
    conv = conv.double()
    clf = classifier_from_conv(conv)
    x = torch.randn(2, 6, 5, 7, dtype=torch.float64)
    torch.testing.assert_close(clf(x), conv(x), rtol=0, atol=1e-12)


class _StdConv2d(nn.Conv2d):
    """Like timm's StdConv2d: the weight is standardised per output channel on every call."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (
            w.var(dim=(1, 2, 3), keepdim=True, unbiased=False) + 1e-6
        ).sqrt()
        return nn.functional.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class _ScaledConv2d(nn.Conv2d):
    """A subclass overriding only the private conv call."""

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return super()._conv_forward(x, 2 * weight, bias)


class _NamedConv2d(nn.Conv2d):
    """A subclass that adds nothing to the computation."""

    tag = "classifier"


@pytest.mark.parametrize(("cls", "method"), [(_StdConv2d, "forward"), (_ScaledConv2d, "_conv_forward")])
@pytest.mark.parametrize("kernel", [1, 3])
def test_classifier_from_conv_refuses_a_subclass_with_its_own_forward(cls: type, method: str, kernel: int) -> None:
    conv = cls(6, 4, kernel, padding=kernel // 2)
    x = torch.randn(2, 6, 5, 7)
    plain = nn.Conv2d(6, 4, kernel, padding=kernel // 2)
    plain.load_state_dict(conv.state_dict())
    assert (conv(x) - plain(x)).abs().max() > 1e-2  # copying the weight would change the logits
    with pytest.raises(TypeError, match=rf"{cls.__qualname__} subclasses nn.Conv2d with its own {method}"):
        classifier_from_conv(conv)
    with pytest.raises(TypeError, match="own forward"):
        classifier_from_conv(nn.Sequential(_StdConv2d(6, 4, 1), nn.UpsamplingBilinear2d(scale_factor=2)))


def test_classifier_from_conv_accepts_a_subclass_without_its_own_forward() -> None:
    conv = _NamedConv2d(6, 4, 3, padding=1).double()
    x = torch.randn(2, 6, 5, 7, dtype=torch.float64)
    torch.testing.assert_close(classifier_from_conv(conv)(x), conv(x), rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:.*weight_norm.*:FutureWarning")
def test_classifier_from_conv_with_weight_normalisation() -> None:
    x = torch.randn(2, 6, 5, 7)
    hooked = nn.utils.weight_norm(nn.Conv2d(6, 4, 1))  # the old API: a forward pre-hook recomputes the weight
    with pytest.raises(ValueError, match="forward hooks"):
        classifier_from_conv(hooked)
    parametrized = nn.utils.parametrizations.weight_norm(nn.Conv2d(6, 4, 1))  # the weight is computed on access
    with torch.no_grad():
        parametrized.parametrizations.weight.original0.mul_(3)
    torch.testing.assert_close(classifier_from_conv(parametrized)(x), parametrized(x), rtol=0, atol=1e-6)


class _Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.classifier = nn.Conv2d(4, 3, 1)  # registered first, called last (as in BEiT's UperHead)
        self.block = nn.Sequential(nn.Conv2d(8, 4, 3, padding=1), nn.ReLU())
        self.dropout = nn.Dropout2d(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.block(x)))


def test_without_last_child_shares_and_leaves_the_module_intact() -> None:
    head = _Head().eval()
    x = torch.randn(2, 8, 5, 5)
    expected = head(x)
    features = without_last_child(head, "classifier")
    assert features.block is head.block and isinstance(features.classifier, nn.Identity)
    assert isinstance(head.classifier, nn.Conv2d)  # the original keeps its classifier ...
    torch.testing.assert_close(head(x), expected, rtol=0, atol=0)  # ... and its output
    torch.testing.assert_close(head.classifier(features(x)), expected, rtol=0, atol=0)
    assert {n for n, _ in features.named_parameters()} == {"block.0.weight", "block.0.bias"}
    handle = features.register_forward_hook(lambda *_: None)  # the copy's hooks are its own
    assert not head._forward_hooks
    handle.remove()
    last = without_last_child(head)  # the last registered child: the dropout
    assert isinstance(last.dropout, nn.Identity) and isinstance(last.classifier, nn.Conv2d)
    nested = without_last_child(nn.Sequential(head.block, nn.Conv2d(4, 3, 1)), "0.1")
    assert isinstance(nested[0][1], nn.Identity) and isinstance(head.block[1], nn.ReLU)
    with pytest.raises(ValueError, match=r"no child 'cls'.*\['classifier', 'block', 'dropout'\]"):
        without_last_child(head, "cls")
    with pytest.raises(ValueError, match="no child to remove"):
        without_last_child(nn.ReLU())
