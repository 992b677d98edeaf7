"""Tests of StepHistory: forgetting on a hand-made history, table, CSV and JSON round trips, errors."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from incseg.metrics import IoUResult, MeanIoU, StepHistory


def result_with_iou(ious: list[float], n_old: int, *, bg_tp: int = 90) -> IoUResult:
    """A result whose IoU of each class ``c >= 1`` is exactly ``ious[c]`` (a multiple of 1/10, NaN: absent).

    Class ``c`` gets 10 target pixels, ``10 * ious[c]`` predicted right and the others predicted as background,
    so ``c`` has no false positive and ``IoU_c = tp / 10``; the background IoU follows (``ious[0]`` unused).
    """
    k = len(ious)
    conf = torch.zeros(k, k, dtype=torch.long)
    conf[0, 0] = bg_tp
    for c in range(1, k):
        if not math.isnan(ious[c]):
            tp = round(10 * ious[c])
            conf[c, c], conf[c, 0] = tp, 10 - tp
    result = IoUResult.from_confusion(conf, num_old_classes=n_old)
    torch.testing.assert_close(result.iou[1:], torch.tensor(ious[1:], dtype=torch.float64), equal_nan=True)
    return result


NAMES = ["background", "aeroplane", "bicycle", "bird", "boat"]


def hand_made_history() -> StepHistory:
    """Steps 0 (bg, 1, 2), 1 (+3), 2 (+4); IoUs chosen by hand."""
    h = StepHistory(class_names=NAMES)
    h.add(0, result_with_iou([0.9, 0.8, 0.6], 0))
    h.add(1, result_with_iou([0.8, 0.5, 0.7, 0.4], 3))
    h.add(2, result_with_iou([0.7, 0.6, float("nan"), 0.1, 0.9], 4))
    return h


def test_forgetting_on_hand_made_history() -> None:
    h = hand_made_history()
    assert h.learned_at == {0: 0, 1: 0, 2: 0, 3: 1, 4: 2}
    assert h.new_classes(1) == (3,)
    assert h.forgetting(0) == {}
    f1 = h.forgetting(1)
    bg = [float(h[s].iou[0]) for s in h.steps]  # 90/96, 90/104, 90/104
    assert f1[0] == pytest.approx(bg[0] - bg[1]) and f1[1] == pytest.approx(0.3) and f1[2] == pytest.approx(-0.1)
    assert set(f1) == {0, 1, 2}  # class 3 learned at step 1: no forgetting yet
    f2 = h.forgetting()  # last step
    assert f2[0] == pytest.approx(bg[0] - bg[2])  # best earlier IoU is step 0's
    assert f2[1] == pytest.approx(0.8 - 0.6)
    assert math.isnan(f2[2])  # absent at step 2
    assert f2[3] == pytest.approx(0.4 - 0.1)  # from the step that learned it (step 1)
    assert 4 not in f2
    assert h.mean_forgetting() == pytest.approx((0.2 + 0.3) / 2)  # NaN and background excluded
    assert h.mean_forgetting(include_background=True) == pytest.approx((bg[0] - bg[2] + 0.2 + 0.3) / 3)
    assert h.mean_forgetting(1) == pytest.approx((0.3 - 0.1) / 2)
    assert math.isnan(h.mean_forgetting(0))


def test_forgetting_with_real_results() -> None:
    h = StepHistory()
    m0 = MeanIoU(2, num_old_classes=0)
    m0.update(torch.tensor([[[0, 1, 1, 1]]]), torch.tensor([[[0, 1, 1, 1]]]))
    h.add(0, m0.compute())
    m1 = MeanIoU(3, num_old_classes=2)
    m1.update(torch.tensor([[[0, 2, 1, 1, 2]]]), torch.tensor([[[0, 1, 1, 1, 2]]]))
    h.add(1, m1.compute())
    assert h.learned_at == {0: 0, 1: 0, 2: 1}
    assert h.forgetting()[1] == pytest.approx(1.0 - 2 / 3)


def test_explicit_new_classes_and_errors() -> None:
    h = StepHistory()
    h.add(0, result_with_iou([0.9, 0.8, 0.6, 0.0], 0), new_classes=[0, 1, 2])  # a fixed K=4 head
    assert h.learned_at == {0: 0, 1: 0, 2: 0}
    with pytest.raises(ValueError, match="already learned"):
        h.add(1, result_with_iou([0.9, 0.8, 0.6, 0.5], 3), new_classes=[2, 3])
    with pytest.raises(ValueError, match=r"in \[0, 4\)"):
        h.add(1, result_with_iou([0.9, 0.8, 0.6, 0.5], 3), new_classes=[4])
    with pytest.raises(ValueError, match="repeat"):
        h.add(1, result_with_iou([0.9, 0.8, 0.6, 0.5], 3), new_classes=[3, 3])
    with pytest.raises(ValueError, match="larger than the last"):
        h.add(0, result_with_iou([0.9, 0.8, 0.6, 0.5], 3))
    with pytest.raises(ValueError, match="only grows"):
        h.add(1, result_with_iou([0.9, 0.8], 1))
    with pytest.raises(TypeError, match="IoUResult"):
        h.add(1, {"iou": [1.0]})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="step"):
        h.add(1.0, result_with_iou([0.9, 0.8, 0.6, 0.5], 3))  # type: ignore[arg-type]
    h.add(1, result_with_iou([0.9, 0.8, 0.6, 0.5], 3), new_classes=[3])
    assert h.steps == (0, 1) and len(h) == 2 and 1 in h and 2 not in h
    with pytest.raises(KeyError, match="step 5"):
        h[5]
    with pytest.raises(ValueError, match="empty"):
        StepHistory().forgetting()
    with pytest.raises(ValueError, match="class_names"):
        StepHistory(class_names=["a"]).add(0, result_with_iou([0.5, 0.5], 0))


def test_table_is_readable() -> None:
    text = hand_made_history().table()
    lines = text.splitlines()
    assert lines[0].split() == ["#", "class", "step", "0", "step", "1", "step", "2", "forgetting"]
    assert len({len(line) for line in lines[:7]}) == 1  # header, rule and class rows are aligned
    bird = next(line for line in lines if " bird " in line)
    assert bird.split()[2:] == ["-", "40.0", "10.0", "30.0"]
    bicycle = next(line for line in lines if "bicycle" in line)
    assert bicycle.split()[2:] == ["60.0", "70.0", "n/a", "n/a"]
    for label in ("mIoU old", "mIoU new", "mIoU all", "mIoU old+bg", "mIoU all+bg", "hmean", "mean forgetting"):
        assert label in text
    raw = hand_made_history().table(percent=False, digits=3)
    assert "0.300" in raw
    assert "forgetting" in StepHistory().table()


def test_json_round_trip(tmp_path: Path) -> None:
    h = hand_made_history()
    path = tmp_path / "history.json"
    h.to_json(path)
    data = json.loads(path.read_text())  # standard JSON: NaN written as null
    assert data["steps"][2]["result"]["iou"][2] is None
    assert data["steps"][2]["forgetting"][3] == pytest.approx(0.3)
    back = StepHistory.from_json(path)
    assert back.steps == h.steps and back.learned_at == h.learned_at
    for (s, r), (s2, r2) in zip(h, back):
        assert s == s2
        torch.testing.assert_close(r2.iou, r.iou, equal_nan=True)
        torch.testing.assert_close(r2.confusion, r.confusion)
    assert back.table() == h.table()
    assert back.to_dict() == h.to_dict()
    with pytest.raises(ValueError, match="format"):
        StepHistory.from_dict({"steps": []})
    with pytest.raises(ValueError, match="version"):
        StepHistory.from_dict({**h.to_dict(), "version": 99})


def test_csv_round_trip(tmp_path: Path) -> None:
    h = hand_made_history()
    path = tmp_path / "history.csv"
    h.to_csv(path)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == h.csv_header()
    assert [int(r["step"]) for r in rows] == [0, 1, 2]
    assert rows[1]["new_classes"] == "3"
    for row, (_, result) in zip(rows, h):
        for c in range(5):
            cell = row[f"iou/{NAMES[c]}"]
            if c >= result.num_classes:
                assert cell == ""
            else:
                torch.testing.assert_close(float(cell), float(result.iou[c]), equal_nan=True, rtol=0, atol=0)
        for g in IoUResult.GROUP_NAMES:
            torch.testing.assert_close(float(row[g]), result.groups[g], equal_nan=True, rtol=0, atol=0)
    assert float(rows[2]["forgetting/bird"]) == pytest.approx(0.3)
    assert rows[0]["forgetting/background"] == ""
    assert math.isnan(float(rows[2]["forgetting/bicycle"]))
    assert float(rows[2]["mean_forgetting"]) == pytest.approx(0.25)


def test_per_step_split_of_a_long_task_next_to_the_step_0_split(tmp_path: Path) -> None:
    # Results computed with the field's split (old = classes of step 0, n_old = 3 at every step).
    h = StepHistory(class_names=NAMES)
    h.add(0, result_with_iou([0.9, 0.8, 0.6], 3))
    h.add(1, result_with_iou([0.8, 0.5, 0.7, 0.4], 3))
    h.add(2, result_with_iou([0.7, 0.6, 0.2, 0.1, 0.9], 3))
    assert h[2].groups["old"] == pytest.approx(0.4) and h[2].groups["new"] == pytest.approx(0.5)
    per_step = h.per_step(2)  # old = classes learnt before step 2 (1-3), new = class 4
    assert per_step.num_old_classes == 4
    assert per_step.groups["old"] == pytest.approx(0.3) and per_step.groups["new"] == pytest.approx(0.9)
    assert h.per_step(0).num_old_classes == 0
    entry = h.to_dict()["steps"][2]
    assert entry["result"]["num_old_classes"] == 3 and entry["per_step"]["num_old_classes"] == 4
    assert entry["per_step"]["new"] == pytest.approx(0.9)
    h.to_csv(tmp_path / "h.csv")
    with open(tmp_path / "h.csv") as f:
        rows = list(csv.DictReader(f))
    assert float(rows[2]["new"]) == pytest.approx(0.5) and float(rows[2]["new_step"]) == pytest.approx(0.9)
    assert "mIoU new (step t)" in h.table()
