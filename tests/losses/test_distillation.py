"""Tests of the distillation modules KDLoss, UnbiasedKDLoss, BalancedKDLoss (eq. 9-12)."""

from __future__ import annotations

import pytest
import torch

from incseg.functional import balanced_kd_loss, kd_loss, unbiased_kd_loss
from incseg.losses import BalancedKDLoss, KDLoss, UnbiasedKDLoss

PAIRS = [(KDLoss, kd_loss), (UnbiasedKDLoss, unbiased_kd_loss), (BalancedKDLoss, balanced_kd_loss)]


@pytest.mark.parametrize(("module", "functional"), PAIRS)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("class_reduction", ["mean", "sum"])
@pytest.mark.parametrize("with_mask", [False, True])
def test_module_equals_functional(module, functional, reduction: str, class_reduction: str, with_mask: bool) -> None:
    logits, old_logits = torch.randn(2, 6, 5, 7), torch.randn(2, 4, 3, 3)
    mask = torch.rand(2, 5, 7) < 0.6 if with_mask else None
    criterion = module(class_reduction=class_reduction, reduction=reduction)
    expected = functional(logits, old_logits, class_reduction=class_reduction, reduction=reduction, mask=mask)
    torch.testing.assert_close(criterion(logits, old_logits, mask), expected)
    assert f"reduction={reduction!r}" in repr(criterion)


@pytest.mark.parametrize(("module", "functional"), PAIRS)
def test_gradient_flows(module, functional) -> None:
    logits = torch.randn(2, 6, 4, 4, requires_grad=True)
    module()(logits, torch.randn(2, 4, 4, 4)).backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("module", [KDLoss, UnbiasedKDLoss, BalancedKDLoss])
@pytest.mark.parametrize(
    ("kwargs", "match"), [({"reduction": "avg"}, "reduction"), ({"class_reduction": "none"}, "class_reduction")]
)
def test_bad_construction_raises(module, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        module(**kwargs)
