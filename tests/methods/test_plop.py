"""PLOP: Local POD and pseudo-labels against float64 references written from the equations, properties of the
distillation, and the method through the learner (calibration, checkpoints, configuration)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.resnet import Bottleneck, ResNet
from torchvision.models.segmentation.deeplabv3 import DeepLabHead, DeepLabV3

from incseg.functional.pod import (
    collapse_new_classes,
    entropy_pseudo_labels,
    local_pod,
    local_pod_distance,
    normalized_entropy,
)
from incseg.learner import METHODS, IncrementalLearner, MethodConfig
from incseg.methods.base import Batch
from incseg.methods.plop import PLOPLoss, PLOPMethod, median_from_histogram, pod_stage_modules
from incseg.models import (
    IncrementalClassifier,
    IncrementalSegmenter,
    deeplabv3_resnet50,
    from_named_submodules,
    from_torchvision_deeplabv3,
    small_segmenter,
)
from incseg.scenarios import Scenario


def _reference_pod(x: Tensor, scales: tuple[int, ...]) -> Tensor:
    """Φ(x) with explicit loops over images, scales, regions, channels and rows/columns (float64)."""
    b, c, h, w = x.shape
    out = []
    for n in range(b):
        emb: list[float] = []
        for s in scales:
            for i in range(s):
                for j in range(s):
                    r0, r1 = i * h // s, (i + 1) * h // s
                    c0, c1 = j * w // s, (j + 1) * w // s
                    for ch in range(c):
                        for r in range(r0, r1):  # width pooling: one value per row
                            emb.append(sum(float(x[n, ch, r, q]) ** 2 for q in range(c0, c1)) / (c1 - c0))
                    for ch in range(c):
                        for q in range(c0, c1):  # height pooling: one value per column
                            emb.append(sum(float(x[n, ch, r, q]) ** 2 for r in range(r0, r1)) / (r1 - r0))
        out.append(emb)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize(
    ("shape", "scales"), [((2, 3, 4, 4), (1, 2)), ((1, 2, 5, 7), (1, 2, 4)), ((1, 1, 8, 8), (1, 2, 4))]
)
def test_local_pod_matches_the_loop_reference(shape: tuple[int, ...], scales: tuple[int, ...]) -> None:
    x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(local_pod(x, scales), _reference_pod(x, scales), rtol=1e-12, atol=1e-12)


def test_pod_distance_matches_the_reference() -> None:
    g = torch.Generator().manual_seed(1)
    a, b = (
        torch.randn(3, 2, 4, 4, dtype=torch.float64, generator=g),
        torch.randn(3, 2, 4, 4, dtype=torch.float64, generator=g),
    )
    ea, eb = _reference_pod(a, (1, 2, 4)), _reference_pod(b, (1, 2, 4))
    want = sum(math.sqrt(float(((ea[n] - eb[n]) ** 2).sum())) for n in range(3)) / 3
    assert float(local_pod_distance(a, b)) == pytest.approx(want, rel=1e-12)
    na, nb = ea / ea.norm(dim=1, keepdim=True), eb / eb.norm(dim=1, keepdim=True)
    want_n = float((na - nb).norm(dim=1).mean())
    assert float(local_pod_distance(a, b, normalize=True)) == pytest.approx(want_n, rel=1e-12)


maps = st.integers(0, 2**31 - 1).map(
    lambda seed: torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
)


@settings(max_examples=30, deadline=None)
@given(maps, maps, maps, st.booleans())
def test_pod_distance_is_a_pseudo_metric(a: Tensor, b: Tensor, c: Tensor, normalize: bool) -> None:
    d = lambda x, y: float(local_pod_distance(x, y, normalize=normalize))  # noqa: E731
    assert d(a, a) == 0.0
    assert d(a, b) >= 0.0
    assert d(a, b) == pytest.approx(d(b, a), rel=1e-12)
    assert d(a, c) <= d(a, b) + d(b, c) + 1e-12
    assert d(a, -a) == 0.0  # squared features: the sign is not distilled
    if normalize:
        assert d(a, 3.0 * b) == pytest.approx(d(a, b), rel=1e-9)  # scale-free after L2 normalisation
        assert d(a, b) <= 2.0 + 1e-12


def test_pod_gradient_and_errors() -> None:
    a = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    torch.autograd.gradcheck(lambda x: local_pod_distance(x, b), (a,))
    with pytest.raises(ValueError, match="same shape"):
        local_pod_distance(a, b[:, :2])
    with pytest.raises(ValueError, match="smaller than the largest POD scale"):
        local_pod(torch.randn(1, 1, 2, 8))
    with pytest.raises(ValueError, match="scales"):
        local_pod(a, scales=())
    assert local_pod(torch.randn(1, 2, 4, 4, dtype=torch.float16)).dtype == torch.float32


def test_collapse_new_classes() -> None:
    x = torch.randn(2, 6, 3, 3, dtype=torch.float64)
    y = collapse_new_classes(x, 4)
    torch.testing.assert_close(y[:, 0], x[:, 0] + x[:, 4] + x[:, 5])
    torch.testing.assert_close(y[:, 1:], x[:, 1:4])
    assert collapse_new_classes(x, 6).shape == x.shape
    with pytest.raises(ValueError, match="num_old_classes"):
        collapse_new_classes(x, 0)


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 6), st.integers(0, 2**31 - 1))
def test_normalized_entropy_is_in_unit_interval(c: int, seed: int) -> None:
    logits = 5 * torch.randn(1, c, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    p = torch.softmax(logits, dim=1)
    u = normalized_entropy(p)
    ref = -(p * p.clamp(min=1e-300).log()).sum(dim=1) / math.log(c)
    torch.testing.assert_close(u, ref)
    assert bool(((u >= 0) & (u <= 1 + 1e-12)).all())
    assert float(normalized_entropy(torch.full((1, c, 1, 1), 1.0 / c, dtype=torch.float64))) == pytest.approx(1.0)
    assert float(normalized_entropy(F.one_hot(torch.tensor([[[0]]]), c).permute(0, 3, 1, 2).double())) == 0.0


def test_pseudo_labels_follow_the_rule() -> None:
    g = torch.Generator().manual_seed(3)
    old = 3 * torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=g)
    labels = torch.randint(0, 5, (2, 8, 8), generator=g)
    labels[0, 0, 0] = 255
    thresholds = torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64)
    pseudo, factor = entropy_pseudo_labels(labels, old, thresholds)
    p = torch.softmax(old, dim=1)
    for n in range(2):
        confident_bg = 0
        for i in range(8):
            for j in range(8):
                y = int(labels[n, i, j])
                if y != 0:
                    assert int(pseudo[n, i, j]) == y  # new classes, ignored pixels: unchanged
                    continue
                c = int(p[n, :, i, j].argmax())
                u = float(-(p[n, :, i, j] * p[n, :, i, j].log()).sum() / math.log(3))
                expected = c if u < float(thresholds[c]) else 255
                confident_bg += expected != 255
                assert int(pseudo[n, i, j]) == expected
        assert float(factor[n]) == pytest.approx(confident_bg / int((labels[n] == 0).sum()))
    _, factor = entropy_pseudo_labels(torch.ones(1, 8, 8, dtype=torch.long), old[:1], thresholds)
    assert float(factor) == 1.0  # no background: the loss keeps its weight


def test_median_from_histogram_matches_sample_medians() -> None:
    g = torch.Generator().manual_seed(4)
    samples = [torch.rand(1001, generator=g, dtype=torch.float64) ** k for k in (1, 2, 3)]
    bins = 1000
    hist = torch.stack([torch.histc(s, bins=bins, min=0, max=1) for s in samples]).double()
    hist = torch.cat([hist, torch.zeros(1, bins, dtype=torch.float64)])
    med = median_from_histogram(hist)
    for k, s in enumerate(samples):
        assert float(med[k]) == pytest.approx(float(s.median()), abs=2.0 / bins)
    assert float(med[3]) == 0.0  # a class never predicted


# ---------------------------------------------------------------- the method through the learner


def _batches(scenario: Scenario, step: int) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(10 + step)
    images = torch.randn(2, 3, 32, 32, generator=g)
    labels = torch.randint(0, scenario.num_classes_at(step), (2, 32, 32), generator=g)
    labels[labels < scenario.num_old_classes(step)] = 0  # old classes are background in the current labels
    return [(images, labels)]


def test_begin_step_calibrates_on_the_data_it_is_given() -> None:
    scenario = Scenario([[1, 2], [3]])
    plop = IncrementalLearner(small_segmenter(3, width=8), scenario, "plop")
    plop.begin_step(0, data=iter(()))  # nothing to calibrate at step 0: the data is not read
    plop.end_step()
    plop.begin_step(1, data=_batches(scenario, 1))
    criterion = plop.criterion
    assert isinstance(criterion, PLOPLoss) and int(criterion.calibrated_for) == 3 and not plop.needs_calibration
    reference = IncrementalLearner(small_segmenter(3, width=8), scenario, "plop")
    reference.load_state_dict(plop.state_dict())
    reference.criterion.calibrated_for.fill_(-1)
    reference.calibrate(_batches(scenario, 1))  # the same as calibrating after begin_step
    assert torch.equal(reference.criterion.thresholds, criterion.thresholds)

    caf = IncrementalLearner(small_segmenter(3, width=8), scenario, "caf")

    def unread() -> Iterator[Any]:
        raise AssertionError("a method without calibration read the data")
        yield

    caf.begin_step(0, data=unread())


def test_plop_trains_through_the_learner_and_checkpoints(tmp_path: Path) -> None:
    torch.manual_seed(0)
    scenario = Scenario([[1, 2], [3], [4]])
    learner = IncrementalLearner(small_segmenter(3, width=8), scenario, "plop")
    assert learner.config.family == "plop" and learner.config.init == "mib" and learner.config.kd is None
    for step in range(3):
        learner.begin_step(step)
        batches = _batches(scenario, step)
        if step > 0:
            assert learner.needs_calibration
            with pytest.raises(RuntimeError, match="calibrate"):
                learner.training_step(*batches[0])
            learner.calibrate(batches)
        assert not learner.needs_calibration
        opt = torch.optim.SGD(learner.param_groups(0.01), lr=0.01)
        out = learner.training_step(*batches[0])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        assert sorted(out.terms) == (["pod", "seg", "total"] if step else ["seg", "total"])
        assert float(out.terms["total"]) == pytest.approx(sum(float(v) for k, v in out.terms.items() if k != "total"))
        learner.end_step()
    criterion = learner.criterion
    assert isinstance(criterion, PLOPLoss) and int(criterion.calibrated_for) == 4
    assert bool((criterion.thresholds[:4] >= 0.001).all())
    path = tmp_path / "plop.pt"
    learner.save(path)
    restored = IncrementalLearner.from_checkpoint(path, small_segmenter(3, width=8))
    assert restored.config == learner.config
    torch.testing.assert_close(restored.criterion.thresholds, criterion.thresholds)
    assert not restored.needs_calibration


def test_plop_loss_matches_a_float64_reference() -> None:
    """The whole step-1 loss on a float64 network: CE on pseudo-labels times the factor, POD on the encoder's
    stage outputs before their ReLU, h and the collapsed logits, weights 0.01 / 0.0005, schedule sqrt(K/|C_t|)."""
    torch.manual_seed(0)
    scenario = Scenario([[1, 2], [3, 4]])
    model = small_segmenter(3, width=4).double()
    learner = IncrementalLearner(model, scenario, "plop-release")
    learner.begin_step(0)
    learner.end_step()
    learner.begin_step(1)
    images, labels = _batches(scenario, 1)[0]
    images = images.double()
    learner.calibrate([(images, labels)])
    out = learner.training_step(images, labels)

    teacher, student = learner.teacher, learner.model
    assert teacher is not None

    def stages(net: torch.nn.Module) -> list[Tensor]:
        """The outputs of stage1-3 (the stem is followed by a stage at its resolution) before their ReLU."""
        feats, x = [], images
        for name, (conv, bn, _relu) in net.encoder.named_children():  # type: ignore[attr-defined]
            pre = bn(conv(x))
            x = F.relu(pre)
            if name != "stem":
                feats.append(pre)
        return feats

    with torch.no_grad():
        t_out = teacher.forward_features(images)
        t_maps = [*stages(teacher), t_out["h"], t_out["logits"]]
    s_out = student.forward_features(images)
    k, n_old = 5, 3
    s_logits = s_out["logits"]
    collapsed = torch.cat([s_logits[:, :1] + s_logits[:, n_old:].sum(1, keepdim=True), s_logits[:, 1:n_old]], 1)
    s_maps = [*stages(student), s_out["h"], collapsed]
    weights = [0.01] * (len(s_maps) - 1) + [0.0005]
    pod = (
        sum(
            w * float((_reference_pod(a.detach(), (1, 2, 4)) - _reference_pod(b, (1, 2, 4))).norm(dim=1).mean())
            for w, a, b in zip(weights, s_maps, t_maps)
        )
        / len(s_maps)
        * math.sqrt(k / (k - n_old))
    )
    probs = torch.softmax(F.interpolate(t_out["logits"], size=(32, 32), mode="bilinear"), dim=1)
    u = -(probs * probs.log()).sum(1) / math.log(n_old)
    c = probs.argmax(1)
    thr = learner.criterion.thresholds
    bg = labels == 0
    target = torch.where(bg, torch.where(u < thr[c], c, torch.full_like(c, 255)), labels)
    factor = (bg & (target != 255)).flatten(1).sum(1).double() / bg.flatten(1).sum(1).double()
    x = F.interpolate(s_logits.detach(), size=(32, 32), mode="bilinear")
    ce = F.cross_entropy(x, target, ignore_index=255, reduction="none") * factor[:, None, None]
    seg = float(ce.sum()) / ce.numel()
    assert float(out.terms["seg"]) == pytest.approx(seg, rel=1e-10)
    assert float(out.terms["pod"]) == pytest.approx(pod, rel=1e-10)


def test_plop_configuration() -> None:
    cfg = METHODS["plop"]
    assert cfg.options["pod_factor"] == 0.01 and cfg.options["pod_logits_factor"] == 0.0005
    assert MethodConfig.from_dict(cfg.to_dict()) == cfg
    mine = MethodConfig.preset("plop", pod_factor=1, pseudo_bins=20)
    assert mine.options["pod_factor"] == 1.0 and mine.options["pseudo_bins"] == 20 and mine.family == "plop"
    with pytest.raises(ValueError, match="pod_factor must be >= 0"):
        MethodConfig.preset("plop", pod_factor=-1.0)
    with pytest.raises(TypeError, match="pseudo_bins must be a int"):
        MethodConfig.preset("plop", pseudo_bins=2.5)
    with pytest.raises(ValueError, match=r"\['kd'\] are not settings of method family 'plop'.*pod_factor"):
        MethodConfig.preset("plop", kd="unbiased")
    for foreign in ({"lambda_ad": 100.0}, {"test_strategy": "concat"}, {"ad_balance": None}):
        with pytest.raises(ValueError, match=r"not settings of method family 'plop'; its settings: name, family"):
            MethodConfig.preset("plop", **foreign)
    with pytest.raises(ValueError, match=r"lambda_ad=5\.0 is not a setting of method family 'plop'"):
        MethodConfig.from_dict({**cfg.to_dict(), "lambda_ad": 5.0})
    release = METHODS["plop-release"]  # the family's option defaults are the release's; `plop` normalises POD
    assert MethodConfig(name="p", family="plop").to_dict() == {**release.to_dict(), "name": "p", "dropout": "frozen"}
    assert cfg.options["pod_normalize"] and not release.options["pod_normalize"]
    assert cfg.replace(name="plop-release", pod_normalize=False) == release
    with pytest.raises(ValueError, match="unknown method configuration fields"):
        MethodConfig.preset("mib", pod_factor=1.0)  # an option of another family
    assert MethodConfig.preset("plop").uses_teacher and not MethodConfig.preset("ft").uses_teacher


# ---------------------------------------------------------------- which maps POD distils


def _block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def _sequential_net(strides: list[int], width: int = 4) -> IncrementalSegmenter:
    net = nn.Module()
    net.encoder = nn.Sequential(*[_block(3 if i == 0 else width, width, s) for i, s in enumerate(strides)])
    net.refiner = _block(width, width)
    net.classifier = nn.Conv2d(width, 3, 1)
    return from_named_submodules(net, z_channels=width, h_channels=width)


def _plop(model: IncrementalSegmenter, **options: Any) -> PLOPMethod:
    config = MethodConfig.preset("plop", **options)
    return PLOPMethod(config, model, Scenario([[1, 2], [3]]))


def _tiny_deeplabv3() -> IncrementalSegmenter:
    """torchvision's DeepLabV3 on a ResNet with one or two bottlenecks per stage and 4 inner channels per group
    (output stride 8, layer3 and layer4 dilated), adapted with from_torchvision_deeplabv3."""
    resnet = ResNet(Bottleneck, [1, 2, 1, 1], width_per_group=4, replace_stride_with_dilation=[False, True, True])
    body = IntermediateLayerGetter(resnet, return_layers={"layer4": "out"})
    return from_torchvision_deeplabv3(DeepLabV3(body, DeepLabHead(2048, 3, atrous_rates=(2, 4, 6))))


def _randomize_norms(model: nn.Module, seed: int) -> None:
    """Non-trivial batch-norm statistics and affine parameters, so that eval mode is not an identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                assert m.running_mean is not None and m.running_var is not None
                m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
                m.weight.copy_(0.5 + torch.rand(m.num_features, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.num_features, generator=g))


