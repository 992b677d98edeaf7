"""DKD's functionals against float64 references written from the equations, and their properties."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from incseg.functional import (
    auxiliary_bce_loss,
    decompose_logits,
    multilabel_bce_loss,
    sigmoid_kd_loss,
    threshold_background,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _reference_mbce(x: Tensor, labels: Tensor, first: int, p: float, ignore: int | None) -> float:
    """-[p y log σ(x) + (1 - y) log(1 - σ(x))] summed over classes c >= first, averaged over counted pixels,
    with explicit loops over pixels and classes (float64)."""
    b, k, h, w = x.shape
    total, count = 0.0, 0
    for n in range(b):
        for i in range(h):
            for j in range(w):
                y = int(labels[n, i, j])
                if ignore is not None and y == ignore:
                    continue
                count += 1
                for c in range(first, k):
                    s = 1.0 / (1.0 + math.exp(-float(x[n, c, i, j])))
                    total -= p * math.log(s) if y == c else math.log(1.0 - s)
    return total / max(count, 1)


def _reference_kd(x: Tensor, old: Tensor) -> float:
    b, c, h, w = x.shape
    total = 0.0
    for n in range(b):
        for ch in range(c):
            for i in range(h):
                for j in range(w):
                    t = 1.0 / (1.0 + math.exp(-float(old[n, ch, i, j])))
                    s = 1.0 / (1.0 + math.exp(-float(x[n, ch, i, j])))
                    total -= t * math.log(s) + (1.0 - t) * math.log(1.0 - s)
    return total / (b * h * w)


@pytest.mark.parametrize(("first", "p", "ignore"), [(1, 2.0, None), (3, 1.0, None), (2, 1.5, 255), (4, 1.0, 255)])
def test_multilabel_bce_matches_the_loop_reference(first: int, p: float, ignore: int | None) -> None:
    x = 3 * torch.randn(2, 5, 3, 4, dtype=torch.float64, generator=_gen(0))
    labels = torch.randint(0, 5, (2, 3, 4), generator=_gen(1))
    labels[0, 0, :2] = 255
    got = multilabel_bce_loss(x, labels, first_class=first, pos_weight=p, ignore_index=ignore)
    assert float(got) == pytest.approx(_reference_mbce(x, labels, first, p, ignore), rel=1e-12)


def test_multilabel_bce_equals_torch_bce_with_pos_weight_and_resizes_to_the_labels() -> None:
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64, generator=_gen(2))
    labels = torch.randint(0, 4, (2, 6, 6), generator=_gen(3))
    up = F.interpolate(x, size=(6, 6), mode="bilinear", align_corners=False)[:, 2:]
    target = torch.stack([(labels == c).double() for c in (2, 3)], dim=1)
    pw = torch.full((2, 1, 1), 2.0, dtype=torch.float64)
    ref = F.binary_cross_entropy_with_logits(up, target, pos_weight=pw, reduction="none").sum(1).mean()
    got = multilabel_bce_loss(x, labels, first_class=2, pos_weight=2.0)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 4, 5), (1, 2, 5, 3)])
def test_sigmoid_kd_matches_the_loop_reference(shape: tuple[int, ...]) -> None:
    x = 2 * torch.randn(*shape, dtype=torch.float64, generator=_gen(4))
    old = 2 * torch.randn(*shape, dtype=torch.float64, generator=_gen(5))
    assert float(sigmoid_kd_loss(x, old)) == pytest.approx(_reference_kd(x, old), rel=1e-12)
    assert float(sigmoid_kd_loss(x[:, :0], old[:, :0])) == 0.0  # no distilled class


def _reference_weighted_kd(x: Tensor, old: Tensor, weight: Tensor, target_weight: Tensor) -> float:
    """Each pixel's term times ``weight``, its target ``σ(old)`` times ``target_weight``, over all pixels."""
    b, c, h, w = x.shape
    total = 0.0
    for n in range(b):
        for i in range(h):
            for j in range(w):
                for ch in range(c):
                    t = float(target_weight[n, i, j]) / (1.0 + math.exp(-float(old[n, ch, i, j])))
                    s = 1.0 / (1.0 + math.exp(-float(x[n, ch, i, j])))
                    total -= float(weight[n, i, j]) * (t * math.log(s) + (1.0 - t) * math.log(1.0 - s))
    return total / (b * h * w)


