"""Tests of incseg.scenarios.scenario: structure, label maps, image selection, serialisation, validation."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from incseg.scenarios import IGNORE_INDEX, Scenario


def _voc_15_5(mode: str = "disjoint") -> Scenario:
    return Scenario([range(1, 16), range(16, 21)], num_classes=21, mode=mode, name="voc-15-5")


# ------------------------------------------------------------------------------------------------ structure
def test_structure_15_5() -> None:
    s = _voc_15_5()
    assert s.num_steps == 2 and s.num_classes == 21 and s.mode == "disjoint" and s.name == "voc-15-5"
    assert s.classes_at(0) == tuple(range(16))
    assert s.classes_at(1) == tuple(range(16, 21))
    assert s.seen_at(0) == tuple(range(16)) and s.seen_at(1) == tuple(range(21))
    assert (s.num_old_classes(0), s.num_old_classes(1)) == (0, 16)
    assert (s.num_classes_at(0), s.num_classes_at(1)) == (16, 21)
    assert s.classes_per_step == (16, 5)
    assert s.class_names_at(0) == ("background", *(f"class{i}" for i in range(1, 16)))
    assert "voc-15-5" in repr(s)


def test_custom_order_defines_indices() -> None:
    s = Scenario([[3, 1], [2]], num_classes=5)
    assert s.seen_at(1) == (0, 3, 1, 2)
    assert [s.index_of(c) for c in (0, 3, 1, 2)] == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="not learnt"):
        s.index_of(4)  # a dataset class no step learns
    assert s.train_label_map(0)[:5].tolist() == [0, 2, 0, 1, 0]  # never learnt: background in training
    assert s.test_label_map(0)[:5].tolist() == [0, 2, 255, 1, 255]
    assert s.test_label_map(1)[:5].tolist() == [0, 2, 3, 1, 255]


def test_default_num_classes_and_names() -> None:
    s = Scenario([[2], [5]])
    assert s.num_classes == 6
    assert s.class_names == ("background", "class1", "class2", "class3", "class4", "class5")
    named = Scenario([[1], [2]], class_names=["bg", "cat", "dog"])
    assert named.class_names_at(1) == ("bg", "cat", "dog")


# ------------------------------------------------------------------------------------------------ label maps
def test_train_label_map_15_5() -> None:
    s = _voc_15_5()
    table = s.train_label_map(1)
    assert table.dtype == torch.int64 and table.shape == (256,)
    expected = torch.full((256,), IGNORE_INDEX, dtype=torch.int64)
    expected[:16] = 0  # background and old classes
    expected[16:21] = torch.arange(16, 21)  # new classes keep their index
    assert torch.equal(table, expected)
    void_bg = s.train_label_map(1, void_as_background=True)
    assert void_bg[255] == 0 and torch.equal(void_bg[:255], expected[:255])
    step0 = s.train_label_map(0)
    assert step0[:16].tolist() == list(range(16)) and step0[16:21].tolist() == [0] * 5  # future -> background


def test_test_label_map_15_5() -> None:
    s = _voc_15_5()
    table = s.test_label_map(0)
    assert table[:16].tolist() == list(range(16))
    assert table[16:].tolist() == [255] * 240  # future classes and non-classes are ignored
    assert s.test_label_map(1)[:21].tolist() == list(range(21))


def test_label_maps_are_fresh_tensors() -> None:
    s = _voc_15_5()
    s.train_label_map(0)[:] = 7
    assert s.train_label_map(0)[1] == 1


# ------------------------------------------------------------------------------------------------ selection
_STEPWISE = Scenario([[1], [2], [3]], num_classes=5)  # class 4 is never learnt


@pytest.mark.parametrize(
    ("present", "step", "disjoint", "overlapped"),
    [
        ({0, 1}, 0, True, True),
        ({0, 1, 255}, 0, True, True),  # void never matters
        ({0, 1, 2}, 0, False, True),  # future class 2 at step 0
        ({0, 2}, 1, True, True),
        ({0, 1, 2}, 1, True, True),  # old classes are allowed in disjoint
        ({0, 2, 3}, 1, False, True),
        ({0, 1}, 1, False, False),  # no new class
        ({0}, 1, False, False),
        ({0, 3, 4}, 2, False, True),  # class 4 is never learnt: a future class at every step
        ({3}, 2, True, True),
    ],
)
def test_keep_train_image(present: set[int], step: int, disjoint: bool, overlapped: bool) -> None:
    assert Scenario(_STEPWISE.groups, num_classes=5, mode="disjoint").keep_train_image(step, present) is disjoint
    assert Scenario(_STEPWISE.groups, num_classes=5, mode="overlapped").keep_train_image(step, present) is overlapped


@pytest.mark.parametrize(
    ("present", "step", "kept"),
    [
        ({0, 1}, 0, True),
        ({0}, 0, False),  # background only: left out
        ({0, 255}, 2, False),
        ({0, 2}, 0, False),  # only a future class
        ({0, 2}, 1, True),
        ({4}, 2, False),  # never learnt
        ({0, 1, 2, 3}, 2, True),
    ],
)
def test_keep_test_image(present: set[int], step: int, kept: bool) -> None:
    assert _STEPWISE.keep_test_image(step, present) is kept


# ------------------------------------------------------------------------------------------------ joint, dicts, eq
def test_joint_matches_last_step() -> None:
    s = Scenario([[4, 2], [1], [3]], num_classes=6, mode="overlapped", name="x")
    j = s.joint()
    assert j.num_steps == 1 and j.mode == "overlapped" and j.name == "x-joint"
    assert j.seen_at(0) == s.seen_at(2)
    assert torch.equal(j.test_label_map(0), s.test_label_map(2))
    assert j.train_label_map(0)[:6].tolist() == [0, 3, 2, 4, 1, 0]


def test_to_dict_round_trip() -> None:
    s = Scenario([[3, 1], [2]], num_classes=4, class_names=["bg", "a", "b", "c"], mode="overlapped", name="n")
    d = s.to_dict()
    assert json.loads(json.dumps(d)) == d  # plain python types only
    assert d == {
        "groups": [[3, 1], [2]],
        "num_classes": 4,
        "class_names": ["bg", "a", "b", "c"],
        "mode": "overlapped",
        "name": "n",
    }
    back = Scenario.from_dict(d)
    assert back == s and back.name == "n"


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ([1, 2], "mapping"),
        ({"groups": [[1]]}, "missing keys"),
        ({"groups": "ab", "num_classes": 3, "class_names": None, "mode": "disjoint", "name": "x"}, "groups"),
        ({"groups": [[1]], "num_classes": 2, "class_names": None, "mode": "other", "name": "x"}, "mode"),
    ],
)
def test_from_dict_errors(data: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Scenario.from_dict(data)  # type: ignore[arg-type]


def test_equality_and_hash() -> None:
    a = Scenario([[1, 2], [3]], num_classes=4, name="a")
    b = Scenario([(1, 2), (3,)], num_classes=4, name="b")  # the name is a label only
    assert a == b and hash(a) == hash(b)
    assert a != Scenario([[2, 1], [3]], num_classes=4)
    assert a != Scenario([[1, 2], [3]], num_classes=5)
    assert a != Scenario([[1, 2], [3]], num_classes=4, mode="overlapped")
    assert a != Scenario([[1, 2], [3]], num_classes=4, class_names=["bg", "x", "y", "z"])
    assert a != a.to_dict()


# ------------------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize(
    ("groups", "kwargs", "match"),
    [
        ([], {}, "at least one step"),
        ([[1], []], {}, r"groups\[1\] is empty"),
        ([[1, 2], [2, 3]], {}, r"class 2 is listed in groups\[0\] and groups\[1\]"),
        ([[1, 1]], {}, "twice"),
        ([[0, 1]], {}, "background"),
        ([[-1]], {}, "out of range"),
        ([[255]], {}, "out of range"),
        ([[1, 5]], {"num_classes": 4}, "out of range"),
        ([[1]], {"num_classes": 1}, "num_classes"),
        ([[1]], {"num_classes": 256}, "num_classes"),
        ([[1]], {"mode": "joint"}, "mode"),
        ([[1]], {"class_names": ["bg"]}, "class_names"),
    ],
)
def test_invalid_scenarios(groups: list[list[int]], kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Scenario(groups, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("groups", "kwargs"),
    [([[1.0]], {}), ([[True]], {}), ([["a"]], {}), ("12", {}), ([1, 2], {}), ([[1]], {"class_names": ["a", 2]})],
)
def test_type_errors(groups: object, kwargs: dict[str, object]) -> None:
    with pytest.raises(TypeError):
        Scenario(groups, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("method", ["classes_at", "seen_at", "num_old_classes", "num_classes_at", "class_names_at"])
@pytest.mark.parametrize("step", [-1, 2, 10])
def test_step_out_of_range(method: str, step: int) -> None:
    with pytest.raises(ValueError, match=f"step {step} is out of range"):
        getattr(_voc_15_5(), method)(step)


def test_step_out_of_range_in_maps_and_filters() -> None:
    s = _voc_15_5()
    for call in (
        lambda: s.train_label_map(2),
        lambda: s.test_label_map(-1),
        lambda: s.keep_train_image(2, {16}),
        lambda: s.keep_test_image(5, {1}),
    ):
        with pytest.raises(ValueError, match="out of range"):
            call()
    with pytest.raises(TypeError, match="step"):
        s.classes_at(1.0)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ properties
@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    num_classes = draw(st.integers(2, 12))
    ids = draw(st.permutations(range(1, num_classes)))
    used = draw(st.integers(1, len(ids)))  # a prefix may leave classes never learnt
    cuts = sorted(draw(st.sets(st.integers(1, used - 1), max_size=3))) if used > 1 else []
    bounds = [0, *cuts, used]
    groups = [ids[a:b] for a, b in itertools.pairwise(bounds)]
    mode = draw(st.sampled_from(["disjoint", "overlapped"]))
    return Scenario(groups, num_classes=num_classes, mode=mode)


@given(scenarios())
def test_steps_partition_the_learnt_classes(s: Scenario) -> None:
    new = [set(s.classes_at(t)) for t in range(s.num_steps)]
    assert all(new)
    assert sum(len(n) for n in new) == s.num_classes_at(s.num_steps - 1) == len(set().union(*new))
    for t in range(s.num_steps):
        assert s.seen_at(t) == tuple(c for u in range(t + 1) for c in s.classes_at(u))
        assert s.num_old_classes(t) + len(s.classes_at(t)) == s.num_classes_at(t)
        if t:
            assert s.seen_at(t)[: s.num_old_classes(t)] == s.seen_at(t - 1)  # old classes keep their indices


@given(scenarios())
def test_label_maps_follow_the_protocol(s: Scenario) -> None:
    for t in range(s.num_steps):
        train, test, seen = s.train_label_map(t), s.test_label_map(t), s.seen_at(t)
        for c in range(s.num_classes):
            if c in seen:
                assert test[c] == seen.index(c)
            else:
                assert test[c] == IGNORE_INDEX
            assert train[c] == (seen.index(c) if c in s.classes_at(t) else 0)
        assert train[IGNORE_INDEX] == test[IGNORE_INDEX] == IGNORE_INDEX
        assert s.train_label_map(t, void_as_background=True)[IGNORE_INDEX] == 0
        valid = train[train != IGNORE_INDEX]
        assert int(valid.max()) < s.num_classes_at(t) and set(valid.tolist()) <= {0, *range(s.num_old_classes(t), 99)}


@given(scenarios(), st.sets(st.integers(0, 12), max_size=5))
def test_selection_rules(s: Scenario, present: set[int]) -> None:
    present = {c for c in present if c < s.num_classes}
    disjoint = Scenario(s.groups, num_classes=s.num_classes, mode="disjoint")
    overlapped = Scenario(s.groups, num_classes=s.num_classes, mode="overlapped")
    for t in range(s.num_steps):
        has_new = bool(present & set(s.groups[t]))
        assert overlapped.keep_train_image(t, present) is has_new
        kept = disjoint.keep_train_image(t, present)
        assert kept is (has_new and present <= set(s.seen_at(t)))  # no future (or never learnt) class
        assert s.keep_test_image(t, present) is bool(present & (set(s.seen_at(t)) - {0}))
