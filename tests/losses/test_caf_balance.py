"""Tests of CAFLoss's stabilisers: the gradient-balanced weight of L_AD (``ad_balance``; on the features here, on the
weights in test_weight_balance.py) and the bound on γ."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from incseg.functional import attentive_distillation_loss, balanced_kd_loss, gamma_balance
from incseg.losses import CAFLoss

CZ, CH, K, N_OLD = 16, 8, 6, 4


class _Net(nn.Module):
    """z -> h -> logits, so that the features are ancestors of the logits as in a segmenter."""

    def __init__(self) -> None:
        super().__init__()
        self.refiner = nn.Conv2d(CZ, CH, 1)
        self.classifier = nn.Conv2d(CH, K, 1)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.tanh(self.refiner(z))
        return h, self.classifier(h)


def _setup(seed: int, dtype: torch.dtype = torch.float64, scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    net = _Net().to(dtype)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=dtype) * 0.5)
    z = (torch.randn(2, CZ, 5, 5, generator=g, dtype=dtype) * scale).requires_grad_(True)
    z_old = torch.randn(2, CZ, 5, 5, generator=g, dtype=dtype) * scale
    h_old = torch.randn(2, CH, 5, 5, generator=g, dtype=dtype)
    labels = torch.randint(0, K, (2, 5, 5), generator=g)
    old_logits = torch.randn(2, N_OLD, 5, 5, generator=g, dtype=dtype)
    return net, z, z_old, h_old, labels, old_logits


def _run(criterion: CAFLoss, net, z, z_old, h_old, labels, old_logits):
    h, logits = net(z)
    out = criterion(
        logits, labels, num_old_classes=N_OLD, old_logits=old_logits,
        features={"z": z, "h": h}, old_features={"z": z_old, "h": h_old},
    )  # fmt: skip
    return out, h, logits


def _reference_weights(criterion: CAFLoss, net, z, z_old, h_old, labels, old_logits, kappa, lam):
    """λ_m = min(λ, κ ||∂L_task/∂m|| / ||∂L_AD(m)/∂m||), written out with separate float64 graphs."""
    plain = CAFLoss(CZ, CH, ad=None, lambda_d=criterion.lambda_d).double()
    h, logits = net(z)
    task = plain(logits, labels, num_old_classes=N_OLD, old_logits=old_logits).loss
    g_task = torch.autograd.grad(task, [z, h], retain_graph=True)
    ad = criterion.ad_loss
    loss_z = attentive_distillation_loss(z, z_old, ad.se_z)
    loss_h = attentive_distillation_loss(h, h_old, ad.se_h)
    (g_z,) = torch.autograd.grad(loss_z, z, retain_graph=True)
    (g_h,) = torch.autograd.grad(loss_h, h, retain_graph=True)
    lam_z = min(lam, kappa * g_task[0].norm().item() / g_z.norm().item())
    lam_h = min(lam, kappa * g_task[1].norm().item() / g_h.norm().item())
    return lam_z, lam_h, task, loss_z, loss_h


@pytest.mark.parametrize("kappa", [0.01, 0.5, 1.0, 1e6])
def test_balanced_weights_match_float64_reference(kappa: float) -> None:
    net, z, z_old, h_old, labels, old_logits = _setup(0)
    criterion = CAFLoss(CZ, CH, ad_balance_on="features", ad_balance=kappa, lambda_ad=1000.0).double()
    out, _, _ = _run(criterion, net, z, z_old, h_old, labels, old_logits)
    lam_z, lam_h, task, loss_z, loss_h = _reference_weights(
        criterion, net, z, z_old, h_old, labels, old_logits, kappa, 1000.0
    )
    expected = task + lam_z * loss_z + lam_h * loss_h
    torch.testing.assert_close(out.loss, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.stats["lambda_ad"].item(), 0.5 * (lam_z + lam_h), rtol=1e-10, atol=0)
    if kappa == 1e6:  # the cap does not bind: the paper's fixed weight
        assert lam_z == lam_h == 1000.0


def test_balance_weights_are_constants_in_the_graph() -> None:
    """The weights are detached: the gradient of the loss is λ_m times the gradient of each AD term."""
    net, z, z_old, h_old, labels, old_logits = _setup(1)
    criterion = CAFLoss(CZ, CH, ad_balance_on="features", ad_balance=0.3).double()
    out, _, _ = _run(criterion, net, z, z_old, h_old, labels, old_logits)
    (grad,) = torch.autograd.grad(out.loss, z)
    lam_z, lam_h, task, loss_z, loss_h = _reference_weights(
        criterion, net, z, z_old, h_old, labels, old_logits, 0.3, 1000.0
    )
    (expected,) = torch.autograd.grad(task + lam_z * loss_z + lam_h * loss_h, z)
    torch.testing.assert_close(grad, expected, rtol=1e-9, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    kappa=st.floats(1e-3, 10.0),
    scale=st.sampled_from([1e-2, 1.0, 1e3]),
)
def test_balanced_pull_never_exceeds_kappa_times_the_task(seed: int, kappa: float, scale: float) -> None:
    """||λ_m ∂L_AD(m)/∂m|| <= κ ||∂L_task/∂m|| for both maps, whatever the feature scale."""
    net, z, z_old, h_old, labels, old_logits = _setup(seed, scale=scale)
    criterion = CAFLoss(CZ, CH, ad_balance_on="features", ad_balance=kappa, lambda_ad=1e4).double()
    lam_z, _lam_h, task, loss_z, _loss_h = _reference_weights(
        criterion, net, z, z_old, h_old, labels, old_logits, kappa, 1e4
    )
    out, _h, _ = _run(criterion, net, z, z_old, h_old, labels, old_logits)
    assert out.stats["lambda_ad"].item() <= 1e4
    (g_task,) = torch.autograd.grad(task, z, retain_graph=True)
    (g_ad,) = torch.autograd.grad(lam_z * loss_z, z)
    assert g_ad.norm() <= kappa * g_task.norm() * (1 + 1e-9)


def test_balance_falls_back_to_the_fixed_weight_without_a_graph() -> None:
    """Features that are not ancestors of the logits (a drop-in use) or no gradients: the fixed λ_AD."""
    _net, z, z_old, h_old, labels, old_logits = _setup(2)
    criterion = CAFLoss(CZ, CH, ad_balance_on="features", ad_balance=0.5, lambda_ad=7.0).double()
    fixed = CAFLoss(CZ, CH, lambda_ad=7.0).double()
    fixed.load_state_dict(criterion.state_dict())
    logits = torch.randn(2, K, 5, 5, dtype=torch.float64)
    h = torch.randn(2, CH, 5, 5, dtype=torch.float64)
    kw = {"num_old_classes": N_OLD, "old_logits": old_logits, "old_features": {"z": z_old, "h": h_old}}
    with torch.no_grad():
        a = criterion(logits, labels, features={"z": z, "h": h}, **kw)
        b = fixed(logits, labels, features={"z": z, "h": h}, **kw)
    torch.testing.assert_close(a.loss, b.loss)
    assert a.stats["lambda_ad"].item() == 7.0


def test_identical_features_do_not_bind_the_cap() -> None:
    net, z, _, _, labels, old_logits = _setup(3)
    criterion = CAFLoss(CZ, CH, ad_balance_on="features", ad_balance=1.0, ad="plain").double()
    h, logits = net(z)
    out = criterion(
        logits, labels, num_old_classes=N_OLD, old_logits=old_logits,
        features={"z": z, "h": h}, old_features={"z": z.detach(), "h": h.detach()},
    )  # fmt: skip
    assert out.stats["lambda_ad"].item() == 1000.0
    assert out.terms["ad"].item() == 0.0
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("bad", [0, -1.0, float("inf"), float("nan"), True, "1"])
def test_bad_ad_balance_and_gamma_max(bad: object) -> None:
    with pytest.raises(ValueError, match="ad_balance"):
        CAFLoss(CZ, CH, ad_balance_on="features", ad_balance=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="gamma_max"):
        CAFLoss(CZ, CH, gamma_max=bad)  # type: ignore[arg-type]


def _bkd_reference(logits, old_logits, gamma_max, new_pixels=None):
    """Balanced KD (eq. 9-12, class mean) in float64 with γ bounded by ``gamma_max``; γ = 1 where ``new_pixels``."""
    x, x_old = logits.double(), old_logits.double()
    n_old = x_old.shape[1]
    p = x.softmax(dim=1)
    q = x_old.softmax(dim=1)
    phi_hat = torch.cat([p[:, :1] + p[:, n_old:].sum(dim=1, keepdim=True), p[:, 1:n_old]], dim=1)
    q_bar = x_old.mean(dim=(2, 3)).softmax(dim=1)
    gamma = ((1 - q_bar[:, 0]) / q_bar[:, 0]).clamp(max=gamma_max)
    loss_b = -q[:, 0] * phi_hat[:, 0].log()
    loss_n = -(q[:, 1:] * phi_hat[:, 1:].log()).sum(dim=1)
    gamma = gamma.view(-1, 1, 1).expand_as(loss_b)
    if new_pixels is not None:
        gamma = torch.where(new_pixels, torch.ones_like(gamma), gamma)
    return ((gamma * loss_b + loss_n) / n_old).mean()


@pytest.mark.parametrize("gamma_max", [0.25, 1.0, 100.0])
def test_gamma_max_bounds_gamma_float64(gamma_max: float) -> None:
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(3, K, 4, 4, generator=g, dtype=torch.float64)
    old_logits = torch.randn(3, N_OLD, 4, 4, generator=g, dtype=torch.float64)
    old_logits[0, 0] += 4.0  # background-dominated image: γ < 1
    old_logits[1, 0] -= 4.0  # object-dominated image: γ > 1
    labels = torch.randint(0, K, (3, 4, 4), generator=g)
    criterion = CAFLoss(None, None, ad=None, gamma_max=gamma_max, lambda_d=1.0).double()
    plain = CAFLoss(None, None, ad=None, kd=None).double()
    out = criterion(logits, labels, num_old_classes=N_OLD, old_logits=old_logits)
    seg = plain(logits, labels, num_old_classes=N_OLD).loss
    torch.testing.assert_close(out.loss - seg, _bkd_reference(logits, old_logits, gamma_max), rtol=1e-10, atol=1e-12)
    gamma = gamma_balance(old_logits)
    assert gamma[1] > 1 > gamma[0]


@pytest.mark.parametrize("gamma_max", [None, 1.0])
def test_gamma_on_new_false_keeps_unbiased_kd_on_new_pixels_float64(gamma_max: float | None) -> None:
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(3, K, 4, 4, generator=g, dtype=torch.float64)
    old_logits = torch.randn(3, N_OLD, 4, 4, generator=g, dtype=torch.float64)
    old_logits[0, 0] += 4.0  # γ < 1
    old_logits[1, 0] -= 4.0  # γ > 1
    labels = torch.randint(0, K, (3, 4, 4), generator=g)
    labels[2, 0] = 255  # ignored pixels are not new: they keep γ (and count in L_D, as every pixel does)
    criterion = CAFLoss(None, None, ad=None, gamma_max=gamma_max, gamma_on_new=False, lambda_d=1.0).double()
    seg = CAFLoss(None, None, ad=None, kd=None).double()(logits, labels, num_old_classes=N_OLD).loss
    out = criterion(logits, labels, num_old_classes=N_OLD, old_logits=old_logits)
    new_pixels = (labels >= N_OLD) & (labels != 255)
    expected = _bkd_reference(logits, old_logits, gamma_max or float("inf"), new_pixels)
    torch.testing.assert_close(out.loss - seg, expected, rtol=1e-10, atol=1e-12)
    # no new pixel: the paper's balanced KD; every pixel new: MiB's unbiased KD
    old_only = labels.clamp(max=N_OLD - 1)
    paper = CAFLoss(None, None, ad=None, gamma_max=gamma_max, lambda_d=1.0).double()
    torch.testing.assert_close(
        criterion(logits, old_only, num_old_classes=N_OLD, old_logits=old_logits).loss,
        paper(logits, old_only, num_old_classes=N_OLD, old_logits=old_logits).loss,
    )
    all_new = torch.full_like(labels, N_OLD)
    mib = CAFLoss(None, None, ad=None, kd="unbiased", lambda_d=1.0).double()
    torch.testing.assert_close(
        criterion(logits, all_new, num_old_classes=N_OLD, old_logits=old_logits).loss,
        mib(logits, all_new, num_old_classes=N_OLD, old_logits=old_logits).loss,
    )


def test_gamma_on_new_must_be_bool() -> None:
    with pytest.raises(ValueError, match="gamma_on_new"):
        CAFLoss(None, None, ad=None, gamma_on_new=1)  # type: ignore[arg-type]


def test_gamma_max_none_is_the_paper() -> None:
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(2, K, 4, 4, generator=g)
    old_logits = torch.randn(2, N_OLD, 4, 4, generator=g)
    labels = torch.randint(0, K, (2, 4, 4), generator=g)
    out = CAFLoss(None, None, ad=None, lambda_d=1.0)(logits, labels, num_old_classes=N_OLD, old_logits=old_logits)
    seg = CAFLoss(None, None, ad=None, kd=None)(logits, labels, num_old_classes=N_OLD).loss
    torch.testing.assert_close(out.loss - seg, balanced_kd_loss(logits, old_logits))


@pytest.mark.parametrize("kappa", [0.1, 1.0])
def test_ad_opposition_is_the_cancelled_share_of_the_task_descent_float64(kappa: float) -> None:
    net, z, z_old, h_old, labels, old_logits = _setup(2)
    criterion = CAFLoss(CZ, CH, ad_balance_on="features", ad_balance=kappa, lambda_ad=1000.0).double()
    out, _, _ = _run(criterion, net, z, z_old, h_old, labels, old_logits)
    lam_z, *_ = _reference_weights(criterion, net, z, z_old, h_old, labels, old_logits, kappa, 1000.0)
    plain = CAFLoss(CZ, CH, ad=None, lambda_d=criterion.lambda_d).double()
    g_task = torch.autograd.grad(plain(net(z)[1], labels, num_old_classes=N_OLD, old_logits=old_logits).loss, [z])
    ad = criterion.ad_loss
    assert ad is not None
    (g_ad_z,) = torch.autograd.grad(attentive_distillation_loss(z, z_old, ad.se_z), z)
    expected = max(0.0, -lam_z * float((g_ad_z * g_task[0]).sum())) / float(g_task[0].square().sum())
    torch.testing.assert_close(out.stats["ad_opposition_z"].item(), expected, rtol=1e-9, atol=1e-12)
    assert 0.0 <= out.stats["ad_opposition_h"].item() <= kappa + 1e-9  # |<a, t>| <= |a||t| <= κ |t|²


@given(seed=st.integers(0, 2**16), kappa=st.sampled_from([0.01, 0.3, 1.0, 3.0]))
@settings(max_examples=25, deadline=None)
def test_ad_opposition_never_exceeds_kappa(seed: int, kappa: float) -> None:
    net, z, z_old, h_old, labels, old_logits = _setup(seed)
    out, _, _ = _run(
        CAFLoss(CZ, CH, ad_balance_on="features", ad_balance=kappa).double(), net, z, z_old, h_old, labels, old_logits
    )
    for key in ("ad_opposition_z", "ad_opposition_h"):
        assert 0.0 <= out.stats[key].item() <= kappa * (1 + 1e-9)


@pytest.mark.parametrize(("maps", "kappa"), [(("z",), 0.1), (("h",), 0.1), (("z",), 1e6)])
def test_ad_maps_distils_only_the_named_maps_float64(maps: tuple[str, ...], kappa: float) -> None:
    """With ``ad_maps`` naming one map, the loss is the task plus that map's balanced term; the other map's
    AD gradient is zero and its weight is not reported."""
    net, z, z_old, h_old, labels, old_logits = _setup(4)
    criterion = CAFLoss(CZ, CH, ad_balance_on="features", ad_balance=kappa, lambda_ad=1000.0, ad_maps=maps).double()
    both = CAFLoss(CZ, CH, ad_balance_on="features", ad_balance=kappa, lambda_ad=1000.0).double()
    both.load_state_dict(criterion.state_dict(), strict=False)  # the SE block of the distilled map
    assert criterion.ad_maps == maps
    assert (criterion.ad_loss.se_z is None) == ("z" not in maps)
    assert (criterion.ad_loss.se_h is None) == ("h" not in maps)
    out, h, _ = _run(criterion, net, z, z_old, h_old, labels, old_logits)
    lam_z, lam_h, task, loss_z, loss_h = _reference_weights(both, net, z, z_old, h_old, labels, old_logits, kappa, 1e3)
    lam, loss = (lam_z, loss_z) if maps == ("z",) else (lam_h, loss_h)
    torch.testing.assert_close(out.loss, task + lam * loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.stats["lambda_ad"].item(), lam, rtol=1e-10, atol=0)
    assert set(k for k in out.stats if k.startswith("ad_opposition")) == {f"ad_opposition_{maps[0]}"}
    # the AD term of a map left out pulls nothing: d(loss - task)/dh through h alone is that of the kept term
    h_leaf = h.detach().requires_grad_(True)
    logits = net.classifier(h_leaf)
    kw = {"num_old_classes": N_OLD, "old_logits": old_logits}
    ad_only = CAFLoss(CZ, CH, kd="unbiased", lambda_ad=1.0, ad_maps=maps).double()
    ad_only.load_state_dict(criterion.state_dict())
    full = ad_only(logits, labels, features={"z": z, "h": h_leaf}, old_features={"z": z_old, "h": h_old}, **kw).loss
    plain = CAFLoss(CZ, CH, kd="unbiased", ad=None).double()(logits, labels, **kw).loss
    (g_h,) = torch.autograd.grad(full - plain, h_leaf)
    assert (g_h.abs().max() == 0) == ("h" not in maps)


@pytest.mark.parametrize("bad", [(), ("x",), ("z", "z"), "z+x", 3, None])
def test_bad_ad_maps(bad: object) -> None:
    with pytest.raises(ValueError, match="ad_maps"):
        CAFLoss(CZ, CH, ad_maps=bad)  # type: ignore[arg-type]


def test_ad_maps_accepts_a_string_and_the_default_is_both() -> None:
    assert CAFLoss(CZ, CH).ad_maps == ("z", "h")
    assert CAFLoss(CZ, CH, ad_maps="h+z").ad_maps == ("z", "h")
    assert CAFLoss(CZ, CH, ad_maps="z").ad_maps == ("z",)
    assert "ad_maps=('z',)" in repr(CAFLoss(CZ, CH, ad_maps="z"))
