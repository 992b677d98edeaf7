"""The :class:`SegmentationSource` protocol (a raw, scenario-agnostic dataset) and file helpers for sources."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.io import ImageReadMode, decode_image

__all__ = ["SegmentationSource"]


@runtime_checkable
class SegmentationSource(Protocol):
    """A raw segmentation dataset in dataset ids: what :class:`~incseg.data.IncrementalSegmentation` reads.

    Implemented by :class:`~incseg.data.PascalVOC`, :class:`~incseg.data.ADE20K` and the synthetic scenes;
    any object with these members works (structural typing).

    Members:
        ``__len__()``: number of images.
        ``load(i)``: ``(image, mask)``, image uint8 ``(3, H, W)`` RGB, mask int64 ``(H, W)`` of dataset ids
        (``0`` background, ``255`` void).
        ``labels_present(i)``: dataset ids occurring in mask ``i``, void excluded (cheaper than ``load``:
        it may skip decoding the image).
        ``class_names``: one name per dataset id; ``num_classes``: number of ids, background included.
        ``fingerprint()``: a string identifying the files (their names, sizes and modification times), used
        to validate cached per-image class sets.

    Example:
        >>> from incseg.data import PascalVOC  # doctest: +SKIP
        >>> isinstance(PascalVOC("/data/voc"), SegmentationSource)  # doctest: +SKIP
        True
    """

    @property
    def class_names(self) -> Sequence[str]: ...

    @property
    def num_classes(self) -> int: ...

    def __len__(self) -> int: ...

    def load(self, index: int) -> tuple[Tensor, Tensor]: ...

    def labels_present(self, index: int) -> frozenset[int]: ...

    def fingerprint(self) -> str: ...


# ---------------------------------------------------------------------------------------------- file helpers
_MASK_MODES = ("P", "L", "I", "I;16")


def read_image(path: Path) -> Tensor:
    """Decode an RGB image file into a uint8 tensor ``(3, H, W)``.

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: the file cannot be decoded (corrupt or truncated); the message names the file.
    """
    if not path.is_file():
        raise FileNotFoundError(f"image file {path} is missing")
    try:
        return decode_image(str(path), mode=ImageReadMode.RGB)
    except RuntimeError as exc:  # torchvision's decoders raise RuntimeError without the file's name
        raise ValueError(
            f"image file {path} cannot be decoded (corrupt or truncated?): {' '.join(str(exc).split())[:300]}"
        ) from exc


def read_index_mask(path: Path) -> np.ndarray:
    """Read a label PNG as class indices (uint8 ``(H, W)``).

    Palette PNGs (Pascal VOC ``SegmentationClass``) are read as their palette indices, never as colours.

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: the PNG holds colours (RGB) rather than indices, values above 255, or cannot be decoded
            (corrupt or truncated; the message names the file).
    """
    if not path.is_file():
        raise FileNotFoundError(f"label file {path} is missing")
    try:
        with Image.open(path) as img:
            if img.mode not in _MASK_MODES:
                raise ValueError(
                    f"label file {path} has PIL mode {img.mode!r}: expected class indices, as a palette ('P') or "
                    "grayscale ('L') PNG, not colours"
                )
            mask = np.asarray(img)
    except (OSError, SyntaxError) as exc:  # PIL: UnidentifiedImageError, "image file is truncated", bad chunks
        raise ValueError(
            f"label file {path} cannot be decoded (corrupt or truncated?): {type(exc).__name__}: {exc}"
        ) from exc
    if mask.dtype != np.uint8:
        if mask.size and (mask.min() < 0 or mask.max() > 255):
            raise ValueError(f"label file {path} has values outside [0, 255]")
        mask = mask.astype(np.uint8)
    return mask


def mask_to_tensor(mask: np.ndarray) -> Tensor:
    """uint8 numpy mask ``(H, W)`` -> int64 tensor ``(H, W)``."""
    return torch.from_numpy(mask.astype(np.int64))


def ids_in_mask(mask: np.ndarray) -> frozenset[int]:
    """Dataset ids occurring in a uint8 mask, void 255 excluded."""
    counts = np.bincount(mask.ravel(), minlength=256)
    return frozenset(int(c) for c in np.flatnonzero(counts[:255]))


def check_pair(image: Tensor, mask: np.ndarray, image_path: Path, mask_path: Path) -> None:
    """Check that an image and its mask have the same height and width."""
    if tuple(image.shape[-2:]) != mask.shape:
        raise ValueError(
            f"image {image_path} has size {tuple(image.shape[-2:])} but its label {mask_path} has size {mask.shape}"
        )


def files_fingerprint(kind: str, base: Path, files: Iterable[Path], *, content: bool = False) -> str:
    """A fingerprint of ``files``: their paths relative to ``base`` with their sizes and modification times, or
    with ``content=True`` their bytes (SHA-256), which sees a file rewritten with the same size and modification
    time at the cost of reading every file.

    Raises:
        FileNotFoundError: one of the files is missing.
    """
    digest = hashlib.sha256()
    count = 0
    for path in files:
        name = path.relative_to(base).as_posix()
        try:
            if content:
                data = path.read_bytes()
                digest.update(f"{name}\0{len(data)}\0".encode())
                digest.update(hashlib.sha256(data).digest())
            else:
                st = os.stat(path)
                digest.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except FileNotFoundError:
            raise FileNotFoundError(f"label file {path} is missing") from None
        count += 1
    return f"{kind}:content:{count}:{digest.hexdigest()}" if content else f"{kind}:{count}:{digest.hexdigest()}"


def check_index(index: int, length: int) -> int:
    """Validate an image index in ``[-length, length)`` and return it as non-negative."""
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
        raise TypeError(f"index must be an integer, got {type(index).__name__}")
    i = int(index)
    if not -length <= i < length:
        raise IndexError(f"index {i} is out of range for a source of {length} images")
    return i % length


class _ImageMaskFiles:
    """Shared part of the file-backed sources: one image and one index mask per item.

    Subclasses set ``self._images`` and ``self._masks`` (equal-length lists of paths) and ``self._fingerprint_key``
    ``(kind, base)`` in ``__init__``; this class reads, checks and fingerprints them.
    """

    _images: list[Path]
    _masks: list[Path]
    _fingerprint_key: tuple[str, Path]
    _fingerprint: str | None = None

    def __len__(self) -> int:
        return len(self._images)

    def load(self, index: int) -> tuple[Tensor, Tensor]:
        """Image ``index``: uint8 RGB ``(3, H, W)`` and int64 dataset ids ``(H, W)``."""
        i = check_index(index, len(self))
        image = read_image(self._images[i])
        mask = read_index_mask(self._masks[i])
        check_pair(image, mask, self._images[i], self._masks[i])
        return image, mask_to_tensor(mask)

    def labels_present(self, index: int) -> frozenset[int]:
        """Dataset ids in mask ``index``, void excluded (reads the mask only)."""
        return ids_in_mask(read_index_mask(self._masks[check_index(index, len(self))]))

    def fingerprint(self) -> str:
        """Identifies the split and its mask files (names, sizes, modification times)."""
        if self._fingerprint is None:
            kind, base = self._fingerprint_key
            self._fingerprint = files_fingerprint(kind, base, self._masks)
        return self._fingerprint

    def content_fingerprint(self) -> str:
        """Identifies the split and the bytes of its mask files (reads every mask; see ``cache_check``)."""
        kind, base = self._fingerprint_key
        return files_fingerprint(kind, base, self._masks, content=True)
