"""incseg.models.adapt: every recognised family gives the original logits and trains through the learner."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import torchvision.models.segmentation as tvs
from torch import Tensor, nn

from incseg.learner import CheckpointError, IncrementalLearner
from incseg.models import IncrementalSegmenter, adapt, small_segmenter
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
    "tv-fcn": _tv(tvs.fcn_resnet50, aux_loss=False),
    "tv-lraspp": _tv(tvs.lraspp_mobilenet_v3_large),
    **{f"smp-{arch}": _smp(arch) for arch in SMP_ARCHS},
    "smp-DPT": _dpt,
    "hf-segformer": _hf_segformer,
    "hf-upernet": _hf_upernet,
}
# Families trained through the learner (each costs a few seconds): one per kind of encoder output.
TRAINED = ["tv-lraspp", "smp-Unet", "smp-FPN", "hf-segformer"]


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
    with torch.no_grad():
        expected = _out(original(x))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # auxiliary heads dropped
            model = adapt(original).eval()
        got = model(x)
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
    with pytest.warns(UserWarning, match="classification head"):
        model = adapt(net)
    assert not any("classification_head" in name for name, _ in model.named_modules())
    with pytest.warns(UserWarning, match="auxiliary"):
        adapt(_tv(tvs.fcn_resnet50, aux_loss=True)())
