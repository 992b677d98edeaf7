"""TrainingModule: direct use, teacher_out checks, and DistributedDataParallel on a 1-process gloo group."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from incseg.learner import IncrementalLearner, TrainingModule
from incseg.losses import CAFLoss
from incseg.methods import METHODS, CAFMethod
from incseg.models import small_segmenter
from incseg.scenarios import Scenario

MakeLearner = Callable[..., IncrementalLearner]


def _caf_method(model: torch.nn.Module) -> CAFMethod:
    return CAFMethod(METHODS["caf"], model, Scenario([[1, 2], [3]]))  # type: ignore[arg-type]


def test_step0_needs_no_teacher(images: Tensor) -> None:
    model = small_segmenter(3, width=8)
    module = TrainingModule(model, CAFLoss(32, 16), _caf_method(model))
    out = module(images, torch.randint(0, 3, (2, 32, 32)))
    assert set(out.terms) == {"seg", "total"}
    assert "num_old_classes=0" in repr(module)


def test_constructor_types() -> None:
    model = small_segmenter(3, width=8)
    with pytest.raises(TypeError, match="IncrementalSegmenter"):
        TrainingModule(torch.nn.Conv2d(3, 3, 1), CAFLoss(32, 16), _caf_method(model))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Method"):
        TrainingModule(model, CAFLoss(32, 16), CAFLoss(32, 16))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"nn\.Module"):
        TrainingModule(model, lambda *a: None, _caf_method(model))  # type: ignore[arg-type]


def test_teacher_out_is_required_and_checked(make_learner: MakeLearner, images: Tensor) -> None:
    learner = make_learner("caf")
    learner.begin_step(0)
    learner.end_step()
    learner.begin_step(1)
    labels = torch.zeros(2, 32, 32, dtype=torch.long)
    with pytest.raises(ValueError, match="teacher_out is required"):
        learner.module(images, labels)
    teacher_out = learner.teacher_forward(images)
    assert teacher_out is not None
    with pytest.raises(ValueError, match=r"missing \['z_bar'\]"):
        learner.module(images, labels, {k: v for k, v in teacher_out.items() if k != "z_bar"})
    with pytest.raises(TypeError, match="dict"):
        learner.module(images, labels, [teacher_out["z"]])  # type: ignore[arg-type]
    torch.manual_seed(3)  # CAF's fusion dropout draws per call: the same draws for both
    direct = learner.module(images, labels, teacher_out)
    torch.manual_seed(3)
    assert torch.equal(direct.loss, learner.training_step(images, labels).loss)


def test_old_features_come_from_the_teacher(make_learner: MakeLearner, images: Tensor) -> None:
    learner = make_learner("caf")
    learner.begin_step(0)
    learner.end_step()
    learner.begin_step(1)
    seen: dict[str, Any] = {}

    def spy(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        seen.update(kwargs)

    learner.criterion.register_forward_pre_hook(spy, with_kwargs=True)
    teacher_out = learner.teacher_forward(images)
    assert teacher_out is not None
    learner.module(images, torch.zeros(2, 32, 32, dtype=torch.long), teacher_out)
    assert seen["num_old_classes"] == 3
    assert seen["old_logits"] is teacher_out["logits"]
    assert seen["old_features"]["z"] is teacher_out["z_bar"] and seen["old_features"]["h"] is teacher_out["h"]
    assert seen["features"]["z"].shape == teacher_out["z"].shape


def test_distributed_data_parallel_one_process(
    tmp_path: Path,
    make_learner: MakeLearner,
    train_iters: Callable[..., list[float]],
    labels_for: Callable[..., Tensor],
    images: Tensor,
) -> None:
    """Two steps (step 0, then step 1 with teacher, CAF and AD) under DDP equal the plain run exactly."""

    def run(ddp: bool) -> IncrementalLearner:
        torch.manual_seed(0)
        learner = make_learner("caf")
        for step in range(2):
            learner.begin_step(step)
            optimizer = torch.optim.SGD(learner.param_groups(1e-3), lr=1e-3, momentum=0.9)
            module = DistributedDataParallel(learner.module) if ddp else None
            train_iters(learner, optimizer, images, labels_for(learner.scenario, step), 2, module=module)
            learner.end_step()
        return learner

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        wrapped = run(ddp=True)
    finally:
        dist.destroy_process_group()
    plain = run(ddp=False)
    expected, got = plain.model.state_dict(), wrapped.model.state_dict()
    assert expected.keys() == got.keys()
    assert all(torch.allclose(expected[k].float(), got[k].float(), atol=1e-6) for k in expected)
    assert wrapped.teacher is not None and not isinstance(wrapped.teacher, DistributedDataParallel)


@pytest.mark.slow  # about 30 s on a loaded 2-core CPU, mostly tracing
def test_fullgraph_compile_matches_eager(make_learner: MakeLearner, images: Tensor) -> None:
    """The whole training module (student with CAF, CAFLoss) compiles without a graph break; same loss and grads.

    The gradient balance of the ``caf`` recipe takes gradients inside the loss (``torch.autograd.grad``), which
    dynamo cannot trace: it runs as a graph break (``torch.compiler.disable``), so fullgraph needs it off."""
    learner = make_learner("caf", ad_balance=None)
    learner.begin_step(0)
    learner.end_step()
    learner.begin_step(1)
    labels = torch.randint(
        0, learner.scenario.num_classes_at(1), (2, 32, 32), generator=torch.Generator().manual_seed(3)
    )
    with torch.no_grad():
        teacher_out = learner.teacher_forward(images)
    learner.module.eval()  # batch statistics would differ between the two calls otherwise (running stats update)
    torch._dynamo.reset()
    compiled = torch.compile(learner.module, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (learner.module, compiled):
        learner.module.zero_grad(set_to_none=True)
        out = fn(images, labels, teacher_out)
        out.loss.backward()
        results.append((out.loss.detach(), [p.grad for p in learner.module.parameters() if p.grad is not None]))
    (loss_eager, grads_eager), (loss_compiled, grads_compiled) = results
    torch.testing.assert_close(loss_compiled, loss_eager)
    assert len(grads_eager) == len(grads_compiled) > 0
    for eager, compiled_grad in zip(grads_eager, grads_compiled):
        torch.testing.assert_close(compiled_grad, eager, rtol=1e-4, atol=1e-5)
