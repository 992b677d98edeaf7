"""IncrementalLearner: lifecycle over three steps, teacher, parameter groups, training, prediction."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from incseg.learner import IncrementalLearner, MethodConfig, is_frozen, unwrap_module
from incseg.losses import CAFLoss
from incseg.models import small_segmenter
from incseg.nn.caf import ContinualAttentiveFusion
from incseg.nn.squeeze_excitation import SqueezeExcitation
from incseg.scenarios import Scenario

MakeLearner = Callable[..., IncrementalLearner]


def _trainable(learner: IncrementalLearner) -> list[nn.Parameter]:
    params = list(learner.model.parameters()) + list(learner.criterion.parameters())
    return [p for p in params if p.requires_grad]


@pytest.mark.parametrize("method", ["ft", "lwf", "mib", "caf", "joint"])
def test_lifecycle_over_three_steps(
    make_learner: MakeLearner, labels_for: Callable[..., Tensor], images: Tensor, method: str
) -> None:
    learner = make_learner(method)
    scenario = learner.scenario
    uses_caf = method == "caf"
    assert learner.step == -1 and learner.teacher is None and learner.teacher_forward(images) is None
    assert isinstance(learner.criterion, CAFLoss) and learner.criterion.kd == learner.config.kd
    assert dict(learner.module.named_children()) == {"model": learner.model, "criterion": learner.criterion}

    for step in range(scenario.num_steps):
        learner.begin_step(step)
        model = learner.model
        assert (learner.step, learner.step_finished) == (step, False)
        assert model.classifier.classes_per_step == list(scenario.classes_per_step[: step + 1])
        assert learner.num_old_classes == scenario.num_old_classes(step)
        assert (model.fusion is not None) == (uses_caf and step > 0)
        if model.fusion is not None:
            assert isinstance(model.fusion, ContinualAttentiveFusion) and model.fusion.test_strategy == "skip"

        teacher = learner.teacher
        if step == 0:
            assert teacher is None
        else:
            assert teacher is not None and is_frozen(teacher)
            assert teacher.num_classes == scenario.num_classes_at(step - 1)
            assert (teacher.fusion is not None) == (uses_caf and step > 1)
            teacher.train()  # stays in eval mode
            assert not any(m.training for m in teacher.modules())
            assert not any(p.requires_grad for p in teacher.parameters())
            assert all(p not in set(learner.module.parameters()) for p in teacher.parameters())

        # param_groups: every trainable parameter exactly once, CAF and SE blocks included
        groups = learner.param_groups(0.01)
        grouped = [p for g in groups for p in g["params"]]
        assert len(grouped) == len({id(p) for p in grouped})
        assert {id(p) for p in grouped} == {id(p) for p in _trainable(learner)}
        names = [g["name"] for g in groups]
        if uses_caf and step > 0:
            assert names == ["backbone", "head", "caf", "criterion"]
            by_name = {g["name"]: {id(p) for p in g["params"]} for g in groups}
            assert by_name["caf"] == {id(p) for p in model.fusion.parameters()}  # type: ignore[union-attr]
            se = [m for m in learner.criterion.modules() if isinstance(m, SqueezeExcitation)]
            assert len(se) == 2 and all(id(p) in by_name["criterion"] for m in se for p in m.parameters())
        else:
            assert names == ["backbone", "head"]

        out = learner.training_step(images, labels_for(scenario, step))
        assert out.loss.ndim == 0 and torch.isfinite(out.loss)
        expected_terms = {"seg", "total"}
        if step > 0 and learner.config.kd is not None:
            expected_terms.add("kd")
        if step > 0 and learner.config.ad is not None:
            expected_terms.add("ad")
        assert set(out.terms) == expected_terms
        out.loss.backward()
        # every optimised parameter gets a gradient (so DDP needs no find_unused_parameters), the teacher none
        assert all(p.grad is not None for p in grouped)
        if teacher is not None:
            assert all(p.grad is None for p in teacher.parameters())
        learner.module.zero_grad(set_to_none=True)
        learner.end_step()
        assert learner.step_finished

    assert learner.predict(images).shape == (2, scenario.num_classes_at(2), 32, 32)


def test_teacher_is_snapshot_of_previous_model(make_learner: MakeLearner, images: Tensor) -> None:
    learner = make_learner("caf")
    learner.begin_step(0)
    learner.model.eval()
    before = learner.model(images)
    learner.end_step()
    learner.begin_step(1)
    teacher_out = learner.teacher_forward(images)
    assert teacher_out is not None and set(teacher_out) == {"z", "z_bar", "h", "logits"}
    assert not teacher_out["logits"].requires_grad
    assert torch.allclose(teacher_out["logits"], before)
    # MiB init: the old-class probabilities of the student equal the teacher's at the start of the step
    learner.model.eval()
    probs = learner.model(images).softmax(1)
    assert torch.allclose(probs[:, 1:3], before.softmax(1)[:, 1:3], atol=1e-5)
    # identity at init and shared features: attentive distillation is zero with the student in eval mode
    learner.module.eval()
    out = learner.module(images, torch.zeros(2, 32, 32, dtype=torch.long), teacher_out)
    assert float(out.terms["ad"]) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("method", ["ft", "caf"])
def test_optimisation_reduces_the_loss(
    make_learner: MakeLearner,
    advance: Callable[..., Any],
    train_iters: Callable[..., list[float]],
    labels_for: Callable[..., Tensor],
    images: Tensor,
    method: str,
) -> None:
    learner = make_learner(method, lambda_ad=10.0)
    advance(learner, images, 1, iters=0)
    optimizer = torch.optim.Adam(learner.param_groups(1e-3, weight_decay=0.0))
    losses = train_iters(learner, optimizer, images, labels_for(learner.scenario, 1), 8)
    assert losses[-1] < losses[0]


def test_param_groups_options(make_learner: MakeLearner) -> None:
    learner = make_learner("caf")
    learner.begin_step(0)
    learner.model.encoder.requires_grad_(False)  # a user-frozen part is left out
    groups = learner.param_groups(0.1, weight_decay=0.0, head_lr=1.0)
    assert {g["name"]: (g["lr"], g["weight_decay"]) for g in groups} == {"backbone": (0.1, 0.0), "head": (1.0, 0.0)}
    assert all(p.requires_grad for g in groups for p in g["params"])
    assert sum(len(g["params"]) for g in groups) == len(_trainable(learner))
    torch.optim.SGD(groups, lr=0.1)  # accepted by an optimizer
    for kwargs, error in (
        ({"lr": 0.0}, ValueError),
        ({"lr": float("inf")}, ValueError),
        ({"lr": "0.1"}, TypeError),
        ({"lr": 0.1, "weight_decay": -1.0}, ValueError),
        ({"lr": 0.1, "head_lr": 0.0}, ValueError),
    ):
        with pytest.raises(error):
            learner.param_groups(**kwargs)


def test_lifecycle_errors(make_learner: MakeLearner, scenario: Scenario, images: Tensor) -> None:
    learner = make_learner("mib")
    labels = torch.zeros(2, 32, 32, dtype=torch.long)
    with pytest.raises(RuntimeError, match="begin_step"):
        learner.training_step(images, labels)
    with pytest.raises(RuntimeError, match="end_step"):
        learner.end_step()
    with pytest.raises(ValueError, match=r"in order.*begin_step\(0\)"):
        learner.begin_step(1)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        learner.begin_step(3)
    with pytest.raises(TypeError, match="int"):
        learner.begin_step(True)
    learner.begin_step(0)
    with pytest.raises(RuntimeError, match="end_step"):
        learner.begin_step(1)
    learner.end_step()
    with pytest.raises(RuntimeError, match="end_step"):
        learner.end_step()
    with pytest.raises(ValueError, match=r"in order.*begin_step\(1\)"):
        learner.begin_step(0)
    learner.model.classifier.add_classes(2)  # changed behind the learner's back
    with pytest.raises(RuntimeError, match="outside the learner"):
        learner.begin_step(1)


def test_step0_classifier_size_is_checked(scenario: Scenario) -> None:
    learner = IncrementalLearner(small_segmenter(5, width=8), scenario, "ft")
    with pytest.raises(ValueError, match=r"num_classes_at\(0\)=3.*classes_per_step=\[5\]"):
        learner.begin_step(0)
    model = small_segmenter(3, width=8)
    model.fusion = ContinualAttentiveFusion(model.z_channels)
    with pytest.raises(ValueError, match="fusion module at step 0"):
        IncrementalLearner(model, scenario, "caf").begin_step(0)


def test_constructor_arguments(scenario: Scenario) -> None:
    model = small_segmenter(3, width=8)
    with pytest.raises(TypeError, match="IncrementalSegmenter"):
        IncrementalLearner(nn.Conv2d(3, 3, 1), scenario)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Scenario"):
        IncrementalLearner(model, [[1, 2], [3]])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="valid methods"):
        IncrementalLearner(model, scenario, "icarl")
    with pytest.raises(TypeError, match="method"):
        IncrementalLearner(model, scenario, 3)  # type: ignore[arg-type]
    learner = IncrementalLearner(nn.DataParallel(model), scenario, MethodConfig.preset("lwf"), lambda_d=1.0)  # type: ignore[arg-type]
    assert learner.model is model and learner.config.lambda_d == 1.0 and learner.config.kd == "plain"
    assert learner.criterion.lambda_d == 1.0 and "lwf" in repr(learner)


def test_training_step_module_argument(make_learner: MakeLearner, images: Tensor) -> None:
    learner = make_learner("ft")
    learner.begin_step(0)
    labels = torch.zeros(2, 32, 32, dtype=torch.long)
    wrapped = nn.DataParallel(learner.module)
    assert unwrap_module(wrapped) is learner.module
    assert torch.equal(
        learner.training_step(images, labels, module=wrapped).loss, learner.training_step(images, labels).loss
    )
    other = make_learner("ft").module
    with pytest.raises(ValueError, match=r"learner\.module"):
        learner.training_step(images, labels, module=other)


def test_ft_does_not_run_the_teacher(
    make_learner: MakeLearner, images: Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    learner = make_learner("ft")
    learner.begin_step(0)
    learner.end_step()
    learner.begin_step(1)

    def fail(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("teacher called")

    monkeypatch.setattr(learner, "teacher_forward", fail)
    learner.training_step(images, torch.zeros(2, 32, 32, dtype=torch.long))


@pytest.fixture
def caf_step1(make_learner: MakeLearner, advance: Callable[..., Any], images: Tensor) -> IncrementalLearner:
    learner = make_learner("caf")
    advance(learner, images, 1, iters=2, lr=1e-2)
    return learner


def test_predict_strategies(caf_step1: IncrementalLearner, images: Tensor) -> None:
    learner = caf_step1
    preds = {s: learner.predict(images, strategy=s) for s in ("skip", "zero_pad", "concat")}
    for logits in preds.values():
        assert logits.shape == (2, 4, 32, 32) and logits.dtype == torch.float32 and torch.isfinite(logits).all()
        assert not logits.requires_grad
    assert torch.equal(learner.predict(images), preds["skip"])  # the configured default
    assert not torch.allclose(preds["skip"], preds["zero_pad"])
    assert not torch.allclose(preds["skip"], preds["concat"])

    # skip ignores the teacher, concat uses it
    assert learner.teacher is not None
    with torch.no_grad():
        for p in learner.teacher.encoder.parameters():
            p.add_(torch.randn_like(p))
    assert torch.equal(learner.predict(images, strategy="skip"), preds["skip"])
    assert torch.equal(learner.predict(images, strategy="zero_pad"), preds["zero_pad"])
    assert not torch.allclose(learner.predict(images, strategy="concat"), preds["concat"])

    with pytest.raises(ValueError, match="strategy must be"):
        learner.predict(images, strategy="average")  # type: ignore[arg-type]


def test_predict_restores_modes_and_strategy(caf_step1: IncrementalLearner, images: Tensor) -> None:
    learner = caf_step1
    model = learner.model
    model.train()
    model.encoder.eval()  # a user's mixed setting (e.g. frozen BN) must survive
    fusion = model.fusion
    assert isinstance(fusion, ContinualAttentiveFusion)
    fusion.test_strategy = "zero_pad"
    before = {name: m.training for name, m in model.named_modules()}
    learner.predict(images, strategy="concat")
    assert {name: m.training for name, m in model.named_modules()} == before
    assert fusion.test_strategy == "zero_pad"
    with pytest.raises(ValueError):
        learner.predict(images[0])  # unbatched input is rejected with a clear message
    assert {name: m.training for name, m in model.named_modules()} == before


def test_predict_under_autocast_returns_float32(caf_step1: IncrementalLearner, images: Tensor) -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = caf_step1.predict(images)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_predict_without_fusion_ignores_strategy(make_learner: MakeLearner, images: Tensor) -> None:
    learner = make_learner("mib")
    learner.begin_step(0)
    assert torch.equal(learner.predict(images, strategy="concat"), learner.predict(images))


def test_to_moves_teacher_and_module(caf_step1: IncrementalLearner) -> None:
    assert caf_step1.to(torch.float64) is caf_step1
    assert caf_step1.teacher is not None
    for module in (caf_step1.model, caf_step1.criterion, caf_step1.teacher):
        assert all(p.dtype == torch.float64 for p in module.parameters())


def test_caf_inner_channels_reach_the_module_and_survive_a_checkpoint(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import torch

    from incseg.learner import IncrementalLearner
    from incseg.models import small_segmenter
    from incseg.scenarios import Scenario

    scenario = Scenario([[1, 2], [3]])
    learner = IncrementalLearner(small_segmenter(3, width=8), scenario, "caf", caf_inner_channels=4)
    learner.begin_step(0)
    learner.end_step()
    learner.begin_step(1)
    fusion = learner.model.fusion
    assert fusion is not None
    assert fusion.projection_new.theta.out_channels == 4
    learner.save(tmp_path / "c.pt")
    torch.manual_seed(1)
    again = IncrementalLearner.from_checkpoint(tmp_path / "c.pt", small_segmenter(3, width=8))
    assert again.config.caf_inner_channels == 4
    assert again.model.fusion.projection_old.theta.out_channels == 4  # type: ignore[union-attr]


# ----------------------------------------------------------------------------- dtypes and devices


def _two_steps(model: torch.nn.Module, dtype: torch.dtype) -> tuple[IncrementalLearner, torch.Tensor]:
    scenario = Scenario([[1, 2], [3]])
    learner = IncrementalLearner(model, scenario, "caf")
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(dtype)
    learner.begin_step(0)
    learner.training_step(images, torch.randint(0, 3, (2, 32, 32))).loss.backward()
    learner.end_step()
    learner.begin_step(1)
    return learner, images


@pytest.mark.parametrize("convert_after", [False, True])
def test_a_float64_model_trains_with_caf(convert_after: bool) -> None:
    model = small_segmenter(3, width=8)
    if not convert_after:
        model = model.double()
    learner = IncrementalLearner(model, Scenario([[1, 2], [3]]), "caf")
    if convert_after:  # converted once the learner (and its criterion) exist
        learner.model.double()
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    learner.begin_step(0)
    learner.training_step(images, torch.randint(0, 3, (2, 32, 32))).loss.backward()
    learner.end_step()
    learner.begin_step(1)
    out = learner.training_step(images, torch.randint(0, 4, (2, 32, 32)))  # attentive distillation: SE blocks
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(p.dtype == torch.float64 for p in learner.criterion.parameters())
    assert torch.isfinite(learner.predict(images)).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_images_of_another_float_dtype_are_converted_to_the_models(dtype: torch.dtype) -> None:
    learner, images = _two_steps(small_segmenter(3, width=8), torch.float32)
    expected = learner.predict(images.to(dtype).float())
    got = learner.predict(images.to(dtype))
    assert got.dtype == torch.float32 and torch.equal(got, expected)
    learner.training_step(images.to(dtype), torch.randint(0, 4, (2, 32, 32))).loss.backward()


def test_meta_tensors_are_clear_errors() -> None:
    learner, images = _two_steps(small_segmenter(3, width=8), torch.float32)
    meta_images = torch.empty(2, 3, 32, 32, device="meta")
    with pytest.raises(ValueError, match="images are on the meta device"):
        learner.predict(meta_images)
    with pytest.raises(ValueError, match="images are on the meta device"):
        learner.training_step(meta_images, torch.zeros(2, 32, 32, dtype=torch.long))
    with torch.device("meta"):
        meta_model = small_segmenter(3, width=8)
    meta_learner = IncrementalLearner(meta_model, Scenario([[1, 2], [3]]), "caf")
    meta_learner.begin_step(0)
    with pytest.raises(ValueError, match=r"model's weights are on the meta device.*to_empty"):
        meta_learner.predict(images)
    with pytest.raises(ValueError, match=r"model's weights are on the meta device"):
        meta_learner.training_step(images, torch.zeros(2, 32, 32, dtype=torch.long))


@pytest.mark.parametrize("method", ["caf", "caf-paper", "mib"])
def test_c7_an_empty_batch_at_a_later_step_is_a_zero_loss(
    make_learner: Callable[..., IncrementalLearner], method: str
) -> None:
    """Issue 23 c7: CAF's non-local projection could not reshape a batch of 0 images; every method returns 0."""
    learner = make_learner(method)
    learner.begin_step(0)
    learner.end_step()
    learner.begin_step(1)
    out = learner.training_step(torch.zeros(0, 3, 32, 32), torch.zeros(0, 32, 32, dtype=torch.long))
    assert float(out.loss.detach()) == 0.0 and out.loss.requires_grad
    out.loss.backward()


