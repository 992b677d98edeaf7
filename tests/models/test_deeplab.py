# mypy: disable-error-code="index,operator,union-attr"
# (dynamic nn.Module attribute access, e.g. model.refiner[0], is typed Tensor | Module by torch)
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.models import resnet50
from torchvision.models.segmentation.deeplabv3 import ASPP as TorchvisionASPP
from torchvision.ops import FrozenBatchNorm2d

from incseg.learner import CheckpointError
from incseg.models import ASPP, deeplabv3_resnet50, deeplabv3_resnet101


def test_deeplabv3_resnet101_channels_and_shapes() -> None:
    model = deeplabv3_resnet101(16).eval()
    assert (model.z_channels, model.h_channels, model.num_classes) == (2048, 256, 16)
    assert model.classifier.classes_per_step == [16]
    assert [m.dilation for m in (model.refiner[0].convs[i][0] for i in (1, 2, 3))] == [(6, 6), (12, 12), (18, 18)]
    with torch.no_grad():
        out = model.forward_features(torch.randn(1, 3, 65, 65))
    assert out["z"].shape == (1, 2048, 5, 5)  # output stride 16
    assert out["h"].shape == (1, 256, 5, 5)
    assert out["logits"].shape == (1, 16, 5, 5)


def test_output_stride_8_and_norm_layer() -> None:
    model = deeplabv3_resnet50(4, output_stride=8, norm_layer=FrozenBatchNorm2d).eval()
    assert [m.dilation for m in (model.refiner[0].convs[i][0] for i in (1, 2, 3))] == [(12, 12), (24, 24), (36, 36)]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert isinstance(model.refiner[2], FrozenBatchNorm2d)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 33, 41)).shape == (1, 4, 5, 6)


def test_backbone_weights_loaded_from_file(tmp_path: Path) -> None:
    torch.manual_seed(1)
    reference = resnet50(weights=None)
    path = tmp_path / "resnet50.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}}, path)
    model = deeplabv3_resnet50(3, backbone_weights=path)
    torch.testing.assert_close(model.encoder.conv1.weight, reference.conv1.weight, rtol=0, atol=0)
    torch.testing.assert_close(
        model.encoder.layer4[2].bn3.running_var, reference.layer4[2].bn3.running_var, rtol=0, atol=0
    )


def test_backbone_weights_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="never downloads"):
        deeplabv3_resnet101(21, backbone_weights=tmp_path / "missing.pth")
    bad = tmp_path / "bad.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, bad)  # wrong shape
    with pytest.raises(ValueError, match="does not match a torchvision ResNet"):
        deeplabv3_resnet50(21, backbone_weights=bad)
    torch.save({"fc.weight": torch.zeros(1000, 2048)}, bad)
    with pytest.raises(ValueError, match=r"missing keys \['conv1.weight'"):
        deeplabv3_resnet50(21, backbone_weights=bad)
    torch.save([1, 2], bad)
    with pytest.raises(ValueError, match="does not hold a state dict"):
        deeplabv3_resnet50(21, backbone_weights=bad)


class _Evil:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, ("echo pwned",))


def test_c1_c2_backbone_weights_are_read_like_checkpoints(tmp_path: Path) -> None:
    """Issue 23 c1/c2: a pickle holding code, or an empty file, as --backbone-weights: one-line CheckpointError."""
    evil = tmp_path / "evil.pth"
    torch.save({"conv1.weight": _Evil()}, evil)
    with pytest.raises(CheckpointError, match=r"backbone_weights .* holds python code.*refused as unsafe") as info:
        deeplabv3_resnet50(3, backbone_weights=evil)
    assert "weights_only" not in str(info.value) and "trusted source" not in str(info.value)
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"backbone_weights .* is empty \(0 bytes\)"):
        deeplabv3_resnet50(3, backbone_weights=empty)


def test_argument_errors() -> None:
    with pytest.raises(ValueError, match="output_stride must be 8 or 16"):
        deeplabv3_resnet101(21, output_stride=32)
    with pytest.raises(ValueError, match="num_classes"):
        deeplabv3_resnet101(0)
    with pytest.raises(ValueError, match="atrous_rates"):
        ASPP(8, ())


def test_aspp_matches_torchvision() -> None:
    ours, theirs = ASPP(16, (1, 2, 3), out_channels=8).eval(), TorchvisionASPP(16, (1, 2, 3), out_channels=8).eval()
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 16, 7, 5)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x))
