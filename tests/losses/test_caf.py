"""Tests of CAFLoss, the overall objective L = L_SEG + λ_AD L_AD + λ_D L_D (eq. 13), and its switches."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch.overrides import TorchFunctionMode

from incseg.functional import (
    attentive_distillation_loss,
    balanced_kd_loss,
    kd_loss,
    unbiased_cross_entropy,
    unbiased_kd_loss,
)
from incseg.losses import CAFLoss, LossOutput
from incseg.nn.squeeze_excitation import SqueezeExcitation

K, N_OLD, CZ, CH = 7, 4, 32, 16


def _batch(k: int = K, n_old: int = N_OLD, size: tuple[int, int] = (6, 5), dtype: torch.dtype = torch.float32):
    logits = torch.randn(2, k, *size, dtype=dtype)
    labels = torch.randint(0, k, (2, *size))
    labels[:, 0, :2] = 255
    old_logits = torch.randn(2, n_old, *size, dtype=dtype)
    features = {"z": torch.randn(2, CZ, 3, 3, dtype=dtype), "h": torch.randn(2, CH, 3, 3, dtype=dtype)}
    old_features = {"z": torch.randn(2, CZ, 3, 3, dtype=dtype), "h": torch.randn(2, CH, 3, 3, dtype=dtype)}
    return logits, labels, old_logits, features, old_features


def _se_ref(se: SqueezeExcitation, m: torch.Tensor) -> torch.Tensor:
    pooled = m.double().mean(dim=(2, 3))
    hidden = torch.relu(pooled @ se.fc1.weight.double()[:, :, 0, 0].T + se.fc1.bias.double())
    return torch.sigmoid(hidden @ se.fc2.weight.double()[:, :, 0, 0].T + se.fc2.bias.double())[:, :, None, None]


def _caf_ref(criterion: CAFLoss, logits, labels, old_logits, features, old_features) -> dict[str, torch.Tensor]:
    """Eq. 13 in float64 with probabilities, straight from eq. 5-15 (default switches, class mean, AD mean)."""
    x, x_old = logits.double(), old_logits.double()
    n_old, k = x_old.shape[1], x.shape[1]
    p = x.exp() / x.exp().sum(dim=1, keepdim=True)
    # eq. 14-15: old classes aggregated into the background
    phi_tilde = torch.cat([p[:, :n_old].sum(dim=1, keepdim=True), p[:, n_old:]], dim=1)
    valid = labels != 255
    target = torch.where(labels < n_old, torch.zeros_like(labels), labels - n_old + 1).clamp(0, k - n_old)
    seg = -(phi_tilde.gather(1, target.unsqueeze(1)).squeeze(1).log()[valid]).mean()
    # eq. 9-12: new classes aggregated into the background, γ-weighted background term, class mean
    q = x_old.exp() / x_old.exp().sum(dim=1, keepdim=True)
    phi_hat = torch.cat([p[:, :1] + p[:, n_old:].sum(dim=1, keepdim=True), p[:, 1:n_old]], dim=1)
    q_bar = x_old.mean(dim=(2, 3)).softmax(dim=1)
    gamma = (1 - q_bar[:, 0]) / q_bar[:, 0]
    loss_b = -q[:, 0] * phi_hat[:, 0].log()
    loss_n = -(q[:, 1:] * phi_hat[:, 1:].log()).sum(dim=1)
    kd = ((gamma.view(-1, 1, 1) * loss_b + loss_n) / n_old).mean()
    # eq. 5-8: AD(m) = (AD_CH ⊗ AD_SP + 1) m, mean squared difference per map, summed over z and h
    ad = torch.zeros((), dtype=torch.float64)
    assert criterion.ad_loss is not None
    for key, se in (("z", criterion.ad_loss.se_z), ("h", criterion.ad_loss.se_h)):
        assert se is not None
        ads = []
        for m in (features[key].double(), old_features[key].double()):
            energy = (m**2).sum(dim=1, keepdim=True)
            spatial = energy / energy.pow(2).sum(dim=(2, 3), keepdim=True).sqrt()
            ads.append((_se_ref(se, m) * spatial + 1) * m)
        ad = ad + ((ads[0] - ads[1]) ** 2).mean()
    seg_w, kd_w, ad_w = seg, criterion.lambda_d * kd, criterion.lambda_ad * ad
    return {"seg": seg_w, "kd": kd_w, "ad": ad_w, "total": seg_w + kd_w + ad_w}


def test_default_matches_float64_reference() -> None:
    criterion = CAFLoss(CZ, CH, se_reduction=4)
    logits, labels, old_logits, features, old_features = _batch()
    out = criterion(
        logits, labels, num_old_classes=N_OLD, old_logits=old_logits, features=features, old_features=old_features
    )
    assert isinstance(out, LossOutput)
    assert set(out.terms) == {"seg", "kd", "ad", "total"}
    expected = _caf_ref(criterion, logits, labels, old_logits, features, old_features)
    for name, value in expected.items():
        rel = float((out.terms[name].double() - value.detach()).abs() / value.detach().abs())
        assert rel < 1e-5, name
    torch.testing.assert_close(out.loss.detach(), out.terms["total"])
    torch.testing.assert_close(out.terms["seg"] + out.terms["kd"] + out.terms["ad"], out.terms["total"])
    assert not any(t.requires_grad for t in out.terms.values())


def test_default_equals_functionals() -> None:
    criterion = CAFLoss(CZ, CH, lambda_d=3.0, lambda_ad=7.0)
    logits, labels, old_logits, features, old_features = _batch()
    out = criterion(
        logits, labels, num_old_classes=N_OLD, old_logits=old_logits, features=features, old_features=old_features
    )
    assert criterion.ad_loss is not None
    ad = attentive_distillation_loss(features["z"], old_features["z"], criterion.ad_loss.se_z) + (
        attentive_distillation_loss(features["h"], old_features["h"], criterion.ad_loss.se_h)
    )
    torch.testing.assert_close(out.terms["seg"], unbiased_cross_entropy(logits, labels, N_OLD))
    torch.testing.assert_close(out.terms["kd"], 3.0 * balanced_kd_loss(logits, old_logits))
    torch.testing.assert_close(out.terms["ad"], 7.0 * ad.detach())


def test_fine_tuning_is_cross_entropy() -> None:
    criterion = CAFLoss(None, None, ce="plain", kd=None, ad=None)
    logits, labels, *_ = _batch()
    out = criterion(logits, labels, num_old_classes=N_OLD)
    assert set(out.terms) == {"seg", "total"}
    torch.testing.assert_close(out.loss, F.cross_entropy(logits, labels, ignore_index=255))
    assert list(criterion.parameters()) == []


def test_lwf_is_cross_entropy_plus_plain_kd() -> None:
    criterion = CAFLoss(None, None, ce="plain", kd="plain", ad=None)
    logits, labels, old_logits, *_ = _batch()
    out = criterion(logits, labels, num_old_classes=N_OLD, old_logits=old_logits)
    expected = F.cross_entropy(logits, labels, ignore_index=255) + 10.0 * kd_loss(logits, old_logits)
    torch.testing.assert_close(out.loss, expected)


def test_mib_is_unbiased_ce_plus_unbiased_kd() -> None:
    criterion = CAFLoss(None, None, ce="unbiased", kd="unbiased", ad=None, class_reduction="sum")
    logits, labels, old_logits, *_ = _batch()
    out = criterion(logits, labels, num_old_classes=N_OLD, old_logits=old_logits)
    expected = unbiased_cross_entropy(logits, labels, N_OLD) + 10.0 * unbiased_kd_loss(
        logits, old_logits, class_reduction="sum"
    )
    torch.testing.assert_close(out.loss, expected)


SWITCHES = list(
    itertools.product(
        ["plain", "unbiased"], [None, "plain", "unbiased", "balanced"], [None, "plain", "spatial", "channel", "both"]
    )
)


@pytest.mark.parametrize(("ce", "kd", "ad"), SWITCHES)
def test_every_combination_runs(ce: str, kd: str | None, ad: str | None) -> None:
    criterion = CAFLoss(CZ, CH, ce=ce, kd=kd, ad=ad)
    logits, labels, old_logits, features, old_features = _batch()
    logits.requires_grad_(True)
    for key in ("z", "h"):
        features[key].requires_grad_(True)
    out = criterion(
        logits, labels, num_old_classes=N_OLD, old_logits=old_logits, features=features, old_features=old_features
    )
    expected_terms = {"seg", "total"} | ({"kd"} if kd else set()) | ({"ad"} if ad else set())
    assert set(out.terms) == expected_terms
    out.loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    assert (features["z"].grad is not None) == (ad is not None)
    for name, p in criterion.named_parameters():
        assert p.grad is not None, name


def test_first_step_runs_only_segmentation() -> None:
    criterion = CAFLoss(CZ, CH)
    logits, labels, *_ = _batch(n_old=1)
    out = criterion(logits, labels, num_old_classes=0)
    assert set(out.terms) == {"seg", "total"}
    torch.testing.assert_close(out.loss, F.cross_entropy(logits, labels, ignore_index=255))


def test_upsamples_logits_and_old_logits_to_label_size() -> None:
    criterion = CAFLoss(CZ, CH)
    _, labels, _, features, old_features = _batch(size=(8, 10))
    logits, old_logits = torch.randn(2, K, 4, 5), torch.randn(2, N_OLD, 2, 3)

    def up(x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, size=(8, 10), mode="bilinear", align_corners=False)

    kwargs = {"num_old_classes": N_OLD, "features": features, "old_features": old_features}
    small = criterion(logits, labels, old_logits=old_logits, **kwargs)
    full = criterion(up(logits), labels, old_logits=up(old_logits), **kwargs)
    for name in small.terms:
        torch.testing.assert_close(small.terms[name], full.terms[name])


@pytest.mark.parametrize("ce", ["plain", "unbiased"])
def test_student_classes_are_exponentiated_once(ce: str) -> None:
    """L_SEG and L_D share the student's log-sums: at most one exp per class and pixel (issue 5)."""

    class CountExp(TorchFunctionMode):
        def __init__(self) -> None:
            super().__init__()
            self.channels = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            # Class-sized tensors only: the teacher's softmax (N_OLD channels) and log-sums over stacked (B, H, W)
            # maps (dim 0) are not counted.
            first = args[0] if args else None
            class_sized = (
                isinstance(first, torch.Tensor)
                and first.ndim == 4
                and first.shape[-2:] == (6, 5)
                and first.shape[1] != N_OLD
            )
            if func in (torch.exp, torch.Tensor.exp, torch.Tensor.exp_) and class_sized:
                self.channels += first.shape[1]
            elif func in (torch.logsumexp, torch.log_softmax, torch.softmax, F.log_softmax, F.softmax):
                dim = kwargs.get("dim") if kwargs and "dim" in kwargs else (args[1] if len(args) > 1 else None)
                if class_sized and dim in (1, -3):
                    self.channels += first.shape[1]
            return func(*args, **(kwargs or {}))

    for kd in ("plain", "unbiased", "balanced"):
        criterion = CAFLoss(None, None, ce=ce, kd=kd, ad=None)
        logits, labels, old_logits, *_ = _batch()
        with CountExp() as mode:
            criterion(logits, labels, num_old_classes=N_OLD, old_logits=old_logits)
        assert 0 < mode.channels <= K, kd