def _pre_activation(block: Bottleneck, x: Tensor) -> Tensor:
    """A torchvision bottleneck's output before its final ReLU, computed by hand: bn3(...) + the residual."""
    out = F.relu(block.bn1(block.conv1(x)))
    out = F.relu(block.bn2(block.conv2(out)))
    out = block.bn3(block.conv3(out))
    identity = x if block.downsample is None else block.downsample(x)
    return out + identity


def test_deeplabv3_maps_are_the_stage_outputs_before_their_activation_as_the_release() -> None:
    """The release distils the 4 ResNet stage outputs before their final activation, the ASPP output and the
    logits (6 maps); the capture equals a hand computation in float64, values and gradients."""
    torch.manual_seed(0)
    model = _tiny_deeplabv3().double()
    _randomize_norms(model, 1)
    method = _plop(model)
    assert method.pod_modules == tuple(f"encoder.body.layer{i}" for i in range(1, 5))
    assert pod_stage_modules(model) == method.pod_modules
    model.eval()
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    out = method.forward(model, Batch(images, torch.zeros(2, 32, 32, dtype=torch.long), None, 0))
    assert len(out["pod"]) == 5 and out["pod"][-1] is out["h"]  # + the logits in the loss: 6 maps
    assert {"z", "z_bar", "h", "logits"} <= set(out)
    torch.testing.assert_close(out["logits"], model.forward_features(images)["logits"], rtol=0, atol=0)

    body = model.encoder.body  # type: ignore[union-attr]
    x = body.maxpool(body.relu(body.bn1(body.conv1(images))))
    expected = []
    for name in ("layer1", "layer2", "layer3", "layer4"):
        layer = getattr(body, name)
        for block in list(layer)[:-1]:
            x = block(x)
        pre = _pre_activation(layer[-1], x)
        expected.append(pre)
        x = F.relu(pre)
    for got, want in zip(out["pod"], expected):
        assert bool((want < 0).any())  # before the ReLU
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    weight = body.layer2[-1].bn3.weight
    (grad,) = torch.autograd.grad(out["pod"][1].pow(2).sum(), weight)
    (want_grad,) = torch.autograd.grad(expected[1].pow(2).sum(), weight)
    torch.testing.assert_close(grad, want_grad, rtol=1e-10, atol=1e-12)