def test_weighted_sigmoid_kd_matches_the_loop_reference() -> None:
    x = 2 * torch.randn(2, 3, 4, 5, dtype=torch.float64, generator=_gen(6))
    old = 2 * torch.randn(2, 3, 4, 5, dtype=torch.float64, generator=_gen(7))
    weight = torch.rand(2, 4, 5, dtype=torch.float64, generator=_gen(8))
    target_weight = (torch.rand(2, 4, 5, generator=_gen(9)) > 0.5).double()
    got = sigmoid_kd_loss(x, old, weight=weight, target_weight=target_weight)
    assert float(got) == pytest.approx(_reference_weighted_kd(x, old, weight, target_weight), rel=1e-12)
    ones = torch.ones(2, 1, 4, 5, dtype=torch.float64)
    torch.testing.assert_close(sigmoid_kd_loss(x, old, weight=ones, target_weight=ones), sigmoid_kd_loss(x, old))
    with pytest.raises(ValueError, match="weight must be"):
        sigmoid_kd_loss(x, old, weight=weight[:, :2])


@pytest.mark.parametrize("k", [1, 3])
def test_decompose_logits_matches_the_loop_reference(k: int) -> None:
    h = torch.randn(2, 3, 4, 5, dtype=torch.float64, generator=_gen(6))
    w = torch.randn(4, 3, k, k, dtype=torch.float64, generator=_gen(7))
    pos, neg = decompose_logits(h, w)
    padded = F.pad(h, (k // 2,) * 4)
    ref_pos, ref_neg = torch.zeros_like(pos), torch.zeros_like(neg)
    for n in range(2):
        for o in range(4):
            for i in range(4):
                for j in range(5):
                    patch = padded[n, :, i : i + k, j : j + k]
                    ref_pos[n, o, i, j] = (patch * w[o].clamp(min=0)).sum()
                    ref_neg[n, o, i, j] = (patch * w[o].clamp(max=0)).sum()
    torch.testing.assert_close(pos, ref_pos, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(neg, ref_neg, rtol=1e-12, atol=1e-12)
    pos2, _ = decompose_logits(h, w[:, :, 0, 0]) if k == 1 else (pos, neg)
    torch.testing.assert_close(pos2, pos)


def test_auxiliary_bce_is_minus_log_one_minus_sigmoid() -> None:
    x = 4 * torch.randn(2, 1, 3, 3, dtype=torch.float64, generator=_gen(8))
    ref = -torch.log(1 - torch.sigmoid(x)).mean()
    torch.testing.assert_close(auxiliary_bce_loss(x), ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(auxiliary_bce_loss(x, reduction="sum"), ref * 18, rtol=1e-12, atol=1e-12)


def _release_rule(logits: Tensor, threshold: float) -> Tensor:
    """The release's prediction: argmax of sigmoid over the classes, background where none exceeds 0.5."""
    prob = torch.sigmoid(logits)
    pred = prob[:, 1:].argmax(dim=1) + 1
    pred[(prob[:, 1:] > threshold).sum(dim=1) == 0] = 0
    return pred


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    k=st.integers(2, 6),
    threshold=st.sampled_from([0.5, 0.3, 0.9]),
)
def test_threshold_background_argmax_is_the_release_rule(seed: int, k: int, threshold: float) -> None:
    logits = 3 * torch.randn(2, k, 4, 4, dtype=torch.float64, generator=_gen(seed))
    got = threshold_background(logits, threshold).argmax(dim=1)
    assert torch.equal(got, _release_rule(logits, threshold))


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), first=st.integers(1, 4), p=st.floats(0.25, 4.0))
def test_mbce_properties(seed: int, first: int, p: float) -> None:
    """Non-negative; mean = sum / counted pixels; an ignored pixel changes nothing; with ignore_index=None a 255
    pixel is a negative of every class (the same as a background pixel)."""
    x = 2 * torch.randn(2, 5, 3, 3, dtype=torch.float64, generator=_gen(seed))
    labels = torch.randint(0, 5, (2, 3, 3), generator=_gen(seed + 1))
    labels[1, 2, 2] = 255
    kw = {"first_class": first, "pos_weight": p}
    mean = multilabel_bce_loss(x, labels, ignore_index=255, **kw)
    total = multilabel_bce_loss(x, labels, ignore_index=255, reduction="sum", **kw)
    assert float(mean) >= 0 and float(mean) == pytest.approx(float(total) / 17, rel=1e-12)
    per_pixel = multilabel_bce_loss(x, labels, ignore_index=255, reduction="none", **kw)
    assert float(per_pixel[1, 2, 2]) == 0.0
    as_background = labels.clone()
    as_background[1, 2, 2] = 0
    torch.testing.assert_close(
        multilabel_bce_loss(x, labels, reduction="none", **kw),
        multilabel_bce_loss(x, as_background, reduction="none", **kw),
    )


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_sigmoid_kd_gradient_is_the_probability_gap(seed: int) -> None:
    """d/dx of the mean loss is (σ(x) - σ(x_old)) / pixels: zero where the student equals the teacher."""
    x = torch.randn(2, 3, 2, 3, dtype=torch.float64, generator=_gen(seed)).requires_grad_()
    old = torch.randn(2, 3, 2, 3, dtype=torch.float64, generator=_gen(seed + 1))
    (grad,) = torch.autograd.grad(sigmoid_kd_loss(x, old), x)
    torch.testing.assert_close(grad, (torch.sigmoid(x) - torch.sigmoid(old)) / 12, rtol=1e-12, atol=1e-14)
    (same,) = torch.autograd.grad(sigmoid_kd_loss(x, x.detach()), x)
    assert float(same.abs().max()) < 1e-15


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), k=st.sampled_from([1, 3]))
def test_decomposition_adds_up_and_has_signs(seed: int, k: int) -> None:
    """pos + neg = h * W, and on non-negative features (after a ReLU) pos >= 0 >= neg."""
    h = torch.randn(1, 4, 5, 5, dtype=torch.float64, generator=_gen(seed)).relu()
    w = torch.randn(3, 4, k, k, dtype=torch.float64, generator=_gen(seed + 1))
    pos, neg = decompose_logits(h, w)
    torch.testing.assert_close(pos + neg, F.conv2d(h, w, padding=k // 2), rtol=1e-12, atol=1e-12)
    assert bool((pos >= 0).all()) and bool((neg <= 0).all())


def test_gradcheck_and_extreme_logits() -> None:
    x = torch.randn(1, 3, 2, 2, dtype=torch.float64, generator=_gen(9), requires_grad=True)
    old = torch.randn(1, 3, 2, 2, dtype=torch.float64, generator=_gen(10))
    labels = torch.tensor([[[0, 1], [2, 255]]])
    assert torch.autograd.gradcheck(lambda t: multilabel_bce_loss(t, labels, first_class=1, pos_weight=2.0), (x,))
    assert torch.autograd.gradcheck(lambda t: sigmoid_kd_loss(t, old), (x,))
    assert torch.autograd.gradcheck(lambda t: auxiliary_bce_loss(t[:, :1]), (x,))
    big = torch.tensor([100.0, -100.0]).repeat(3)[None, :, None, None].reshape(1, 3, 2, 1)
    for value in (
        multilabel_bce_loss(big, torch.tensor([[[1], [2]]]), first_class=1),
        sigmoid_kd_loss(big, -big),
        auxiliary_bce_loss(big[:, :1]),
    ):
        assert math.isfinite(float(value))
    assert float(multilabel_bce_loss(big.bfloat16(), torch.tensor([[[1], [2]]]), first_class=1)) >= 0


def test_bad_arguments_raise_clear_errors() -> None:
    x, labels = torch.zeros(1, 3, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long)
    with pytest.raises(ValueError, match=r"first_class must be an int in \[1, K\)"):
        multilabel_bce_loss(x, labels, first_class=3)
    with pytest.raises(ValueError, match="pos_weight must be a finite number > 0"):
        multilabel_bce_loss(x, labels, first_class=1, pos_weight=0.0)
    with pytest.raises(ValueError, match="reduction must be one of"):
        multilabel_bce_loss(x, labels, first_class=1, reduction="avg")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="same shape"):
        sigmoid_kd_loss(x, x[:, :2])
    with pytest.raises(ValueError, match="input channels"):
        decompose_logits(x, torch.zeros(2, 4, 1, 1))
    with pytest.raises(ValueError, match="square odd kernel"):
        decompose_logits(x, torch.zeros(2, 3, 2, 2))
    with pytest.raises(ValueError, match="one channel"):
        auxiliary_bce_loss(x)
    with pytest.raises(ValueError, match=r"threshold must be a probability in \(0, 1\)"):
        threshold_background(x, 1.0)
