"""ADE20K scene parsing (the 150-class ADEChallengeData2016 benchmark), read from local files."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from incseg.data._source import _ImageMaskFiles
from incseg.data.incremental import CacheCheck, IncrementalSegmentation, JointTransform, _resolve_scenario
from incseg.scenarios import ADE20K_CLASS_NAMES, Scenario

__all__ = ["ADE20K", "ADE20KIncremental"]

_LAYOUT = """expected layout (nothing is downloaded):
  <root>/ADEChallengeData2016/   (or <root> itself)
    images/{training,validation}/<name>.jpg
    annotations/{training,validation}/<name>.png   grayscale PNGs, 0 = unlabelled, 1..150 = classes"""
_SPLITS = {"training": "training", "train": "training", "validation": "validation", "val": "validation"}


def _find_ade(root: Path) -> Path:
    if not root.is_dir():
        raise FileNotFoundError(f"ADE20K root {root} does not exist; {_LAYOUT}")
    candidates = (root / "ADEChallengeData2016", root)
    for c in candidates:
        if (c / "images").is_dir() and (c / "annotations").is_dir():
            return c
    tried = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(f"no images/ and annotations/ directories in {tried}; {_LAYOUT}")


class ADE20K(_ImageMaskFiles):
    """ADE20K (SceneParsing, 150 classes) as a :class:`~incseg.data.SegmentationSource` (151 ids).

    Annotation value ``0`` ("other", unlabelled) is kept as ``0`` and plays the background, classes are
    ``1..150`` in the benchmark's order (as MiB and the CAF paper; not the 0..149 + 255 convention of
    semantic-segmentation toolboxes). There is no void value. Nothing is downloaded.

    Args:
        root: the ``ADEChallengeData2016/`` directory or its parent.
        split: ``"training"`` (20,210 images) or ``"validation"`` (2,000); ``"train"``/``"val"`` are
            accepted as aliases.

    Shape:
        ``load(i)``: image uint8 ``(3, H, W)``, mask int64 ``(H, W)``.

    Raises:
        FileNotFoundError: the root, the split directories, or the annotation of an image is missing (the
            message names the path and the expected layout).
        ValueError: unknown split.

    Example:
        >>> ade = ADE20K("/data", "validation")  # doctest: +SKIP
        >>> len(ade), ade.num_classes  # doctest: +SKIP
        (2000, 151)
    """

    class_names: tuple[str, ...] = ADE20K_CLASS_NAMES
    num_classes: int = len(ADE20K_CLASS_NAMES)

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: Literal["training", "validation", "train", "val"] = "training",
    ) -> None:
        if split not in _SPLITS:
            raise ValueError(f"split must be 'training' or 'validation' (or 'train'/'val'), got {split!r}")
        base = _find_ade(Path(root).expanduser())
        self.root = base
        self.split = _SPLITS[split]
        image_dir, ann_dir = base / "images" / self.split, base / "annotations" / self.split
        for d in (image_dir, ann_dir):
            if not d.is_dir():
                raise FileNotFoundError(f"ADE20K directory {d} is missing; {_LAYOUT}")
        self._images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() == ".jpg")
        if not self._images:
            raise FileNotFoundError(f"no .jpg images in {image_dir}; {_LAYOUT}")
        self._masks = [ann_dir / f"{p.stem}.png" for p in self._images]
        missing = [m for m in self._masks if not m.is_file()]
        if missing:
            shown = ", ".join(str(p) for p in missing[:3])
            raise FileNotFoundError(f"{len(missing)} annotations of images in {image_dir} are missing, e.g. {shown}")
        self.names: tuple[str, ...] = tuple(p.stem for p in self._images)
        self._fingerprint_key = (f"ADE20K/{self.split}", self.root)

    def __repr__(self) -> str:
        return f"ADE20K(root={str(self.root)!r}, split={self.split!r}, images={len(self)})"


class ADE20KIncremental(IncrementalSegmentation):
    """ADE20K at one step of a scenario: :class:`ADE20K` wrapped in :class:`IncrementalSegmentation`.

    Args:
        root: dataset root (see :class:`ADE20K`).
        scenario: a :class:`~incseg.scenarios.Scenario` with 151 ids, or an ADE20K task name such as
            ``"100-50"``.
        step: the learning step.
        train: ``"training"`` split and training labels, or ``"validation"`` and test labels.
        mode: with a task name, ``"overlapped"`` (default: ADE20K's convention, as PLOP; see
            :func:`~incseg.scenarios.default_mode`) or ``"disjoint"``; must be ``None`` or match ``scenario.mode``
            when a :class:`Scenario` is given.
        transform, cache_dir, void_as_background, cache_check: see :class:`IncrementalSegmentation`.

    Raises:
        ValueError: ``mode`` contradicts the scenario, or see :class:`ADE20K` and
            :class:`IncrementalSegmentation`.

    Example:
        >>> ds = ADE20KIncremental("/data", "100-50", 1, train=True, cache_dir="cache")  # doctest: +SKIP
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        scenario: Scenario | str,
        step: int,
        *,
        train: bool,
        mode: str | None = None,
        transform: JointTransform | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        void_as_background: bool = False,
        cache_check: CacheCheck = "stat",
    ) -> None:
        super().__init__(
            ADE20K(root, "training" if train else "validation"),
            _resolve_scenario("ade20k", scenario, mode),
            step,
            train=train,
            transform=transform,
            cache_dir=cache_dir,
            void_as_background=void_as_background,
            cache_check=cache_check,
        )