def test_the_library_deeplabv3_distils_the_same_stages() -> None:
    assert pod_stage_modules(deeplabv3_resnet50(3)) == tuple(f"encoder.layer{i}" for i in range(1, 5))


def test_sequential_encoder_maps_are_the_last_child_at_each_resolution() -> None:
    torch.manual_seed(0)
    model = _sequential_net([2, 1, 2, 1, 2, 1]).double()  # the plain network's layout
    _randomize_norms(model, 2)
    method = _plop(model)
    assert method.pod_modules == ("encoder.1", "encoder.3", "encoder.5")
    model.eval()
    images = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    out = method.forward(model, Batch(images, torch.zeros(2, 16, 16, dtype=torch.long), None, 0))
    x, expected = images, []
    for i, (conv, bn, _relu) in enumerate(model.encoder):  # type: ignore[arg-type]
        pre = bn(conv(x))
        x = F.relu(pre)
        if i in (1, 3, 5):
            expected.append(pre)
    assert [tuple(m.shape[-2:]) for m in out["pod"]] == [(8, 8), (4, 4), (2, 2), (2, 2)]
    for got, want in zip(out["pod"][:-1], expected):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out["pod"][-1], out["h"])


@settings(max_examples=25, deadline=None)
@given(st.lists(st.sampled_from([1, 2]), min_size=1, max_size=6))
def test_sequential_stages_end_where_the_resolution_changes(strides: list[int]) -> None:
    """A child is a stage output exactly when the next child changes the resolution, or when it is the last."""
    model = _sequential_net(strides, width=2).eval()
    sizes, x = [], torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for child in model.encoder:
            x = child(x)
            sizes.append(tuple(x.shape[-2:]))
    want = tuple(f"encoder.{i}" for i in range(len(strides)) if i == len(strides) - 1 or sizes[i + 1] != sizes[i])
    assert pod_stage_modules(model) == (want if len(strides) > 1 else ())


