"""Tests of the gradient balance of L_AD on the weights (``ad_balance_on="weights"``, the default) and of
``new_class_loss``, its reference: float64 references written out with separate graphs, and properties."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from incseg.functional import attentive_distillation_loss
from incseg.losses import CAFLoss
from incseg.losses.attentive import (
    WeightBalance,
    _trainable_leaves,
    new_class_loss,
    weight_balanced_ad_weight,
    weighted_ad_term,
)

CZ, CH, K, N_OLD = 16, 8, 6, 4


class _Net(nn.Module):
    """z -> h -> logits: the refiner is trained by both L_new and L_AD, the classifier by L_new only."""

    def __init__(self) -> None:
        super().__init__()
        self.refiner = nn.Conv2d(CZ, CH, 3, padding=1)
        self.classifier = nn.Conv2d(CH, K, 1)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.tanh(self.refiner(z))
        return h, self.classifier(h)


def _setup(seed: int, *, new: bool = True):
    g = torch.Generator().manual_seed(seed)
    net = _Net().double()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5)
    z = torch.randn(2, CZ, 5, 5, generator=g, dtype=torch.float64).requires_grad_(True)
    z_old = torch.randn(2, CZ, 5, 5, generator=g, dtype=torch.float64)
    h_old = torch.randn(2, CH, 5, 5, generator=g, dtype=torch.float64)
    labels = torch.randint(0, K if new else N_OLD, (2, 5, 5), generator=g)
    labels[0, 0, 0] = 255  # one ignored pixel
    old_logits = torch.randn(2, N_OLD, 5, 5, generator=g, dtype=torch.float64)
    return net, z, z_old, h_old, labels, old_logits


def _run(criterion: CAFLoss, net, z, z_old, h_old, labels, old_logits):
    h, logits = net(z)
    out = criterion(
        logits, labels, num_old_classes=N_OLD, old_logits=old_logits,
        features={"z": z, "h": h}, old_features={"z": z_old, "h": h_old},
    )  # fmt: skip
    return out


def _reference(criterion: CAFLoss, net, z, z_old, h_old, labels, old_logits, kappa: float, lam: float):
    """λ = min(λ_AD, κ ||∇ L_new|| / ||∇ L_AD||) over the leaves both train (z and the refiner), by hand."""
    plain = CAFLoss(CZ, CH, ad=None, lambda_d=criterion.lambda_d).double()
    h, logits = net(z)
    task = plain(logits, labels, num_old_classes=N_OLD, old_logits=old_logits).loss
    # L_new written out: -log softmax of the label on new-class pixels, over the labelled pixels
    logp = F.log_softmax(logits, dim=1)
    counted = labels != 255
    new = counted & (labels >= N_OLD)
    picked = logp.gather(1, torch.where(new, labels, 0).unsqueeze(1)).squeeze(1)
    l_new = -(picked * new).sum() / counted.sum()
    ad = criterion.ad_loss
    keep = (~new).double().unsqueeze(1)  # ad_on_new=False at the labels' (= features') resolution
    l_ad = attentive_distillation_loss(z, z_old, ad.se_z, weight=keep) + attentive_distillation_loss(
        h, h_old, ad.se_h, weight=keep
    )
    shared = [z, net.refiner.weight, net.refiner.bias]
    g_new = torch.autograd.grad(l_new, shared, retain_graph=True)
    g_ad = torch.autograd.grad(l_ad, shared, retain_graph=True)
    n_new = torch.sqrt(sum(g.square().sum() for g in g_new))
    n_ad = torch.sqrt(sum(g.square().sum() for g in g_ad))
    inner = sum((a * b).sum() for a, b in zip(g_ad, g_new))
    weight = min(lam, kappa * n_new.item() / n_ad.item())
    return (
        weight,
        task,
        l_ad,
        l_new,
        weight * n_ad.item() / n_new.item(),
        max(0.0, -weight * inner.item()) / n_new.item() ** 2,
    )


@pytest.mark.parametrize("kappa", [0.01, 0.1, 1.0, 1e6])
def test_weight_balance_matches_float64_reference(kappa: float) -> None:
    net, z, z_old, h_old, labels, old_logits = _setup(0)
    criterion = CAFLoss(CZ, CH, ad_balance=kappa, lambda_ad=1000.0, ad_on_new=False).double()
    assert criterion.ad_balance_on == "weights"  # the default
    out = _run(criterion, net, z, z_old, h_old, labels, old_logits)
    weight, task, l_ad, _, pull, cancel = _reference(criterion, net, z, z_old, h_old, labels, old_logits, kappa, 1000.0)
    torch.testing.assert_close(out.stats["lambda_ad"].item(), weight, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(out.loss, task + weight * l_ad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.stats["ad_pull"].item(), pull, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(out.stats["ad_cancel"].item(), cancel, rtol=1e-9, atol=1e-12)


def test_weight_balance_is_a_constant_in_the_graph() -> None:
    """The backward pass of the total sees λ as a number: ∇ = ∇task + λ ∇L_AD."""
    net, z, z_old, h_old, labels, old_logits = _setup(1)
    criterion = CAFLoss(CZ, CH, ad_balance=0.3, ad_on_new=False).double()
    out = _run(criterion, net, z, z_old, h_old, labels, old_logits)
    (g_total,) = torch.autograd.grad(out.loss, z)
    weight, task, l_ad, _, _, _ = _reference(criterion, net, z, z_old, h_old, labels, old_logits, 0.3, 1000.0)
    (g_ref,) = torch.autograd.grad(task + weight * l_ad, z)
    torch.testing.assert_close(g_total, g_ref, rtol=1e-9, atol=1e-12)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**16), kappa=st.floats(1e-3, 10.0))
def test_weight_pull_and_cancelled_share_never_exceed_kappa(seed: int, kappa: float) -> None:
    net, z, z_old, h_old, labels, old_logits = _setup(seed)
    out = _run(CAFLoss(CZ, CH, ad_balance=kappa).double(), net, z, z_old, h_old, labels, old_logits)
    if not (labels >= N_OLD).logical_and(labels != 255).any():
        return  # no new pixel drawn: covered by the test below
    assert out.stats["ad_pull"].item() <= kappa * (1 + 1e-9)
    assert 0.0 <= out.stats["ad_cancel"].item() <= kappa * (1 + 1e-9)  # |<a, n>| <= |a||n| <= κ |n|²


def test_no_new_pixel_means_no_distillation() -> None:
    """A batch without new-class pixels has no new classes to protect from: λ = 0, the loss is the task's."""
    net, z, z_old, h_old, labels, old_logits = _setup(2, new=False)
    criterion = CAFLoss(CZ, CH, ad_balance=0.1).double()
    out = _run(criterion, net, z, z_old, h_old, labels, old_logits)
    plain = CAFLoss(CZ, CH, ad=None).double()
    _h, logits = net(z)
    expected = plain(logits, labels, num_old_classes=N_OLD, old_logits=old_logits).loss
    assert out.stats["lambda_ad"].item() == 0.0
    torch.testing.assert_close(out.loss, expected, rtol=1e-12, atol=1e-12)


