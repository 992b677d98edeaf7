"""Why PLOP loses the old classes on the plain check: its terms at step 1 of 15-1 (a script, not a test).

On the setting of ``plain_check.py`` (network ``plain``, its scenes, disjoint 15-1, the same step-0 training),
trains step 0 once, then for each run prints a JSON line with:

- ``first``: the loss terms at the first iteration of step 1, and the gradient norm of the total on the model;
- ``first_eval_bn``: the same terms with the student's batch norms in evaluation mode (the teacher's mode), so the
  part of POD that is the gap between batch and running statistics shows;
- ``pod_over_steps``: the POD term at the first and last iteration of step 1;
- ``after_step1``: old / new mIoU (%) after step 1 (old = step 0's classes, on step 1's test labels);
- ``rms_ratio``: the RMS of each POD map of the student over the teacher's, both in evaluation mode, on test images.

    python benchmarks/diagnose_plop.py --seed 0      # plop, each POD term alone, none, normalised, mib
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _networks import NETWORKS
from plain_check import scenes, step_data
from robustness import parse_method

from incseg.learner import IncrementalLearner
from incseg.metrics import MeanIoU
from incseg.models import IncrementalSegmenter
from incseg.scenarios import Scenario, get_scenario


def _batches(x: Tensor, y: Tensor, size: int) -> list[tuple[Tensor, Tensor]]:
    return [(x[b : b + size], y[b : b + size]) for b in range(0, len(x), size)]


def _train(learner: IncrementalLearner, x: Tensor, y: Tensor, epochs: int, lr: float, seed: int) -> list[float]:
    """The loop of plain_check; returns the POD term of every iteration (empty without one)."""
    optimizer = torch.optim.SGD(learner.param_groups(lr), lr=lr, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    pods = []
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=g)
        for b in range(len(x) // 32):
            idx = order[b * 32 : (b + 1) * 32]
            out = learner.training_step(x[idx], y[idx])
            if "pod" in out.terms:
                pods.append(round(float(out.terms["pod"]), 3))
            optimizer.zero_grad()
            out.loss.backward()
            optimizer.step()
    return pods


def _first_terms(learner: IncrementalLearner, x: Tensor, y: Tensor, *, eval_bn: bool) -> dict[str, float]:
    model = learner.model
    states = {m: m.training for m in model.modules()}
    if eval_bn:
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.train = lambda mode=True, m=m: m  # type: ignore[method-assign]  # stays in eval for this step
                m.training = False
    out = learner.training_step(x, y)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out.loss, params, allow_unused=True)
    for m, training in states.items():
        m.__dict__.pop("train", None)
        m.training = training
    row = {k: round(float(v), 3) for k, v in out.terms.items()}
    row["grad"] = round(math.sqrt(sum(float(g.pow(2).sum()) for g in grads if g is not None)), 3)
    return row


def _miou(model: IncrementalSegmenter, x: Tensor, y: Tensor, scenario: Scenario, step: int) -> dict[str, float]:
    metric = MeanIoU(scenario.num_classes_at(step), num_old_classes=scenario.num_classes_at(0))
    with torch.no_grad():
        for b in range(0, len(x), 64):
            metric.update(model.eval()(x[b : b + 64]), y[b : b + 64])
    groups = metric.compute().groups
    return {k: round(100 * groups[k], 2) for k in ("old", "new")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--runs",
        nargs="+",
        default=[
            "plop",
            "plop:pod_factor=0",
            "plop:pod_logits_factor=0",
            "plop:pod_factor=0,pod_logits_factor=0",
            "plop:pod_normalize=True",
            "mib",
        ],
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    scenario = get_scenario("voc", "15-1", mode="disjoint")
    train_x, train_y = scenes(600, 64, 1000 + args.seed)
    test_x, test_y = scenes(150, 64, 2000 + args.seed)
    base = IncrementalLearner(NETWORKS["plain"](scenario.num_classes_at(0)), scenario, "plop")
    x0, y0 = step_data(train_x, train_y, scenario, 0, train=True)
    base.begin_step(0)
    _train(base, x0, y0, 6, 0.05, 1000 * args.seed)
    trained = copy.deepcopy(base.model)
    x1, y1 = step_data(train_x, train_y, scenario, 1, train=True)
    tx, ty = step_data(test_x, test_y, scenario, 1, train=False)
    for text in args.runs:
        method, overrides = parse_method(text)
        row: dict[str, Any] = {"run": text}
        for eval_bn in (False, True):
            learner = IncrementalLearner(copy.deepcopy(trained), scenario, method, **overrides)
            learner.begin_step(0)
            learner.end_step()
            learner.begin_step(1, data=_batches(x1, y1, 32))
            row["first_eval_bn" if eval_bn else "first"] = _first_terms(learner, x1[:32], y1[:32], eval_bn=eval_bn)
        pods = _train(learner, x1, y1, 12, 0.01, 1000 * args.seed + 1)
        row["pod_over_steps"] = [pods[0], pods[-1]] if pods else []
        teacher = learner.teacher
        assert teacher is not None
        row["after_step1"] = _miou(learner.model, tx, ty, scenario, 1)
        family = learner.method
        if learner.config.family == "plop":
            with torch.no_grad():
                s = family.teacher_forward(learner.model.eval(), tx[:64])["pod"]
                t = family.teacher_forward(teacher, tx[:64])["pod"]
            row["rms_ratio"] = [round(float(a.pow(2).mean().sqrt() / b.pow(2).mean().sqrt()), 3) for a, b in zip(s, t)]
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
