"""incseg.models.adapt: every recognised family gives the original logits and trains through the learner."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import torchvision.models.segmentation as tvs
from torch import Tensor, nn

from incseg.learner import CheckpointError, IncrementalLearner
from incseg.models import IncrementalSegmenter, adapt, check_equivalent, small_segmenter
from incseg.nn import ContinualAttentiveFusion
from incseg.scenarios import Scenario

SIZE = 64
SCENARIO = Scenario([[1, 2], [3]])
K0 = SCENARIO.num_classes_at(0)

smp = pytest.importorskip("segmentation_models_pytorch")

SMP_ARCHS = [
    "Unet",
    "UnetPlusPlus",
    "FPN",
    "PSPNet",
    "Linknet",
    "PAN",
    "MAnet",
    "DeepLabV3",
    "DeepLabV3Plus",
    "UPerNet",
    "Segformer",
]


def _smp(arch: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        kwargs: dict[str, Any] = {"encoder_name": "resnet18", "encoder_weights": None, "classes": K0}
        if arch not in ("PAN", "DeepLabV3", "PSPNet"):
            kwargs["encoder_depth"] = 3  # smaller and faster; the decoders adapt their channels
            if arch in ("Unet", "UnetPlusPlus", "MAnet"):
                kwargs["decoder_channels"] = (32, 16, 8)
            if arch == "FPN":
                kwargs.update(decoder_pyramid_channels=64, decoder_segmentation_channels=32)
            if arch == "Linknet":
                del kwargs["encoder_depth"]
        return getattr(smp, arch)(**kwargs)

    return build


def _dpt() -> nn.Module:
    return smp.DPT(
        encoder_name="tu-vit_tiny_patch16_224",
        encoder_weights=None,
        classes=K0,
        dynamic_img_size=True,
        decoder_intermediate_channels=(16, 16, 32, 32),
        decoder_fusion_channels=16,
    )


def _hf_segformer() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.SegformerConfig(
        depths=[1, 1, 1, 1],
        hidden_sizes=[8, 16, 24, 32],
        num_attention_heads=[1, 1, 1, 1],
        decoder_hidden_size=16,
        num_labels=K0,
    )
    return transformers.SegformerForSemanticSegmentation(config)


def _hf_upernet() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    backbone = transformers.ConvNextConfig(
        hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1], out_features=["stage1", "stage2", "stage3", "stage4"]
    )
    config = transformers.UperNetConfig(
        backbone_config=backbone, hidden_size=16, num_labels=K0, use_auxiliary_head=False
    )
    return transformers.UperNetForSemanticSegmentation(config)


def _vit_config(config_class: Callable[..., Any], **kwargs: Any) -> Any:
    """A 4-layer ViT of hidden size 32 on 64 px images (16 px patches: 4x4 tokens); each layer feeds the head."""
    return config_class(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=SIZE,
        patch_size=16,
        num_labels=K0,
        **kwargs,
    )


def _hf_dpt(auxiliary_head: bool = False) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = _vit_config(
        transformers.DPTConfig,
        backbone_out_indices=[0, 1, 2, 3],
        neck_hidden_sizes=[8, 16, 16, 32],
        fusion_hidden_size=16,
        use_auxiliary_head=auxiliary_head,
    )
    return transformers.DPTForSemanticSegmentation(config)


def _hf_beit_like(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        transformers = pytest.importorskip("transformers")
        config = _vit_config(
            getattr(transformers, f"{name}Config"),
            out_indices=[1, 2, 3, 4],
            pool_scales=[1, 2],
            auxiliary_channels=16,
            use_auxiliary_head=False,
        )
        return getattr(transformers, f"{name}ForSemanticSegmentation")(config)

    return build


def _hf_mobilevit() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.MobileViTConfig(
        image_size=SIZE,
        hidden_sizes=[16, 24, 32],
        neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 64],
        num_attention_heads=2,
        aspp_out_channels=16,
        num_labels=K0,
    )
    return transformers.MobileViTForSemanticSegmentation(config)


def _hf_mobilevitv2() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.MobileViTV2Config(image_size=SIZE, width_multiplier=0.25, aspp_out_channels=16, num_labels=K0)
    return transformers.MobileViTV2ForSemanticSegmentation(config)


def _hf_mobilenetv2() -> nn.Module:  # no adapt code names it: the general transformers path
    transformers = pytest.importorskip("transformers")
    config = transformers.MobileNetV2Config(image_size=SIZE, depth_multiplier=0.25, num_labels=K0)
    return transformers.MobileNetV2ForSemanticSegmentation(config)


def _smp_timm(encoder: str) -> Callable[[], nn.Module]:
    return lambda: smp.Unet(encoder, encoder_weights=None, encoder_depth=3, decoder_channels=(32, 16, 8), classes=K0)


def _tv(build: Callable[..., nn.Module], **kwargs: Any) -> Callable[[], nn.Module]:
    return lambda: build(weights=None, weights_backbone=None, num_classes=K0, **kwargs)


def _out(result: Any) -> Tensor:
    if isinstance(result, Tensor):
        return result
    if hasattr(result, "logits"):
        return result.logits  # transformers' SemanticSegmenterOutput
    return result["out"]  # torchvision


FAMILIES: dict[str, Callable[[], nn.Module]] = {
    "tv-deeplabv3": _tv(tvs.deeplabv3_mobilenet_v3_large, aux_loss=False),
    "tv-deeplabv3-aux": _tv(tvs.deeplabv3_mobilenet_v3_large, aux_loss=True),
    "tv-fcn": _tv(tvs.fcn_resnet50, aux_loss=False),
    "tv-lraspp": _tv(tvs.lraspp_mobilenet_v3_large),
    **{f"smp-{arch}": _smp(arch) for arch in SMP_ARCHS},
    "smp-DPT": _dpt,
    **{f"smp-Unet-{enc}": _smp_timm(enc) for enc in ("tu-resnet18", "tu-convnext_atto", "tu-efficientnet_b0")},
    "hf-segformer": _hf_segformer,
    "hf-upernet": _hf_upernet,
    "hf-dpt": _hf_dpt,
    "hf-beit": _hf_beit_like("Beit"),
    "hf-data2vec-vision": _hf_beit_like("Data2VecVision"),
    "hf-mobilevit": _hf_mobilevit,
    "hf-mobilevitv2": _hf_mobilevitv2,
    "hf-mobilenetv2": _hf_mobilenetv2,
}
# Families trained through the learner (each costs a few seconds): one per kind of encoder output, and every
# transformers family (tiny configurations, a second or less each).
TRAINED = [
    "tv-lraspp",
    "smp-Unet",
    "smp-FPN",
    "hf-segformer",
    "hf-dpt",
    "hf-beit",
    "hf-data2vec-vision",
    "hf-mobilevit",
    "hf-mobilevitv2",
    "hf-mobilenetv2",
]


def _images(size: int = SIZE, seed: int = 0) -> Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return FAMILIES[name]().eval()


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_eval_logits_equal_the_original(name: str) -> None:
    original = _build(name)
    size = 128 if name == "smp-PAN" else SIZE  # PAN's pyramid pooling needs 1/32 maps of at least 4x4
    x = _images(size)
    modules = dict(original.named_modules())
    with torch.no_grad():
        expected = _out(original(x))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # auxiliary heads dropped
            model = adapt(original).eval()
        got = model(x)
    assert dict(original.named_modules()) == modules  # not one module of the original replaced
    assert isinstance(model, IncrementalSegmenter)
    if got.shape[-2:] != expected.shape[-2:]:  # torchvision and UperNet upsample to the input in forward
        got = F.interpolate(got, size=expected.shape[-2:], mode="bilinear", align_corners=False)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert not any(m is model for m in original.modules())  # the original is left intact
    with torch.no_grad():
        torch.testing.assert_close(_out(original(x)), expected, rtol=0, atol=0)


def _labels(step: int, size: int = SIZE) -> Tensor:
    g = torch.Generator().manual_seed(10 + step)
    low, k = SCENARIO.num_old_classes(step), SCENARIO.num_classes_at(step)
    labels = torch.randint(low, k, (2, size, size), generator=g)
    labels[:, : size // 4] = 0
    return labels


def _train(learner: IncrementalLearner, module: nn.Module | None = None, *, iterations: int = 2) -> list[float]:
    losses = []
    for step in range(SCENARIO.num_steps):
        learner.begin_step(step)
        optimizer = torch.optim.SGD(learner.param_groups(1e-3), lr=1e-3)
        for _ in range(iterations):
            out = learner.training_step(_images(), _labels(step), module=module)
            optimizer.zero_grad()
            out.loss.backward()
            optimizer.step()
            losses.append(float(out.loss.detach()))
        learner.end_step()
    return losses


@pytest.mark.parametrize("method", ["mib", "caf"])
@pytest.mark.parametrize("name", TRAINED)
def test_two_steps_train_predict_and_round_trip(name: str, method: str, tmp_path: Path) -> None:
    model = adapt(_build(name))
    learner = IncrementalLearner(model, SCENARIO, method)
    losses = _train(learner)
    assert all(torch.isfinite(torch.tensor(losses)))
    if method == "caf":
        assert learner.model.fusion is not None
        assert "ad" in learner.training_step(_images(), _labels(1), guard=False).terms  # a probe, not training
    x = _images(seed=5)
    predicted = learner.predict(x)
    assert predicted.shape == (2, SCENARIO.num_classes_at(1), SIZE, SIZE)
    learner.save(tmp_path / "ckpt.pt")
    restored = IncrementalLearner.from_checkpoint(tmp_path / "ckpt.pt", adapt(_build(name)))
    torch.testing.assert_close(restored.predict(x), predicted, rtol=0, atol=1e-6)


def test_caf_on_every_level_of_a_unet(tmp_path: Path) -> None:
    model = adapt(_build("smp-Unet"), caf_levels="all")
    assert model.caf_levels == (1, 2, 3)  # level 0 is the input image
    learner = IncrementalLearner(model, SCENARIO, "caf")
    _train(learner, iterations=1)
    fusion = learner.model.fusion
    assert isinstance(fusion, nn.ModuleDict) and list(fusion.keys()) == ["1", "2", "3"]
    assert all(isinstance(m, ContinualAttentiveFusion) for m in fusion.values())
    se_z = learner.criterion.ad_loss.se_z  # type: ignore[union-attr]
    assert isinstance(se_z, nn.ModuleDict) and list(se_z.keys()) == ["1", "2", "3"]
    teacher_out = learner.teacher_forward(_images())
    assert teacher_out is not None and sorted(teacher_out["z"]) == [1, 2, 3]
    for strategy in ("skip", "zero_pad", "concat"):
        assert learner.predict(_images(), strategy=strategy).shape == (2, 4, SIZE, SIZE)
    learner.save(tmp_path / "all.pt")
    deepest = adapt(_build("smp-Unet"))
    with pytest.raises(CheckpointError, match="encoder levels"):
        IncrementalLearner.from_checkpoint(tmp_path / "all.pt", deepest)
    with pytest.raises(CheckpointError, match="encoder levels"):
        IncrementalLearner.from_checkpoint(tmp_path / "all.pt", small_segmenter(K0))
    copy.deepcopy(learner.model)  # no tensors stashed on modules


def test_ddp_wrapping_of_a_multi_scale_family(tmp_path: Path) -> None:
    import torch.distributed as dist

    learner = IncrementalLearner(adapt(_build("smp-FPN"), caf_levels=[-1, -2]), SCENARIO, "caf")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        for step in range(SCENARIO.num_steps):
            learner.begin_step(step)
            ddp = nn.parallel.DistributedDataParallel(learner.module)
            optimizer = torch.optim.SGD(learner.param_groups(1e-3), lr=1e-3)
            out = learner.training_step(_images(), _labels(step), module=ddp)
            optimizer.zero_grad()
            out.loss.backward()
            optimizer.step()
            learner.end_step()
    finally:
        dist.destroy_process_group()
    grads = [p.grad for p in learner.model.fusion.parameters()]  # type: ignore[union-attr]
    assert any(g is not None and bool(g.abs().sum() > 0) for g in grads)


@pytest.mark.slow
def test_torch_compile_of_a_multi_scale_family() -> None:
    learner = IncrementalLearner(adapt(_build("smp-Unet")), SCENARIO, "caf")
    learner.begin_step(0)
    learner.end_step()
    learner.begin_step(1)
    compiled = torch.compile(learner.module, backend="eager")
    eager = learner.training_step(_images(), _labels(1))
    out = learner.training_step(_images(), _labels(1), module=compiled)
    torch.testing.assert_close(out.loss, eager.loss, rtol=1e-4, atol=1e-5)
    out.loss.backward()


def test_unknown_network_names_the_recipe() -> None:
    with pytest.raises(TypeError, match="from_named_submodules"):
        adapt(nn.Sequential(nn.Conv2d(3, 4, 1)))
    with pytest.raises(TypeError, match=r"nn\.Module"):
        adapt("unet")  # type: ignore[arg-type]


def test_segmenter_is_returned_as_is() -> None:
    model = small_segmenter(3, width=4)
    assert adapt(model) is model
    with pytest.raises(ValueError, match="already"):
        adapt(model, caf_levels="all")


def test_caf_levels_of_a_single_map_network_are_refused() -> None:
    with pytest.raises(ValueError, match="multi-scale"):
        adapt(_build("tv-fcn"), caf_levels="all")


def test_final_activation_is_refused() -> None:
    net = smp.FPN(encoder_name="resnet18", encoder_weights=None, classes=3, encoder_depth=3, activation="sigmoid")
    with pytest.raises(ValueError, match="activation"):
        adapt(net)


def test_auxiliary_heads_are_dropped_with_a_warning() -> None:
    net = smp.FPN(encoder_name="resnet18", encoder_weights=None, classes=3, encoder_depth=3, aux_params={"classes": 2})
    with pytest.warns(UserWarning, match="classification head") as smp_record:
        model = adapt(net)
    assert not any("classification_head" in name for name, _ in model.named_modules())
    with pytest.warns(UserWarning, match="auxiliary") as tv_record:
        adapt(_tv(tvs.fcn_resnet50, aux_loss=True)())
    assert [w.filename for w in [*smp_record, *tv_record]] == [__file__, __file__]  # the caller's line


def test_wrapped_networks_are_unwrapped(tmp_path: Path) -> None:
    import torch.distributed as dist

    net = _build("smp-Unet")
    x = _images()
    with torch.no_grad():
        expected = net(x)
    wrapped = [torch.compile(net, backend="eager"), nn.DataParallel(net), torch.compile(nn.DataParallel(net))]
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        wrapped.append(nn.parallel.DistributedDataParallel(net))
        for module in wrapped:
            model = adapt(module, check=x).eval()
            assert model.encoder is net.encoder  # the network itself, not its wrapper
            with torch.no_grad():
                torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-5)
    finally:
        dist.destroy_process_group()


def test_check_compares_with_the_original() -> None:
    net = _build("tv-fcn")
    x = _images()
    model = adapt(net, check=x)  # torchvision resizes its logits to the input: compared after that resizing
    assert check_equivalent(model, net, x) < 1e-5
    assert adapt(model, check=x) is model


def test_transformers_auxiliary_heads_are_dropped_with_a_warning() -> None:
    net = _hf_dpt(auxiliary_head=True).eval()
    with pytest.warns(UserWarning, match=r"auxiliary head of the DPTForSemanticSegmentation") as record:
        model = adapt(net, check=_images())
    assert [w.filename for w in record] == [__file__]  # the warning points at the caller's line
    assert net.auxiliary_head is not None  # dropped from the adapted network only
    assert not any(m is net.auxiliary_head for m in model.modules())


class _Head(nn.Module):
    def __init__(self, scale: float) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=4, padding=1)
        self.classifier = nn.Conv2d(8, K0, 1)
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.classifier(self.conv(x).relu())
        return out if self.scale == 1 else self.scale * out  # work after the classifier: no split reproduces it


class FakeForSemanticSegmentation(nn.Module):
    """A model with the shape of transformers' segmentation models that no adapt code names."""

    __module__ = "transformers.models.fake.modeling_fake"

    def __init__(self, scale: float = 1) -> None:
        super().__init__()
        self.config = SimpleNamespace(image_size=32, num_channels=3)
        self.stem = nn.Conv2d(3, 3, 3, padding=1)
        self.decode_head = _Head(scale)

    def forward(self, pixel_values: Tensor) -> tuple[Tensor]:
        return (self.decode_head(self.stem(pixel_values)),)


def test_the_general_transformers_path_checks_its_split() -> None:
    net = FakeForSemanticSegmentation()
    model = adapt(net)
    assert model.encoder.model.stem is net.stem and model.refiner.conv is net.decode_head.conv
    assert isinstance(net.decode_head, _Head) and isinstance(net.decode_head.classifier, nn.Conv2d)
    assert check_equivalent(model, net, _images()) < 1e-6
    with pytest.raises(ValueError, match=r"split of FakeForSemanticSegmentation does not reproduce.*by up to"):
        adapt(FakeForSemanticSegmentation(scale=2))
    headless = FakeForSemanticSegmentation()
    headless.decode_head = nn.Sequential(nn.ReLU())
    with pytest.raises(TypeError, match=r"holds no convolution.*from_named_submodules"):
        adapt(headless)
    del headless.decode_head
    with pytest.raises(TypeError, match="none of the heads"):
        adapt(headless)
