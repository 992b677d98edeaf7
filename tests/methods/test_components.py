"""Components compose with any family: configuration, the composed loss, CAF's blocks, weight fusion."""

from __future__ import annotations

import copy
import importlib.util
import math
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from incseg.learner import IncrementalLearner, MethodConfig
from incseg.losses import LossOutput
from incseg.losses.attentive import AttentiveDistillationLoss
from incseg.methods import (
    METHODS,
    Batch,
    ComposedMethod,
    Method,
    WeightFusionComponent,
    fuse_weights,
    get_component,
    register_method,
    unregister_preset,
)
from incseg.models import small_segmenter
from incseg.scenarios import Scenario


def _run(learner: IncrementalLearner, steps: int, seed: int = 0) -> LossOutput:
    g = torch.Generator().manual_seed(seed)
    scenario = learner.scenario
    out = None
    for step in range(steps):
        images = torch.randn(2, 3, 32, 32, generator=g, dtype=torch.float64)
        labels = torch.randint(0, scenario.num_classes_at(step), (2, 32, 32), generator=g)
        learner.begin_step(step, data=[(images, labels)])
        optimizer = torch.optim.SGD(learner.param_groups(0.01), lr=0.01)
        out = learner.training_step(images, labels)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        learner.end_step()
    assert out is not None
    return out


# ---------------------------------------------------------------------------------------------- configuration
def test_components_are_validated_with_the_valid_lists() -> None:
    with pytest.raises(ValueError, match="component must be one of"):
        MethodConfig.preset("mib").replace(components=("nope",))
    with pytest.raises(ValueError, match="must not repeat"):
        MethodConfig.preset("mib").replace(components=("ewf", "ewf"))
    with pytest.raises(TypeError, match="list of component names"):
        MethodConfig.preset("mib").replace(components="ewf")
    with pytest.raises(ValueError, match="built in"):  # the CAF family has its own fusion module and AD
        MethodConfig.preset("mib").replace(components=("caf-fusion",))
    with pytest.raises(ValueError, match="memory_size"):  # an option of a component the method does not have
        MethodConfig.preset("mib", memory_size=3)
    with pytest.raises(ValueError, match="ewf_alpha must be in"):
        MethodConfig.preset("mib+ewf", ewf_alpha=2.0)
    with pytest.raises(TypeError, match="memory_size must be a int"):
        MethodConfig.preset("mib-m", memory_size=2.5)
    with pytest.raises(ValueError, match="lambda_ad"):  # plop alone does not read CAF's settings
        MethodConfig.preset("plop", lambda_ad=10.0)
    assert MethodConfig.preset("plop+caf", lambda_ad=10.0).lambda_ad == 10.0  # its AD component does


def test_composed_presets_round_trip_and_keep_component_options() -> None:
    for name in ("plop+caf", "mib+ewf", "mib-m", "plop-m", "plop+ewf"):
        config = METHODS[name]
        assert config.components and MethodConfig.from_dict(config.to_dict()) == config
    config = MethodConfig.preset("mib-m", memory_size=7)
    assert config.options == {"memory_size": 7, "memory_seed": 0}
    assert config.to_dict()["memory_size"] == 7 and config.to_dict()["components"] == ["replay"]
    dropped = config.replace(components=())  # options of a dropped component go with it
    assert dropped.options == {} and MethodConfig.from_dict(dropped.to_dict()) == METHODS["mib"].replace(name="mib-m")
    plop_caf = METHODS["plop+caf"]
    recipe = METHODS["caf"]
    assert (plop_caf.ad, plop_caf.ad_balance, plop_caf.ad_on_new, plop_caf.ad_maps, plop_caf.fusion_dropout) == (
        recipe.ad,
        recipe.ad_balance,
        recipe.ad_on_new,
        recipe.ad_maps,
        recipe.fusion_dropout,
    )
    assert plop_caf.options["pod_factor"] == METHODS["plop"].options["pod_factor"]
    assert plop_caf.uses_teacher and not METHODS["ft"].replace(components=("ewf",)).uses_teacher


