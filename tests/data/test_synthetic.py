"""Tests of the built-in synthetic benchmark :class:`incseg.data.synthetic.SyntheticScenes`."""

from __future__ import annotations

from collections import Counter
from functools import cache
from typing import Literal

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from incseg.data.synthetic import SyntheticScenes

VOID = 255


def _mask_ids(mask: torch.Tensor) -> frozenset[int]:
    return frozenset(int(v) for v in mask.unique().tolist()) - {VOID}


@cache
def _default_train_sets() -> tuple[frozenset[int], ...]:
    src = SyntheticScenes("train")
    return tuple(src.labels_present(i) for i in range(len(src)))


# ---------------------------------------------------------------------------------------------- basics


@pytest.mark.parametrize("size", [48, 64, 97])
@pytest.mark.parametrize("void_border", [True, False])
def test_shapes_dtypes_and_values(size: int, void_border: bool) -> None:
    src = SyntheticScenes("val", num_images=6, size=size, void_border=void_border)
    for i in range(len(src)):
        image, mask = src.load(i)
        assert image.shape == (3, size, size) and image.dtype == torch.uint8
        assert mask.shape == (size, size) and mask.dtype == torch.int64
        allowed = set(range(21)) | ({VOID} if void_border else set())
        assert set(mask.unique().tolist()) <= allowed
        assert image.is_contiguous() and mask.is_contiguous()


def test_metadata_and_protocol() -> None:
    from incseg.data import SegmentationSource

    src = SyntheticScenes("train", num_images=10)
    assert isinstance(src, SegmentationSource)
    assert len(src) == 10
    assert src.num_classes == 21 == len(src.class_names)
    assert src.class_names[0] == "background"
    assert len(set(src.class_names)) == 21
    assert all(isinstance(n, str) and n for n in src.class_names)


def test_default_lengths() -> None:
    assert len(SyntheticScenes("train")) == 1500
    assert len(SyntheticScenes("val")) == 300


def test_fingerprint_identifies_parameters() -> None:
    base = SyntheticScenes("train", num_images=10, seed=3)
    assert isinstance(base.fingerprint(), str)
    assert base.fingerprint() == SyntheticScenes("train", num_images=10, seed=3).fingerprint()
    others = [
        SyntheticScenes("val", num_images=10, seed=3),
        SyntheticScenes("train", num_images=11, seed=3),
        SyntheticScenes("train", num_images=10, seed=4),
        SyntheticScenes("train", num_images=10, seed=3, size=96),
        SyntheticScenes("train", num_images=10, seed=3, void_border=False),
    ]
    fingerprints = {base.fingerprint(), *(o.fingerprint() for o in others)}
    assert len(fingerprints) == 1 + len(others)


# ---------------------------------------------------------------------------------------------- determinism


def test_same_index_twice_and_two_instances_are_identical() -> None:
    a, b = SyntheticScenes("train", num_images=20, seed=1), SyntheticScenes("train", num_images=20, seed=1)
    first = [a.load(i) for i in range(5)]
    again = [a.load(i) for i in range(5)]
    # A fresh instance visited in another order, as a DataLoader worker would.
    other = {i: b.load(i) for i in reversed(range(5))}
    for i in range(5):
        for x, y, z in zip(first[i], again[i], other[i]):
            assert torch.equal(x, y) and torch.equal(x, z)
    assert a.labels_present(3) == b.labels_present(3)


def test_independent_of_global_rng_and_length() -> None:
    src = SyntheticScenes("train", num_images=5, seed=2)
    image, mask = src.load(4)
    torch.manual_seed(123)
    np.random.seed(123)
    image2, mask2 = SyntheticScenes("train", num_images=50, seed=2).load(4)
    assert torch.equal(image, image2) and torch.equal(mask, mask2)


def test_negative_index() -> None:
    src = SyntheticScenes("val", num_images=7)
    for x, y in zip(src.load(-1), src.load(6)):
        assert torch.equal(x, y)
    assert src.labels_present(-2) == src.labels_present(5)


def test_seeds_and_splits_differ() -> None:
    train0 = SyntheticScenes("train", num_images=8, seed=0)
    train1 = SyntheticScenes("train", num_images=8, seed=1)
    val0 = SyntheticScenes("val", num_images=8, seed=0)
    for i in range(8):
        assert not torch.equal(train0.load(i)[0], train1.load(i)[0])
        assert not torch.equal(train0.load(i)[0], val0.load(i)[0])
    assert not torch.equal(train0.load(0)[0], train0.load(1)[0])


# ---------------------------------------------------------------------------------------------- labels


@pytest.mark.parametrize(("split", "size", "void_border"), [("train", 64, True), ("val", 48, False), ("val", 96, True)])
def test_labels_present_equals_rendered_mask(split: Literal["train", "val"], size: int, void_border: bool) -> None:
    src = SyntheticScenes(split, num_images=120, size=size, seed=5, void_border=void_border)
    for i in range(len(src)):
        present = src.labels_present(i)
        assert present == _mask_ids(src.load(i)[1]), f"image {i}"
        assert 0 in present and VOID not in present
        assert 2 <= len(present) <= 4  # background and 1 to 3 objects (possibly of the same class)


@given(seed=st.integers(0, 2**32 - 1), index=st.integers(0, 9999), size=st.sampled_from([48, 64, 80]))
def test_labels_present_property(seed: int, index: int, size: int) -> None:
    src = SyntheticScenes("train", num_images=10_000, size=size, seed=seed)
    _, mask = src.load(index)
    assert src.labels_present(index) == _mask_ids(mask)


