"""Tests of UnbiasedCrossEntropyLoss, the module twin of the unbiased cross-entropy (eq. 14-15)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from incseg.functional import unbiased_cross_entropy
from incseg.losses import UnbiasedCrossEntropyLoss


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("ignore_index", [255, None])
def test_module_equals_functional(reduction: str, ignore_index: int | None) -> None:
    logits = torch.randn(2, 6, 4, 5)
    labels = torch.randint(0, 6, (2, 8, 10))
    if ignore_index is not None:
        labels[:, :2] = ignore_index
    criterion = UnbiasedCrossEntropyLoss(4, ignore_index=ignore_index, reduction=reduction)
    expected = unbiased_cross_entropy(logits, labels, 4, ignore_index=ignore_index, reduction=reduction)
    torch.testing.assert_close(criterion(logits, labels), expected)


def test_num_old_classes_is_settable() -> None:
    criterion = UnbiasedCrossEntropyLoss(3)
    logits, labels = torch.randn(2, 5, 4, 4), torch.randint(0, 5, (2, 4, 4))
    criterion.num_old_classes = 0
    torch.testing.assert_close(criterion(logits, labels), F.cross_entropy(logits, labels))
    assert "num_old_classes=0" in repr(criterion)


def test_gradient_flows() -> None:
    logits = torch.randn(2, 5, 4, 4, requires_grad=True)
    UnbiasedCrossEntropyLoss(2)(logits, torch.randint(0, 5, (2, 4, 4))).backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"num_old_classes": -1}, "num_old_classes"), ({"num_old_classes": 1, "reduction": "avg"}, "reduction")],
)
def test_bad_construction_raises(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        UnbiasedCrossEntropyLoss(**kwargs)


def test_num_old_classes_too_large_raises_at_call() -> None:
    with pytest.raises(ValueError, match="num_old_classes"):
        UnbiasedCrossEntropyLoss(5)(torch.randn(2, 5, 4, 4), torch.zeros(2, 4, 4, dtype=torch.long))