class _ThreeLevels(nn.Module):
    """An smp-like encoder whose first level is the input image itself."""

    def __init__(self) -> None:
        super().__init__()
        self.fine, self.coarse = _block(3, 4, 2), _block(4, 8, 2)

    def forward(self, x: Tensor) -> list[Tensor]:
        fine = self.fine(x)
        return [x, fine, self.coarse(fine)]


class _Decoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(12, 4, 1)

    def forward(self, feats: list[Tensor]) -> Tensor:
        up = F.interpolate(feats[2], size=feats[1].shape[-2:])
        return self.conv(torch.cat([feats[1], up], 1))  # type: ignore[no-any-return]


def test_multi_scale_encoder_maps_are_its_levels_without_the_input_image() -> None:
    model = IncrementalSegmenter(
        _ThreeLevels(), _Decoder(), IncrementalClassifier(4, [3]), z_channels=[3, 4, 8], h_channels=4
    )
    method = _plop(model)
    assert method.pod_modules == ()
    images = torch.randn(2, 3, 16, 16)
    out = method.forward(model, Batch(images, torch.zeros(2, 16, 16, dtype=torch.long), None, 0))
    feats = out["features"]
    assert len(out["pod"]) == 3
    assert out["pod"][0] is feats[1] and out["pod"][1] is feats[2] and out["pod"][2] is out["h"]
    named = _plop(model, pod_maps="encoder.fine")  # names replace the levels
    out = named.forward(model, Batch(images, torch.zeros(2, 16, 16, dtype=torch.long), None, 0))
    assert len(out["pod"]) == 2 and bool((out["pod"][0] < 0).any())


