"""Pascal-VOC 15-5 (disjoint or overlapped) with DeepLabV3-ResNet101 and the paper's hyper-parameters.

Equivalent to the command line `incseg train --dataset voc --task 15-5 ...`; shown here as Python so you can
change any part. Needs the dataset on disk (nothing is downloaded):

    ROOT/VOCdevkit/VOC2012/{JPEGImages,SegmentationClass,ImageSets/Segmentation/{train,val}.txt}
    optional: ROOT/VOCdevkit/VOC2012/SegmentationClassAug + ImageSets/Segmentation/train_aug.txt

Single GPU:   python examples/voc_15_5.py --root ROOT --backbone-weights resnet101.pth
Multi-GPU:    torchrun --nproc_per_node 4 examples/voc_15_5.py --root ROOT --backbone-weights resnet101.pth
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from incseg import distributed as D
from incseg.data import IncrementalSegmentation, PascalVOC, TestTransform, TrainTransform
from incseg.engine import TrainConfig, train_scenario
from incseg.learner import IncrementalLearner
from incseg.models import deeplabv3_resnet101
from incseg.scenarios import get_scenario


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True, help="folder holding VOCdevkit/")
    parser.add_argument("--backbone-weights", type=Path, help="local ImageNet ResNet-101 state dict")
    parser.add_argument("--mode", choices=["disjoint", "overlapped"], default="disjoint")
    parser.add_argument("--method", default="caf")
    parser.add_argument("--out", type=Path, default=Path("runs/voc-15-5"))
    parser.add_argument("--amp", choices=["none", "bf16", "fp16"], default="bf16")
    args = parser.parse_args()

    device = D.init_from_env()
    scenario = get_scenario("voc", "15-5", mode=args.mode)
    try:
        train_src, val_src = PascalVOC(args.root, "train"), PascalVOC(args.root, "val")
    except FileNotFoundError as err:
        raise SystemExit(f"voc_15_5.py: {err}") from None
    train_tf, test_tf = TrainTransform(crop_size=512, scale=(0.5, 2.0)), TestTransform(size=512)
    cache = args.out / "cache"

    def datasets(step: int) -> tuple[IncrementalSegmentation, IncrementalSegmentation]:
        return (
            IncrementalSegmentation(train_src, scenario, step, train=True, transform=train_tf, cache_dir=cache),
            IncrementalSegmentation(val_src, scenario, step, train=False, transform=test_tf, cache_dir=cache),
        )

    torch.manual_seed(0)
    model = deeplabv3_resnet101(scenario.num_classes_at(0), backbone_weights=args.backbone_weights).to(device)
    learner = IncrementalLearner(model, scenario, args.method)
    config = TrainConfig(epochs=30, batch_size=24, lr=1e-2, lr_next=1e-3, amp=args.amp, num_workers=4)
    history = train_scenario(learner, datasets, config, device=device, checkpoint_dir=args.out / "checkpoints")
    if D.is_main_process():
        print(history.table())
        history.to_csv(args.out / "history.csv")
    D.cleanup()


if __name__ == "__main__":
    main()