def test_without_a_graph_the_fixed_weight_is_used() -> None:
    net, z, z_old, h_old, labels, old_logits = _setup(3)
    criterion = CAFLoss(CZ, CH, ad_balance=0.5, lambda_ad=7.0, ad_on_new=False).double()
    with torch.no_grad():
        out = _run(criterion, net, z, z_old, h_old, labels, old_logits)
    _, task, l_ad, _, _, _ = _reference(criterion, net, z, z_old, h_old, labels, old_logits, 0.5, 7.0)
    torch.testing.assert_close(out.loss, (task + 7.0 * l_ad).detach(), rtol=1e-10, atol=1e-12)
    assert "ad_pull" not in out.stats


def test_trainable_leaves_are_what_backward_writes_into() -> None:
    net, z, *_ = _setup(4)
    h, logits = net(z)
    assert set(_trainable_leaves(logits.sum())) == {id(z), *(id(p) for p in net.parameters())}
    assert set(_trainable_leaves(h.sum())) == {id(z), id(net.refiner.weight), id(net.refiner.bias)}
    with torch.no_grad():
        frozen = net.refiner.weight * 2  # no graph: a constant, not a leaf to train
    assert set(_trainable_leaves((h * frozen.sum()).sum())) == set(_trainable_leaves(h.sum()))
    assert all(_trainable_leaves(h.sum())[key] is leaf for key, leaf in ((id(z), z),))


