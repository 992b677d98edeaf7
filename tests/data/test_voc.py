"""Tests of incseg.data.voc on tiny fake VOCdevkit trees built in tmp_path."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from incseg.data import PascalVOC, PascalVOCIncremental, SegmentationSource, TestTransform
from incseg.scenarios import get_scenario

sys.path.insert(0, str(Path(__file__).parent))
from _fake_datasets import SIZE, make_voc
from _fake_datasets import VOC_AUG_EXTRA as AUG_EXTRA
from _fake_datasets import VOC_TRAIN as TRAIN
from _fake_datasets import VOC_VAL as VAL
from _fake_datasets import voc_mask as _mask


@pytest.fixture
def voc_root(tmp_path: Path) -> Path:
    make_voc(tmp_path)
    return tmp_path


def test_load_reads_palette_indices(voc_root: Path) -> None:
    voc = PascalVOC(voc_root, "train", use_aug=False)
    assert isinstance(voc, SegmentationSource)
    assert len(voc) == 4 and voc.ids == tuple(TRAIN) and voc.num_classes == 21 and voc.class_names[15] == "person"
    image, mask = voc.load(0)
    assert image.dtype == torch.uint8 and image.shape == (3, SIZE, SIZE)
    assert mask.dtype == torch.int64 and mask.shape == (SIZE, SIZE)
    assert torch.equal(mask, torch.from_numpy(_mask([1, 2])).long())  # indices, not colours
    assert voc.labels_present(0) == frozenset({0, 1, 2})  # void excluded
    assert voc.labels_present(-1) == frozenset({0, 15})
    with pytest.raises(IndexError):
        voc.load(4)


@pytest.mark.parametrize("sub", ["", "VOCdevkit", "VOCdevkit/VOC2012"])
def test_accepted_roots(voc_root: Path, sub: str) -> None:
    val = PascalVOC(voc_root / sub if sub else str(voc_root), "val")
    assert val.ids == tuple(VAL) and val.labels_present(2) == frozenset({0})


def test_train_without_aug_warns_and_falls_back(voc_root: Path) -> None:
    with pytest.warns(UserWarning, match="SegmentationClassAug"):
        voc = PascalVOC(voc_root, "train")
    assert not voc.augmented and len(voc) == len(TRAIN)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        PascalVOC(voc_root, "val")  # the validation split never looks for the augmented set


@pytest.mark.parametrize("deeplab_list", [False, True])
def test_augmented_train_set(tmp_path: Path, deeplab_list: bool) -> None:
    make_voc(tmp_path, aug=True, deeplab_list=deeplab_list)
    voc = PascalVOC(tmp_path, "train")
    assert voc.augmented and voc.ids == (*TRAIN, *AUG_EXTRA)
    assert voc.labels_present(5) == frozenset({0, 5, 20})
    _, mask = voc.load(4)
    assert mask.unique().tolist() == [0, 19, 255]
    assert not PascalVOC(tmp_path, "train", use_aug=False).augmented
    assert PascalVOC(tmp_path, "val").ids == tuple(VAL)


def test_augmented_files_next_to_vocdevkit(tmp_path: Path) -> None:
    voc = make_voc(tmp_path, aug=True)
    (voc / "SegmentationClassAug").rename(tmp_path / "SegmentationClassAug")
    (voc / "ImageSets" / "Segmentation" / "train_aug.txt").rename(tmp_path / "train_aug.txt")
    assert PascalVOC(tmp_path, "train").augmented


def test_fingerprint_tracks_mask_files(voc_root: Path) -> None:
    a = PascalVOC(voc_root, "val").fingerprint()
    assert a == PascalVOC(voc_root, "val").fingerprint()
    assert a != PascalVOC(voc_root, "train", use_aug=False).fingerprint()
    mask = voc_root / "VOCdevkit" / "VOC2012" / "SegmentationClass" / "2008_000002.png"
    st = mask.stat()
    os.utime(mask, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert PascalVOC(voc_root, "val").fingerprint() != a


def test_incremental_voc(voc_root: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    kwargs = {"use_aug": False, "cache_dir": cache}
    disjoint = PascalVOCIncremental(voc_root, "15-5", 0, train=True, **kwargs)  # type: ignore[arg-type]
    assert disjoint.indices == (0, 3)  # 2007_000003 shows the future class 17
    overlapped = PascalVOCIncremental(voc_root, "15-5", 0, train=True, mode="overlapped", **kwargs)  # type: ignore[arg-type]
    assert overlapped.indices == (0, 2, 3)
    assert PascalVOCIncremental(voc_root, "15-5", 1, train=True, **kwargs).indices == (1, 2)  # type: ignore[arg-type]
    test = PascalVOCIncremental(voc_root, get_scenario("voc", "15-5"), 0, train=False, cache_dir=cache)
    assert test.indices == (0,)  # 2008_000002 has only a future class, 2008_000003 only background
    image, target = PascalVOCIncremental(voc_root, "15-5", 1, train=False, transform=TestTransform(8), cache_dir=cache)[
        1
    ]
    assert image.shape == (3, 8, 8) and set(target.unique().tolist()) <= {0, 18, 255}
    assert len(list(cache.glob("*.json"))) == 2  # one per split


def test_incremental_mode_must_match_scenario(voc_root: Path) -> None:
    with pytest.raises(ValueError, match="contradicts"):
        PascalVOCIncremental(voc_root, get_scenario("voc", "15-5"), 0, train=False, mode="overlapped")


# ------------------------------------------------------------------------------------------------ errors
def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"does not exist.*expected layout"):
        PascalVOC(tmp_path / "nowhere", "val")
    with pytest.raises(FileNotFoundError, match=r"JPEGImages.*expected layout"):
        PascalVOC(tmp_path, "val")


def test_missing_list_and_files(voc_root: Path) -> None:
    voc = voc_root / "VOCdevkit" / "VOC2012"
    (voc / "ImageSets" / "Segmentation" / "val.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"val\.txt is missing"):
        PascalVOC(voc_root, "val")
    (voc / "JPEGImages" / "2007_000002.jpg").unlink()
    (voc / "SegmentationClass" / "2007_000004.png").unlink()
    with pytest.raises(
        FileNotFoundError, match=r"2 files listed in .*train\.txt are missing, e\.g\. .*2007_000002\.jpg"
    ):
        PascalVOC(voc_root, "train", use_aug=False)


def test_bad_masks_and_arguments(voc_root: Path) -> None:
    voc = voc_root / "VOCdevkit" / "VOC2012"
    Image.new("RGB", (SIZE, SIZE)).save(voc / "SegmentationClass" / "2008_000001.png")
    Image.fromarray(np.zeros((SIZE, SIZE + 1), dtype=np.uint8)).save(voc / "SegmentationClass" / "2008_000002.png")
    val = PascalVOC(voc_root, "val")
    with pytest.raises(ValueError, match="mode 'RGB'"):
        val.labels_present(0)
    with pytest.raises(ValueError, match="has size"):
        val.load(1)
    with pytest.raises(ValueError, match="split"):
        PascalVOC(voc_root, "test")  # type: ignore[arg-type]
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="empty"):
        PascalVOC(voc_root, "val")
