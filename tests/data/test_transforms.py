"""Tests of incseg.data.transforms: shapes, padding, image/mask alignment, determinism, validation."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor

from incseg.data.transforms import IMAGENET_MEAN, IMAGENET_STD, TestTransform, TrainTransform, normalize

# One colour per label value; the image is painted from the mask, so alignment can be read off the output.
_PALETTE = torch.tensor(
    [[0, 0, 0], [250, 10, 10], [10, 250, 10], [10, 10, 250], [250, 250, 10], [10, 250, 250], [250, 10, 250]],
    dtype=torch.uint8,
)


def _blocks(h: int, w: int, block: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """A mask of random square blocks (values 0..5 and some void 255) and the image painted from it."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, 7, ((h + block - 1) // block, (w + block - 1) // block), generator=g)
    mask = coarse.repeat_interleave(block, 0).repeat_interleave(block, 1)[:h, :w]
    image = _PALETTE[mask].permute(2, 0, 1).contiguous()
    mask = torch.where(mask == 6, 255, mask)  # the magenta blocks are void
    return image, mask


def _denormalize(image: Tensor) -> Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (image * std + mean) * 255.0


def _uniform_interior(mask: Tensor, radius: int) -> Tensor:
    """Pixels whose (2 radius + 1)^2 neighbourhood holds a single label."""
    m = mask.double()[None, None]
    k = 2 * radius + 1
    hi = torch.nn.functional.max_pool2d(m, k, 1, radius)
    lo = -torch.nn.functional.max_pool2d(-m, k, 1, radius)
    inside = torch.zeros_like(mask, dtype=torch.bool)
    inside[radius:-radius, radius:-radius] = True
    return (hi == lo)[0, 0] & inside


# ------------------------------------------------------------------------------------------------ normalize
def test_normalize_float64_reference() -> None:
    image = torch.randint(0, 256, (3, 5, 7), dtype=torch.uint8)
    ref = torch.empty(3, 5, 7, dtype=torch.float64)
    for c in range(3):
        ref[c] = (image[c].double() / 255.0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
    out = normalize(image)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-6)
    assert normalize(image[None]).shape == (1, 3, 5, 7)


def test_normalize_errors() -> None:
    with pytest.raises(TypeError, match="uint8"):
        normalize(torch.zeros(3, 2, 2))
    with pytest.raises(ValueError, match="shape"):
        normalize(torch.zeros(4, 2, 2, dtype=torch.uint8))
    with pytest.raises(ValueError, match="3 values"):
        normalize(torch.zeros(3, 2, 2, dtype=torch.uint8), mean=(0.5, 0.5))
    with pytest.raises(ValueError, match="positive"):
        normalize(torch.zeros(3, 2, 2, dtype=torch.uint8), std=(1.0, 0.0, 1.0))


# ------------------------------------------------------------------------------------------------ TrainTransform
@pytest.mark.parametrize(("crop", "expected"), [(8, (8, 8)), ((7, 11), (7, 11)), (40, (40, 40))])
@pytest.mark.parametrize("hw", [(16, 16), (13, 21)])
def test_train_output_shape_and_types(
    crop: int | tuple[int, int], expected: tuple[int, int], hw: tuple[int, int]
) -> None:
    image, mask = _blocks(*hw, block=4)
    out_image, out_mask = TrainTransform(crop_size=crop)(image, mask)
    assert out_image.shape == (3, *expected) and out_image.dtype == torch.float32
    assert out_mask.shape == expected and out_mask.dtype == torch.int64
    assert set(out_mask.unique().tolist()) <= {0, 1, 2, 3, 4, 5, 255}  # nearest: no new label values


def test_train_pads_image_with_zero_and_mask_with_255() -> None:
    image, mask = _blocks(5, 6, block=2)
    out_image, out_mask = TrainTransform(crop_size=(9, 10), scale=(1.0, 1.0), hflip=False)(image, mask)
    # No resize and a crop larger than the image: the image sits at the top left, the rest is padding.
    torch.testing.assert_close(out_image[:, :5, :6], normalize(image))
    assert torch.equal(out_mask[:5, :6], mask)
    assert (out_image[:, 5:] == 0).all() and (out_image[:, :, 6:] == 0).all()
    assert (out_mask[5:] == 255).all() and (out_mask[:, 6:] == 255).all()


@pytest.mark.parametrize("seed", range(6))
def test_train_without_resize_is_an_exact_crop(seed: int) -> None:
    image, mask = _blocks(20, 17, block=3, seed=seed)
    t = TrainTransform(crop_size=(12, 12), scale=(1.0, 1.0), generator=torch.Generator().manual_seed(seed))
    out_image, out_mask = t(image, mask)
    painted = _PALETTE[torch.where(out_mask == 255, 6, out_mask)].permute(2, 0, 1)
    torch.testing.assert_close(out_image, normalize(painted))  # every pixel still shows its label's colour