def test_only_the_shared_leaves_count() -> None:
    """Parameters trained by one loss only (the classifier: L_new only; an SE block: L_AD only) do not enter."""
    net, z, _z_old, h_old, labels, _old_logits = _setup(5)
    h, logits = net(z)
    l_new = new_class_loss(logits, labels, N_OLD)
    extra = nn.Parameter(torch.ones((), dtype=torch.float64))  # trains L_AD only: a large gradient, no effect
    l_ad = ((h - h_old) ** 2).mean() * (1 + 1e6 * extra)
    weight, _ = weight_balanced_ad_weight(l_new, l_ad, lambda_ad=1e9, kappa=1.0)
    shared = [z, net.refiner.weight, net.refiner.bias]
    n_new = torch.sqrt(sum(g.square().sum() for g in torch.autograd.grad(l_new, shared, retain_graph=True)))
    n_ad = torch.sqrt(sum(g.square().sum() for g in torch.autograd.grad(l_ad, shared, retain_graph=True)))
    torch.testing.assert_close(weight.item(), (n_new / n_ad).item(), rtol=1e-9, atol=0.0)


def test_new_class_loss_is_the_new_pixels_share_of_the_cross_entropy_float64() -> None:
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(2, K, 4, 4, generator=g, dtype=torch.float64)
    labels = torch.randint(0, K, (2, 8, 8), generator=g)
    labels[1, :2] = 255
    up = F.interpolate(logits, size=(8, 8), mode="bilinear", align_corners=False)
    per_pixel = F.cross_entropy(up, labels, ignore_index=255, reduction="none")
    counted = labels != 255
    expected = (per_pixel * (counted & (labels >= N_OLD))).sum() / counted.sum()
    torch.testing.assert_close(new_class_loss(logits, labels, N_OLD), expected, rtol=1e-12, atol=1e-12)
    # with no old class every labelled pixel is new: the mean cross-entropy
    torch.testing.assert_close(new_class_loss(logits, labels, 0), F.cross_entropy(up, labels, ignore_index=255))
    assert new_class_loss(logits, torch.full((2, 8, 8), 255), N_OLD).item() == 0.0


def test_weighted_ad_term_refuses_an_unknown_place_and_a_missing_reference() -> None:
    loss = torch.ones((), requires_grad=True)
    with pytest.raises(ValueError, match="ad_balance_on"):
        weighted_ad_term(loss, (loss, loss), (loss, loss), lambda_ad=1.0, kappa=0.1, balance_on="logits")
    with pytest.raises(ValueError, match="reference"):
        weighted_ad_term(loss, (loss, loss), (loss, loss), lambda_ad=1.0, kappa=0.1, balance_on="weights")
    with pytest.raises(ValueError, match="ad_balance_on"):
        CAFLoss(CZ, CH, ad_balance=0.1, ad_balance_on="both")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_weight_balance_under_autocast_is_close_to_float32(dtype: torch.dtype) -> None:
    """Under autocast (half precision activations) the balance finds the float32 weight within half precision's
    rounding."""
    torch.manual_seed(7)
    net = _Net().float()
    z = (torch.randn(2, CZ, 5, 5) * 1e-2).requires_grad_(True)  # small features: small gradients
    z_old, h_old = torch.randn(2, CZ, 5, 5) * 1e-2, torch.zeros(2, CH, 5, 5)
    labels = torch.randint(0, K, (2, 5, 5), generator=torch.Generator().manual_seed(7))
    old_logits = torch.randn(2, N_OLD, 5, 5)
    criterion = CAFLoss(CZ, CH, ad_balance=0.1, ad_on_new=False)
    full = _run(criterion, net, z, z_old, h_old, labels, old_logits).stats["lambda_ad"].item()
    with torch.autocast("cpu", dtype=dtype):
        half = _run(criterion, net, z, z_old, h_old, labels, old_logits).stats["lambda_ad"].item()
    assert full > 0
    assert half == pytest.approx(full, rel=0.1)


# ----------------------------------------------------------------------------- WeightBalance: refresh and state


def _losses(seed: int):
    net, z, z_old, h_old, labels, _ = _setup(seed)
    h, logits = net(z)
    return new_class_loss(logits, labels, N_OLD), ((h - h_old) ** 2).mean() + ((z - z_old) ** 2).mean()


