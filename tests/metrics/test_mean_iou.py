"""Tests of MeanIoU: float64 pixel reference, order/split invariance, logits, state, sync (incl. 2-process gloo)."""

from __future__ import annotations

import importlib
import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from hypothesis import given
from hypothesis import strategies as st

from incseg.metrics import IoUResult, MeanIoU, confusion_matrix


def reference_iou(pred: np.ndarray, target: np.ndarray, k: int, ignore_index: int = 255) -> np.ndarray:
    """Per-class IoU from pixel sets in float64: |P_c ∩ T_c| / |P_c ∪ T_c| over non-ignored pixels, NaN if empty."""
    valid = target != ignore_index
    out = np.empty(k, dtype=np.float64)
    for c in range(k):
        p, t = (pred == c) & valid, (target == c) & valid
        union = np.logical_or(p, t).sum(dtype=np.float64)
        out[c] = np.logical_and(p, t).sum(dtype=np.float64) / union if union > 0 else np.nan
    return out


def make_batches(n: int, k: int, *, h: int = 5, w: int = 6, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        b = int(torch.randint(1, 3, (1,), generator=gen))
        target = torch.randint(0, k, (b, h, w), generator=gen)
        target[torch.rand(b, h, w, generator=gen) < 0.25] = 255
        pred = torch.randint(0, k, (b, h, w), generator=gen)
        batches.append((pred, target))
    return batches


def test_matches_pixel_reference_over_batches() -> None:
    k = 6
    batches = make_batches(4, k)
    metric = MeanIoU(k, num_old_classes=4)
    for pred, target in batches:
        metric.update(pred, target)
    r = metric.compute()
    preds = np.concatenate([p.reshape(-1).numpy() for p, _ in batches])
    targets = np.concatenate([t.reshape(-1).numpy() for _, t in batches])
    expected = reference_iou(preds, targets, k)
    np.testing.assert_allclose(r.iou.numpy(), expected, rtol=0, atol=1e-15)
    assert r.groups["old"] == pytest.approx(float(np.nanmean(expected[1:4])), abs=1e-15)
    assert r.groups["new"] == pytest.approx(float(np.nanmean(expected[4:])), abs=1e-15)
    assert r.groups["all_bg"] == pytest.approx(float(np.nanmean(expected)), abs=1e-15)
    valid = targets != 255
    assert r.pixel_accuracy == pytest.approx(float((preds[valid] == targets[valid]).mean()), abs=1e-15)


def test_nan_for_class_absent_from_pred_and_target() -> None:
    target = torch.tensor([[[0, 1], [1, 255]]])
    pred = torch.tensor([[[0, 1], [0, 3]]])  # class 2 nowhere; class 3 only on an ignored pixel
    metric = MeanIoU(4, num_old_classes=2)
    metric.update(pred, target)
    r = metric.compute()
    assert math.isnan(float(r.iou[2])) and math.isnan(float(r.iou[3]))
    assert math.isnan(r.groups["new"])
    assert r.groups["all_bg"] == pytest.approx((0.5 + 0.5) / 2)


@given(
    st.integers(1, 5),
    st.integers(1, 5),
    st.integers(0, 2**31 - 1),
    st.lists(st.integers(0, 8), min_size=0, max_size=4),
)
def test_property_update_order_and_batch_split_do_not_matter(k: int, n: int, seed: int, cuts: list[int]) -> None:
    batches = make_batches(n, k, h=3, w=4, seed=seed)
    pred = torch.cat([p for p, _ in batches])
    target = torch.cat([t for _, t in batches])
    whole = MeanIoU(k, num_old_classes=k // 2)
    whole.update(pred, target)

    # re-split the concatenated images at arbitrary cut points and feed the pieces in a shuffled order
    total = pred.shape[0]
    bounds = sorted({0, total, *(c % (total + 1) for c in cuts)})
    pieces = [(pred[a:b], target[a:b]) for a, b in itertools.pairwise(bounds) if b > a]
    order = torch.randperm(len(pieces), generator=torch.Generator().manual_seed(seed)).tolist()
    split = MeanIoU(k, num_old_classes=k // 2)
    for i in order:
        split.update(*pieces[i])
    torch.testing.assert_close(split.confusion, whole.confusion, rtol=0, atol=0)
    torch.testing.assert_close(split.compute().iou, whole.compute().iou, equal_nan=True, rtol=0, atol=0)


def test_logits_equal_argmax_input() -> None:
    logits = torch.randn(2, 4, 5, 6)
    _, target = make_batches(1, 4, h=5, w=6)[0]
    target = target[:1].expand(2, 5, 6).clone()
    m1, m2 = MeanIoU(4), MeanIoU(4)
    m1.update(logits, target)
    m2.update(logits.argmax(1), target)
    torch.testing.assert_close(m1.confusion, m2.confusion)


def test_low_resolution_logits_are_upsampled() -> None:
    logits = torch.randn(1, 3, 4, 4)
    target = torch.randint(0, 3, (1, 8, 8))
    metric = MeanIoU(3)
    metric.update(logits, target)
    up = torch.nn.functional.interpolate(logits, size=(8, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(metric.confusion, confusion_matrix(up.argmax(1), target, 3))
    assert int(metric.confusion.sum()) == 64


def test_compute_reset_and_empty() -> None:
    metric = MeanIoU(3, class_names=["background", "cat", "dog"])
    r = metric.compute()
    assert isinstance(r, IoUResult) and torch.isnan(r.iou).all()
    pred, target = make_batches(1, 3)[0]
    metric.update(pred, target)
    assert int(metric.confusion.sum()) == int((target != 255).sum())
    assert metric.compute().class_names == ("background", "cat", "dog")
    metric.reset()
    assert int(metric.confusion.sum()) == 0


def test_state_dict_round_trip(tmp_path: Path) -> None:
    metric = MeanIoU(4, num_old_classes=2)
    for pred, target in make_batches(2, 4):
        metric.update(pred, target)
    torch.save(metric.state_dict(), tmp_path / "metric.pt")
    state = torch.load(tmp_path / "metric.pt", weights_only=True)
    restored = MeanIoU(4, num_old_classes=2)
    restored.load_state_dict(state)
    torch.testing.assert_close(restored.confusion, metric.confusion)
    torch.testing.assert_close(restored.compute().iou, metric.compute().iou, equal_nan=True)
    with pytest.raises(ValueError, match="num_classes=4"):
        MeanIoU(5).load_state_dict(state)
    with pytest.raises(ValueError, match="confusion"):
        restored.load_state_dict({})
    with pytest.raises(ValueError, match="shape"):
        restored.load_state_dict({"confusion": torch.zeros(3, 3, dtype=torch.long)})


def test_sync_is_noop_without_process_group() -> None:
    metric = MeanIoU(3)
    pred, target = make_batches(1, 3)[0]
    metric.update(pred, target)
    before = metric.confusion.clone()
    metric.sync()
    torch.testing.assert_close(metric.confusion, before)
    torch.testing.assert_close(metric.local_confusion, before)


def test_fixed_device_and_to() -> None:
    metric = MeanIoU(3, device="cpu")
    assert metric.device == torch.device("cpu")
    assert metric.to("cpu") is metric
    pred, target = make_batches(1, 3)[0]
    metric.update(pred, target)
    assert "num_classes=3" in repr(metric)


def test_bad_update_inputs() -> None:
    metric = MeanIoU(3)
    pred, target = make_batches(1, 3)[0]
    with pytest.raises(ValueError, match="same shape"):
        metric.update(pred[..., :-1], target)
    with pytest.raises(ValueError, match="preds contains values"):
        metric.update(pred + 3, target)
    with pytest.raises(ValueError, match="target contains values"):
        metric.update(pred, torch.full_like(target, 7))
    with pytest.raises(ValueError, match="channels"):
        metric.update(torch.randn(pred.shape[0], 4, 5, 6), target)
    with pytest.raises(TypeError, match="integer"):
        metric.update(pred, target.float())
    assert int(metric.confusion.sum()) == 0  # failed updates leave the counts untouched


def test_bad_constructor_arguments() -> None:
    with pytest.raises(ValueError, match="num_classes"):
        MeanIoU(0)
    with pytest.raises(TypeError, match="num_classes"):
        MeanIoU(True)
    with pytest.raises(ValueError, match="num_old_classes"):
        MeanIoU(3, num_old_classes=4)
    with pytest.raises(ValueError, match="3 entries"):
        MeanIoU(3, class_names=["a", "b"])
    with pytest.raises(ValueError, match="unique"):
        MeanIoU(2, class_names=["a", "a"])
    with pytest.raises(TypeError, match="class_names"):
        MeanIoU(2, class_names="ab")
    with pytest.raises(ValueError, match="absent"):
        MeanIoU(2, absent="both")  # type: ignore[arg-type]


def test_two_process_gloo_sync_equals_single_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    monkeypatch.syspath_prepend(str(Path(__file__).parent))  # spawned workers import the worker module by name
    worker = importlib.import_module("_metrics_dist_worker")
    mp.spawn(worker.run, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    out = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    logits, target, extra_pred, extra_target = worker.make_data()
    single = MeanIoU(worker.NUM_CLASSES, num_old_classes=3)
    single.update(logits, target)
    expected = single.compute()
    assert not torch.equal(out[0]["local"], expected.confusion)  # each rank alone saw only part of the data
    torch.testing.assert_close(out[0]["local"] + out[1]["local"], expected.confusion)
    for r in range(2):
        torch.testing.assert_close(out[r]["first"], expected.confusion)
        torch.testing.assert_close(out[r]["second"], expected.confusion)  # no double count after two syncs
        torch.testing.assert_close(out[r]["first_iou"], expected.iou, equal_nan=True)
        own_extra = confusion_matrix(extra_pred[r], extra_target[r], worker.NUM_CLASSES)
        torch.testing.assert_close(out[r]["before_resync"], expected.confusion + own_extra)
    single.update(extra_pred.flatten(0, 1), extra_target.flatten(0, 1))
    for r in range(2):
        torch.testing.assert_close(out[r]["final"], single.confusion)
