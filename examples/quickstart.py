"""Quick start: an incremental scenario on the built-in synthetic benchmark with the IncrementalLearner API.

Runs a short CAF training over the two steps of synthetic 15-5 (disjoint) in a plain PyTorch loop and prints the
mIoU on old and new classes after each step. A couple of minutes on a laptop CPU:

    python examples/quickstart.py --epochs 2
    python examples/quickstart.py --method plop   # any name of incseg.methods.METHODS
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.data import DataLoader

from incseg.data import IncrementalSegmentation, SyntheticScenes, TestTransform, TrainTransform
from incseg.learner import IncrementalLearner
from incseg.metrics import MeanIoU
from incseg.models import small_segmenter
from incseg.scenarios import get_scenario


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--method", default="caf")
    args = parser.parse_args()
    torch.manual_seed(0)

    scenario = get_scenario("synthetic", "15-5", mode="disjoint")
    train_src = SyntheticScenes("train", num_images=args.images, size=64)
    val_src = SyntheticScenes("val", num_images=args.images // 4, size=64)
    learner = IncrementalLearner(small_segmenter(scenario.num_classes_at(0)), scenario, args.method)

    for step in range(scenario.num_steps):
        train_set = IncrementalSegmentation(
            train_src, scenario, step, train=True, transform=TrainTransform(crop_size=64, scale=(0.75, 1.25))
        )
        # grows the head, snapshots the frozen teacher, inserts CAF at step 1; a method that looks at the step's
        # data first (PLOP's pseudo-label thresholds) does it on `data`
        learner.begin_step(step, data=DataLoader(train_set, batch_size=32))
        lr = 0.05 if step == 0 else 0.005
        optimizer = torch.optim.SGD(learner.param_groups(lr), lr=lr, momentum=0.9)
        for epoch in range(args.epochs):
            for images, labels in DataLoader(train_set, batch_size=16, shuffle=True, drop_last=True):
                out = learner.training_step(images, labels)  # loss and its named terms
                optimizer.zero_grad()
                out.loss.backward()
                optimizer.step()
            print(f"step {step} epoch {epoch}: " + ", ".join(f"{k}={float(v):.3f}" for k, v in out.terms.items()))
        learner.end_step(data=DataLoader(train_set, batch_size=32))  # STAR computes its prototypes on the step's data

        metric = MeanIoU(scenario.num_classes_at(step), num_old_classes=scenario.num_old_classes(step))
        test_set = IncrementalSegmentation(val_src, scenario, step, train=False, transform=TestTransform(size=None))
        for images, labels in DataLoader(test_set, batch_size=32):
            metric.update(learner.predict(images), labels)
        groups = metric.compute().groups
        print(f"after step {step}: " + ", ".join(f"{k}={100 * v:.1f}" for k, v in groups.items()))


if __name__ == "__main__":
    main()