def test_to_dict_of_a_0_2_configuration_loads_without_components() -> None:
    data = METHODS["mib"].to_dict()
    del data["components"]
    assert MethodConfig.from_dict(data) == METHODS["mib"]


# ---------------------------------------------------------------------------------------------- composed loss
class _CEOnly(Method):
    """A family of the test: MiB's unbiased cross-entropy only, written with torch ops."""

    family = "test-ce-only"

    def loss(self, criterion: nn.Module, out: Mapping[str, Any], batch: Batch) -> LossOutput:
        logits = F.interpolate(out["logits"], size=batch.labels.shape[-2:], mode="bilinear", align_corners=False)
        n_old = batch.num_old_classes
        if n_old:  # background = log-sum-exp of background and old classes (eq. 14-15)
            log_z = torch.logsumexp(logits, dim=1, keepdim=True)
            bg = torch.logsumexp(logits[:, :n_old], dim=1, keepdim=True)
            log_p = torch.cat([bg, logits[:, n_old:]], dim=1) - log_z
            target = torch.where(batch.labels < n_old, torch.zeros_like(batch.labels), batch.labels - n_old + 1)
            target = torch.where(batch.labels == 255, batch.labels, target)
            seg = F.nll_loss(log_p, target, ignore_index=255)
        else:
            seg = F.cross_entropy(logits, batch.labels, ignore_index=255)
        return LossOutput(seg, {"seg": seg.detach(), "total": seg.detach()})


register_method(_CEOnly)