def test_gradcheck() -> None:
    criterion = CAFLoss(CZ, CH, se_reduction=8, lambda_ad=10.0).double()
    logits, labels, old_logits, features, old_features = _batch(size=(3, 4), dtype=torch.float64)
    logits.requires_grad_(True)
    z, h = features["z"].requires_grad_(True), features["h"].requires_grad_(True)

    def fn(x: torch.Tensor, z: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return criterion(
            x,
            labels,
            num_old_classes=N_OLD,
            old_logits=old_logits,
            features={"z": z, "h": h},
            old_features=old_features,
        ).loss

    assert torch.autograd.gradcheck(fn, (logits, z, h))


def test_bf16_autocast_and_extreme_logits_finite() -> None:
    criterion = CAFLoss(CZ, CH)
    logits, labels, old_logits, features, old_features = _batch()
    kwargs = {"num_old_classes": N_OLD, "features": features, "old_features": old_features}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = criterion(logits.bfloat16(), labels, old_logits=old_logits.bfloat16(), **kwargs)
    assert out.loss.dtype == torch.float32
    assert torch.isfinite(out.loss)
    extreme = (torch.randint(0, 2, logits.shape).float() * 200 - 100).requires_grad_(True)
    old_extreme = torch.randint(0, 2, old_logits.shape).float() * 200 - 100
    out = criterion(extreme, labels, old_logits=old_extreme, **kwargs)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert extreme.grad is not None and torch.isfinite(extreme.grad).all()


@given(seed=st.integers(0, 2**16), scale=st.sampled_from([0.01, 1.0, 50.0]), n_old=st.integers(0, K - 1))
def test_fuzz_finite(seed: int, scale: float, n_old: int) -> None:
    torch.manual_seed(seed)
    criterion = CAFLoss(CZ, CH)
    logits, labels, _, features, old_features = _batch()
    logits = (logits * scale).requires_grad_(True)
    old_logits = torch.randn(2, n_old, 6, 5) * scale if n_old else None
    out = criterion(
        logits, labels, num_old_classes=n_old, old_logits=old_logits, features=features, old_features=old_features
    )
    out.loss.backward()
    assert all(torch.isfinite(t) for t in out.terms.values())
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


LOGITS, LABELS, OLD_LOGITS, FEATURES, OLD_FEATURES = _batch()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"num_old_classes": K}, ValueError, "num_old_classes"),
        ({"num_old_classes": -1}, ValueError, "num_old_classes"),
        ({"num_old_classes": 2.0}, TypeError, "num_old_classes"),
        ({"old_logits": None}, ValueError, "needs old_logits"),
        ({"old_logits": torch.randn(2, N_OLD + 1, 6, 5)}, ValueError, "num_old_classes=4 channels"),
        ({"old_logits": torch.randn(3, N_OLD, 6, 5)}, ValueError, "batch"),
        ({"features": None}, ValueError, "needs features"),
        ({"old_features": {"z": OLD_FEATURES["z"]}}, ValueError, "missing \\['h'\\]"),
        ({"features": {"z": torch.randn(2, CZ + 1, 3, 3), "h": FEATURES["h"]}}, ValueError, "32 channels"),
        ({"old_features": {"z": OLD_FEATURES["z"], "h": torch.randn(2, CH, 2, 2)}}, ValueError, "same shape"),
        ({"labels": torch.full((2, 6, 5), K)}, ValueError, "outside"),
        ({"labels": torch.zeros(2, 6, 5)}, TypeError, "integer"),
        ({"logits": torch.randn(2, K, 6)}, ValueError, "logits"),
    ],
)
def test_bad_inputs_raise(kwargs: dict, error: type[Exception], match: str) -> None:
    args = {
        "logits": LOGITS,
        "labels": LABELS,
        "num_old_classes": N_OLD,
        "old_logits": OLD_LOGITS,
        "features": FEATURES,
        "old_features": OLD_FEATURES,
        **kwargs,
    }
    with pytest.raises(error, match=match):
        CAFLoss(CZ, CH)(args.pop("logits"), args.pop("labels"), **args)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"ce": "focal"}, "ce"),
        ({"kd": "mse"}, "kd"),
        ({"ad": "none"}, "ad"),  # spelled "plain", as everywhere
        ({"class_reduction": "none"}, "class_reduction"),
        ({"lambda_d": -1.0}, "lambda_d"),
        ({"lambda_ad": float("nan")}, "lambda_ad"),
    ],
)
def test_bad_construction_raises(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CAFLoss(CZ, CH, **kwargs)


def test_ad_needs_channels() -> None:
    with pytest.raises(ValueError, match="z_channels"):
        CAFLoss(None, CH)
    assert "kd='balanced'" in repr(CAFLoss(CZ, CH))


def _caf() -> CAFLoss:
    return CAFLoss(CZ, CH, ce="unbiased", kd="balanced", ad="both", lambda_d=10.0, lambda_ad=1000.0)


def test_empty_batch_gives_zero_terms_not_nan() -> None:
    logits, labels, old_logits, features, old_features = _batch()
    empty = {k: v[:0] for k, v in features.items()}
    out = _caf()(
        logits[:0].requires_grad_(),
        labels[:0],
        num_old_classes=N_OLD,
        old_logits=old_logits[:0],
        features=empty,
        old_features={k: v[:0] for k, v in old_features.items()},
    )
    assert {k: float(v) for k, v in out.terms.items()} == {"seg": 0.0, "kd": 0.0, "ad": 0.0, "total": 0.0}
    out.loss.backward()


def test_features_of_another_batch_size_are_refused() -> None:
    logits, labels, old_logits, features, old_features = _batch()
    features = {k: v[:1] for k, v in features.items()}
    with pytest.raises(ValueError, match=r"logits and features\['z'\] must have the same batch size"):
        _caf()(
            logits, labels, num_old_classes=N_OLD, old_logits=old_logits, features=features, old_features=old_features
        )


def test_non_finite_features_raise_non_finite_error() -> None:
    from incseg._checks import NonFiniteError

    logits, labels, old_logits, features, old_features = _batch()
    old_features["h"][0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"old_features\['h'\]"):
        _caf()(
            logits, labels, num_old_classes=N_OLD, old_logits=old_logits, features=features, old_features=old_features
        )


def test_huge_features_give_a_finite_attentive_distillation() -> None:
    logits, labels, old_logits, features, old_features = _batch()
    features = {k: v * 1e19 for k, v in features.items()}
    old_features = {k: v * 1.01 for k, v in features.items()}
    out = _caf()(
        logits, labels, num_old_classes=N_OLD, old_logits=old_logits, features=features, old_features=old_features
    )
    assert torch.isfinite(out.terms["ad"])


def _ad_ref_weighted(criterion: CAFLoss, features, old_features, labels, n_old: int) -> torch.Tensor:
    """L_AD of eq. 8 in float64, each position weighted by the fraction of its pixels not labelled new."""
    keep = ((labels < n_old) | (labels == 255)).double()
    ad = torch.zeros((), dtype=torch.float64)
    assert criterion.ad_loss is not None
    for key, se in (("z", criterion.ad_loss.se_z), ("h", criterion.ad_loss.se_h)):
        assert se is not None
        m_new, m_old = features[key].double(), old_features[key].double()
        b, c, hh, ww = m_new.shape
        ads = []
        for m in (m_new, m_old):
            energy = (m**2).sum(dim=1, keepdim=True)
            spatial = energy / energy.pow(2).sum(dim=(2, 3), keepdim=True).sqrt()
            ads.append((_se_ref(se, m) * spatial + 1) * m)
        sq = ((ads[0] - ads[1]) ** 2).sum(dim=1)  # (B, h, w)
        total = torch.zeros((), dtype=torch.float64)
        for i in range(hh):  # each feature position covers the label pixels of its adaptive-pooling window
            r0, r1 = (i * labels.shape[1]) // hh, -((-(i + 1) * labels.shape[1]) // hh)
            for j in range(ww):
                c0, c1 = (j * labels.shape[2]) // ww, -((-(j + 1) * labels.shape[2]) // ww)
                total = total + (keep[:, r0:r1, c0:c1].mean(dim=(1, 2)) * sq[:, i, j]).sum()
        ad = ad + total / (b * c * hh * ww)
    return ad


def test_ad_on_new_false_leaves_new_pixels_out_float64() -> None:
    torch.manual_seed(3)
    criterion = CAFLoss(CZ, CH, kd=None, se_reduction=4, lambda_ad=1.0, ad_on_new=False).double()
    logits, labels, _, features, old_features = _batch(size=(6, 6), dtype=torch.float64)
    out = criterion(logits, labels, num_old_classes=N_OLD, features=features, old_features=old_features)
    expected = _ad_ref_weighted(criterion, features, old_features, labels, N_OLD)
    torch.testing.assert_close(out.terms["ad"], expected, rtol=1e-10, atol=1e-14)
    # no pixel labelled new: the paper's L_AD; every pixel new: no attentive distillation at all
    paper = CAFLoss(CZ, CH, kd=None, se_reduction=4, lambda_ad=1.0).double()
    paper.load_state_dict(criterion.state_dict())
    old_only = labels.clamp(max=N_OLD - 1)
    torch.testing.assert_close(
        criterion(logits, old_only, num_old_classes=N_OLD, features=features, old_features=old_features).terms["ad"],
        paper(logits, old_only, num_old_classes=N_OLD, features=features, old_features=old_features).terms["ad"],
    )
    all_new = torch.full_like(labels, N_OLD)
    none = criterion(logits, all_new, num_old_classes=N_OLD, features=features, old_features=old_features)
    assert none.terms["ad"].item() == 0.0


def test_ad_on_new_false_gives_no_feature_gradient_where_every_pixel_is_new() -> None:
    """With plain feature distillation a position covering only new pixels gets no gradient from L_AD (with
    attention it still gets the small one through the image-wide normalisation of the attention maps)."""
    criterion = CAFLoss(CZ, CH, kd=None, ad="plain", ad_on_new=False)
    logits, labels, _, features, old_features = _batch(size=(6, 6))
    labels[:, :2, :2] = N_OLD  # the top-left feature position covers only new pixels
    labels[:, 2:, :] = 0
    labels[:, :, 2:] = 0
    features = {k: v.requires_grad_(True) for k, v in features.items()}
    out = criterion(logits, labels, num_old_classes=N_OLD, features=features, old_features=old_features)
    seg = CAFLoss(CZ, CH, kd=None, ad=None)(logits, labels, num_old_classes=N_OLD).loss
    grads = torch.autograd.grad(out.loss - seg, [features["z"], features["h"]])  # L_AD alone
    for g in grads:
        assert g.abs().sum() > 0
        assert torch.all(g[:, :, 0, 0] == 0)


def test_ad_on_new_must_be_bool() -> None:
    with pytest.raises(ValueError, match="ad_on_new"):
        CAFLoss(CZ, CH, ad_on_new=0)  # type: ignore[arg-type]


@pytest.mark.parametrize("maps", [("z",), ("h",)])
@pytest.mark.parametrize("ad_on_new", [True, False])
def test_ad_maps_distils_one_map_float64(maps: tuple[str, ...], ad_on_new: bool) -> None:
    """``ad_maps`` names the maps of eq. 8 that enter L_AD; float64 reference of the one kept."""
    torch.manual_seed(5)
    criterion = CAFLoss(CZ, CH, kd=None, se_reduction=4, lambda_ad=3.0, ad_maps=maps, ad_on_new=ad_on_new).double()
    logits, labels, _, features, old_features = _batch(size=(6, 6), dtype=torch.float64)
    out = criterion(logits, labels, num_old_classes=N_OLD, features=features, old_features=old_features)
    (key,) = maps
    assert criterion.ad_loss is not None
    se = criterion.ad_loss.se_z if key == "z" else criterion.ad_loss.se_h
    assert se is not None
    keep = torch.ones(labels.shape, dtype=torch.float64) if ad_on_new else ((labels < N_OLD) | (labels == 255)).double()
    ads = []
    for m in (features[key], old_features[key]):
        energy = (m**2).sum(dim=1, keepdim=True)
        spatial = energy / energy.pow(2).sum(dim=(2, 3), keepdim=True).sqrt()
        ads.append((_se_ref(se, m) * spatial + 1) * m)
    sq = ((ads[0] - ads[1]) ** 2).sum(dim=1)  # (B, 3, 3): each position covers a 2x2 block of labels
    weight = keep.view(2, 3, 2, 3, 2).mean(dim=(2, 4))
    expected = 3.0 * (weight * sq).sum() / sq.numel() / features[key].shape[1]
    torch.testing.assert_close(out.terms["ad"], expected, rtol=1e-10, atol=1e-14)
