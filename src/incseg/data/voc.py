"""Pascal VOC 2012 segmentation (optionally with the SBD-augmented training set), read from local files."""

from __future__ import annotations

import os
import warnings
from pathlib import Path, PurePosixPath
from typing import Literal

from incseg.data._source import _ImageMaskFiles
from incseg.data.incremental import CacheCheck, IncrementalSegmentation, JointTransform, _resolve_scenario
from incseg.scenarios import VOC_CLASS_NAMES, Scenario

__all__ = ["PascalVOC", "PascalVOCIncremental"]

_LAYOUT = """expected layout (nothing is downloaded):
  <root>/VOCdevkit/VOC2012/   (or <root>/VOC2012/, or <root> itself)
    JPEGImages/<id>.jpg
    SegmentationClass/<id>.png                 palette PNGs of class ids (255 = void)
    ImageSets/Segmentation/{train,val}.txt     one image id per line
  and, for the augmented training set (use_aug=True, split='train'), optionally:
    SegmentationClassAug/<id>.png              in VOC2012/ or in <root>/
    train_aug.txt                              in VOC2012/ImageSets/Segmentation/, VOC2012/splits/ or <root>/"""


def _find_voc(root: Path) -> Path:
    if not root.is_dir():
        raise FileNotFoundError(f"Pascal VOC root {root} does not exist; {_LAYOUT}")
    candidates = (root / "VOCdevkit" / "VOC2012", root / "VOC2012", root)
    for c in candidates:
        if (c / "JPEGImages").is_dir():
            return c
    tried = ", ".join(str(c / "JPEGImages") for c in candidates)
    raise FileNotFoundError(f"no Pascal VOC 2012 directory under {root} (looked for {tried}); {_LAYOUT}")


def _read_ids(list_file: Path) -> list[str]:
    ids: list[str] = []
    seen: set[str] = set()
    for line in list_file.read_text().splitlines():
        tokens = line.split()
        if not tokens:
            continue
        # Plain ids ("2007_000032") or DeepLab-style pairs ("/JPEGImages/2007_000032.jpg /SegmentationClassAug/...").
        image_id = PurePosixPath(tokens[0]).stem
        if image_id not in seen:
            seen.add(image_id)
            ids.append(image_id)
    if not ids:
        raise ValueError(f"image list {list_file} is empty")
    return ids