@pytest.mark.parametrize(("ad_balance", "ad_maps"), [(None, "z+h"), (0.1, "z+h"), (None, "z"), (0.1, "z"), (0.1, "h")])
def test_attentive_distillation_component_equals_the_built_in_ad_in_float64(
    ad_balance: float | None, ad_maps: str
) -> None:
    scenario = Scenario([[1, 2], [3]])
    built_in = MethodConfig.preset("baseline+ad").replace(name="ad-built-in", ad_balance=ad_balance, ad_maps=ad_maps)
    composed = MethodConfig(
        name="ad-composed",
        family="test-ce-only",
        components=("attentive-distillation",),
        ad="both",
        ad_balance=ad_balance,
        ad_on_new=built_in.ad_on_new,
        ad_maps=built_in.ad_maps,
        lambda_ad=built_in.lambda_ad,
        init=built_in.init,
        dropout=built_in.dropout,
    )
    torch.manual_seed(0)
    model = small_segmenter(3, width=8).double()
    learners = [IncrementalLearner(copy.deepcopy(model), scenario, c) for c in (built_in, composed)]
    ad_built_in = learners[0].criterion.ad_loss  # type: ignore[union-attr]
    ad_composed = learners[1].criterion.components["attentive-distillation"]  # type: ignore[index]
    assert isinstance(ad_built_in, AttentiveDistillationLoss) and isinstance(ad_composed, AttentiveDistillationLoss)
    assert ad_built_in.maps == ad_composed.maps == built_in.ad_maps
    ad_composed.load_state_dict(ad_built_in.state_dict())  # the same SE blocks
    outs = [_run(learner, 2) for learner in learners]
    assert sorted(outs[0].terms) == sorted(outs[1].terms) == ["ad", "seg", "total"]
    for key in ("seg", "ad", "total"):
        torch.testing.assert_close(outs[1].terms[key], outs[0].terms[key], rtol=1e-12, atol=1e-14)
    if ad_balance is not None:
        torch.testing.assert_close(outs[1].stats["lambda_ad"], outs[0].stats["lambda_ad"], rtol=1e-12, atol=0)
    for a, b in zip(learners[0].model.parameters(), learners[1].model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_plop_with_caf_blocks_adds_fusion_and_ad_to_plop_s_terms() -> None:
    scenario = Scenario([[1, 2], [3], [4]])
    torch.manual_seed(0)
    learner = IncrementalLearner(small_segmenter(3, width=8).double(), scenario, "plop+caf")
    assert isinstance(learner.method, ComposedMethod)
    out = _run(learner, 3)
    assert sorted(out.terms) == ["ad", "pod", "seg", "total"]
    torch.testing.assert_close(out.terms["total"], out.terms["seg"] + out.terms["pod"] + out.terms["ad"])
    assert learner.model.fusion is not None and "caf" in [g["name"] for g in learner.param_groups(0.01)]
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    skip = learner.predict(images, strategy="skip")
    concat = learner.predict(images, strategy="concat")
    assert skip.shape == concat.shape == (2, 5, 32, 32) and not torch.equal(skip, concat)
    plop_alone = IncrementalLearner(small_segmenter(3, width=8).double(), scenario, "plop")
    assert sorted(_run(plop_alone, 2).terms) == ["pod", "seg", "total"] and plop_alone.model.fusion is None


def test_composed_checkpoint_round_trip(tmp_path: Path) -> None:
    scenario = Scenario([[1, 2], [3], [4]])
    torch.manual_seed(0)
    learner = IncrementalLearner(small_segmenter(3, width=8).double(), scenario, "plop+caf")
    _run(learner, 2)
    learner.save(tmp_path / "c.pt")
    loaded = IncrementalLearner.from_checkpoint(tmp_path / "c.pt", small_segmenter(3, width=8).double())
    assert loaded.config == learner.config and loaded.step == 1
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(loaded.predict(images), learner.predict(images), rtol=0, atol=0)
    for key, value in learner.criterion.state_dict().items():
        assert torch.equal(loaded.criterion.state_dict()[key], value), key


# ---------------------------------------------------------------------------------------------- weight fusion
def _reference_fusion(new: Mapping[str, Tensor], old: Mapping[str, Tensor], alpha: float) -> dict[str, Tensor]:
    out = {}
    for name, value in new.items():
        value = value.clone()
        if name in old and value.is_floating_point():
            rows = old[name].shape[0] if old[name].dim() else None
            if rows is None or rows == value.shape[0]:
                value = alpha * old[name] + (1 - alpha) * value
            else:
                value[:rows] = alpha * old[name] + (1 - alpha) * value[:rows]
        out[name] = value
    return out


@settings(max_examples=25, deadline=None)
@given(alpha=st.floats(0.0, 1.0), seed=st.integers(0, 2**16), grow=st.integers(0, 3))
def test_fuse_weights_equals_the_float64_reference(alpha: float, seed: int, grow: int) -> None:
    torch.manual_seed(seed)
    old = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1)).double()
    new = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 2 + grow, 1)).double()
    with torch.no_grad():
        for module in (old, new):
            module[1].running_mean.normal_()
            module[1].running_var.uniform_(0.5, 2.0)
            module[1].num_batches_tracked.fill_(seed % 7)
    before = {k: v.clone() for k, v in new.state_dict().items()}
    expected = _reference_fusion(before, old.state_dict(), alpha)
    assert fuse_weights(new, old, alpha) == 8  # 6 parameters, 2 running statistics
    for name, value in new.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=1e-12, atol=1e-14)
    assert torch.equal(new[1].num_batches_tracked, before["1.num_batches_tracked"])  # integers keep new's
    if grow:
        assert torch.equal(new[2].weight[2:], before["2.weight"][2:])  # grown rows keep their trained values


def test_fuse_weights_end_points_and_errors() -> None:
    old, new = nn.Linear(3, 2).double(), nn.Linear(3, 2).double()
    kept = copy.deepcopy(new)
    fuse_weights(new, old, 0.0)
    assert torch.equal(new.weight, kept.weight)
    fuse_weights(new, old, 1.0)
    assert torch.equal(new.weight, old.weight)
    for alpha in (-0.1, 1.5, True):
        with pytest.raises(ValueError, match="alpha"):
            fuse_weights(new, old, alpha)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cannot be fused"):
        fuse_weights(nn.Linear(3, 2), nn.Linear(4, 2), 0.5)


