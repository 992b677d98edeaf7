"""DKDLoss: the weighted sum of DKD's functionals, its step-0 form and its errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from incseg.functional import auxiliary_bce_loss, multilabel_bce_loss, sigmoid_kd_loss
from incseg.losses import DKDLoss


def _inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "logits": torch.randn(2, 5, 4, 4, dtype=torch.float64, generator=g),
        "labels": torch.randint(0, 5, (2, 8, 8), generator=g),
        "aux_logits": torch.randn(2, 1, 4, 4, dtype=torch.float64, generator=g),
        "pos_logits": torch.randn(2, 5, 4, 4, dtype=torch.float64, generator=g),
        "neg_logits": torch.randn(2, 5, 4, 4, dtype=torch.float64, generator=g),
        "old_logits": torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=g),
        "old_pos_logits": torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=g),
        "old_neg_logits": torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=g),
    }


def _up(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, size=(8, 8), mode="bilinear", align_corners=False)


def test_total_is_the_weighted_sum_of_the_functionals() -> None:
    t = _inputs()
    loss = DKDLoss(mbce_weight=1.5, kd_weight=2.0, dkd_pos_weight=3.0, dkd_neg_weight=4.0, ac_weight=0.5)
    out = loss(num_old_classes=3, **t)
    expected = {
        "mbce": 1.5 * multilabel_bce_loss(t["logits"], t["labels"], first_class=3, pos_weight=1.0),
        "kd": 2.0 * sigmoid_kd_loss(_up(t["logits"])[:, 1:3], _up(t["old_logits"])[:, 1:]),
        "dkd_pos": 3.0 * sigmoid_kd_loss(t["pos_logits"][:, 1:3], t["old_pos_logits"][:, 1:]),
        "dkd_neg": 4.0 * sigmoid_kd_loss(t["neg_logits"][:, 1:3], t["old_neg_logits"][:, 1:]),
        "ac": 0.5 * auxiliary_bce_loss(_up(t["aux_logits"])),
    }
    for name, value in expected.items():
        torch.testing.assert_close(out.terms[name], value, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.loss, sum(expected.values()), rtol=1e-12, atol=1e-12)
    assert sorted(out.terms) == sorted([*expected, "total"])


def test_step_zero_scores_every_foreground_class_with_the_base_positive_weight() -> None:
    t = _inputs(1)
    out = DKDLoss(base_pos_weight=3.0)(t["logits"], t["labels"], num_old_classes=0, aux_logits=t["aux_logits"])
    mbce = multilabel_bce_loss(t["logits"], t["labels"], first_class=1, pos_weight=3.0)
    torch.testing.assert_close(out.terms["mbce"], mbce, rtol=1e-12, atol=1e-12)
    assert sorted(out.terms) == ["ac", "mbce", "total"]


def test_gradients_reach_only_what_each_term_reads() -> None:
    t = {k: v.requires_grad_() if v.is_floating_point() else v for k, v in _inputs(2).items()}
    DKDLoss()(num_old_classes=3, **t).loss.backward()
    logits_grad = t["logits"].grad
    assert logits_grad is not None and float(logits_grad[:, 0].abs().max()) == 0.0  # the background row is aux's
    for name in ("old_logits", "old_pos_logits", "old_neg_logits"):
        assert t[name].grad is None or float(t[name].grad.abs().max()) == 0.0


def test_errors() -> None:
    t = _inputs()
    with pytest.raises(ValueError, match=r"needs \['pos_logits'"):
        DKDLoss()(t["logits"], t["labels"], num_old_classes=3, aux_logits=t["aux_logits"])
    with pytest.raises(ValueError, match="num_old_classes=3 channels"):
        DKDLoss()(num_old_classes=3, **{**t, "old_logits": t["old_logits"][:, :2]})
    with pytest.raises(ValueError, match="kd_weight must be a finite number >= 0"):
        DKDLoss(kd_weight=-1.0)
    with pytest.raises(ValueError, match="pos_weight must be a finite number > 0"):
        DKDLoss(pos_weight=0.0)
    with pytest.raises(TypeError, match="ac_weight must be a float"):
        DKDLoss(ac_weight="1")  # type: ignore[arg-type]


@pytest.mark.parametrize("new_pixels", ["free", "negative"])
def test_pixels_of_new_classes(new_pixels: str) -> None:
    """``"free"`` leaves the pixels labelled with a new class out of every distillation term (at the features'
    resolution, by the share of such pixels); ``"negative"`` makes the old classes negatives there in ``L_kd``."""
    t = _inputs(2)
    out = DKDLoss(new_pixels=new_pixels)(num_old_classes=3, **t)
    keep = (t["labels"] < 3).double()
    cell = F.adaptive_avg_pool2d(keep[:, None], (4, 4))
    x, x_old = _up(t["logits"])[:, 1:3], _up(t["old_logits"])[:, 1:]
    if new_pixels == "free":
        kd = sigmoid_kd_loss(x, x_old, weight=keep)
    else:
        kd = sigmoid_kd_loss(x, x_old, target_weight=keep)
    torch.testing.assert_close(out.terms["kd"], 5 * kd, rtol=1e-12, atol=1e-12)
    pos = sigmoid_kd_loss(t["pos_logits"][:, 1:3], t["old_pos_logits"][:, 1:], weight=cell)
    torch.testing.assert_close(out.terms["dkd_pos"], 5 * pos, rtol=1e-12, atol=1e-12)
    distil = DKDLoss()(num_old_classes=3, **t)
    assert float(out.terms["dkd_neg"]) < float(distil.terms["dkd_neg"])
    with pytest.raises(ValueError, match="new_pixels must be one of"):
        DKDLoss(new_pixels="mask")
