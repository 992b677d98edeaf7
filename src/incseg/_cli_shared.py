"""Helpers shared by the commands of :mod:`incseg.cli` and :mod:`incseg._cli_eval`: dataset defaults, data
sources and the network of a run. Like the command line, it imports torch only inside the functions."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from incseg.models import IncrementalSegmenter

__all__ = ["DATASET_DEFAULTS", "SYNTHETIC_IMAGES", "build_model", "has_matplotlib", "sources", "synthetic_sources"]

# Settings of ``incseg train`` that depend on the dataset (the paper's for VOC / ADE20K, the demo's for the
# synthetic benchmark); a flag left out takes the value of its dataset.
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    "voc": {
        "task": "15-5",
        "model": "deeplabv3_resnet101",
        "epochs": 30,
        "epochs_next": None,
        "batch_size": 24,
        "lr": 1e-2,
        "lr_next": 1e-3,
        "crop_size": 512,
    },
    "ade20k": {
        "task": "100-50",
        "model": "deeplabv3_resnet101",
        "epochs": 60,
        "epochs_next": None,
        "batch_size": 24,
        "lr": 1e-2,
        "lr_next": 1e-2,
        "crop_size": 512,
    },
    "synthetic": {
        "task": "15-5",
        "model": "small",
        "epochs": 30,
        "epochs_next": 15,
        "batch_size": 16,
        "lr": 0.05,
        "lr_next": 0.01,
        "crop_size": 64,
    },
}
SYNTHETIC_IMAGES = {"train": 1200, "val": 300}


def build_model(args: argparse.Namespace, num_classes: int) -> IncrementalSegmenter:
    from incseg.models import deeplabv3_resnet101, small_segmenter

    if args.model == "small":
        return small_segmenter(num_classes)
    return deeplabv3_resnet101(num_classes, output_stride=args.output_stride, backbone_weights=args.backbone_weights)


def synthetic_sources(size: int, seed: int, train_images: int, val_images: int) -> tuple[Any, Any, Any, Any]:
    """The synthetic benchmark of ``incseg demo``, ``train`` and ``eval``: ``size`` px images, trained on with a
    mild scale jitter and evaluated as they are (``TestTransform(size=None)``: no resizing)."""
    from incseg.data import SyntheticScenes, TestTransform, TrainTransform

    cache = (train_images + val_images) * size * size * 4 <= 512 * 2**20  # rendered once when small enough
    train_src = SyntheticScenes("train", num_images=train_images, size=size, seed=seed, cache=cache)
    test_src = SyntheticScenes("val", num_images=val_images, size=size, seed=seed, cache=cache)
    return train_src, test_src, TrainTransform(crop_size=size, scale=(0.75, 1.25), hflip=True), TestTransform(None)


def sources(args: argparse.Namespace) -> tuple[Any, Any, Any, Any]:
    """``(train source, test source, train transform, test transform)`` of ``args.dataset``.

    VOC and ADE20K are evaluated as in MiB and the paper (short side resized to ``--crop-size``, centre crop);
    the synthetic images at their own size (``--crop-size`` is their side).
    """
    from incseg.data import ADE20K, PascalVOC, TestTransform, TrainTransform

    if args.dataset == "synthetic":
        return synthetic_sources(args.crop_size, args.seed, SYNTHETIC_IMAGES["train"], SYNTHETIC_IMAGES["val"])
    train_src: Any
    test_src: Any
    if args.root is None:
        raise ValueError(f"--root is required for --dataset {args.dataset} (the folder that holds the dataset)")
    if args.dataset == "voc":
        train_src, test_src = PascalVOC(args.root, "train"), PascalVOC(args.root, "val")
    else:
        train_src, test_src = ADE20K(args.root, "training"), ADE20K(args.root, "validation")
    train_tf = TrainTransform(crop_size=args.crop_size, scale=(0.5, 2.0), hflip=True)
    return train_src, test_src, train_tf, TestTransform(size=args.crop_size)


def has_matplotlib() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None
