"""Tests of IoUResult: float64 reference, old/new/all groups on a hand-made matrix, NaN rules, dict round trip."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from incseg.metrics import IoUResult


def reference_iou(conf: np.ndarray, absent: str = "union") -> np.ndarray:
    """IoU_c = TP / (TP + FP + FN) in float64, NaN for absent classes, written from the definition."""
    k = conf.shape[0]
    out = np.empty(k, dtype=np.float64)
    for c in range(k):
        tp = float(conf[c, c])
        fn = float(conf[c, :].sum()) - tp
        fp = float(conf[:, c].sum()) - tp
        no_target = tp + fn == 0
        if tp + fp + fn == 0 or (absent == "target" and no_target):
            out[c] = np.nan
        else:
            out[c] = tp / (tp + fp + fn)
    return out


# Hand-made 5-class matrix (rows target, columns prediction), n_old = 3: old = {1, 2}, new = {3, 4}.
CONF = torch.tensor(
    [
        [50, 2, 3, 0, 5],  # background
        [4, 20, 0, 1, 0],  # old 1
        [0, 0, 10, 0, 0],  # old 2
        [6, 0, 0, 12, 2],  # new 3
        [0, 0, 0, 0, 0],  # new 4: never in the target, predicted 7 times -> IoU 0 (union) / NaN (target)
    ]
)


def test_iou_matches_reference() -> None:
    r = IoUResult.from_confusion(CONF, num_old_classes=3)
    expected = reference_iou(CONF.numpy())
    assert r.iou.dtype == torch.float64
    np.testing.assert_allclose(r.iou.numpy(), expected, rtol=0, atol=1e-15)
    # by hand: bg 50/(60+60-50), c1 20/(25+22-20), c2 10/(10+13-10), c3 12/(20+13-12), c4 0/(0+7-0)
    np.testing.assert_allclose(r.iou.numpy(), [50 / 70, 20 / 27, 10 / 13, 12 / 21, 0.0], atol=1e-15)


def test_groups_on_hand_made_matrix() -> None:
    r = IoUResult.from_confusion(CONF, num_old_classes=3)
    iou = [50 / 70, 20 / 27, 10 / 13, 12 / 21, 0.0]
    assert r.groups["old"] == pytest.approx((iou[1] + iou[2]) / 2, abs=1e-15)
    assert r.groups["old_bg"] == pytest.approx((iou[0] + iou[1] + iou[2]) / 3, abs=1e-15)
    assert r.groups["new"] == pytest.approx((iou[3] + iou[4]) / 2, abs=1e-15)
    assert r.groups["all"] == pytest.approx(sum(iou[1:]) / 4, abs=1e-15)
    assert r.groups["all_bg"] == pytest.approx(sum(iou) / 5, abs=1e-15)
    o, n = r.groups["old"], r.groups["new"]
    assert r.hmean == pytest.approx(2 * o * n / (o + n), abs=1e-15)
    assert r.pixel_accuracy == pytest.approx((50 + 20 + 10 + 12) / float(CONF.sum()), abs=1e-15)
    assert set(r.groups) == set(IoUResult.GROUP_NAMES)


def test_absent_target_drops_predicted_only_classes() -> None:
    r = IoUResult.from_confusion(CONF, num_old_classes=3, absent="target")
    np.testing.assert_allclose(r.iou.numpy(), reference_iou(CONF.numpy(), "target"), atol=1e-15)
    assert math.isnan(float(r.iou[4]))
    assert r.groups["new"] == pytest.approx(12 / 21, abs=1e-15)  # class 4 left out of the mean
    assert r.groups["all_bg"] == pytest.approx((50 / 70 + 20 / 27 + 10 / 13 + 12 / 21) / 4, abs=1e-15)


def test_nan_classes_are_excluded_from_means() -> None:
    conf = torch.zeros(4, 4, dtype=torch.long)
    conf[0, 0], conf[1, 1], conf[1, 0] = 3, 2, 2  # classes 2 and 3 absent from target and prediction
    r = IoUResult.from_confusion(conf, num_old_classes=2)
    assert torch.isnan(r.iou[2:]).all()
    assert r.groups["old"] == pytest.approx(0.5)
    assert math.isnan(r.groups["new"])  # every new class absent
    assert math.isnan(r.hmean)
    assert r.groups["all"] == pytest.approx(0.5)
    assert r.groups["all_bg"] == pytest.approx((0.6 + 0.5) / 2)
    assert math.isnan(float(r.accuracy[2])) and r.mean_accuracy == pytest.approx((1.0 + 0.5) / 2)


def test_empty_matrix_is_all_nan() -> None:
    r = IoUResult.from_confusion(torch.zeros(3, 3, dtype=torch.long), num_old_classes=1)
    assert torch.isnan(r.iou).all()
    assert all(math.isnan(v) for v in r.groups.values())
    assert math.isnan(r.pixel_accuracy) and math.isnan(r.mean_accuracy)


@pytest.mark.parametrize(
    ("n_old", "expected"),
    [
        (None, {"old": None, "old_bg": None, "new": None, "all": [1, 2, 3], "all_bg": [0, 1, 2, 3]}),
        (0, {"old": None, "old_bg": None, "new": [1, 2, 3], "all": [1, 2, 3], "all_bg": [0, 1, 2, 3]}),
        (1, {"old": None, "old_bg": [0], "new": [1, 2, 3], "all": [1, 2, 3], "all_bg": [0, 1, 2, 3]}),
        (3, {"old": [1, 2], "old_bg": [0, 1, 2], "new": [3], "all": [1, 2, 3], "all_bg": [0, 1, 2, 3]}),
        (4, {"old": [1, 2, 3], "old_bg": [0, 1, 2, 3], "new": None, "all": [1, 2, 3], "all_bg": [0, 1, 2, 3]}),
    ],
)
def test_group_membership(n_old: int | None, expected: dict[str, list[int] | None]) -> None:
    conf = torch.diag(torch.tensor([1, 2, 3, 4]))
    conf[:, 0] += torch.tensor([0, 2, 6, 12])  # distinct IoU per class: 1/21, 1/2, 1/3, 1/4
    r = IoUResult.from_confusion(conf, num_old_classes=n_old)
    for key, members in expected.items():
        if members is None:
            assert math.isnan(r.groups[key]), key
        else:
            assert r.groups[key] == pytest.approx(float(r.iou[members].mean()), abs=1e-15), key


def test_hmean_zero_when_both_zero() -> None:
    conf = torch.tensor([[0, 1, 1], [1, 0, 0], [1, 0, 0]])
    r = IoUResult.from_confusion(conf, num_old_classes=2)
    assert r.groups["old"] == 0.0 and r.groups["new"] == 0.0 and r.hmean == 0.0


@given(st.integers(1, 6), st.integers(0, 2**31 - 1), st.sampled_from(["union", "target"]))
def test_property_matches_reference_and_bounds(k: int, seed: int, absent: str) -> None:
    gen = torch.Generator().manual_seed(seed)
    conf = torch.randint(0, 4, (k, k), generator=gen) * (torch.rand(k, k, generator=gen) < 0.6)
    r = IoUResult.from_confusion(conf, num_old_classes=k // 2, absent=absent)  # type: ignore[arg-type]
    np.testing.assert_allclose(r.iou.numpy(), reference_iou(conf.numpy(), absent), atol=1e-15)
    finite = r.iou[~torch.isnan(r.iou)]
    assert bool(((finite >= 0) & (finite <= 1)).all())
    for v in (*r.groups.values(), r.hmean, r.pixel_accuracy):
        assert math.isnan(v) or 0.0 <= v <= 1.0


def test_to_dict_is_json_safe_and_round_trips() -> None:
    names = ("background", "a", "b", "c", "d")
    r = IoUResult.from_confusion(CONF, num_old_classes=3, class_names=names, absent="target")
    d = r.to_dict()
    text = json.dumps(d, allow_nan=False)  # NaN stored as null
    assert d["iou"][4] is None
    assert all(isinstance(v, float) for v in d["iou"][:4])
    back = IoUResult.from_dict(json.loads(text))
    torch.testing.assert_close(back.confusion, r.confusion)
    torch.testing.assert_close(back.iou, r.iou, equal_nan=True)
    assert back.groups == r.groups and back.hmean == r.hmean
    assert back.class_names == names and back.absent == "target" and back.num_old_classes == 3
    assert "confusion" not in r.to_dict(include_confusion=False)
    with pytest.raises(ValueError, match="confusion"):
        IoUResult.from_dict(r.to_dict(include_confusion=False))


def test_per_class_and_repr() -> None:
    r = IoUResult.from_confusion(CONF, num_old_classes=3)
    assert list(r.per_class()) == ["0", "1", "2", "3", "4"]
    assert r.num_classes == 5
    assert "num_old_classes=3" in repr(r)


def test_bad_confusion() -> None:
    with pytest.raises(ValueError, match=r"\(K, K\)"):
        IoUResult.from_confusion(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        IoUResult.from_confusion(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="negative"):
        IoUResult.from_confusion(torch.tensor([[1, -1], [0, 1]]))
    with pytest.raises(ValueError, match="num_old_classes"):
        IoUResult.from_confusion(CONF, num_old_classes=6)
    with pytest.raises(ValueError, match="class_names"):
        IoUResult.from_confusion(CONF, class_names=["a"])
    with pytest.raises(ValueError, match="absent"):
        IoUResult.from_confusion(CONF, absent="pred")  # type: ignore[arg-type]
