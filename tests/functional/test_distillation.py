"""Tests of the output distillation losses: plain (LwF), unbiased (eq. 9-10), balanced (eq. 11-12)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from incseg.functional import balanced_kd_loss, gamma_balance, kd_loss, unbiased_kd_loss

LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "plain": kd_loss,
    "unbiased": unbiased_kd_loss,
    "balanced": balanced_kd_loss,
}


def _kd_ref(logits: torch.Tensor, old_logits: torch.Tensor, kind: str, class_reduction: str = "mean") -> torch.Tensor:
    """Per-pixel loss in float64 straight from eq. 9-12, with probabilities and an explicit loop over classes."""
    logits, old_logits = logits.double(), old_logits.double()
    n_old, k = old_logits.shape[1], logits.shape[1]
    q = old_logits.exp() / old_logits.exp().sum(dim=1, keepdim=True)
    p = logits.exp() / logits.exp().sum(dim=1, keepdim=True)
    if kind == "plain":  # LwF: the student's softmax over the old classes only
        p_old = logits[:, :n_old].exp() / logits[:, :n_old].exp().sum(dim=1, keepdim=True)
        phi = [p_old[:, s] for s in range(n_old)]
    else:  # eq. 10: background = background + new classes
        phi = [p[:, 0] + sum((p[:, s] for s in range(n_old, k)), torch.zeros_like(p[:, 0]))]
        phi += [p[:, s] for s in range(1, n_old)]
    gamma = torch.ones(logits.shape[0], dtype=torch.float64)
    if kind == "balanced":  # eq. 11
        q_bar = old_logits.mean(dim=(2, 3)).exp()
        q_bar = q_bar / q_bar.sum(dim=1, keepdim=True)
        gamma = q_bar[:, 1:].sum(dim=1) / q_bar[:, 0]
    loss_b = -q[:, 0] * phi[0].log()  # L_B
    loss_n = torch.zeros_like(loss_b)  # L_N
    for s in range(1, n_old):
        loss_n = loss_n - q[:, s] * phi[s].log()
    per_pixel = gamma.view(-1, 1, 1) * loss_b + loss_n  # eq. 12
    return per_pixel / n_old if class_reduction == "mean" else per_pixel


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error of ``a`` against the float64 reference ``b`` (absolute below 1e-10, e.g. a zero loss)."""
    return float((a.double() - b).abs() / b.abs().clamp_min(1e-10))


@pytest.mark.parametrize("kind", list(LOSSES))
@pytest.mark.parametrize(("k", "n_old"), [(5, 1), (5, 2), (5, 3), (6, 6), (21, 16)])
@pytest.mark.parametrize("class_reduction", ["mean", "sum"])
def test_matches_reference(kind: str, k: int, n_old: int, class_reduction: str) -> None:
    logits, old_logits = torch.randn(2, k, 5, 7) * 3, torch.randn(2, n_old, 5, 7) * 3
    per_pixel = _kd_ref(logits, old_logits, kind, class_reduction)
    fn = LOSSES[kind]
    mean = fn(logits, old_logits, class_reduction=class_reduction)
    assert mean.dtype == torch.float32
    assert _rel_err(mean, per_pixel.mean()) < 1e-5
    assert _rel_err(fn(logits, old_logits, class_reduction=class_reduction, reduction="sum"), per_pixel.sum()) < 1e-5
    none = fn(logits, old_logits, class_reduction=class_reduction, reduction="none")
    torch.testing.assert_close(none.double(), per_pixel, rtol=1e-5, atol=1e-6)


def test_balanced_with_gamma_one_equals_unbiased() -> None:
    logits, old_logits = torch.randn(2, 7, 5, 6), torch.randn(2, 4, 5, 6)
    # Shift the background logit per image so that its spatial mean equals logsumexp of the others' means:
    # then q̄_0 = 1/2 and γ = (1 - q̄_0) / q̄_0 = 1 exactly.
    pooled = old_logits.mean(dim=(2, 3))
    shift = torch.logsumexp(pooled[:, 1:], dim=1) - pooled[:, 0]
    old_logits[:, 0] += shift.view(-1, 1, 1)
    for class_reduction in ("mean", "sum"):
        torch.testing.assert_close(
            balanced_kd_loss(logits, old_logits, class_reduction=class_reduction),
            unbiased_kd_loss(logits, old_logits, class_reduction=class_reduction),
        )


def test_unbiased_without_new_classes_equals_plain() -> None:
    logits, old_logits = torch.randn(2, 5, 4, 4), torch.randn(2, 5, 4, 4)
    torch.testing.assert_close(unbiased_kd_loss(logits, old_logits), kd_loss(logits, old_logits))


def test_plain_ignores_new_classes() -> None:
    logits, old_logits = torch.randn(2, 6, 4, 4), torch.randn(2, 4, 4, 4)
    changed = logits.clone()
    changed[:, 4:] += 10.0
    torch.testing.assert_close(kd_loss(logits, old_logits), kd_loss(changed, old_logits))