@given(seed=st.integers(0, 2**31 - 1), hflip=st.booleans())
def test_train_keeps_image_and_mask_aligned(seed: int, hflip: bool) -> None:
    image, mask = _blocks(48, 40, block=8, seed=seed % 97)
    t = TrainTransform(crop_size=32, scale=(0.5, 2.0), hflip=hflip, generator=torch.Generator().manual_seed(seed))
    out_image, out_mask = t(image, mask)
    # Away from label boundaries (bilinear blending), each pixel has the colour of its label.
    interior = _uniform_interior(out_mask, radius=1) & (out_mask != 255)
    colours = _denormalize(out_image).permute(1, 2, 0)[interior]
    expected = _PALETTE[out_mask[interior]].float()
    assert interior.any()
    torch.testing.assert_close(colours, expected, atol=1.5, rtol=0)


def test_train_flip_is_joint() -> None:
    image, mask = _blocks(6, 8, block=2)
    flipped = [
        TrainTransform(8, scale=(1.0, 1.0), generator=torch.Generator().manual_seed(s))(image, mask) for s in range(8)
    ]
    masks = {tuple(m.flatten().tolist()) for _, m in flipped}
    assert masks == {
        tuple(torch.cat([mask, torch.full((2, 8), 255)]).flatten().tolist()),
        tuple(torch.cat([mask.flip(-1), torch.full((2, 8), 255)]).flatten().tolist()),
    }
    for out_image, out_mask in flipped:
        same = torch.equal(out_mask[:6], mask)
        torch.testing.assert_close(out_image[:, :6], normalize(image if same else image.flip(-1)))


def test_train_is_deterministic() -> None:
    image, mask = _blocks(30, 30, block=5)
    a = TrainTransform(16, generator=torch.Generator().manual_seed(3))(image, mask)
    b = TrainTransform(16, generator=torch.Generator().manual_seed(3))(image, mask)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    t = TrainTransform(16)  # global RNG: reproducible under torch.manual_seed (as in seeded DataLoader workers)
    torch.manual_seed(5)
    c = t(image, mask)
    torch.manual_seed(5)
    d = t(image, mask)
    assert torch.equal(c[0], d[0]) and torch.equal(c[1], d[1])


def test_train_scale_changes_content_size() -> None:
    image, mask = _blocks(16, 16, block=16)  # one label over the whole image
    _, small = TrainTransform(32, scale=(0.5, 0.5), hflip=False)(image, mask)
    assert (small != 255).sum() == 64  # 16 * 0.5 = 8 -> 8 x 8 labelled pixels, the rest is padding


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"crop_size": 0}, ValueError),
        ({"crop_size": (4, 0)}, ValueError),
        ({"crop_size": 2.5}, TypeError),
        ({"crop_size": (1, 2, 3)}, TypeError),
        ({"scale": (0.0, 1.0)}, ValueError),
        ({"scale": (2.0, 1.0)}, ValueError),
        ({"mean": (0.1,)}, ValueError),
        ({"std": (1.0, -1.0, 1.0)}, ValueError),
    ],
)
def test_train_argument_errors(kwargs: dict[str, object], error: type[Exception]) -> None:
    with pytest.raises(error):
        TrainTransform(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("transform", [TrainTransform(8), TestTransform(8)])
def test_input_errors(transform: TrainTransform | TestTransform) -> None:
    image, mask = _blocks(8, 8, block=2)
    with pytest.raises(TypeError, match="uint8"):
        transform(image.float(), mask)
    with pytest.raises(ValueError, match="shape"):
        transform(image[:2], mask)
    with pytest.raises(ValueError, match="like the image"):
        transform(image, mask[:4])
    with pytest.raises(TypeError, match="integer"):
        transform(image, mask.float())
    with pytest.raises(ValueError, match=r"\[0, 255\]"):
        transform(image, mask + 300)


# ------------------------------------------------------------------------------------------------ TestTransform
def test_test_transform_full_resolution() -> None:
    image, mask = _blocks(13, 9, block=3)
    out_image, out_mask = TestTransform(None)(image, mask)
    torch.testing.assert_close(out_image, normalize(image))
    assert torch.equal(out_mask, mask) and out_mask.dtype == torch.int64


def test_test_transform_resize_and_centre_crop() -> None:
    image, mask = _blocks(16, 24, block=2)
    out_image, out_mask = TestTransform(8)(image, mask)
    assert out_image.shape == (3, 8, 8) and out_mask.shape == (8, 8)
    # Halving the short side halves the long one (24 -> 12), then the centre 8 columns are kept.
    assert torch.equal(out_mask, mask[::2, ::2][:, 2:10])
    _, no_crop = TestTransform(8, crop=False)(image, mask)
    assert no_crop.shape == (8, 12)
    tall_image, tall_mask = TestTransform(4, crop=False)(*_blocks(20, 8, block=4))
    assert tall_image.shape == (3, 10, 4) and tall_mask.shape == (10, 4)


def test_test_transform_same_size_centre_crop_is_a_slice() -> None:
    image, mask = _blocks(10, 14, block=2)
    out_image, out_mask = TestTransform(10)(image, mask)
    torch.testing.assert_close(out_image, normalize(image[:, :, 2:12]))
    assert torch.equal(out_mask, mask[:, 2:12])


@pytest.mark.parametrize(("size", "error"), [(0, ValueError), (2.0, TypeError), ((4, 4), TypeError)])
def test_test_transform_argument_errors(size: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="size"):
        TestTransform(size)  # type: ignore[arg-type]


def test_reprs() -> None:
    assert "crop_size=(8, 8)" in repr(TrainTransform(8)) and "size=4" in repr(TestTransform(4))
