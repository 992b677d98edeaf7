"""Tests of the batch confusion matrix (NumPy reference, logits, ignore, validation, scatter path)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from incseg import _checks
from incseg.metrics import confusion_matrix
from incseg.metrics._common import count_pairs, histogram, scatter_histogram


def reference_confusion(pred: np.ndarray, target: np.ndarray, k: int, ignore_index: int | None) -> np.ndarray:
    """Straight from the definition: C[t, p] = number of non-ignored pixels with target t and prediction p."""
    conf = np.zeros((k, k), dtype=np.int64)
    for t, p in zip(target.reshape(-1).tolist(), pred.reshape(-1).tolist()):
        if ignore_index is not None and t == ignore_index:
            continue
        conf[t, p] += 1
    return conf


def random_batch(b: int, h: int, w: int, k: int, p_ignore: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    target = torch.randint(0, k, (b, h, w))
    target[torch.rand(b, h, w) < p_ignore] = 255
    pred = torch.randint(0, k, (b, h, w))
    return pred, target


@pytest.mark.parametrize(("b", "h", "w", "k"), [(1, 5, 7, 3), (2, 9, 4, 6), (3, 1, 1, 1)])
def test_matches_numpy_reference(b: int, h: int, w: int, k: int) -> None:
    pred, target = random_batch(b, h, w, k)
    conf = confusion_matrix(pred, target, k)
    assert conf.dtype == torch.int64
    assert conf.shape == (k, k)
    np.testing.assert_array_equal(conf.numpy(), reference_confusion(pred.numpy(), target.numpy(), k, 255))


def test_ignored_pixels_change_nothing() -> None:
    pred, target = random_batch(2, 6, 6, 4, p_ignore=0.0)
    base = confusion_matrix(pred, target, 4)
    target2 = target.clone()
    pred2 = pred.clone()
    extra_t = torch.full((2, 6, 3), 255)
    extra_p = torch.randint(0, 4, (2, 6, 3))
    conf = confusion_matrix(torch.cat([pred2, extra_p], -1), torch.cat([target2, extra_t], -1), 4)
    torch.testing.assert_close(conf, base)
    assert int(conf.sum()) == 2 * 6 * 6


def test_ignore_index_none_counts_everything() -> None:
    pred, target = random_batch(1, 4, 4, 3, p_ignore=0.0)
    conf = confusion_matrix(pred, target, 3, ignore_index=None)
    assert int(conf.sum()) == 16


def test_ignore_index_inside_class_range() -> None:
    target = torch.tensor([[[0, 1, 2, 0]]])
    pred = torch.tensor([[[0, 0, 2, 1]]])
    conf = confusion_matrix(pred, target, 3, ignore_index=0)
    np.testing.assert_array_equal(conf.numpy(), reference_confusion(pred.numpy(), target.numpy(), 3, 0))


def test_uint8_inputs() -> None:
    pred, target = random_batch(2, 5, 5, 4)
    conf = confusion_matrix(pred.to(torch.uint8), target.to(torch.uint8), 4)
    torch.testing.assert_close(conf, confusion_matrix(pred, target, 4))


def test_logits_equal_argmax() -> None:
    logits = torch.randn(2, 5, 6, 7)
    _, target = random_batch(2, 6, 7, 5)
    torch.testing.assert_close(confusion_matrix(logits, target, 5), confusion_matrix(logits.argmax(1), target, 5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_logits_are_upsampled_bilinearly(dtype: torch.dtype) -> None:
    logits = torch.randn(2, 4, 3, 5, dtype=dtype)
    _, target = random_batch(2, 9, 11, 4)
    up = F.interpolate(logits.float(), size=(9, 11), mode="bilinear", align_corners=False)
    expected = confusion_matrix(up.argmax(1), target, 4)
    torch.testing.assert_close(confusion_matrix(logits, target, 4), expected)


def test_scatter_path_equals_bincount() -> None:
    values = torch.randint(0, 17, (500,))
    torch.testing.assert_close(scatter_histogram(values, 17), histogram(values, 17))
    torch.testing.assert_close(scatter_histogram(values, 17), torch.bincount(values, minlength=17))


def test_unchecked_out_of_range_values_are_dropped() -> None:
    # what an accelerator does with value checks off: bad pixels go to the dump bin, the counts stay (K, K)
    pred = torch.tensor([[[0, 5, 1, -1]]])
    target = torch.tensor([[[0, 1, 7, 1]]])
    conf = count_pairs(pred, target, 3, 255)
    assert conf.shape == (3, 3)
    assert int(conf.sum()) == 1 and int(conf[0, 0]) == 1


@given(st.integers(1, 3), st.integers(1, 6), st.integers(1, 6), st.integers(1, 5), st.integers(0, 2**31 - 1))
def test_property_total_is_number_of_valid_pixels(b: int, h: int, w: int, k: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    target = torch.randint(0, k + 1, (b, h, w), generator=gen)
    target[target == k] = 255
    pred = torch.randint(0, k, (b, h, w), generator=gen)
    conf = confusion_matrix(pred, target, k)
    assert int(conf.sum()) == int((target != 255).sum())
    np.testing.assert_array_equal(conf.sum(1).numpy(), np.bincount(target[target != 255].numpy(), minlength=k))


def test_bad_inputs() -> None:
    pred, target = random_batch(2, 4, 4, 3)
    with pytest.raises(ValueError, match="same shape"):
        confusion_matrix(pred[:, :3], target, 3)
    with pytest.raises(ValueError, match="B=1"):
        confusion_matrix(torch.randn(1, 3, 4, 4), target, 3)
    with pytest.raises(ValueError, match="channels"):
        confusion_matrix(torch.randn(2, 4, 4, 4), target, 3)
    with pytest.raises(ValueError, match="preds contains values"):
        confusion_matrix(torch.full_like(pred, 3), target, 3)
    with pytest.raises(ValueError, match="target contains values"):
        confusion_matrix(pred, torch.full_like(target, 3), 3)
    with pytest.raises(ValueError, match="target contains values"):
        confusion_matrix(pred, torch.full_like(target, -1), 3)
    with pytest.raises(ValueError, match="3 dims"):
        confusion_matrix(pred[0], target[0], 3)
    with pytest.raises(TypeError, match="integer"):
        confusion_matrix(pred, target.float(), 3)
    with pytest.raises(TypeError, match="look like logits"):
        confusion_matrix(torch.zeros(2, 3, 4, 4, dtype=torch.long), target, 3)
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        confusion_matrix(pred.tolist(), target, 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="same device"):
        confusion_matrix(pred, target.to("meta"), 3)
    with pytest.raises(ValueError, match="num_classes"):
        confusion_matrix(pred, target, 0)
    with pytest.raises(TypeError, match="num_classes"):
        confusion_matrix(pred, target, 3.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="ignore_index"):
        confusion_matrix(pred, target, 3, ignore_index=2.5)  # type: ignore[arg-type]


def test_value_checks_follow_global_switch() -> None:
    pred, target = random_batch(1, 3, 3, 3)
    bad = torch.full_like(target, 9)
    try:
        _checks.set_validate_values(False)
        conf = confusion_matrix(pred, bad, 3)  # no check: bad pixels dropped
        assert int(conf.sum()) == 0
    finally:
        _checks.set_validate_values(None)
    with pytest.raises(ValueError, match="target contains values"):
        confusion_matrix(pred, bad, 3)