def test_maps_can_be_named() -> None:
    torch.manual_seed(0)
    model = _sequential_net([2, 1, 2, 1])
    method = _plop(model, pod_maps="encoder.0, encoder.2 refiner")
    assert method.pod_modules == ("encoder.0", "encoder.2", "refiner")
    images = torch.randn(2, 3, 16, 16)
    out = method.forward(model, Batch(images, torch.zeros(2, 16, 16, dtype=torch.long), None, 0))
    assert [tuple(m.shape[-2:]) for m in out["pod"]] == [(8, 8), (4, 4), (4, 4), (4, 4)]
    conv, bn, _ = model.encoder[0]  # type: ignore[index,misc]
    torch.testing.assert_close(out["pod"][0], bn(conv(images)))  # before the block's ReLU, as the auto rule
    learner = IncrementalLearner(_sequential_net([2, 1]), Scenario([[1, 2], [3]]), "plop", pod_maps="encoder.1")
    assert learner.config.options["pod_maps"] == "encoder.1"
    assert MethodConfig.from_dict(learner.config.to_dict()) == learner.config
    with pytest.raises(ValueError, match=r"'encoder\.9', which is not a submodule.*encoder\.0"):
        _plop(model, pod_maps="encoder.9")
    with pytest.raises(ValueError, match='pod_maps must be "auto" or names'):
        MethodConfig.preset("plop", pod_maps=" , ")
    model.spare = nn.Identity()  # a submodule the forward pass never runs
    unused = _plop(model, pod_maps="encoder.0.2 spare")
    with pytest.raises(ValueError, match=r"\['spare'\] were not computed"):
        unused.forward(model, Batch(images, torch.zeros(2, 16, 16, dtype=torch.long), None, 0))


def test_a_network_without_stages_distils_z() -> None:
    model = small_segmenter(3, width=4)
    model.encoder = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1))  # one child: no stages
    method = _plop(model)
    assert method.pod_modules == ()
    images = torch.randn(1, 3, 16, 16)
    out = method.forward(model, Batch(images, torch.zeros(1, 16, 16, dtype=torch.long), None, 0))
    assert len(out["pod"]) == 2 and out["pod"][0] is out["z"]