def test_ewf_component_follows_the_release_schedule_and_freezes_old_heads() -> None:
    scenario = Scenario([list(range(1, 16)), [16], [17]])  # 15-1 style: 16 old classes, 1 new
    config = METHODS["mib+ewf"]
    part = WeightFusionComponent(config, small_segmenter(16, width=8), scenario)
    assert part.old_share(1) == pytest.approx(1 - math.sqrt(1 / 17), abs=1e-15)
    assert part.old_share(2) == pytest.approx(1 - math.sqrt(1 / 18), abs=1e-15)
    fixed = WeightFusionComponent(config.replace(ewf_schedule=False, ewf_alpha=0.3), small_segmenter(16), scenario)
    assert fixed.old_share(1) == 0.3

    small = Scenario([[1, 2], [3]])
    torch.manual_seed(0)
    learner = IncrementalLearner(small_segmenter(3, width=8).double(), small, "mib+ewf")
    _run(learner, 1)
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 32, 32, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 4, (2, 32, 32), generator=g)
    learner.begin_step(1)
    assert not any(p.requires_grad for p in learner.model.classifier.head(0).parameters())  # --fix_pre_cls
    assert all(p.requires_grad for p in learner.model.classifier.head(1).parameters())
    optimizer = torch.optim.SGD(learner.param_groups(0.1), lr=0.1)
    out = learner.training_step(images, labels)
    optimizer.zero_grad()
    out.loss.backward()
    optimizer.step()
    trained = {k: v.clone() for k, v in learner.model.state_dict().items()}
    assert learner.teacher is not None
    old = {k: v.clone() for k, v in learner.teacher.state_dict().items()}
    learner.end_step()
    share = 1 - math.sqrt(1 / 4)  # 1 new class among 4 seen
    expected = _reference_fusion(trained, old, share)
    for name, value in learner.model.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=1e-12, atol=1e-14, msg=name)
    assert "classifier.heads.1.weight" not in old  # the new head keeps its trained values (checked above)


# ---------------------------------------------------------------------------------------------- extension
_PLUGIN = '''
"""A family and a component of a user's own, in one file outside incseg."""
import torch
import torch.nn.functional as F
from incseg.losses import LossOutput
from incseg.methods import Component, Method, MethodConfig, register_component, register_method, register_preset


@register_method
class PlainCE(Method):
    family = "user-plain-ce"

    def loss(self, criterion, out, batch):
        logits = F.interpolate(out["logits"], size=batch.labels.shape[-2:], mode="bilinear", align_corners=False)
        seg = F.cross_entropy(logits, batch.labels, ignore_index=255)
        return LossOutput(seg, {"seg": seg.detach(), "total": seg.detach()})


@register_component
class LogitNorm(Component):
    name = "user-logit-norm"
    options = {"logit_norm_weight": 0.1}

    @classmethod
    def uses_teacher(cls, config):
        return False

    def loss_terms(self, criterion, out, batch, task):
        return {"norm": self.config.options["logit_norm_weight"] * out["logits"].square().mean()}, {}


register_preset(
    MethodConfig(name="user-ce+caf", family="user-plain-ce", components=("caf-fusion", "user-logit-norm"))
)
'''


def test_a_new_family_with_a_composed_component_is_one_file_outside_the_package(tmp_path: Path) -> None:
    path = tmp_path / "my_method.py"
    path.write_text(_PLUGIN)
    spec = importlib.util.spec_from_file_location("my_method", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["my_method"] = module
    try:
        spec.loader.exec_module(module)
        assert get_component("user-logit-norm").options == {"logit_norm_weight": 0.1}
        torch.manual_seed(0)
        learner = IncrementalLearner(small_segmenter(3, width=8), Scenario([[1, 2], [3]]), "user-ce+caf")
        out = _run(learner, 2)
        assert sorted(out.terms) == ["norm", "seg", "total"] and learner.model.fusion is not None
        assert learner.config.to_dict()["logit_norm_weight"] == 0.1
    finally:
        unregister_preset("user-ce+caf")
        sys.modules.pop("my_method", None)
