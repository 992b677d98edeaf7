"""Tiny fake Pascal VOC and ADE20K folders in the real layouts, for the loaders' tests and the shipped configs.

Each image is ``SIZE x SIZE`` random RGB; its mask draws the listed classes as horizontal bands (VOC: with a void
top row) on background.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 16
# Image id -> classes drawn in its mask. Train ids are 2007_*, val ids 2008_*.
VOC_TRAIN = {"2007_000001": [1, 2], "2007_000002": [16], "2007_000003": [3, 17], "2007_000004": [15]}
VOC_VAL = {"2008_000001": [1], "2008_000002": [18], "2008_000003": []}
VOC_AUG_EXTRA = {"2007_100001": [19], "2007_100002": [5, 20]}
ADE_TRAINING = {"ADE_train_00000001": [1, 120], "ADE_train_00000002": [3], "ADE_train_00000003": [101, 150]}
ADE_VALIDATION = {"ADE_val_00000001": [7, 140], "ADE_val_00000002": []}


def _voc_palette() -> list[int]:
    """The standard VOC colour map (bit-interleaved), 256 RGB triples."""
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


def voc_mask(classes: Sequence[int]) -> np.ndarray:
    """Up to 3 classes as bands of 4 rows, a void (255) top row."""
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    for k, c in enumerate(classes):
        mask[2 + 5 * k : 6 + 5 * k, 3:12] = c
    mask[0, :] = 255  # void border
    return mask


def ade_mask(classes: Sequence[int]) -> np.ndarray:
    """Up to 2 classes as bands of 6 rows on 0 (unlabelled, the background)."""
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    for k, c in enumerate(classes):
        mask[1 + 7 * k : 7 + 7 * k, 2:14] = c
    return mask


def _write_mask(path: Path, mask: np.ndarray, *, palette: bool) -> None:
    img = Image.fromarray(mask, mode="L")
    if palette:
        img = img.convert("P")
        img.putpalette(_voc_palette())
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def _write_image(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(path, quality=95)


def make_voc(
    root: Path,
    *,
    aug: bool = False,
    deeplab_list: bool = False,
    train: Mapping[str, Sequence[int]] = VOC_TRAIN,
    val: Mapping[str, Sequence[int]] = VOC_VAL,
    aug_extra: Mapping[str, Sequence[int]] = VOC_AUG_EXTRA,
) -> Path:
    """Write ``root/VOCdevkit/VOC2012`` (and the augmented set when ``aug``); return the VOC2012 path."""
    voc = root / "VOCdevkit" / "VOC2012"
    sets = voc / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    for k, (image_id, classes) in enumerate({**train, **val, **aug_extra}.items()):
        _write_image(voc / "JPEGImages" / f"{image_id}.jpg", k)
        if image_id not in aug_extra:
            _write_mask(voc / "SegmentationClass" / f"{image_id}.png", voc_mask(classes), palette=True)
        if aug:
            _write_mask(voc / "SegmentationClassAug" / f"{image_id}.png", voc_mask(classes), palette=False)
    (sets / "train.txt").write_text("\n".join(train) + "\n")
    (sets / "val.txt").write_text("\n".join(val) + "\n")
    if aug:
        ids = [*train, *aug_extra]
        lines = [f"/JPEGImages/{i}.jpg /SegmentationClassAug/{i}.png" if deeplab_list else i for i in ids]
        (sets / "train_aug.txt").write_text("\n".join(lines) + "\n\n")
    return voc


def make_ade(
    root: Path,
    *,
    training: Mapping[str, Sequence[int]] = ADE_TRAINING,
    validation: Mapping[str, Sequence[int]] = ADE_VALIDATION,
) -> Path:
    """Write ``root/ADEChallengeData2016`` with grayscale annotations; return its path."""
    base = root / "ADEChallengeData2016"
    for split, items in (("training", training), ("validation", validation)):
        (base / "images" / split).mkdir(parents=True)
        (base / "annotations" / split).mkdir(parents=True)
        for k, (name, classes) in enumerate(items.items()):
            rgb = np.random.default_rng(k).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
            Image.fromarray(rgb).save(base / "images" / split / f"{name}.jpg")
            Image.fromarray(ade_mask(classes), mode="L").save(base / "annotations" / split / f"{name}.png")
    return base
