"""Joint image/label transforms: random scale, crop and flip for training, resize and centre crop for testing.

Both work on an image uint8 ``(3, H, W)`` and a label map int64 ``(H, W)`` with values in ``[0, 255]`` and
return a normalised float32 image and an int64 label map. Images are resized bilinearly (antialiased),
labels with exact nearest-neighbour interpolation so that no new label value appears. The training
augmentation follows DeepLab / MiB (paper Sec. IV-B: "the same data augmentation of [70]", 512 x 512 crops).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torchvision.transforms.v2.functional as TF
from torch import Tensor

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "TestTransform", "TrainTransform", "normalize"]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
_IGNORE = 255


def _check_stats(mean: Sequence[float], std: Sequence[float]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    m, s = tuple(float(x) for x in mean), tuple(float(x) for x in std)
    if len(m) != 3 or len(s) != 3:
        raise ValueError(f"mean and std must have 3 values (RGB), got {len(m)} and {len(s)}")
    if any(not x > 0 for x in s):
        raise ValueError(f"std must be positive, got {s}")
    return m, s


def normalize(image: Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> Tensor:
    """uint8 image -> float32 ``(image / 255 - mean) / std`` per channel.

    Args:
        image: uint8 RGB image.
        mean: per-channel mean in ``[0, 1]`` units.
        std: per-channel standard deviation in ``[0, 1]`` units.

    Shape:
        image: ``(3, H, W)`` (or ``(B, 3, H, W)``); output: same shape, float32.

    Raises:
        TypeError: ``image`` is not a uint8 tensor.
        ValueError: ``image`` does not have 3 channels, or bad ``mean``/``std``.

    Example:
        >>> [round(v, 3) for v in normalize(torch.full((3, 1, 1), 255, dtype=torch.uint8)).flatten().tolist()]
        [2.249, 2.429, 2.64]
    """
    if not isinstance(image, Tensor) or image.dtype != torch.uint8:
        raise TypeError(f"image must be a uint8 tensor, got {getattr(image, 'dtype', type(image).__name__)}")
    if image.ndim not in (3, 4) or image.shape[-3] != 3:
        raise ValueError(f"image must have shape (3, H, W) or (B, 3, H, W), got {tuple(image.shape)}")
    m, s = _check_stats(mean, std)
    # (x / 255 - mean) / std as one scale and one shift per channel.
    scale = torch.tensor([1.0 / (255.0 * v) for v in s], dtype=torch.float32).view(3, 1, 1)
    shift = torch.tensor([mu / v for mu, v in zip(m, s)], dtype=torch.float32).view(3, 1, 1)
    return image.float().mul_(scale).sub_(shift)


def _check_pair(image: object, mask: object) -> tuple[Tensor, Tensor]:
    if not isinstance(image, Tensor) or image.dtype != torch.uint8:
        raise TypeError(f"image must be a uint8 tensor (3, H, W), got {getattr(image, 'dtype', type(image).__name__)}")
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"image must have shape (3, H, W), got {tuple(image.shape)}")
    if not isinstance(mask, Tensor) or mask.dtype.is_floating_point or mask.dtype == torch.bool:
        raise TypeError(f"mask must be an integer tensor (H, W), got {getattr(mask, 'dtype', type(mask).__name__)}")
    if mask.shape != image.shape[1:]:
        raise ValueError(
            f"mask must have shape (H, W) = {tuple(image.shape[1:])} like the image, got {tuple(mask.shape)}"
        )
    if mask.numel():
        lo, hi = torch.aminmax(mask)
        if lo < 0 or hi > _IGNORE:
            raise ValueError(f"mask values must be in [0, 255], got [{int(lo)}, {int(hi)}]")
    return image, mask


def _resize(image: Tensor, mask: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Resize the uint8 image bilinearly (antialiased) and the mask (as uint8) with exact nearest neighbour."""
    if size == tuple(image.shape[1:]):
        return image, mask
    image = TF.resize(image, list(size), interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    as_uint8 = mask.to(torch.uint8)[None]
    mask = TF.resize(as_uint8, list(size), interpolation=TF.InterpolationMode.NEAREST_EXACT)[0].to(mask.dtype)
    return image, mask


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        pair = (value, value)
    elif isinstance(value, Sequence) and len(value) == 2 and all(isinstance(v, int) for v in value):
        pair = (int(value[0]), int(value[1]))
    else:
        raise TypeError(f"{name} must be an int or a pair of ints (height, width), got {value!r}")
    if min(pair) < 1:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return pair


class TrainTransform:
    """Training augmentation: random scale, random horizontal flip, pad and random crop (DeepLab / MiB).

    Random numbers are drawn in this order from ``generator`` (or torch's global RNG, so that a seeded
    ``DataLoader`` with per-worker seeds is reproducible): scale factor ``s ~ U(scale)`` applied to both sides
    (image bilinear, mask nearest), horizontal flip with probability 0.5, then the position of a uniformly
    placed ``crop_size`` window. Where the scaled image is smaller than the crop, it is padded at the bottom
    and right (image with 0, i.e. the mean colour after normalisation; mask with 255, ignored).

    Args:
        crop_size: output size, an int or ``(height, width)``.
        scale: range ``(low, high)`` of the scale factor of the sides, ``0 < low <= high``.
        hflip: whether to flip horizontally with probability 0.5.
        mean: per-channel mean for normalisation.
        std: per-channel standard deviation for normalisation.
        generator: optional ``torch.Generator`` for the random draws.

    Shape:
        Input: image uint8 ``(3, H, W)``, mask integer ``(H, W)`` in ``[0, 255]``.
        Output: image float32 ``(3, h, w)``, mask int64 ``(h, w)`` with ``(h, w) = crop_size``.

    Raises:
        TypeError: wrong argument or input types.
        ValueError: non-positive sizes, a bad scale range, mismatched image/mask shapes.

    Example:
        >>> t = TrainTransform(crop_size=8, generator=torch.Generator().manual_seed(0))
        >>> image, mask = t(torch.zeros(3, 5, 6, dtype=torch.uint8), torch.ones(5, 6, dtype=torch.int64))
        >>> image.shape, mask.shape, mask.dtype
        (torch.Size([3, 8, 8]), torch.Size([8, 8]), torch.int64)
    """

    def __init__(
        self,
        crop_size: int | Sequence[int] = 512,
        scale: tuple[float, float] = (0.5, 2.0),
        hflip: bool = True,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        *,
        generator: torch.Generator | None = None,
    ) -> None:
        self.crop_size = _pair(crop_size, "crop_size")
        if len(scale) != 2 or not 0 < float(scale[0]) <= float(scale[1]):
            raise ValueError(f"scale must be (low, high) with 0 < low <= high, got {scale!r}")
        self.scale = (float(scale[0]), float(scale[1]))
        self.hflip = bool(hflip)
        self.mean, self.std = _check_stats(mean, std)
        self.generator = generator

    def _uniform(self) -> float:
        return float(torch.rand((), generator=self.generator))

    def _randint(self, high: int) -> int:
        return int(torch.randint(high, (), generator=self.generator))

    def __call__(self, image: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        image, mask = _check_pair(image, mask)
        low, high = self.scale
        s = low + (high - low) * self._uniform()
        flip = self.hflip and self._uniform() < 0.5
        h, w = image.shape[1:]
        image, mask = _resize(image, mask, (max(1, round(h * s)), max(1, round(w * s))))
        # Crop first, then flip, normalise and pad only the crop: the same distribution as flip -> pad -> crop
        # (crop positions are uniform, hence symmetric), at a fraction of the cost on up-scaled images.
        ch, cw = self.crop_size
        h, w = image.shape[1:]
        top = self._randint(max(h - ch, 0) + 1)
        left = self._randint(max(w - cw, 0) + 1)
        image = image[:, top : top + ch, left : left + cw]
        mask = mask[top : top + ch, left : left + cw].long()
        if flip:
            image, mask = image.flip(-1), mask.flip(-1)
        out = normalize(image, self.mean, self.std)
        pad_h, pad_w = ch - out.shape[1], cw - out.shape[2]
        if pad_h or pad_w:
            out = torch.nn.functional.pad(out, (0, pad_w, 0, pad_h), value=0.0)
            mask = torch.nn.functional.pad(mask, (0, pad_w, 0, pad_h), value=_IGNORE)
        return out, mask.contiguous()

    def __repr__(self) -> str:
        return f"TrainTransform(crop_size={self.crop_size}, scale={self.scale}, hflip={self.hflip})"


class TestTransform:
    """Evaluation transform: resize the short side to ``size`` and centre-crop ``size x size``, or keep the image.

    ``size=None`` only normalises (full-resolution evaluation); ``crop=False`` resizes without cropping. The
    default (512, centre crop) is MiB's and the CAF paper's protocol.

    Args:
        size: target short side, or ``None`` to keep the original resolution.
        crop: centre-crop to ``size x size`` after resizing.
        mean: per-channel mean for normalisation.
        std: per-channel standard deviation for normalisation.

    Shape:
        Input: image uint8 ``(3, H, W)``, mask integer ``(H, W)`` in ``[0, 255]``.
        Output: image float32 ``(3, h, w)``, mask int64 ``(h, w)``.

    Raises:
        TypeError: wrong argument or input types.
        ValueError: non-positive size, mismatched image/mask shapes.

    Example:
        >>> image = torch.zeros(3, 6, 8, dtype=torch.uint8)
        >>> image, mask = TestTransform(4)(image, torch.zeros(6, 8, dtype=torch.int64))
        >>> tuple(image.shape), tuple(mask.shape)
        ((3, 4, 4), (4, 4))
    """

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        size: int | None = 512,
        crop: bool = True,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        if size is not None:
            if isinstance(size, bool) or not isinstance(size, int):
                raise TypeError(f"size must be an int (short side) or None, got {size!r}")
            if size < 1:
                raise ValueError(f"size must be positive, got {size}")
        self.size = size
        self.crop = bool(crop)
        self.mean, self.std = _check_stats(mean, std)

    def __call__(self, image: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        image, mask = _check_pair(image, mask)
        if self.size is not None:
            h, w = image.shape[1:]
            short = min(h, w)
            new = (max(self.size, round(h * self.size / short)), max(self.size, round(w * self.size / short)))
            image, mask = _resize(image, mask, new)
            if self.crop:
                top = (new[0] - self.size) // 2
                left = (new[1] - self.size) // 2
                image = image[:, top : top + self.size, left : left + self.size]
                mask = mask[top : top + self.size, left : left + self.size]
        return normalize(image, self.mean, self.std), mask.long().contiguous()

    def __repr__(self) -> str:
        return f"TestTransform(size={self.size}, crop={self.crop})"