class PascalVOC(_ImageMaskFiles):
    """Pascal VOC 2012 segmentation as a :class:`~incseg.data.SegmentationSource` (21 ids, 255 = void).

    ``split="train"`` with ``use_aug=True`` uses the 10,582-image augmented set (SBD masks in
    ``SegmentationClassAug`` and the ``train_aug.txt`` list, as MiB and the CAF paper) when both are found,
    and otherwise falls back to the 1,464-image ``train.txt`` with a warning; ``split="val"`` is the 1,449
    validation images with ``SegmentationClass`` masks. Masks are read as palette indices, not colours.
    Nothing is downloaded.

    Accepted locations: ``root`` may be the directory holding ``VOCdevkit/``, the ``VOCdevkit/`` itself or the
    ``VOC2012/`` directory. ``SegmentationClassAug/`` is looked for in ``VOC2012/`` then in ``root``;
    ``train_aug.txt`` in ``VOC2012/ImageSets/Segmentation/``, ``VOC2012/splits/`` then ``root``. List files
    hold one image id per line, or DeepLab-style ``/JPEGImages/<id>.jpg /SegmentationClassAug/<id>.png``.

    Args:
        root: dataset root (see above).
        split: ``"train"`` or ``"val"``.
        use_aug: use the augmented training set when present (training split only).

    Shape:
        ``load(i)``: image uint8 ``(3, H, W)``, mask int64 ``(H, W)``.

    Raises:
        FileNotFoundError: the root, the VOC directory, the list file or any listed image or mask is missing
            (the message names the path and the expected layout).
        ValueError: unknown split, or an empty list file.

    Example:
        >>> voc = PascalVOC("/data/voc", "val")  # doctest: +SKIP
        >>> image, mask = voc.load(0)  # doctest: +SKIP
        >>> image.dtype, mask.dtype, voc.num_classes  # doctest: +SKIP
        (torch.uint8, torch.int64, 21)
    """

    class_names: tuple[str, ...] = VOC_CLASS_NAMES
    num_classes: int = len(VOC_CLASS_NAMES)

    def __init__(self, root: str | os.PathLike[str], split: Literal["train", "val"] = "train", *, use_aug: bool = True):
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        root = Path(root).expanduser()
        voc = _find_voc(root)
        segmentation = voc / "ImageSets" / "Segmentation"
        list_file, mask_dir = segmentation / f"{split}.txt", voc / "SegmentationClass"
        self.augmented = False
        if split == "train" and use_aug:
            aug_dirs = [d for d in (voc / "SegmentationClassAug", root / "SegmentationClassAug") if d.is_dir()]
            lists = (segmentation / "train_aug.txt", voc / "splits" / "train_aug.txt", root / "train_aug.txt")
            aug_lists = [f for f in lists if f.is_file()]
            if aug_dirs and aug_lists:
                list_file, mask_dir, self.augmented = aug_lists[0], aug_dirs[0], True
            else:
                warnings.warn(
                    f"PascalVOC(use_aug=True): SegmentationClassAug/ or train_aug.txt not found under {root}; "
                    f"using {list_file.name} with SegmentationClass masks instead",
                    stacklevel=2,
                )
        if not list_file.is_file():
            raise FileNotFoundError(f"image list {list_file} is missing; {_LAYOUT}")
        self.root = voc
        self.split = split
        self.ids: tuple[str, ...] = tuple(_read_ids(list_file))
        self._images = [voc / "JPEGImages" / f"{i}.jpg" for i in self.ids]
        self._masks = [mask_dir / f"{i}.png" for i in self.ids]
        missing = [p for pair in zip(self._images, self._masks) for p in pair if not p.is_file()]
        if missing:
            shown = ", ".join(str(p) for p in missing[:3])
            raise FileNotFoundError(f"{len(missing)} files listed in {list_file} are missing, e.g. {shown}; {_LAYOUT}")
        self._fingerprint_key = (f"PascalVOC/{self.split}/{mask_dir.name}", mask_dir)

    def __repr__(self) -> str:
        return (
            f"PascalVOC(root={str(self.root)!r}, split={self.split!r}, augmented={self.augmented}, images={len(self)})"
        )


class PascalVOCIncremental(IncrementalSegmentation):
    """Pascal VOC 2012 at one step of a scenario: :class:`PascalVOC` wrapped in :class:`IncrementalSegmentation`.

    Args:
        root: dataset root (see :class:`PascalVOC`).
        scenario: a :class:`~incseg.scenarios.Scenario` with 21 ids, or a VOC task name such as ``"15-5"``.
        step: the learning step.
        train: training split (``"train"``, augmented when available) and training labels, or validation
            split and test labels.
        mode: with a task name, ``"disjoint"`` (default) or ``"overlapped"``; must be ``None`` or match
            ``scenario.mode`` when a :class:`Scenario` is given.
        use_aug: see :class:`PascalVOC`.
        transform, cache_dir, void_as_background, cache_check: see :class:`IncrementalSegmentation`.

    Raises:
        ValueError: ``mode`` contradicts the scenario, or see :class:`PascalVOC` and
            :class:`IncrementalSegmentation`.

    Example:
        >>> ds = PascalVOCIncremental("/data/voc", "15-5", 1, train=True, cache_dir="cache")  # doctest: +SKIP
        >>> image, target = ds[0]  # doctest: +SKIP
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        scenario: Scenario | str,
        step: int,
        *,
        train: bool,
        mode: str | None = None,
        use_aug: bool = True,
        transform: JointTransform | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        void_as_background: bool = False,
        cache_check: CacheCheck = "stat",
    ) -> None:
        scenario = _resolve_scenario("voc", scenario, mode)
        source = PascalVOC(root, "train" if train else "val", use_aug=use_aug)
        super().__init__(
            source,
            scenario,
            step,
            train=train,
            transform=transform,
            cache_dir=cache_dir,
            void_as_background=void_as_background,
            cache_check=cache_check,
        )