def test_param_group_factors_of_a_method(make_learner: MakeLearner) -> None:
    """A method's :meth:`~incseg.methods.Method.param_group_factors` give the parts it names groups of their own."""
    learner = make_learner("mib")
    learner.begin_step(0)
    learner.end_step()
    learner.begin_step(1)
    method = learner.method
    factors = {"encoder": (0.5, 0.0), "new_classifier": (2.0, 1.0), "refiner": (1.0, 3.0)}
    method.param_group_factors = lambda step: factors  # type: ignore[method-assign]
    groups = {g["name"]: g for g in learner.param_groups(0.1, weight_decay=0.01, head_lr=0.2)}
    assert {k: (g["lr"], g["weight_decay"]) for k, g in groups.items()} == {
        "encoder": (0.05, 0.0),
        "refiner": (0.1, pytest.approx(0.03)),
        "head": (0.2, 0.01),
        "new_classifier": (pytest.approx(0.4), 0.01),
    }
    assert groups["new_classifier"]["params"] == list(learner.model.classifier.head(1).parameters())
    assert groups["head"]["params"] == list(learner.model.classifier.head(0).parameters())
    assert sum(len(g["params"]) for g in groups.values()) == len(_trainable(learner))
    for bad, error in (
        ({"decoder": (1.0, 1.0)}, ValueError),
        ({"encoder": (-1.0, 1.0)}, ValueError),
        ({"encoder": (1.0,)}, TypeError),
        ({"encoder": ("1", 1.0)}, TypeError),
        ([("encoder", (1.0, 1.0))], TypeError),
    ):
        method.param_group_factors = lambda step, bad=bad: bad  # type: ignore[method-assign, misc]
        with pytest.raises(error):
            learner.param_groups(0.1)
