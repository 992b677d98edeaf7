"""STAR's functionals against float64 references written from the equations (and the release's two-pass
statistics), and their properties."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from incseg.functional import (
    class_feature_statistics,
    negative_bce,
    ocfm_loss,
    prototypes_from_statistics,
    replay_features,
    sad_loss,
    sample_labels,
    sigmoid_predictions,
    star_classification_loss,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


# ---------------------------------------------------------------------------------------------- sampling, rules
def test_sample_labels_is_the_release_stride_16_grid() -> None:
    labels = torch.randint(0, 21, (2, 512, 512), generator=_gen())
    assert torch.equal(sample_labels(labels, (32, 32)), labels[:, 8::16, 8::16])


@given(st.integers(1, 20), st.integers(1, 20), st.data())
def test_sample_labels_takes_the_cell_centres(h: int, w: int, data: st.DataObject) -> None:
    height, width = data.draw(st.integers(h, 40)), data.draw(st.integers(w, 40))
    labels = torch.arange(height * width).view(1, height, width)
    out = sample_labels(labels, (h, w))
    for i in range(h):
        for j in range(w):
            r, c = math.floor((i + 0.5) * height / h), math.floor((j + 0.5) * width / w)
            assert int(out[0, i, j]) == r * width + c


def test_sample_labels_refuses_a_grid_larger_than_the_labels() -> None:
    with pytest.raises(ValueError, match="within the labels"):
        sample_labels(torch.zeros(1, 4, 4, dtype=torch.long), (5, 4))


def test_sigmoid_predictions_match_the_release_rule() -> None:
    """Release (trainer_voc.py:233-238): pred = argmax + 1 over the class logits, 0 where no sigmoid > 1/2."""
    logits = torch.randn(2, 5, 6, 7, dtype=torch.float64, generator=_gen())
    for threshold in (0.0, 0.5):
        got = sigmoid_predictions(logits, threshold=threshold)
        for b in range(2):
            for i in range(6):
                for j in range(7):
                    values = [float(logits[b, c, i, j]) for c in range(1, 5)]
                    best = max(values)
                    expected = values.index(best) + 1 if best > threshold else 0
                    assert int(got[b, i, j]) == expected


def test_sigmoid_predictions_threshold_zero_is_probability_one_half() -> None:
    logits = torch.randn(1, 4, 5, 5, generator=_gen(1))
    prob = torch.sigmoid(logits[:, 1:])
    expected = torch.where((prob > 0.5).any(dim=1), prob.argmax(dim=1) + 1, 0)
    assert torch.equal(sigmoid_predictions(logits), expected)


# ---------------------------------------------------------------------------------------------- classification
def _bce_ref(x: float, t: float, w: float) -> float:
    return -(w * t * _log_sigmoid(x) + (1 - t) * _log_sigmoid(-x))


def _classification_ref(
    logits: Tensor, labels: Tensor, n_old: int, rep: Tensor | None, bg: Tensor | None, a: float, b: float, w: float
) -> float:
    """Per new class: (mean BCE over all pixels + a mean_n BCE(rep, 0) + b mean_m BCE(bg, 0)) / (1 + a + b)."""
    k = logits.shape[1]
    first = max(n_old, 1)
    x = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    total = 0.0
    for c in range(first, k):
        cur = [
            _bce_ref(float(x[n, c, i, j]), float(labels[n, i, j] == c), w)
            for n in range(x.shape[0])
            for i in range(x.shape[2])
            for j in range(x.shape[3])
        ]
        num = sum(cur) / len(cur)
        den = 1.0
        for extra, weight in ((rep, a), (bg, b)):
            if extra is not None:
                values = [_bce_ref(float(extra[n, c]), 0.0, 1.0) for n in range(extra.shape[0])]
                num += weight * (sum(values) / len(values) if values else 0.0)
                den += weight
        total += num / den
    return total


@pytest.mark.parametrize(("n_old", "k", "pos_weight"), [(0, 4, 4.0), (3, 5, 4.0), (4, 5, 1.0)])
def test_classification_loss_matches_the_reference(n_old: int, k: int, pos_weight: float) -> None:
    g = _gen(n_old)
    logits = torch.randn(2, k, 3, 4, dtype=torch.float64, generator=g) * 3
    labels = torch.randint(0, k, (2, 6, 8), generator=g)
    labels[0, 0, :3] = 255
    rep = torch.randn(7, k, dtype=torch.float64, generator=g)
    bg = torch.randn(5, k, dtype=torch.float64, generator=g)
    got = star_classification_loss(
        logits,
        labels,
        num_old_classes=n_old,
        replay_logits=rep,
        background_logits=bg,
        replay_weight=0.3,
        background_weight=1.7,
        pos_weight=pos_weight,
    )
    expected = _classification_ref(logits, labels, n_old, rep, bg, 0.3, 1.7, pos_weight)
    assert abs(float(got) - expected) < 1e-12


def test_classification_loss_equals_the_release_criterion_without_extras() -> None:
    """models/loss.py WBCELoss: BCEWithLogitsLoss(pos_weight) on the new logits, 255 a negative, mean per class."""
    g = _gen(3)
    logits = torch.randn(2, 6, 8, 8, dtype=torch.float64, generator=g)
    labels = torch.randint(0, 6, (2, 8, 8), generator=g)
    labels[1, 2:4] = 255
    n_old = 4
    new = logits[:, n_old:]
    target = torch.stack([(labels == c).double() for c in range(n_old, 6)], dim=1)
    crit = torch.nn.BCEWithLogitsLoss(pos_weight=torch.full((2,), 4.0, dtype=torch.float64), reduction="none")
    per = crit(new.permute(0, 2, 3, 1).reshape(-1, 2), target.permute(0, 2, 3, 1).reshape(-1, 2))
    expected = per.mean(dim=0).sum()
    got = star_classification_loss(logits, labels, num_old_classes=n_old, pos_weight=4.0)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@settings(deadline=None, max_examples=30)
@given(st.floats(0, 10), st.floats(0, 10), st.integers(0, 1000))
def test_classification_loss_is_a_convex_combination_per_class(a: float, b: float, seed: int) -> None:
    g = _gen(seed)
    logits = torch.randn(1, 2, 4, 4, dtype=torch.float64, generator=g)
    labels = torch.randint(0, 2, (1, 4, 4), generator=g)
    rep, bg = torch.randn(3, 2, dtype=torch.float64, generator=g), torch.randn(4, 2, dtype=torch.float64, generator=g)
    parts = [
        star_classification_loss(logits, labels, num_old_classes=1),
        negative_bce(rep[:, 1:]).sum(),
        negative_bce(bg[:, 1:]).sum(),
    ]
    got = star_classification_loss(
        logits,
        labels,
        num_old_classes=1,
        replay_logits=rep,
        background_logits=bg,
        replay_weight=a,
        background_weight=b,
    )
    expected = (parts[0] + a * parts[1] + b * parts[2]) / (1 + a + b)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert min(map(float, parts)) - 1e-12 <= float(got) <= max(map(float, parts)) + 1e-12


def test_classification_loss_refuses_no_new_class_and_bad_extras() -> None:
    logits, labels = torch.zeros(1, 3, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="at least one new class"):
        star_classification_loss(logits, labels, num_old_classes=3)
    with pytest.raises(ValueError, match="replay_logits"):
        star_classification_loss(logits, labels, num_old_classes=2, replay_logits=torch.zeros(4, 5))


def test_negative_bce_of_no_sample_is_a_connected_zero() -> None:
    x = torch.zeros(0, 3, requires_grad=True)
    out = negative_bce(x)
    assert out.tolist() == [0.0, 0.0, 0.0]
    out.sum().backward()
    assert x.grad is not None


def test_classification_loss_is_finite_for_extreme_logits_and_has_gradients() -> None:
    logits = (torch.randn(1, 4, 3, 3) * 100).requires_grad_()
    loss = star_classification_loss(logits, torch.randint(0, 4, (1, 3, 3)), num_old_classes=2, pos_weight=4.0)
    loss.backward()
    assert torch.isfinite(loss) and logits.grad is not None and torch.isfinite(logits.grad).all()


def test_classification_gradcheck() -> None:
    g = _gen(5)
    logits = torch.randn(1, 3, 2, 2, dtype=torch.float64, generator=g, requires_grad=True)
    rep = torch.randn(3, 3, dtype=torch.float64, generator=g, requires_grad=True)
    labels = torch.randint(0, 3, (1, 4, 4), generator=g)
    assert torch.autograd.gradcheck(
        lambda x, r: star_classification_loss(
            x, labels, num_old_classes=1, replay_logits=r, replay_weight=0.5, pos_weight=4.0
        ),
        (logits, rep),
    )


# ---------------------------------------------------------------------------------------------- OCFM
def _ocfm_ref(f: Tensor, f_old: Tensor, mask: Tensor) -> float:
    m = F.interpolate(mask.double()[:, None], size=f.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    num = sum(
        float(m[b, i, j]) * float(((f[b, :, i, j] - f_old[b, :, i, j]) ** 2).sum())
        for b in range(f.shape[0])
        for i in range(f.shape[2])
        for j in range(f.shape[3])
    )
    return num / (float(m.sum()) * f.shape[1])


def test_ocfm_matches_the_reference() -> None:
    g = _gen(7)
    f, f_old = (torch.randn(2, 5, 4, 6, dtype=torch.float64, generator=g) for _ in range(2))
    mask = torch.rand(2, 16, 24, generator=g) > 0.6
    assert abs(float(ocfm_loss(f, f_old, mask)) - _ocfm_ref(f, f_old, mask)) < 1e-12


def test_ocfm_of_an_empty_mask_is_a_connected_zero() -> None:
    f = torch.randn(1, 3, 4, 4, requires_grad=True)
    out = ocfm_loss(f, torch.randn(1, 3, 4, 4), torch.zeros(1, 8, 8, dtype=torch.bool))
    out.backward()
    assert float(out.detach()) == 0.0 and f.grad is not None


@settings(deadline=None, max_examples=30)
@given(st.floats(0.01, 100), st.integers(0, 1000))
def test_ocfm_is_non_negative_zero_at_equality_and_invariant_to_mask_scale(scale: float, seed: int) -> None:
    g = _gen(seed)
    f, f_old = (torch.randn(1, 3, 4, 4, dtype=torch.float64, generator=g) for _ in range(2))
    mask = torch.rand(1, 4, 4, dtype=torch.float64, generator=g) + 0.01
    assert float(ocfm_loss(f, f_old, mask)) >= 0
    assert float(ocfm_loss(f, f, mask)) == 0
    torch.testing.assert_close(ocfm_loss(f, f_old, mask * scale), ocfm_loss(f, f_old, mask), rtol=1e-12, atol=0)


def test_ocfm_sends_no_gradient_to_the_old_features() -> None:
    f, f_old = torch.randn(1, 2, 3, 3, requires_grad=True), torch.randn(1, 2, 3, 3, requires_grad=True)
    ocfm_loss(f, f_old, torch.ones(1, 3, 3, dtype=torch.bool)).backward()
    assert f.grad is not None and f_old.grad is None


# ---------------------------------------------------------------------------------------------- SAD
def _sad_ref(f: Tensor, labels: Tensor, protos: Tensor, n_old: int, k: int) -> float:
    unit = f / f.norm(dim=1, keepdim=True)
    values = []
    for c in range(n_old, k):
        m = F.interpolate((labels == c).double()[:, None], size=f.shape[-2:], mode="bilinear", align_corners=False)
        s = (unit * m).sum(dim=(0, 2, 3))
        norm = float(s.norm())
        centre = s / norm if norm > 1e-12 else torch.zeros_like(s)
        values.append(1 / min(float((centre - p).norm()) for p in protos))
    return sum(values) / len(values)


def test_sad_matches_the_reference_absent_class_included() -> None:
    g = _gen(9)
    f = torch.randn(2, 4, 3, 3, dtype=torch.float64, generator=g)
    labels = torch.randint(0, 5, (2, 12, 12), generator=g)  # class 5 (of k = 6) never occurs
    protos = F.normalize(torch.randn(3, 4, dtype=torch.float64, generator=g), dim=1)
    got = sad_loss(f, labels, protos, num_old_classes=4, num_classes=6)
    assert abs(float(got) - _sad_ref(f, labels, protos, 4, 6)) < 1e-12


def test_sad_leaves_out_invalid_prototypes() -> None:
    g = _gen(10)
    f = torch.randn(1, 4, 3, 3, dtype=torch.float64, generator=g)
    labels = torch.full((1, 6, 6), 3)
    protos = F.normalize(torch.randn(3, 4, dtype=torch.float64, generator=g), dim=1)
    valid = torch.tensor([True, False, True])
    got = sad_loss(f, labels, protos, num_old_classes=3, num_classes=4, valid=valid)
    assert abs(float(got) - _sad_ref(f, labels, protos[valid], 3, 4)) < 1e-12
    none = sad_loss(f, labels, protos, num_old_classes=3, num_classes=4, valid=torch.zeros(3, dtype=torch.bool))
    assert float(none) == 0.0


@settings(deadline=None, max_examples=30)
@given(st.floats(0.01, 100), st.integers(0, 1000))
def test_sad_is_invariant_to_a_positive_scale_of_the_features(scale: float, seed: int) -> None:
    g = _gen(seed)
    f = torch.randn(1, 3, 4, 4, dtype=torch.float64, generator=g)
    labels = torch.randint(0, 4, (1, 8, 8), generator=g)
    protos = F.normalize(torch.randn(2, 3, dtype=torch.float64, generator=g), dim=1)
    a = sad_loss(f, labels, protos, num_old_classes=2, num_classes=4)
    b = sad_loss(f * scale, labels, protos, num_old_classes=2, num_classes=4)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert float(a) > 0


# ---------------------------------------------------------------------------------------------- replay, statistics
def test_replay_features_without_spread_are_the_scaled_prototypes() -> None:
    p = F.normalize(torch.randn(3, 4, dtype=torch.float64, generator=_gen()), dim=1)
    mean = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    feats, rows = replay_features(p, torch.zeros_like(p), mean, torch.zeros(3), torch.tensor([2, 0, 3]))
    assert rows.tolist() == [0, 0, 2, 2, 2]
    torch.testing.assert_close(feats, p[rows] * mean[rows, None], rtol=0, atol=0)


def test_replay_features_follow_the_release_sampling() -> None:
    """(p + eps * sigma) * r, r ~ N(mu, s): the sample mean is p mu, the norm spread follows s."""
    g = _gen(11)
    p = F.normalize(torch.randn(2, 3, dtype=torch.float64, generator=g), dim=1)
    sigma = torch.full((2, 3), 0.1, dtype=torch.float64)
    mean, std = torch.tensor([4.0, 2.0], dtype=torch.float64), torch.tensor([0.5, 0.1], dtype=torch.float64)
    feats, rows = replay_features(p, sigma, mean, std, torch.tensor([20000, 20000]), generator=_gen(12))
    for j in range(2):
        torch.testing.assert_close(feats[rows == j].mean(dim=0), p[j] * mean[j], rtol=0, atol=0.03)
    same, _ = replay_features(p, sigma, mean, std, torch.tensor([20000, 20000]), generator=_gen(12))
    assert torch.equal(same, feats)


def _release_statistics(features: list[Tensor], labels: list[Tensor], k: int) -> tuple[Tensor, ...]:
    """base_trainer.py compute_prototypes / compute_noise: one pass for the prototypes and norms, a second
    for the spread around the final prototypes (float64, explicit loops over pixels)."""
    c = features[0].shape[1]
    sums, vectors = torch.zeros(k, c, dtype=torch.float64), {j: [] for j in range(k)}
    for f, lab in zip(features, labels):
        small = sample_labels(lab, f.shape[-2:])
        for b in range(f.shape[0]):
            for i in range(f.shape[2]):
                for j in range(f.shape[3]):
                    cls = int(small[b, i, j])
                    if cls < k:
                        sums[cls] += f[b, :, i, j] / f[b, :, i, j].norm()
                        vectors[cls].append(f[b, :, i, j])
    proto = torch.zeros(k, c, dtype=torch.float64)
    noise, mean, std = torch.zeros(k, c, dtype=torch.float64), torch.zeros(k, dtype=torch.float64), torch.zeros(k)
    std = std.double()
    for j in range(k):
        if not vectors[j]:
            continue
        proto[j] = sums[j] / sums[j].norm()
        stacked = torch.stack(vectors[j])
        unit = stacked / stacked.norm(dim=1, keepdim=True)
        noise[j] = ((unit - proto[j]) ** 2).mean(dim=0).sqrt()
        norms = stacked.norm(dim=1)
        mean[j] = norms.mean()
        std[j] = norms.std() if len(norms) > 1 else 0.0
    return proto, noise, mean, std


def test_statistics_match_the_release_two_pass_computation() -> None:
    g = _gen(13)
    features = [torch.randn(2, 5, 3, 4, dtype=torch.float64, generator=g) + 1 for _ in range(2)]
    labels = [torch.randint(0, 5, (2, 12, 16), generator=g) for _ in range(2)]
    labels[0][0, :6] = 255
    stats = class_feature_statistics(features[0], labels[0], 4) + class_feature_statistics(features[1], labels[1], 4)
    got = prototypes_from_statistics(stats)
    for a, b in zip(got, _release_statistics(features, labels, 4)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@settings(deadline=None, max_examples=20)
@given(st.integers(1, 5), st.integers(0, 1000))
def test_statistics_of_split_batches_add_up(split: int, seed: int) -> None:
    g = _gen(seed)
    f = torch.randn(6, 3, 2, 2, dtype=torch.float64, generator=g)
    labels = torch.randint(0, 4, (6, 4, 4), generator=g)
    whole = class_feature_statistics(f, labels, 4)
    parts = class_feature_statistics(f[:split], labels[:split], 4) + class_feature_statistics(
        f[split:], labels[split:], 4
    )
    for a, b in zip(whole, parts):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert float(whole.pixels.sum()) == 6 * 4


def test_statistics_of_an_absent_class_are_zero() -> None:
    stats = class_feature_statistics(torch.randn(1, 3, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long), 3)
    proto, noise, mean, std = prototypes_from_statistics(stats)
    assert proto[1:].abs().sum() == 0 and noise[1:].abs().sum() == 0 and mean[1:].sum() == 0 and std[1:].sum() == 0
    torch.testing.assert_close(proto[0].norm(), torch.tensor(1.0, dtype=torch.float64))