def test_void_border_only_changes_the_band() -> None:
    with_void = SyntheticScenes("train", num_images=30, seed=7, void_border=True)
    without = SyntheticScenes("train", num_images=30, seed=7, void_border=False)
    void_fraction = []
    for i in range(len(with_void)):
        image_v, mask_v = with_void.load(i)
        image_n, mask_n = without.load(i)
        assert torch.equal(image_v, image_n)
        keep = mask_v != VOID
        assert torch.equal(mask_v[keep], mask_n[keep])
        void_fraction.append(float((~keep).float().mean()))
        assert with_void.labels_present(i) == without.labels_present(i)
    # A thin band: present, but a small fraction of the image.
    assert 0.005 < float(np.mean(void_fraction)) < 0.08


def test_every_class_appears_and_distribution_is_skewed_not_degenerate() -> None:
    sets = _default_train_sets()
    assert all(1 <= len(s - {0}) <= 3 for s in sets)
    seen_200 = set().union(*sets[:200])
    assert seen_200 == set(range(21))
    counts = Counter(c for s in sets for c in s if c != 0)
    assert min(counts.values()) >= 50
    assert 1.5 < max(counts.values()) / min(counts.values()) < 6


def test_objects_are_visible_and_occlude() -> None:
    src = SyntheticScenes("val", num_images=80, seed=0)
    masks = torch.stack([src.load(i)[1] for i in range(len(src))])
    object_fraction = float(((masks > 0) & (masks != VOID)).float().mean())
    assert 0.05 < object_fraction < 0.4
    # Occlusions: without void borders, pixels of two different objects touch in some images.
    no_void = SyntheticScenes("val", num_images=80, seed=0, void_border=False)
    m = torch.stack([no_void.load(i)[1] for i in range(len(no_void))])
    adjacent = (m[:, :, 1:] != m[:, :, :-1]) & (m[:, :, 1:] > 0) & (m[:, :, :-1] > 0)
    assert bool(adjacent.any())


# ---------------------------------------------------------------------------------------------- scenarios


@pytest.mark.parametrize("task", ["15-5", "15-1"])
@pytest.mark.parametrize("mode", ["disjoint", "overlapped"])
def test_voc_like_scenarios_have_images_at_every_step(task: str, mode: str) -> None:
    from incseg.scenarios import get_scenario

    scenario = get_scenario("synthetic", task, mode=mode)
    assert tuple(scenario.class_names) == SyntheticScenes.class_names
    sets = _default_train_sets()
    for t in range(scenario.num_steps):
        kept = sum(scenario.keep_train_image(t, s) for s in sets)
        assert kept >= 20, f"{task} {mode}: step {t} keeps {kept} images"
    val = SyntheticScenes("val")
    val_sets = [val.labels_present(i) for i in range(len(val))]
    for t in range(scenario.num_steps):
        assert sum(scenario.keep_test_image(t, s) for s in val_sets) >= 20


def test_works_with_incremental_segmentation() -> None:
    from incseg.data import IncrementalSegmentation
    from incseg.scenarios import get_scenario

    scenario = get_scenario("synthetic", "15-5", mode="overlapped")
    src = SyntheticScenes("train", num_images=60, seed=0)
    ds = IncrementalSegmentation(src, scenario, 1, train=True)
    assert len(ds) > 0
    image, target = ds[0]
    assert image.shape == (3, 64, 64) and target.shape == (64, 64)
    assert set(target.unique().tolist()) <= {0, *range(16, 21), VOID}


# ---------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs",
    [
        {"split": "test"},
        {"split": "TRAIN"},
        {"num_images": 0},
        {"num_images": -3},
        {"size": 16},
        {"size": 47},
        {"seed": -1},
    ],
)
def test_bad_arguments_raise_value_error(kwargs: dict[str, object]) -> None:
    split = kwargs.pop("split", "train")
    with pytest.raises(ValueError, match=next(iter(kwargs), "split")):
        SyntheticScenes(split, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs", [{"num_images": 1.5}, {"size": "64"}, {"seed": None}, {"size": True}, {"void_border": 1}]
)
def test_bad_argument_types_raise_type_error(kwargs: dict[str, object]) -> None:
    with pytest.raises(TypeError, match=next(iter(kwargs))):
        SyntheticScenes("train", **kwargs)  # type: ignore[arg-type]


def test_bad_index() -> None:
    src = SyntheticScenes("train", num_images=4)
    with pytest.raises(IndexError, match="out of range"):
        src.load(4)
    with pytest.raises(IndexError, match="out of range"):
        src.labels_present(-5)
    with pytest.raises(TypeError, match="index"):
        src.load(1.0)  # type: ignore[arg-type]


def test_cached_images_are_the_rendered_ones_and_stay_intact() -> None:
    plain = SyntheticScenes("train", num_images=5, size=48, seed=3)
    cached = SyntheticScenes("train", num_images=5, size=48, seed=3, cache=True)
    for i in [0, 4, -1, 2, 4, 0]:  # repeated and negative indices hit the cache
        image, mask = cached.load(i)
        ref_image, ref_mask = plain.load(i)
        assert mask.dtype == torch.int64 and torch.equal(image, ref_image) and torch.equal(mask, ref_mask)
        image.zero_()  # a caller modifying what it got leaves the cache unchanged
        mask.fill_(VOID)
    assert torch.equal(cached.load(4)[0], plain.load(4)[0])
    with pytest.raises(IndexError):
        cached.load(5)
    with pytest.raises(TypeError, match="cache"):
        SyntheticScenes(cache=1)  # type: ignore[arg-type]
