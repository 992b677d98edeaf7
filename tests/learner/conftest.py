"""Fixtures of the learner tests: a three-step scenario, tiny networks and batches, learner factories."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor

from incseg.learner import IncrementalLearner
from incseg.models import small_segmenter
from incseg.scenarios import Scenario

WIDTH = 8
SIZE = 32


@pytest.fixture
def scenario() -> Scenario:
    return Scenario([[1, 2], [3], [4]])


@pytest.fixture
def images() -> Tensor:
    return torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def labels_for(scenario: Scenario, step: int, seed: int = 2) -> Tensor:
    """Labels of the step's index space: background, the current classes, and some ignored pixels."""
    g = torch.Generator().manual_seed(seed + step)
    k = scenario.num_classes_at(step)
    low = scenario.num_old_classes(step)
    labels = torch.randint(low, k, (2, SIZE, SIZE), generator=g)
    labels[:, : SIZE // 4] = 0
    labels[:, -2:] = 255
    return labels


@pytest.fixture
def make_learner(scenario: Scenario) -> Callable[..., IncrementalLearner]:
    def make(method: str = "caf", *, width: int = WIDTH, scn: Scenario | None = None, **overrides: Any):
        scn = scenario if scn is None else scn
        return IncrementalLearner(small_segmenter(scn.num_classes_at(0), width=width), scn, method, **overrides)

    return make


def train_iters(
    learner: IncrementalLearner,
    optimizer: torch.optim.Optimizer,
    images: Tensor,
    labels: Tensor,
    n: int,
    *,
    module: torch.nn.Module | None = None,
) -> list[float]:
    """Run ``n`` optimisation steps on one batch, return the losses."""
    losses = []
    learner.module.train()
    for _ in range(n):
        out = learner.training_step(images, labels, module=module)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        losses.append(float(out.loss.detach()))
    return losses


def advance(
    learner: IncrementalLearner, images: Tensor, to_step: int, *, iters: int = 1, lr: float = 1e-3
) -> torch.optim.Optimizer:
    """Train the learner from its current state through ``to_step`` (begun, not ended); return the optimizer."""
    optimizer: torch.optim.Optimizer | None = None
    for step in range(learner.step + 1, to_step + 1):
        if learner.step >= 0 and not learner.step_finished:
            learner.end_step()
        learner.begin_step(step)
        optimizer = torch.optim.SGD(learner.param_groups(lr), lr=lr, momentum=0.9)
        train_iters(learner, optimizer, images, labels_for(learner.scenario, step), iters)
    assert optimizer is not None
    return optimizer


@pytest.fixture(name="labels_for")
def _labels_for() -> Callable[..., Tensor]:
    return labels_for


@pytest.fixture(name="train_iters")
def _train_iters() -> Callable[..., list[float]]:
    return train_iters


@pytest.fixture(name="advance")
def _advance() -> Callable[..., torch.optim.Optimizer]:
    return advance