def _logits_for(phi: torch.Tensor, n_new: int) -> torch.Tensor:
    """Student logits whose eq.-10 probabilities are ``phi`` (``(B, n_old, H, W)``): the background's share is
    split equally between the background and the ``n_new`` new classes."""
    share = (phi[:, :1] / (n_new + 1)).log()
    return torch.cat([share, phi[:, 1:].log(), share.expand(-1, n_new, -1, -1)], dim=1)


@given(seed=st.integers(0, 2**16), n_old=st.integers(2, 5), n_new=st.integers(1, 3), scale=st.floats(0.5, 4.0))
def test_balanced_kd_pulls_towards_a_gamma_tilted_teacher(seed: int, n_old: int, n_new: int, scale: float) -> None:
    """Why the balanced KD costs new classes (docs/lab-notebook.md): per pixel, unbiased KD is minimal where the
    student's eq.-10 probabilities equal the teacher's ``q``; the balanced KD is minimal at ``(γ q_0, q_1, ...)``
    renormalised, so with ``γ < 1`` it moves probability from background-and-new to the old classes."""
    gen = torch.Generator().manual_seed(seed)
    old_logits = torch.randn(2, n_old, 3, 3, generator=gen, dtype=torch.float64) * scale
    q = old_logits.softmax(dim=1)
    gamma = gamma_balance(old_logits).view(-1, 1, 1, 1)
    tilted = torch.cat([gamma * q[:, :1], q[:, 1:]], dim=1)
    tilted = tilted / tilted.sum(dim=1, keepdim=True)

    def grad(fn: Callable[..., torch.Tensor], phi: torch.Tensor) -> torch.Tensor:
        logits = _logits_for(phi, n_new).requires_grad_()
        fn(logits, old_logits, class_reduction="sum", reduction="sum").backward()
        assert logits.grad is not None
        return logits.grad

    zero = torch.zeros(2, n_old + n_new, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(grad(unbiased_kd_loss, q), zero, atol=1e-12, rtol=0)
    torch.testing.assert_close(grad(balanced_kd_loss, tilted), zero, atol=1e-12, rtol=0)
    # at the teacher's own distribution the gradient on the background and new logits is (1 - γ)(1 - q_0) φ_0:
    # positive, so gradient descent lowers them, exactly when γ < 1
    g = grad(balanced_kd_loss, q)
    background_and_new = torch.cat([g[:, :1], g[:, n_old:]], dim=1).sum(dim=1)
    expected_sign = torch.sign(1 - gamma.view(-1, 1, 1)).expand_as(background_and_new)
    informative = (1 - gamma.view(-1, 1, 1)).abs().expand_as(background_and_new) > 1e-6
    assert torch.equal(torch.sign(background_and_new)[informative], expected_sign[informative])


@pytest.mark.parametrize("kind", list(LOSSES))
@pytest.mark.parametrize("n_old", [2, 3])  # 2: a single old foreground class
def test_gradcheck(kind: str, n_old: int) -> None:
    logits = torch.randn(2, 5, 3, 4, dtype=torch.float64, requires_grad=True)
    old_logits = torch.randn(2, n_old, 3, 4, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(2, 3, 4) < 0.7
    fn = LOSSES[kind]
    assert torch.autograd.gradcheck(lambda x: fn(x, old_logits.detach(), mask=mask), (logits,))
    if kind != "balanced":  # γ is detached by design, so the balanced loss is not differentiated through it
        assert torch.autograd.gradcheck(lambda x, y: fn(x, y, class_reduction="sum"), (logits, old_logits))


def test_balanced_gradient_does_not_flow_through_gamma() -> None:
    logits = torch.randn(2, 5, 3, 4, dtype=torch.float64)
    old_logits = torch.randn(2, 3, 3, 4, dtype=torch.float64, requires_grad=True)
    balanced_kd_loss(logits, old_logits).backward()
    expected = torch.autograd.grad(_kd_ref_with_fixed_gamma(logits, old_logits).mean(), old_logits, retain_graph=False)[
        0
    ]
    assert old_logits.grad is not None
    torch.testing.assert_close(old_logits.grad, expected)


def _kd_ref_with_fixed_gamma(logits: torch.Tensor, old_logits: torch.Tensor) -> torch.Tensor:
    """Balanced reference with γ computed from a detached copy (γ is a constant weight)."""
    pooled = old_logits.detach().mean(dim=(2, 3)).softmax(dim=1)
    gamma = pooled[:, 1:].sum(dim=1) / pooled[:, 0]
    q = old_logits.softmax(dim=1)
    n_old = old_logits.shape[1]
    p = logits.softmax(dim=1)
    phi0 = p[:, 0] + p[:, n_old:].sum(dim=1)
    loss_b = -q[:, 0] * phi0.log()
    loss_n = -(q[:, 1:] * p[:, 1:n_old].log()).sum(dim=1)
    return (gamma.view(-1, 1, 1) * loss_b + loss_n) / n_old


@pytest.mark.parametrize("kind", list(LOSSES))
def test_old_logits_upsampled_to_student_size(kind: str) -> None:
    logits, old_logits = torch.randn(2, 5, 9, 11), torch.randn(2, 3, 4, 5)
    upsampled = F.interpolate(old_logits, size=(9, 11), mode="bilinear", align_corners=False)
    fn = LOSSES[kind]
    torch.testing.assert_close(fn(logits, old_logits), fn(logits, upsampled))


@pytest.mark.parametrize("kind", list(LOSSES))
def test_mask_mean_is_sum_over_valid_and_masked_pixels_do_nothing(kind: str) -> None:
    fn = LOSSES[kind]
    old_logits = torch.randn(2, 3, 4, 6)
    mask = torch.rand(2, 4, 6) < 0.5
    logits_a = torch.randn(2, 5, 4, 6)
    logits_b = logits_a.clone()
    excluded = (~mask).unsqueeze(1).expand_as(logits_b)
    logits_b[excluded] = torch.randn(int(excluded.sum())) * 50
    logits_a.requires_grad_(True)
    logits_b.requires_grad_(True)
    loss_a = fn(logits_a, old_logits, mask=mask)
    loss_b = fn(logits_b, old_logits, mask=mask)
    loss_a.backward()
    loss_b.backward()
    torch.testing.assert_close(loss_a, loss_b)
    torch.testing.assert_close(logits_a.grad, logits_b.grad)
    torch.testing.assert_close(loss_a, fn(logits_a, old_logits, mask=mask, reduction="sum") / mask.sum())
    none = fn(logits_a, old_logits, mask=mask, reduction="none")
    assert (none[~mask] == 0).all()


@pytest.mark.parametrize("kind", list(LOSSES))
def test_all_masked_gives_connected_zero(kind: str) -> None:
    logits = torch.randn(2, 5, 3, 3, requires_grad=True)
    loss = LOSSES[kind](logits, torch.randn(2, 3, 3, 3), mask=torch.zeros(2, 3, 3, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()
    assert logits.grad is not None
    assert (logits.grad == 0).all()


@pytest.mark.parametrize("kind", list(LOSSES))
def test_extreme_logits_finite(kind: str) -> None:
    logits = (torch.randint(0, 2, (2, 6, 4, 5)).float() * 200 - 100).requires_grad_(True)
    old_logits = torch.randint(0, 2, (2, 4, 4, 5)).float() * 200 - 100
    old_logits[:, 0] = -100.0  # background never predicted: γ at its clamp
    loss = LOSSES[kind](logits, old_logits)
    loss.backward()
    assert torch.isfinite(loss)
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("kind", list(LOSSES))
def test_bf16_autocast_gives_finite_float32(kind: str) -> None:
    logits, old_logits = torch.randn(2, 5, 4, 4), torch.randn(2, 3, 2, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = LOSSES[kind](logits.bfloat16(), old_logits.bfloat16())
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss)


@pytest.mark.parametrize("kind", list(LOSSES))
def test_compiles_without_graph_break(kind: str) -> None:
    logits, old_logits = torch.randn(2, 5, 4, 4), torch.randn(2, 3, 4, 4)
    mask = torch.rand(2, 4, 4) < 0.5
    compiled = torch.compile(LOSSES[kind], backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(logits, old_logits, mask=mask), LOSSES[kind](logits, old_logits, mask=mask))


@given(
    kind=st.sampled_from(list(LOSSES)),
    k=st.integers(1, 7),
    data=st.data(),
    seed=st.integers(0, 2**16),
    scale=st.sampled_from([0.01, 1.0, 30.0, 100.0]),
)
def test_fuzz_finite(kind: str, k: int, data: st.DataObject, seed: int, scale: float) -> None:
    n_old = data.draw(st.integers(1, k), label="n_old")
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(2, k, 3, 4, generator=gen) * scale).requires_grad_(True)
    old_logits = torch.randn(2, n_old, 3, 4, generator=gen) * scale
    loss = LOSSES[kind](logits, old_logits)
    loss.backward()
    assert torch.isfinite(loss) and loss >= -1e-6  # a cross-entropy, up to rounding
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


X, OLD = torch.randn(2, 5, 4, 4), torch.randn(2, 3, 4, 4)


@pytest.mark.parametrize("kind", list(LOSSES))
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"logits": torch.randn(5, 4, 4)}, ValueError, "logits"),
        ({"old_logits": torch.randn(2, 3, 4)}, ValueError, "old_logits"),
        ({"old_logits": torch.randn(3, 3, 4, 4)}, ValueError, "batch"),
        ({"old_logits": torch.randn(2, 6, 4, 4)}, ValueError, "more classes"),
        ({"mask": torch.ones(2, 4, 4)}, TypeError, "bool"),
        ({"mask": torch.ones(2, 3, 4, dtype=torch.bool)}, ValueError, "mask"),
        ({"reduction": "avg"}, ValueError, "reduction"),
        ({"class_reduction": "none"}, ValueError, "class_reduction"),
        ({"logits": torch.zeros(2, 5, 4, 4, dtype=torch.long)}, TypeError, "floating"),
    ],
)
def test_bad_inputs_raise(kind: str, kwargs: dict, error: type[Exception], match: str) -> None:
    args = {"logits": X, "old_logits": OLD, **kwargs}
    with pytest.raises(error, match=match):
        LOSSES[kind](args.pop("logits"), args.pop("old_logits"), **args)
