from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import incseg.models
from incseg.models import IncrementalClassifier, IncrementalSegmenter


def _tiny(num_classes: int = 3, *, in_channels: int | None = 3) -> IncrementalSegmenter:
    encoder = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU())
    refiner = nn.Sequential(nn.Conv2d(8, 4, 3, padding=1), nn.ReLU())
    return IncrementalSegmenter(
        encoder, refiner, IncrementalClassifier(4, [num_classes]), z_channels=8, h_channels=4, in_channels=in_channels
    )


class _RecordingFusion(nn.Module):
    """z_bar = z * scale (+ z_old when given); records the inputs it was called with."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(2.0))
        self.calls: list[tuple[Tensor, Tensor | None]] = []

    def forward(self, z: Tensor, z_old: Tensor | None) -> Tensor:
        self.calls.append((z, z_old))
        return z * self.scale if z_old is None else z * self.scale + z_old


def test_public_api() -> None:
    assert sorted(incseg.models.__all__) == sorted(
        [
            "ASPP",
            "IncrementalClassifier",
            "IncrementalSegmenter",
            "classifier_from_conv",
            "deeplabv3_resnet50",
            "deeplabv3_resnet101",
            "from_named_submodules",
            "from_torchvision_deeplabv3",
            "small_segmenter",
        ]
    )
    assert all(hasattr(incseg.models, name) for name in incseg.models.__all__)


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize(("height", "width"), [(8, 8), (9, 13)])
def test_forward_features_keys_and_shapes(batch: int, height: int, width: int) -> None:
    model = _tiny()
    x = torch.randn(batch, 3, height, width)
    out = model.forward_features(x)
    h, w = (height + 1) // 2, (width + 1) // 2
    assert set(out) == {"z", "z_bar", "h", "logits"}
    assert out["z"].shape == (batch, 8, h, w)
    assert out["z_bar"] is out["z"]
    assert out["h"].shape == (batch, 4, h, w)
    assert out["logits"].shape == (batch, 3, h, w)
    torch.testing.assert_close(model(x), out["logits"])
    torch.testing.assert_close(out["logits"], model.classifier(model.refiner(model.encoder(x))))
    assert model.num_classes == 3


def test_fusion_between_encoder_and_refiner() -> None:
    model = _tiny()
    assert model.fusion is None
    fusion = _RecordingFusion()
    model.fusion = fusion
    assert any(p is fusion.scale for p in model.parameters())
    assert "fusion.scale" in model.state_dict()
    x = torch.randn(2, 3, 6, 6)
    z_old = torch.randn(2, 8, 3, 3)
    out = model.forward_features(x, z_old)
    assert fusion.calls[-1][1] is z_old
    torch.testing.assert_close(out["z_bar"], 2 * out["z"] + z_old)
    torch.testing.assert_close(out["h"], model.refiner(out["z_bar"]))
    model(x)
    assert fusion.calls[-1][1] is None
    model.fusion = None
    assert model.forward_features(x)["z_bar"] is not None
    assert "fusion.scale" not in model.state_dict()


def test_unbatched_input() -> None:
    model = _tiny().eval()
    x = torch.randn(3, 7, 5)
    out = model.forward_features(x)
    assert out["logits"].shape == (3, 4, 3)
    assert out["z"].shape == (8, 4, 3)
    torch.testing.assert_close(model(x), model(x.unsqueeze(0))[0])


def test_every_parameter_gets_gradient_with_fusion_and_new_classes() -> None:
    model = _tiny()
    model.fusion = _RecordingFusion()
    model.classifier.add_classes(2)
    out = model.forward_features(torch.randn(2, 3, 6, 6), torch.randn(2, 8, 3, 3))
    out["logits"].square().sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize(
    ("x", "error", "match"),
    [
        (torch.randn(3, 4), ValueError, "2 dims"),
        (torch.randn(1, 1, 3, 4, 4), ValueError, "5 dims"),
        (torch.zeros(1, 3, 4, 4, dtype=torch.long), TypeError, "floating-point"),
        (torch.randn(1, 4, 4, 4), ValueError, "3 channels"),
        ([1.0], TypeError, "torch.Tensor"),
    ],
)
def test_input_errors(x: object, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        _tiny()(x)  # type: ignore[arg-type]


def test_input_channels_unchecked_without_in_channels() -> None:
    model = _tiny(in_channels=None)
    with pytest.raises(RuntimeError):  # the encoder's own error
        model(torch.randn(1, 4, 4, 4))


def test_part_output_errors() -> None:
    model = IncrementalSegmenter(
        nn.Conv2d(3, 5, 1), nn.Conv2d(5, 4, 1), IncrementalClassifier(4, [2]), z_channels=8, h_channels=4
    )
    with pytest.raises(ValueError, match=r"encoder returned 5 channels.*z_channels=8"):
        model(torch.randn(1, 3, 4, 4))
    model = IncrementalSegmenter(
        nn.Conv2d(3, 8, 1), nn.Flatten(), IncrementalClassifier(4, [2]), z_channels=8, h_channels=4
    )
    with pytest.raises(ValueError, match=r"refiner must return a \(B, C, h, w\) tensor"):
        model(torch.randn(1, 3, 4, 4))


def test_constructor_errors() -> None:
    enc, ref = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)
    with pytest.raises(TypeError, match="IncrementalClassifier"):
        IncrementalSegmenter(enc, ref, nn.Conv2d(4, 2, 1), z_channels=8, h_channels=4)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"encoder must be an nn\.Module"):
        IncrementalSegmenter(lambda x: x, ref, IncrementalClassifier(4, [2]), z_channels=8, h_channels=4)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"classifier.in_channels \(4\) must equal h_channels \(5\)"):
        IncrementalSegmenter(enc, ref, IncrementalClassifier(4, [2]), z_channels=8, h_channels=5)
    with pytest.raises(ValueError, match="z_channels"):
        IncrementalSegmenter(enc, ref, IncrementalClassifier(4, [2]), z_channels=0, h_channels=4)
