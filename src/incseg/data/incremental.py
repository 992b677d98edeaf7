"""One step of an incremental scenario on a raw source: image selection, label remapping, split cache."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor
from torch.utils.data import Dataset

from incseg.data._source import SegmentationSource
from incseg.data.transforms import normalize
from incseg.scenarios import IGNORE_INDEX, Scenario, get_scenario

__all__ = ["CacheCheck", "IncrementalSegmentation", "JointTransform"]

JointTransform = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
"""``(image uint8 (3,H,W), target int64 (H,W)) -> (image, target)``, e.g. :class:`~incseg.data.TrainTransform`."""

CacheCheck = Literal["stat", "content"]
"""How the class-set cache recognises unchanged label files: ``"stat"`` (names, sizes, modification times;
the default, instant) or ``"content"`` (the files' bytes; reads every mask once per dataset)."""

_CACHE_CHECKS = ("stat", "content")
_UNWRITABLE_WARNED: set[str] = set()  # cache folders already reported as unwritable (warn once per folder)

_CACHE_FORMAT = "incseg-class-sets"
_CACHE_VERSION = 1


def _checksum(classes: Sequence[Sequence[int]]) -> str:
    return hashlib.sha256(json.dumps(classes, separators=(",", ":")).encode()).hexdigest()


def _cache_path(cache_dir: Path, fingerprint: str) -> Path:
    return cache_dir / f"class-sets-{hashlib.sha256(fingerprint.encode()).hexdigest()[:24]}.json"


def _read_cache(path: Path, fingerprint: str, num_images: int) -> list[frozenset[int]] | None:
    """The cached class sets, or ``None`` when the file is missing, stale (other files) or corrupt."""
    try:
        data: Any = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != _CACHE_FORMAT or data.get("version") != _CACHE_VERSION:
        return None
    classes = data.get("classes")
    if data.get("fingerprint") != fingerprint or not isinstance(classes, list) or len(classes) != num_images:
        return None
    if not all(isinstance(s, list) and all(type(c) is int for c in s) for s in classes):
        return None
    if data.get("checksum") != _checksum(classes):
        return None
    return [frozenset(s) for s in classes]


def _write_cache(path: Path, fingerprint: str, sets: Sequence[frozenset[int]]) -> None:
    """Write the class sets atomically (temporary file + rename), so concurrent readers never see half a file.

    The file gets the permissions of the umask (``0o666 & ~umask``), like any file the user creates.
    """
    classes = [sorted(s) for s in sets]
    payload = {
        "format": _CACHE_FORMAT,
        "version": _CACHE_VERSION,
        "fingerprint": fingerprint,
        "checksum": _checksum(classes),
        "classes": classes,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f"{path.stem}.{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, separators=(",", ":"))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _scan(source: SegmentationSource) -> list[frozenset[int]]:
    """``labels_present`` of every image, checked against ``source.num_classes``, void removed."""
    sets = []
    for i in range(len(source)):
        ids = frozenset(int(c) for c in source.labels_present(i)) - {IGNORE_INDEX}
        bad = sorted(c for c in ids if not 0 <= c < source.num_classes)
        if bad:
            raise ValueError(
                f"image {i} of {source!r} contains class ids {bad} outside [0, {source.num_classes}) (255 = void)"
            )
        sets.append(ids)
    return sets


def image_class_sets(
    source: SegmentationSource, cache_dir: str | os.PathLike[str] | None = None, *, cache_check: CacheCheck = "stat"
) -> list[frozenset[int]]:
    """The set of dataset ids present in each image of ``source`` (void excluded), cached on disk.

    The sets do not depend on the scenario, so one scan serves every task, mode and step. With ``cache_dir``
    they are stored as JSON (``class-sets-<hash of the fingerprint>.json``) together with the source's
    fingerprint and a checksum; a file whose fingerprint, image count or checksum does not match, or that
    cannot be parsed, is rebuilt. The cache is optional: a folder that cannot be created or written is
    reported once (a warning) and the sets are used without being stored.

    The fingerprint identifies the label files. ``cache_check="stat"`` (default) uses
    :meth:`~SegmentationSource.fingerprint`: file names, sizes and modification times, read in milliseconds. It
    misses a mask rewritten with the same size and modification time (restored by ``cp -p``, ``rsync -t`` or
    an archive). ``"content"`` hashes the bytes of every mask (the source's ``content_fingerprint()``, as
    :class:`~incseg.data.PascalVOC` and :class:`~incseg.data.ADE20K` have), which reads the whole label set
    once per dataset; sources without that method (the synthetic scenes, whose fingerprint already names
    every generator parameter) use ``fingerprint()``.

    Args:
        source: the raw source.
        cache_dir: directory of the cache (created if needed); ``None`` scans without caching.
        cache_check: ``"stat"`` or ``"content"``, see above.

    Returns:
        One frozenset per image, in source order.

    Raises:
        ValueError: an image contains ids outside ``[0, num_classes)`` other than void 255, or an unknown
            ``cache_check``.
    """
    if cache_check not in _CACHE_CHECKS:
        raise ValueError(f"cache_check must be one of {_CACHE_CHECKS}, got {cache_check!r}")
    if cache_dir is None:
        return _scan(source)
    content = getattr(source, "content_fingerprint", None) if cache_check == "content" else None
    fingerprint = content() if callable(content) else source.fingerprint()
    path = _cache_path(Path(cache_dir), fingerprint)
    cached = _read_cache(path, fingerprint, len(source))
    if cached is not None:
        return cached
    sets = _scan(source)
    try:
        _write_cache(path, fingerprint, sets)
    except OSError as exc:
        folder = str(Path(cache_dir).resolve())
        if folder not in _UNWRITABLE_WARNED:
            _UNWRITABLE_WARNED.add(folder)
            warnings.warn(
                f"the class-set cache cannot be written to {cache_dir} ({type(exc).__name__}: {exc}); continuing "
                "without a cache (the label files are scanned again for every dataset)",
                stacklevel=3,
            )
    return sets


def _resolve_scenario(dataset: str, scenario: Scenario | str, mode: str | None) -> Scenario:
    """A :class:`Scenario` from a scenario or a task name of ``dataset`` (for the convenience datasets)."""
    if isinstance(scenario, str):
        return get_scenario(dataset, scenario, mode=mode)  # None: the dataset's default mode
    if isinstance(scenario, Scenario) and mode is not None and mode != scenario.mode:
        raise ValueError(f"mode={mode!r} contradicts the given scenario's mode {scenario.mode!r}")
    return scenario


class IncrementalSegmentation(Dataset[tuple[Tensor, Tensor]]):
    """The images and labels of one step of a scenario, in incremental indices (paper Sec. IV-A, ``D_l``).

    Selection: training images follow :meth:`Scenario.keep_train_image` (overlapped or disjoint), validation
    images :meth:`Scenario.keep_test_image`; the per-image class sets come from the label files once (see
    :func:`image_class_sets`, cached in ``cache_dir``). Labels: ``target = table[mask]`` with
    :meth:`Scenario.train_label_map` (current classes kept, old and future -> 0, void 255 kept unless
    ``void_as_background``) or :meth:`Scenario.test_label_map` (future -> 255).

    The label map is applied before ``transform``, so the padding a transform adds (255) is always ignored,
    even with ``void_as_background``. ``transform`` receives ``(image uint8 (3,H,W), target int64 (H,W))``
    and returns ``(image, target)``; an image it returns as uint8 (or every image when ``transform`` is
    ``None``) is normalised with the ImageNet mean and std.

    Args:
        source: a :class:`~incseg.data.SegmentationSource` with ``scenario.num_classes`` ids.
        scenario: the scenario.
        step: the learning step ``t``.
        train: training selection and labels (``True``) or test ones (``False``); pass the matching split
            of the source.
        transform: joint image/target transform, e.g. :class:`~incseg.data.TrainTransform`.
        cache_dir: directory for the per-image class sets (``None``: scan the label files every time). A folder
            that cannot be written gives one warning and the dataset is built without the cache.
        void_as_background: training only: void pixels become background (MiB's behaviour).
        cache_check: how the cache recognises unchanged label files: ``"stat"`` (default: names, sizes and
            modification times, instant) or ``"content"`` (the bytes of every mask, read once per dataset;
            sees masks rewritten with the same size and time). See :func:`image_class_sets`.

    Shape:
        ``dataset[i]``: image float32 ``(3, H, W)`` normalised, target int64 ``(H, W)`` with values in
        ``[0, scenario.num_classes_at(step))`` or 255.

    Attributes:
        indices: source indices of the selected images, ascending.
        label_map: the ``(256,)`` int64 lookup table in use.
        num_classes: ``K_t``, the number of model outputs at this step (background included).
        class_names: names of the ``K_t`` classes in incremental-index order.

    Raises:
        TypeError: ``source`` lacks the protocol's members or ``scenario`` is not a :class:`Scenario`.
        ValueError: the source and the scenario disagree on the number of classes, ``step`` is out of range,
            ``void_as_background`` for a test set, or a label file holds ids out of range.

    Example:
        >>> from incseg.scenarios import get_scenario
        >>> ds = IncrementalSegmentation(source, get_scenario("voc", "15-5"), 1, train=True)  # doctest: +SKIP
        >>> image, target = ds[0]  # doctest: +SKIP
    """

    def __init__(
        self,
        source: SegmentationSource,
        scenario: Scenario,
        step: int,
        *,
        train: bool,
        transform: JointTransform | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        void_as_background: bool = False,
        cache_check: CacheCheck = "stat",
    ) -> None:
        if not isinstance(source, SegmentationSource):
            raise TypeError(
                "source must implement SegmentationSource (__len__, load, labels_present, class_names, num_classes, "
                f"fingerprint), got {type(source).__name__}"
            )
        if not isinstance(scenario, Scenario):
            raise TypeError(f"scenario must be an incseg.scenarios.Scenario, got {type(scenario).__name__}")
        if scenario.num_classes != source.num_classes:
            raise ValueError(
                f"scenario has {scenario.num_classes} dataset ids but the source {source!r} has {source.num_classes}"
            )
        if transform is not None and not callable(transform):
            raise TypeError(f"transform must be callable (image, target) -> (image, target), got {type(transform)}")
        if void_as_background and not train:
            raise ValueError("void_as_background applies to training labels only; test labels always ignore void")
        self.num_classes = scenario.num_classes_at(step)  # validates step
        self.class_names = scenario.class_names_at(step)
        self.source = source
        self.scenario = scenario
        self.step = int(step)
        self.train = bool(train)
        self.transform = transform
        if train:
            self.label_map = scenario.train_label_map(step, void_as_background=void_as_background)
            keep = scenario.keep_train_image
        else:
            self.label_map = scenario.test_label_map(step)
            keep = scenario.keep_test_image
        self.cache_dir = cache_dir
        """Where the class sets are cached (``None``: not cached); a replay memory reuses it."""
        sets = image_class_sets(source, cache_dir, cache_check=cache_check)
        self.indices: tuple[int, ...] = tuple(i for i, s in enumerate(sets) if keep(step, s))
        if not self.indices:
            warnings.warn(
                f"{scenario.name} step {step} ({'train' if train else 'test'}) selects no image of {source!r}",
                stacklevel=2,
            )

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        index = self.indices[i]
        image, mask = self.source.load(index)
        if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"source image {index} must be uint8 (3, H, W), got {image.dtype} {tuple(image.shape)}")
        if mask.shape != image.shape[1:] or mask.dtype.is_floating_point:
            raise ValueError(
                f"source mask {index} must be integer (H, W) = {tuple(image.shape[1:])}, got {mask.dtype} "
                f"{tuple(mask.shape)}"
            )
        mask = mask.long()
        if mask.numel():
            lo, hi = torch.aminmax(mask)
            if lo < 0 or hi > IGNORE_INDEX:
                raise ValueError(f"source mask {index} has values outside [0, 255]: [{int(lo)}, {int(hi)}]")
        target = self.label_map[mask]
        if self.transform is not None:
            image, target = self.transform(image, target)
        if image.dtype == torch.uint8:
            image = normalize(image)
        return image, target

    def __repr__(self) -> str:
        split = "train" if self.train else "test"
        return (
            f"IncrementalSegmentation({self.scenario.name}, mode={self.scenario.mode!r}, step={self.step}, {split}, "
            f"images={len(self)}/{len(self.source)}, classes={self.num_classes})"
        )
