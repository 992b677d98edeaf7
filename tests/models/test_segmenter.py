from __future__ import annotations

import copy

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
            "adapt",
            "check_equivalent",
            "classifier_from_conv",
            "deeplabv3_resnet50",
            "deeplabv3_resnet101",
            "from_named_submodules",
            "from_torchvision_deeplabv3",
            "small_segmenter",
            "without_last_child",
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


class _TwoLevels(nn.Module):
    """A two-level encoder returning a list (fine, coarse) or a dict."""

    def __init__(self, as_dict: bool = False) -> None:
        super().__init__()
        self.fine = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.coarse = nn.Conv2d(4, 8, 3, stride=2, padding=1)
        self.as_dict = as_dict

    def forward(self, x: Tensor) -> object:
        fine = self.fine(x)
        coarse = self.coarse(fine)
        return {"fine": fine, "coarse": coarse} if self.as_dict else [fine, coarse]


class _Decoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(12, 4, 1)
        self.seen: list[object] = []

    def forward(self, feats: object) -> Tensor:
        self.seen.append(feats)
        fine, coarse = (feats["fine"], feats["coarse"]) if isinstance(feats, dict) else feats  # type: ignore[misc]
        up = nn.functional.interpolate(coarse, size=fine.shape[-2:])
        return self.conv(torch.cat([fine, up], 1))


def _multi(caf_levels: object = None, *, as_dict: bool = False) -> IncrementalSegmenter:
    channels: object = {"fine": 4, "coarse": 8} if as_dict else [4, 8]
    return IncrementalSegmenter(
        _TwoLevels(as_dict),
        _Decoder(),
        IncrementalClassifier(4, [3]),
        z_channels=channels,  # type: ignore[arg-type]
        h_channels=4,
        caf_levels=caf_levels,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize(
    ("caf_levels", "as_dict", "expected"),
    [
        (None, False, (1,)),
        (-2, False, (0,)),
        ([0, -1], False, (0, 1)),
        ("all", False, (0, 1)),
        (None, True, ("coarse",)),
        ("fine", True, ("fine",)),
        ("all", True, ("fine", "coarse")),
    ],
)
def test_caf_levels_resolve(caf_levels: object, as_dict: bool, expected: tuple[object, ...]) -> None:
    model = _multi(caf_levels, as_dict=as_dict)
    assert model.caf_levels == expected
    channels = {"fine": 4, "coarse": 8, 0: 4, 1: 8}
    assert model.caf_channels == {str(level): channels[level] for level in expected}  # type: ignore[index]


@pytest.mark.parametrize("as_dict", [False, True])
@pytest.mark.parametrize("batch", [1, 2])
def test_multi_scale_forward_features_structure(as_dict: bool, batch: int) -> None:
    model = _multi("all", as_dict=as_dict)
    x = torch.randn(batch, 3, 9, 13)
    out = model.forward_features(x)
    assert set(out) == {"z", "z_bar", "h", "logits", "features"}
    levels = model.caf_levels
    assert levels is not None and list(out["z"]) == list(levels)
    feats = model.encoder(x)
    for level in levels:
        torch.testing.assert_close(out["z"][level], feats[level])  # type: ignore[index]
    assert type(out["features"]) is type(feats)
    torch.testing.assert_close(out["logits"], model.classifier(model.refiner(feats)))
    assert out["logits"].shape == (batch, 3, 5, 7)
    unbatched = model.forward_features(x[0])
    assert unbatched["z"][levels[0]].ndim == 3 and unbatched["logits"].shape == (3, 5, 7)


def test_multi_scale_fusion_replaces_only_the_chosen_levels() -> None:
    model = _multi(0)
    model.fusion = nn.ModuleDict({"0": _RecordingFusion()})
    x = torch.randn(2, 3, 8, 8)
    z_old = {0: torch.randn(2, 4, 4, 4)}
    out = model.forward_features(x, z_old)
    fine, coarse = model.encoder(x)  # type: ignore[misc]
    torch.testing.assert_close(out["z_bar"][0], 2 * fine + z_old[0])
    seen = model.refiner.seen[-1]  # type: ignore[union-attr, index]
    assert isinstance(seen, list)
    torch.testing.assert_close(seen[0], out["z_bar"][0])
    torch.testing.assert_close(seen[1], coarse)  # the other level reaches the refiner unchanged


def test_multi_scale_errors_say_what_to_do() -> None:
    with pytest.raises(ValueError, match="levels with channels"):
        _multi(5)
    with pytest.raises(ValueError, match="levels with channels"):
        _multi("middle", as_dict=True)
    with pytest.raises(ValueError, match="multi-scale"):
        IncrementalSegmenter(
            nn.Conv2d(3, 8, 1),
            nn.Conv2d(8, 4, 1),
            IncrementalClassifier(4, [2]),
            z_channels=8,
            h_channels=4,
            caf_levels="all",
        )
    model = _multi()
    model.fusion = _RecordingFusion()
    with pytest.raises(TypeError, match="ModuleDict"):
        model(torch.randn(1, 3, 8, 8))
    wrong = IncrementalSegmenter(
        _TwoLevels(), _Decoder(), IncrementalClassifier(4, [3]), z_channels=[4, 8, 16], h_channels=4
    )
    with pytest.raises(ValueError, match="3 feature maps"):
        wrong(torch.randn(1, 3, 8, 8))
    tensor_model = IncrementalSegmenter(
        _TwoLevels(), _Decoder(), IncrementalClassifier(4, [3]), z_channels=8, h_channels=4
    )
    with pytest.raises(ValueError, match="z_channels as a list or dict"):
        tensor_model(torch.randn(1, 3, 8, 8))


def test_multi_scale_deepcopy_and_state_dict() -> None:
    model = _multi("all")
    model.fusion = nn.ModuleDict({"0": _RecordingFusion(), "1": _RecordingFusion()})
    clone = copy.deepcopy(model)
    assert "fusion.1.scale" in clone.state_dict()
    x = torch.randn(1, 3, 8, 8)
    torch.testing.assert_close(clone(x), model(x))
