"""Tests of incseg.data.ade20k on tiny fake ADEChallengeData2016 trees built in tmp_path."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from incseg.data import ADE20K, ADE20KIncremental, SegmentationSource
from incseg.scenarios import get_scenario

sys.path.insert(0, str(Path(__file__).parent))
from _fake_datasets import ADE_TRAINING as TRAINING
from _fake_datasets import SIZE, make_ade
from _fake_datasets import ade_mask as _mask


@pytest.fixture
def ade_root(tmp_path: Path) -> Path:
    make_ade(tmp_path)
    return tmp_path


def test_load_and_labels(ade_root: Path) -> None:
    ade = ADE20K(ade_root, "training")
    assert isinstance(ade, SegmentationSource)
    assert len(ade) == 3 and ade.names == tuple(TRAINING) and ade.num_classes == 151
    assert ade.class_names[0] == "background" and ade.class_names[150] == "flag"
    image, mask = ade.load(2)
    assert image.dtype == torch.uint8 and image.shape == (3, SIZE, SIZE)
    assert torch.equal(mask, torch.from_numpy(_mask([101, 150])).long())  # 0 stays 0, classes 1..150 as stored
    assert ade.labels_present(0) == frozenset({0, 1, 120})
    assert "images=3" in repr(ade)


@pytest.mark.parametrize(
    ("split", "expected"), [("validation", "validation"), ("val", "validation"), ("train", "training")]
)
def test_split_aliases_and_roots(ade_root: Path, split: str, expected: str) -> None:
    for root in (ade_root, ade_root / "ADEChallengeData2016"):
        assert ADE20K(root, split).split == expected  # type: ignore[arg-type]


def test_fingerprint(ade_root: Path) -> None:
    a = ADE20K(ade_root, "validation")
    assert a.fingerprint() == ADE20K(ade_root, "val").fingerprint() != ADE20K(ade_root, "training").fingerprint()
    ann = ade_root / "ADEChallengeData2016" / "annotations" / "validation" / "ADE_val_00000002.png"
    Image.fromarray(_mask([9, 9]), mode="L").save(ann)
    Image.fromarray(np.pad(_mask([9]), 1), mode="L").save(ann)  # other size, other file
    assert ADE20K(ade_root, "validation").fingerprint() != a.fingerprint()


def test_incremental_ade(ade_root: Path, tmp_path: Path) -> None:
    scenario = get_scenario("ade20k", "100-50", mode="disjoint")
    step0 = ADE20KIncremental(ade_root, scenario, 0, train=True, cache_dir=tmp_path / "c")
    assert step0.indices == (1,)  # image 0 shows the future class 120 (disjoint), image 2 only future classes
    step1 = ADE20KIncremental(ade_root, "100-50", 1, train=True, mode="overlapped")
    assert step1.indices == (0, 2)
    _, target = step1[1]
    assert set(target.unique().tolist()) == {0, 101, 150}  # incremental index = dataset id in index order
    test = ADE20KIncremental(ade_root, "50-50", 0, train=False)
    assert test.indices == (0,)  # class 7 seen; the second image is background only
    _, target = test[0]
    assert set(target.unique().tolist()) == {0, 7, 255}  # class 140 is future at step 0


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"does not exist.*expected layout"):
        ADE20K(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match=r"no images/ and annotations/"):
        ADE20K(tmp_path)
    base = make_ade(tmp_path)
    with pytest.raises(ValueError, match="split"):
        ADE20K(tmp_path, "test")  # type: ignore[arg-type]
    (base / "annotations" / "training" / "ADE_train_00000002.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 annotations .* missing, e\.g\. .*ADE_train_00000002\.png"):
        ADE20K(tmp_path, "training")
    for f in (base / "images" / "validation").iterdir():
        f.unlink()
    with pytest.raises(FileNotFoundError, match=r"no \.jpg images"):
        ADE20K(tmp_path, "validation")
    shutil.rmtree(base / "annotations" / "validation")
    with pytest.raises(FileNotFoundError, match=r"annotations/validation is missing"):
        ADE20K(tmp_path, "validation")


def test_ade20k_keeps_every_image_with_a_new_class_by_default_as_plop(ade_root: Path, tmp_path: Path) -> None:
    # PLOP trains every ADE20K task with --overlap (scripts/ade/*.sh): an image showing a future class (120 at
    # step 0) is kept, its future pixels labelled background; see docs/protocol.md.
    assert get_scenario("ade20k", "100-50").mode == "overlapped"
    step0 = ADE20KIncremental(ade_root, "100-50", 0, train=True, cache_dir=tmp_path / "c")
    assert step0.scenario.mode == "overlapped" and step0.indices == (0, 1)
    _, target = step0[0]
    assert set(target.unique().tolist()) == {0, 1}  # 120 is a future class: background at step 0
    assert ADE20KIncremental(ade_root, "100-50", 0, train=True, mode="disjoint").indices == (1,)


def test_content_fingerprint_sees_a_mask_rewritten_with_the_same_size_and_time(ade_root: Path) -> None:
    import os

    ann = ade_root / "ADEChallengeData2016" / "annotations" / "validation" / "ADE_val_00000001.png"
    before = ADE20K(ade_root, "validation")
    stat_fp, content_fp = before.fingerprint(), before.content_fingerprint()
    st = ann.stat()
    data = bytearray(ann.read_bytes())
    data[-20] ^= 0xFF  # same size (a changed byte), then the old modification time restored, as cp -p would
    ann.write_bytes(bytes(data))
    os.utime(ann, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = ADE20K(ade_root, "validation")
    assert after.fingerprint() == stat_fp  # the default check cannot see it
    assert after.content_fingerprint() != content_fp


@pytest.mark.parametrize("what", ["image", "mask"])
def test_corrupt_or_truncated_files_are_named_in_the_error(ade_root: Path, what: str) -> None:
    base = ade_root / "ADEChallengeData2016"
    if what == "image":
        bad = base / "images" / "training" / "ADE_train_00000002.jpg"
        bad.write_bytes(bad.read_bytes()[:40])  # a truncated JPEG
    else:
        bad = base / "annotations" / "training" / "ADE_train_00000002.png"
        bad.write_bytes(bad.read_bytes()[:-30])  # a truncated PNG
    ade = ADE20K(ade_root, "training")
    with pytest.raises(ValueError, match=rf"{bad.name} cannot be decoded \(corrupt or truncated\?\)"):
        ade.load(1)
    if what == "mask":
        with pytest.raises(ValueError, match=bad.name):
            ade.labels_present(1)
    bad.write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match=bad.name):
        ade.load(1)