def test_balance_every_1_is_the_weight_of_every_batch() -> None:
    balance = WeightBalance(every=1)
    for seed in range(3):
        ref, ad = _losses(seed)
        got, stats = balance(ref, ad, lambda_ad=1e3, kappa=0.1, num_old_classes=N_OLD)
        want, want_stats = weight_balanced_ad_weight(ref, ad, lambda_ad=1e3, kappa=0.1)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert stats.keys() == want_stats.keys()


def test_balance_refreshes_every_n_calls_and_at_a_new_step() -> None:
    balance = WeightBalance(every=3)
    fresh = [weight_balanced_ad_weight(*_losses(s), lambda_ad=1e3, kappa=0.1)[0].item() for s in range(6)]
    assert len(set(fresh)) == 6  # every batch has its own weight
    got = [balance(*_losses(s), lambda_ad=1e3, kappa=0.1, num_old_classes=N_OLD)[0].item() for s in range(5)]
    assert got == [fresh[0], fresh[0], fresh[0], fresh[3], fresh[3]]
    with torch.no_grad():  # evaluation: the fixed weight, and the count does not move
        assert balance(*_losses(9), lambda_ad=7.0, kappa=0.1, num_old_classes=N_OLD)[0].item() == 7.0
    assert balance(*_losses(5), lambda_ad=1e3, kappa=0.1, num_old_classes=N_OLD)[0].item() == fresh[3]
    # a new step (other old classes) refreshes at once and restarts the count
    assert balance(*_losses(4), lambda_ad=1e3, kappa=0.1, num_old_classes=N_OLD + 1)[0].item() != fresh[3]


def test_balance_state_resumes_where_it_stopped() -> None:
    """A criterion saved after 2 calls and loaded into a new one refreshes at the same calls as the original."""
    a = WeightBalance(every=3)
    for s in range(2):
        a(*_losses(s), lambda_ad=1e3, kappa=0.1, num_old_classes=N_OLD)
    b = WeightBalance(every=3)
    b.load_state_dict(a.state_dict())
    for s in range(2, 6):
        wa = a(*_losses(s), lambda_ad=1e3, kappa=0.1, num_old_classes=N_OLD)[0]
        wb = b(*_losses(s), lambda_ad=1e3, kappa=0.1, num_old_classes=N_OLD)[0]
        torch.testing.assert_close(wa, wb, rtol=0, atol=0)
    assert set(a.state_dict()) == {"_extra_state"} and a.state_dict()["_extra_state"].dtype == torch.float64


def test_a_checkpoint_without_the_balance_state_loads_and_starts_afresh() -> None:
    """incseg 0.2 saved CAFLoss without it: the load is strict about everything else and refreshes at once."""
    criterion = CAFLoss(CZ, CH, ad_balance=0.1)
    old = {k: v for k, v in criterion.state_dict().items() if not k.endswith("balance._extra_state")}
    assert len(old) == len(criterion.state_dict()) - 1
    criterion.load_state_dict(old, strict=True)
    with pytest.raises(RuntimeError, match="Missing"):
        criterion.load_state_dict({k: v for k, v in old.items() if "se_h" not in k}, strict=True)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_bad_ad_balance_every(bad: object) -> None:
    from incseg.learner import MethodConfig

    with pytest.raises((ValueError, TypeError), match="ad_balance_every"):
        CAFLoss(CZ, CH, ad_balance=0.1, ad_balance_every=bad)  # type: ignore[arg-type]
    with pytest.raises((ValueError, TypeError), match="ad_balance_every"):
        MethodConfig.preset("caf", ad_balance_every=bad)


def test_a_reference_function_is_only_called_at_a_refresh() -> None:
    """CAFLoss passes L_new as a function: the cross-entropy of the new pixels is computed 1 time in ``every``."""
    balance = WeightBalance(every=4)
    calls = []
    weights = []
    for s in range(6):
        ref, ad = _losses(s)

        def compute(ref: torch.Tensor = ref, s: int = s) -> torch.Tensor:
            calls.append(s)
            return ref

        weights.append(balance(compute, ad, lambda_ad=1e3, kappa=0.1, num_old_classes=N_OLD)[0].item())
    assert calls == [0, 4]
    want = [weight_balanced_ad_weight(*_losses(s), lambda_ad=1e3, kappa=0.1)[0].item() for s in (0, 4)]
    assert weights == [want[0]] * 4 + [want[1]] * 2
