"""Use torchvision's DeepLabV3 with incseg: adapt it, then run an incremental step with CAF.

The adapter splits torchvision's model into encoder (ResNet up to layer4), refiner (ASPP head without its last
conv) and an incremental classifier initialised from the last conv. Weights are never downloaded: pass
`--weights PATH` with a local state dict of `deeplabv3_resnet50` to start from it, or train from scratch.

    python examples/torchvision_adapter.py --size 96
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torchvision.models.segmentation import deeplabv3_resnet50

from incseg.learner import IncrementalLearner
from incseg.models import from_torchvision_deeplabv3
from incseg.scenarios import get_scenario


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, help="local deeplabv3_resnet50 state dict (21 VOC classes)")
    parser.add_argument("--size", type=int, default=96, help="side of the random test images")
    parser.add_argument("--method", default="caf", help="any name of incseg.methods.METHODS")
    args = parser.parse_args()
    torch.manual_seed(0)

    scenario = get_scenario("voc", "15-5", mode="overlapped")
    tv_model = deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=21, aux_loss=False)
    if args.weights is not None:
        if not args.weights.is_file():
            raise SystemExit(f"--weights {args.weights} does not exist (incseg never downloads weights)")
        tv_model.load_state_dict(torch.load(args.weights, map_location="cpu", weights_only=True))
    # Keep only the 16 classes of step 0 in the head (background + 15): slice the last conv before adapting.
    last = tv_model.classifier[-1]
    head = torch.nn.Conv2d(last.in_channels, scenario.num_classes_at(0), 1)
    with torch.no_grad():
        head.weight.copy_(last.weight[: head.out_channels])
        head.bias.copy_(last.bias[: head.out_channels])
    tv_model.classifier[-1] = head

    model = from_torchvision_deeplabv3(tv_model)
    learner = IncrementalLearner(model, scenario, args.method)
    learner.begin_step(0)
    learner.end_step()  # pretend step 0 was trained (or load a checkpoint with learner.load)

    images = torch.randn(2, 3, args.size, args.size)
    labels = torch.randint(16, 21, (2, args.size, args.size))
    labels[:, : args.size // 2] = 0
    # teacher snapshot, 5 new classes, CAF between encoder and ASPP; `data`: the step's training batches, for a
    # method that calibrates on them first (PLOP)
    learner.begin_step(1, data=[(images, labels)])
    optimizer = torch.optim.SGD(learner.param_groups(1e-3), lr=1e-3, momentum=0.9)
    out = learner.training_step(images, labels)
    optimizer.zero_grad()
    out.loss.backward()
    optimizer.step()
    print(f"one {args.method} step:", {k: round(float(v), 4) for k, v in out.terms.items()})
    print("prediction shape:", tuple(learner.predict(images).shape))


if __name__ == "__main__":
    main()
