"""Tests of incseg.data.incremental: image selection, label remapping, the class-set cache, validation."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor
from torch.utils.data import DataLoader

from incseg.data import IncrementalSegmentation, SegmentationSource, TrainTransform, image_class_sets, normalize
from incseg.scenarios import Scenario, get_scenario


class FakeSource:
    """In-memory source: 4x4 masks built from class sets, counting ``labels_present`` calls."""

    def __init__(self, contents: list[list[int]], num_classes: int = 5, fingerprint: str = "fake-v1") -> None:
        self.masks = []
        for ids in contents:
            mask = torch.tensor((ids * 16)[:16], dtype=torch.int64).view(4, 4) if ids else torch.zeros(4, 4)
            self.masks.append(mask.long())
        self.images = [torch.randint(0, 256, (3, 4, 4), dtype=torch.uint8) for _ in contents]
        self.num_classes = num_classes
        self.class_names = tuple(f"c{i}" for i in range(num_classes))
        self.calls = 0
        self._fingerprint = fingerprint

    def __len__(self) -> int:
        return len(self.masks)

    def load(self, index: int) -> tuple[Tensor, Tensor]:
        return self.images[index], self.masks[index]

    def labels_present(self, index: int) -> frozenset[int]:
        self.calls += 1
        return frozenset(self.masks[index].unique().tolist())

    def fingerprint(self) -> str:
        return self._fingerprint


# Classes 1, 2, 3 learnt one per step; class 4 is never learnt.
_SCENARIO = [[1], [2], [3]]
_CONTENTS = [
    [0, 1],  # 0
    [0, 1, 2],  # 1: future class 2 at step 0
    [0, 2],  # 2
    [0, 1, 2, 255],  # 3
    [0, 2, 3],  # 4: future class 3 at step 1
    [0],  # 5: background only
    [3, 4],  # 6: never-learnt class 4
    [0, 255],  # 7
]


def _dataset(mode: str, step: int, train: bool, **kwargs: object) -> IncrementalSegmentation:
    scenario = Scenario(_SCENARIO, num_classes=5, mode=mode)
    return IncrementalSegmentation(FakeSource(_CONTENTS), scenario, step, train=train, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("mode", "step", "train", "expected"),
    [
        ("disjoint", 0, True, (0,)),
        ("overlapped", 0, True, (0, 1, 3)),
        ("disjoint", 1, True, (1, 2, 3)),
        ("overlapped", 1, True, (1, 2, 3, 4)),
        ("disjoint", 2, True, (4,)),
        ("overlapped", 2, True, (4, 6)),
        ("disjoint", 0, False, (0, 1, 3)),
        ("overlapped", 1, False, (0, 1, 2, 3, 4)),
        ("disjoint", 2, False, (0, 1, 2, 3, 4, 6)),
    ],
)
def test_selection(mode: str, step: int, train: bool, expected: tuple[int, ...]) -> None:
    assert _dataset(mode, step, train).indices == expected


def test_training_targets() -> None:
    ds = _dataset("overlapped", 1, True)
    assert (ds.num_classes, ds.class_names) == (3, ("background", "class1", "class2"))  # the scenario's names
    image, target = ds[2]  # source image 3: classes 0, 1, 2 and void
    source = ds.source
    assert isinstance(source, FakeSource)
    mask = source.masks[3]
    assert image.dtype == torch.float32 and target.dtype == torch.int64 and target.shape == (4, 4)
    torch.testing.assert_close(image, normalize(source.images[3]))
    expected = torch.where(mask == 2, 2, torch.where(mask == 255, 255, 0))  # old class 1 -> background
    assert torch.equal(target, expected)
    _, future = ds[3]  # source image 4: future class 3 becomes background
    assert torch.equal(future, torch.where(source.masks[4] == 2, 2, 0))


def test_void_as_background() -> None:
    _, target = _dataset("overlapped", 0, True, void_as_background=True)[2]  # source image 3
    assert (target != 255).all() and set(target.unique().tolist()) == {0, 1}
    with pytest.raises(ValueError, match="training labels only"):
        _dataset("disjoint", 0, False, void_as_background=True)


def test_test_targets() -> None:
    ds = _dataset("disjoint", 1, False)
    source = ds.source
    assert isinstance(source, FakeSource)
    _, target = ds[ds.indices.index(4)]  # classes 0, 2 (seen) and 3 (future)
    mask = source.masks[4]
    assert torch.equal(target, torch.where(mask == 3, 255, mask))


def test_transform_padding_stays_ignored() -> None:
    transform = TrainTransform(crop_size=6, scale=(1.0, 1.0), hflip=False)
    ds = _dataset("disjoint", 0, True, transform=transform, void_as_background=True)
    image, target = ds[0]
    assert image.shape == (3, 6, 6) and image.dtype == torch.float32
    assert (target[4:] == 255).all() and (target[:, 4:] == 255).all()  # padding is ignored, never background
    assert (target[:4, :4] != 255).all()


def test_uint8_transform_output_is_normalised() -> None:
    ds = _dataset("disjoint", 0, True, transform=lambda image, target: (image.flip(-1), target.flip(-1)))
    image, _ = ds[0]
    source = ds.source
    assert isinstance(source, FakeSource)
    torch.testing.assert_close(image, normalize(source.images[0].flip(-1)))


def test_dataloader_is_reproducible() -> None:
    ds = _dataset("overlapped", 1, True, transform=TrainTransform(crop_size=3, scale=(0.5, 1.5)))

    def batches() -> list[Tensor]:
        loader = DataLoader(ds, batch_size=2, shuffle=True, generator=torch.Generator().manual_seed(1))
        torch.manual_seed(7)
        return [t for _, t in loader]

    first, second = batches(), batches()
    assert all(torch.equal(a, b) for a, b in zip(first, second)) and first[0].shape == (2, 3, 3)


def test_empty_selection_warns() -> None:
    scenario = Scenario([[1], [2]], num_classes=5)
    with pytest.warns(UserWarning, match="selects no image"):
        ds = IncrementalSegmentation(FakeSource([[0, 1]]), scenario, 1, train=True)
    assert len(ds) == 0


# ------------------------------------------------------------------------------------------------ cache
def _cache_files(cache_dir: Path) -> list[Path]:
    return sorted(cache_dir.glob("*.json"))


def test_cache_is_reused_across_steps_and_modes(tmp_path: Path) -> None:
    source = FakeSource(_CONTENTS)
    IncrementalSegmentation(source, Scenario(_SCENARIO, num_classes=5), 0, train=True, cache_dir=tmp_path)
    assert source.calls == len(_CONTENTS)
    (path,) = _cache_files(tmp_path)
    data = json.loads(path.read_text())
    assert data["fingerprint"] == "fake-v1" and data["classes"][3] == [0, 1, 2]  # void not stored
    for mode in ("disjoint", "overlapped"):
        for step in range(3):
            ds = IncrementalSegmentation(
                source, Scenario(_SCENARIO, num_classes=5, mode=mode), step, train=False, cache_dir=tmp_path
            )
            assert ds.indices == _dataset(mode, step, False).indices
    assert source.calls == len(_CONTENTS)  # no second scan
    assert _cache_files(tmp_path) == [path]


def test_stale_cache_is_rebuilt(tmp_path: Path) -> None:
    image_class_sets(FakeSource(_CONTENTS), tmp_path)
    changed = FakeSource([[0, 4]] * 3, fingerprint="fake-v2")  # other files: other fingerprint
    assert image_class_sets(changed, tmp_path) == [frozenset({0, 4})] * 3
    assert changed.calls == 3
    assert len(_cache_files(tmp_path)) == 2  # one file per fingerprint


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda text: text[: len(text) // 2],  # truncated
        lambda text: "not json",
        lambda text: json.dumps([1, 2]),
        lambda text: text.replace("[0,1,2]", "[0,1,3]"),  # tampered: checksum mismatch
        lambda text: text.replace('"version":1', '"version":99'),
        lambda text: text.replace('"fingerprint":"fake-v1"', '"fingerprint":"other"'),
    ],
)
def test_corrupt_cache_is_rebuilt(tmp_path: Path, corrupt: object) -> None:
    image_class_sets(FakeSource(_CONTENTS), tmp_path)
    (path,) = _cache_files(tmp_path)
    path.write_text(corrupt(path.read_text()))  # type: ignore[operator]
    source = FakeSource(_CONTENTS)
    sets = image_class_sets(source, tmp_path)
    assert source.calls == len(_CONTENTS)
    assert sets == [frozenset(c) - {255} for c in _CONTENTS]
    fresh = FakeSource(_CONTENTS)
    assert image_class_sets(fresh, tmp_path) == sets and fresh.calls == 0  # rewritten correctly


def test_cache_with_fewer_images_is_rebuilt(tmp_path: Path) -> None:
    image_class_sets(FakeSource(_CONTENTS[:3]), tmp_path)
    source = FakeSource(_CONTENTS)  # same fingerprint, different length
    assert len(image_class_sets(source, tmp_path)) == len(_CONTENTS) and source.calls == len(_CONTENTS)


def test_no_cache_dir_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    source = FakeSource(_CONTENTS)
    image_class_sets(source)
    image_class_sets(source)
    assert source.calls == 2 * len(_CONTENTS) and not list(tmp_path.iterdir())


def test_an_unwritable_cache_folder_warns_once_and_the_dataset_is_built(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import incseg.data.incremental as inc

    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the cache folder should be")  # mkdir fails, also for root
    monkeypatch.setattr(inc, "_UNWRITABLE_WARNED", set())
    scenario = Scenario(_SCENARIO, num_classes=5)
    with pytest.warns(UserWarning, match=r"class-set cache cannot be written to .*continuing without a cache"):
        ds = IncrementalSegmentation(FakeSource(_CONTENTS), scenario, 0, train=True, cache_dir=blocked / "cache")
    assert ds.indices == _dataset("disjoint", 0, True).indices
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second dataset on the same folder stays quiet
        IncrementalSegmentation(FakeSource(_CONTENTS), scenario, 1, train=True, cache_dir=blocked / "cache")


@pytest.mark.skipif(__import__("os").name != "posix", reason="POSIX permissions")
def test_cache_files_respect_the_umask(tmp_path: Path) -> None:
    import os

    previous = os.umask(0o022)
    try:
        image_class_sets(FakeSource(_CONTENTS), tmp_path)
    finally:
        os.umask(previous)
    (path,) = _cache_files(tmp_path)
    assert path.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left


class ContentSource(FakeSource):
    """A fake file source whose stat fingerprint never changes but whose content fingerprint does."""

    def __init__(self, contents: list[list[int]], version: str) -> None:
        super().__init__(contents)
        self.version = version

    def content_fingerprint(self) -> str:
        return f"fake-content-{self.version}"


def test_content_check_rebuilds_when_the_bytes_change_and_stat_does_not(tmp_path: Path) -> None:
    original = ContentSource(_CONTENTS, "a")
    image_class_sets(original, tmp_path)
    image_class_sets(original, tmp_path, cache_check="content")
    rewritten = ContentSource([[0, 3]] * len(_CONTENTS), "b")  # same names, sizes and times
    assert image_class_sets(rewritten, tmp_path, cache_check="stat")[0] == frozenset({0, 1})  # stale, by design
    assert rewritten.calls == 0
    assert image_class_sets(rewritten, tmp_path, cache_check="content")[0] == frozenset({0, 3})
    assert rewritten.calls == len(_CONTENTS)
    plain = FakeSource(_CONTENTS)  # no content_fingerprint(): its fingerprint is used
    assert image_class_sets(plain, tmp_path, cache_check="content") == image_class_sets(plain, tmp_path)
    with pytest.raises(ValueError, match="cache_check"):
        image_class_sets(plain, tmp_path, cache_check="mtime")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ validation
def test_fake_source_satisfies_protocol() -> None:
    assert isinstance(FakeSource(_CONTENTS), SegmentationSource)
    assert not isinstance(object(), SegmentationSource)


def test_construction_errors() -> None:
    scenario = Scenario(_SCENARIO, num_classes=5)
    with pytest.raises(TypeError, match="SegmentationSource"):
        IncrementalSegmentation([1, 2], scenario, 0, train=True)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Scenario"):
        IncrementalSegmentation(FakeSource(_CONTENTS), "15-5", 0, train=True)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="21 dataset ids but the source"):
        IncrementalSegmentation(FakeSource(_CONTENTS), get_scenario("voc", "15-5"), 0, train=True)
    with pytest.raises(ValueError, match="step 3 is out of range"):
        IncrementalSegmentation(FakeSource(_CONTENTS), scenario, 3, train=True)
    with pytest.raises(TypeError, match="transform"):
        IncrementalSegmentation(FakeSource(_CONTENTS), scenario, 0, train=True, transform=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"image 1 of .* contains class ids \[7\]"):
        IncrementalSegmentation(FakeSource([[0, 1], [0, 7]]), scenario, 0, train=True)


def test_bad_source_samples() -> None:
    scenario = Scenario(_SCENARIO, num_classes=5)
    source = FakeSource([[0, 1]] * 3)
    ds = IncrementalSegmentation(source, scenario, 0, train=True)
    source.images[0] = source.images[0].float()
    with pytest.raises(ValueError, match="uint8"):
        ds[0]
    source.masks[1] = source.masks[1][:2]
    with pytest.raises(ValueError, match="integer"):
        ds[1]
    source.masks[2] = source.masks[2] + 300
    with pytest.raises(ValueError, match=r"outside \[0, 255\]"):
        ds[2]
    with pytest.raises(IndexError):
        ds[3]


def test_synthetic_source_end_to_end(tmp_path: Path) -> None:
    synthetic = pytest.importorskip("incseg.data.synthetic")
    source = synthetic.SyntheticScenes("train", num_images=24)
    scenario = get_scenario("synthetic", "15-5", mode="overlapped")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a tiny set may leave a step empty
        ds = IncrementalSegmentation(source, scenario, 1, train=True, cache_dir=tmp_path)
    for i in range(min(len(ds), 3)):
        image, target = ds[i]
        assert image.shape == (3, source.size, source.size) and image.dtype == torch.float32
        assert set(target.unique().tolist()) <= {0, 16, 17, 18, 19, 20, 255}


@given(
    contents=st.lists(
        st.sets(st.sampled_from([0, 1, 2, 3, 4, 5, 255]), min_size=1, max_size=4), min_size=1, max_size=6
    ),
    order=st.permutations([1, 2, 3, 4, 5]),
    cut=st.integers(1, 4),
    train=st.booleans(),
    mode=st.sampled_from(["disjoint", "overlapped"]),
)
def test_targets_match_a_per_pixel_reference(
    contents: list[set[int]], order: list[int], cut: int, train: bool, mode: str
) -> None:
    scenario = Scenario([order[:cut], order[cut:]], num_classes=6, mode=mode)
    source = FakeSource([sorted(c) for c in contents], num_classes=6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = IncrementalSegmentation(source, scenario, 1, train=train)
    seen = scenario.seen_at(1)
    new = set(scenario.groups[1])
    keep = [i for i, c in enumerate(contents) if (c & new if train else c & (set(seen) - {0}))]
    if train and mode == "disjoint":
        keep = [i for i in keep if contents[i] <= set(seen) | {255}]
    assert list(ds.indices) == keep
    for j, i in enumerate(keep):
        _, target = ds[j]
        for value, out in zip(source.masks[i].flatten().tolist(), target.flatten().tolist()):
            if value == 255:
                assert out == 255
            elif train:
                assert out == (seen.index(value) if value in new else 0)
            else:
                assert out == seen.index(value)
