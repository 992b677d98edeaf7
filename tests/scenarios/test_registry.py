"""Tests of incseg.scenarios.registry: standard tasks, generic "A-B" parsing, class orders, errors."""

from __future__ import annotations

import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from incseg.scenarios import (
    ADE20K_CLASS_NAMES,
    SYNTHETIC_CLASS_NAMES,
    VOC_CLASS_NAMES,
    Scenario,
    default_mode,
    get_scenario,
    list_datasets,
    list_tasks,
)


@pytest.mark.parametrize(
    ("dataset", "task", "sizes"),
    [
        ("voc", "19-1", [19, 1]),
        ("voc", "15-5", [15, 5]),
        ("voc", "15-1", [15, 1, 1, 1, 1, 1]),
        ("voc", "10-1", [10] + [1] * 10),
        ("voc", "5-3", [5, 3, 3, 3, 3, 3]),
        ("voc", "offline", [20]),
        ("ade20k", "100-50", [100, 50]),
        ("ade20k", "100-10", [100, 10, 10, 10, 10, 10]),
        ("ade20k", "50-50", [50, 50, 50]),
        ("ade20k", "offline", [150]),
        ("synthetic", "15-5", [15, 5]),
    ],
)
def test_standard_tasks(dataset: str, task: str, sizes: list[int]) -> None:
    s = get_scenario(dataset, task)
    assert [len(g) for g in s.groups] == sizes
    assert s.num_classes == sizes[0] + sum(sizes[1:]) + 1
    assert [c for g in s.groups for c in g] == list(range(1, s.num_classes))  # index order
    assert s.mode == default_mode(dataset) and s.name == f"{dataset}-{task}"
    assert s.mode == ("overlapped" if dataset == "ade20k" else "disjoint")  # as PLOP on ADE20K, MiB on VOC


def test_voc_15_1_adds_one_class_per_step() -> None:
    s = get_scenario("voc", "15-1", mode="overlapped")
    assert [s.classes_at(t) for t in range(1, 6)] == [(16,), (17,), (18,), (19,), (20,)]
    assert s.mode == "overlapped"
    assert s.class_names_at(5)[16:] == ("pottedplant", "sheep", "sofa", "train", "tvmonitor")


def test_class_names() -> None:
    assert get_scenario("voc", "19-1").class_names == VOC_CLASS_NAMES
    assert VOC_CLASS_NAMES[15] == "person" and len(VOC_CLASS_NAMES) == 21
    ade = get_scenario("ade20k", "100-50")
    assert ade.class_names == ADE20K_CLASS_NAMES and len(set(ADE20K_CLASS_NAMES)) == 151
    assert (ADE20K_CLASS_NAMES[1], ADE20K_CLASS_NAMES[13], ADE20K_CLASS_NAMES[150]) == ("wall", "person", "flag")
    names = ["bg", *(f"o{i}" for i in range(1, 21))]
    assert get_scenario("synthetic", "15-5", class_names=names).class_names_at(0)[:2] == ("bg", "o1")


def test_synthetic_names_are_those_of_the_source(monkeypatch: pytest.MonkeyPatch) -> None:
    synthetic = pytest.importorskip("incseg.data.synthetic")
    assert get_scenario("synthetic", "offline").class_names == synthetic.SyntheticScenes.class_names
    monkeypatch.setitem(sys.modules, "incseg.data.synthetic", None)  # the registry does not need the module
    names = get_scenario("synthetic", "15-5").class_names
    assert names == SYNTHETIC_CLASS_NAMES and names[1] == "red-disc" and names[20] == "white-hexagon"


@pytest.mark.parametrize("dataset", ["voc", "ade20k", "synthetic"])
def test_every_listed_task_builds(dataset: str) -> None:
    tasks = list_tasks(dataset)
    assert "offline" in tasks
    for task in tasks:
        for mode in ("disjoint", "overlapped"):
            assert isinstance(get_scenario(dataset, task, mode=mode), Scenario)
    assert list_datasets() == ("ade20k", "synthetic", "voc")


def test_aliases_and_case() -> None:
    assert get_scenario("VOC", "15-5") == get_scenario("pascal", "15-5")
    assert get_scenario("voc", "15-5s") == get_scenario("voc", "15-1")
    assert get_scenario("ADE", "Joint") == get_scenario("ade20k", "offline")
    assert get_scenario("voc", "offline") == get_scenario("voc", "15-5").joint()


def test_class_order_permutes_before_grouping() -> None:
    order = list(range(20, 0, -1))
    s = get_scenario("voc", "15-5", class_order=order)
    assert s.groups == (tuple(range(20, 5, -1)), (5, 4, 3, 2, 1))
    assert s.class_names_at(0)[1] == "tvmonitor"  # names stay attached to dataset ids
    assert s.test_label_map(0)[20] == 1 and s.test_label_map(0)[5] == 255
    assert get_scenario("voc", "15-5", class_order=[0, *order]) == s  # MiB-style leading background


@pytest.mark.parametrize("dataset", ["coco", "", "cityscapes"])
def test_unknown_dataset(dataset: str) -> None:
    with pytest.raises(ValueError, match=r"unknown dataset .*ade20k.*synthetic.*voc"):
        get_scenario(dataset, "15-5")
    with pytest.raises(ValueError, match="known datasets"):
        list_tasks(dataset)


@pytest.mark.parametrize("task", ["abc", "15", "15-5-1", "", "15_5"])
def test_unknown_task_lists_known_ones(task: str) -> None:
    with pytest.raises(ValueError, match=r"unknown task .*19-1.*15-5.*offline"):
        get_scenario("voc", task)


@pytest.mark.parametrize("task", ["14-4", "0-5", "20-1", "21-1", "15-0", "100-50"])
def test_tasks_that_do_not_split(task: str) -> None:
    with pytest.raises(ValueError, match="does not split the 20 classes"):
        get_scenario("voc", task)


@pytest.mark.parametrize(
    "order", [[1, 2, 3], [*range(1, 20), 1], list(range(0, 20)), list(range(2, 22)), [0, 0, *range(1, 20)]]
)
def test_bad_class_order(order: list[int]) -> None:
    with pytest.raises(ValueError, match="permutation"):
        get_scenario("voc", "15-5", class_order=order)


def test_bad_types_and_mode() -> None:
    with pytest.raises(ValueError, match="mode"):
        get_scenario("voc", "15-5", mode="both")
    with pytest.raises(TypeError, match="task"):
        get_scenario("voc", 15)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="dataset"):
        get_scenario(None, "15-5")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="class_order"):
        get_scenario("voc", "15-5", class_order="abc")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="class_names"):
        get_scenario("voc", "15-5", class_names=["a", "b"])


@given(
    st.integers(1, 19).flatmap(
        lambda a: st.tuples(st.just(a), st.sampled_from([b for b in range(1, 21) if (20 - a) % b == 0]))
    ),
    st.permutations(range(1, 21)),
    st.sampled_from(["disjoint", "overlapped"]),
)
def test_generic_tasks_partition_the_classes(ab: tuple[int, int], order: list[int], mode: str) -> None:
    first, step = ab
    s = get_scenario("synthetic", f"{first}-{step}", mode=mode, class_order=order)
    assert s.num_steps == 1 + (20 - first) // step
    assert [c for g in s.groups for c in g] == list(order)
    assert len(s.groups[0]) == first and all(len(g) == step for g in s.groups[1:])
    assert s.num_classes_at(s.num_steps - 1) == 21
