"""Tests of the spatial attention (eq. 6) and the attentive distillation loss (eq. 5-8)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from incseg.functional import attentive_distillation_loss, pixel_weights, spatial_attention
from incseg.nn.squeeze_excitation import SqueezeExcitation

ATTENTIONS = ["both", "spatial", "channel", "plain"]


def _spatial_ref(m: torch.Tensor) -> torch.Tensor:
    """Eq. 6 with explicit loops over channels: sum_c m_c^2 divided by its Frobenius norm over the image."""
    m = m.double()
    energy = torch.zeros(m.shape[0], 1, m.shape[2], m.shape[3], dtype=torch.float64)
    for c in range(m.shape[1]):
        energy[:, 0] += m[:, c] ** 2
    norm = torch.sqrt((energy**2).sum(dim=(1, 2, 3), keepdim=True))
    return energy / norm


def _channel_ref(se: SqueezeExcitation, m: torch.Tensor) -> torch.Tensor:
    """Eq. 5 written with the SE weights: sigmoid(W2 relu(W1 avgpool(m) + b1) + b2)."""
    pooled = m.double().mean(dim=(2, 3))  # (B, C)
    w1, b1 = se.fc1.weight.double()[:, :, 0, 0], se.fc1.bias.double()
    w2, b2 = se.fc2.weight.double()[:, :, 0, 0], se.fc2.bias.double()
    hidden = torch.relu(pooled @ w1.T + b1)
    return torch.sigmoid(hidden @ w2.T + b2)[:, :, None, None]


def _ad_ref(m: torch.Tensor, se: SqueezeExcitation, attention: str) -> torch.Tensor:
    """AD(m) of eq. 7 and its ablations."""
    m = m.double()
    if attention == "plain":
        return m
    if attention == "spatial":
        return (_spatial_ref(m) + 1) * m
    if attention == "channel":
        return (_channel_ref(se, m) + 1) * m
    return (_channel_ref(se, m) * _spatial_ref(m) + 1) * m


def _loss_ref(m: torch.Tensor, m_old: torch.Tensor, se: SqueezeExcitation, attention: str) -> torch.Tensor:
    """Squared Frobenius norm of AD(m) - AD(m_old) (one term of eq. 8), summed over elements."""
    return ((_ad_ref(m, se, attention) - _ad_ref(m_old, se, attention)) ** 2).sum()


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach()).abs() / b.detach().abs().clamp_min(1e-10))


@pytest.mark.parametrize("shape", [(1, 3, 5, 7), (2, 16, 9, 4)])
def test_spatial_attention_matches_reference(shape: tuple[int, int, int, int]) -> None:
    m = torch.randn(shape) * 3
    out = spatial_attention(m)
    assert out.shape == (shape[0], 1, shape[2], shape[3])
    torch.testing.assert_close(out.double(), _spatial_ref(m), rtol=1e-5, atol=1e-7)


def test_spatial_attention_zero_map_is_zero_with_finite_gradient() -> None:
    m = torch.zeros(2, 4, 3, 5, requires_grad=True)
    out = spatial_attention(m)
    assert (out == 0).all()
    out.sum().backward()
    assert m.grad is not None and torch.isfinite(m.grad).all()


def test_spatial_attention_gradcheck_and_dtype() -> None:
    m = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(spatial_attention, (m,))
    half = torch.randn(2, 3, 4, 5).bfloat16()
    assert spatial_attention(half).dtype == torch.bfloat16


@given(seed=st.integers(0, 2**16), scale=st.sampled_from([1e-3, 1.0, 100.0, 1e4]), c=st.integers(1, 5))
def test_spatial_attention_has_unit_norm(seed: int, scale: float, c: int) -> None:
    m = torch.randn(2, c, 3, 4, generator=torch.Generator().manual_seed(seed)) * scale
    out = spatial_attention(m)
    assert ((out >= 0) & (out <= 1)).all()
    torch.testing.assert_close(out.square().sum(dim=(1, 2, 3)), torch.ones(2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_loss_matches_reference(attention: str) -> None:
    se = SqueezeExcitation(32, reduction=4)
    m, m_old = torch.randn(2, 32, 5, 7), torch.randn(2, 32, 5, 7)
    expected = _loss_ref(m, m_old, se, attention)
    assert _rel_err(attentive_distillation_loss(m, m_old, se, attention=attention, reduction="sum"), expected) < 1e-5
    assert _rel_err(attentive_distillation_loss(m, m_old, se, attention=attention), expected / m.numel()) < 1e-5
    none = attentive_distillation_loss(m, m_old, se, attention=attention, reduction="none")
    assert none.shape == m.shape
    torch.testing.assert_close(
        none.sum(), attentive_distillation_loss(m, m_old, se, attention=attention, reduction="sum")
    )


def test_plain_feature_distillation_is_mse() -> None:
    m, m_old = torch.randn(2, 8, 4, 4), torch.randn(2, 8, 4, 4)
    torch.testing.assert_close(attentive_distillation_loss(m, m_old, None, attention="plain"), F.mse_loss(m, m_old))


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_gradcheck(attention: str) -> None:
    se = SqueezeExcitation(8, reduction=4).double()
    m = torch.randn(2, 8, 3, 4, dtype=torch.float64, requires_grad=True)
    m_old = torch.randn(2, 8, 3, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: attentive_distillation_loss(x, m_old, se, attention=attention), (m,))


def test_teacher_side_is_detached_and_se_learns_from_student_only() -> None:
    se = SqueezeExcitation(8, reduction=2)
    m = torch.randn(2, 8, 3, 4, requires_grad=True)
    m_old = torch.randn(2, 8, 3, 4, requires_grad=True)
    attentive_distillation_loss(m, m_old, se).backward()
    assert m_old.grad is None
    assert m.grad is not None
    grads = [p.grad.clone() for p in se.parameters() if p.grad is not None]
    assert len(grads) == 4
    # same gradients as with a constant target precomputed from the teacher
    se.zero_grad()
    with torch.no_grad():
        target = (1 + se(m_old) * spatial_attention(m_old)) * m_old
    F.mse_loss((1 + se(m) * spatial_attention(m)) * m, target).backward()
    for expected, p in zip(grads, se.parameters()):
        torch.testing.assert_close(p.grad, expected)


def test_identical_features_give_zero() -> None:
    se = SqueezeExcitation(8)
    m = torch.randn(2, 8, 3, 3)
    assert attentive_distillation_loss(m, m.clone(), se).item() == 0.0


def test_bf16_autocast_gives_finite_float32() -> None:
    se = SqueezeExcitation(16)
    m, m_old = torch.randn(2, 16, 5, 5), torch.randn(2, 16, 5, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = attentive_distillation_loss(m.bfloat16(), m_old.bfloat16(), se)
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss)


def test_compiles_without_graph_break() -> None:
    se = SqueezeExcitation(16)
    m, m_old = torch.randn(2, 16, 5, 5), torch.randn(2, 16, 5, 5)
    compiled = torch.compile(attentive_distillation_loss, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(m, m_old, se), attentive_distillation_loss(m, m_old, se))


@given(
    attention=st.sampled_from(ATTENTIONS),
    seed=st.integers(0, 2**16),
    scale=st.sampled_from([0.0, 1e-3, 1.0, 100.0]),
)
def test_fuzz_finite(attention: str, seed: int, scale: float) -> None:
    torch.manual_seed(seed)
    se = SqueezeExcitation(6, reduction=2)
    m = (torch.randn(2, 6, 3, 4) * scale).requires_grad_(True)
    loss = attentive_distillation_loss(m, torch.randn(2, 6, 3, 4) * scale, se, attention=attention)
    loss.backward()
    assert torch.isfinite(loss) and loss >= 0
    assert m.grad is not None and torch.isfinite(m.grad).all()


SE8 = SqueezeExcitation(8)
M = torch.randn(2, 8, 3, 3)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: attentive_distillation_loss(M, torch.randn(2, 4, 3, 3), SE8), ValueError, "same shape"),
        (lambda: attentive_distillation_loss(M[0], M[0], SE8), ValueError, "4 dims"),
        (lambda: attentive_distillation_loss(M, M, None), ValueError, "se"),
        (lambda: attentive_distillation_loss(M, M, None, attention="channel"), ValueError, "se"),
        (lambda: attentive_distillation_loss(M, M, SE8, attention="full"), ValueError, "attention"),
        (lambda: attentive_distillation_loss(M, M, SE8, reduction="avg"), ValueError, "reduction"),
        (lambda: attentive_distillation_loss(M, M, lambda x: x), ValueError, "se"),
        (lambda: attentive_distillation_loss(M.long(), M.long(), SE8), TypeError, "floating"),
        (lambda: spatial_attention(torch.randn(3, 3)), ValueError, "4 dims"),
    ],
)
def test_bad_inputs_raise(call, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("scale", [1e19, 1e30, 1e-30])
def test_spatial_attention_of_huge_and_tiny_features_matches_float64(scale: float) -> None:
    m = torch.randn(2, 16, 5, 4)
    expected = _spatial_ref(m.double())  # the map does not depend on the scale of the features
    got = spatial_attention(m * scale)
    assert torch.isfinite(got).all()
    if scale > 1:
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


def test_empty_batch_gives_a_graph_connected_zero() -> None:
    m = torch.randn(0, 8, 4, 4, requires_grad=True)
    loss = attentive_distillation_loss(m, torch.randn(0, 8, 4, 4), None, attention="spatial")
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert m.grad is not None


def _grads(m: torch.Tensor, se: SqueezeExcitation, loss: torch.Tensor) -> list[torch.Tensor]:
    params = list(se.parameters())
    grads = torch.autograd.grad(loss, [m, *params], allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, [m, *params])]


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("scale", [0.0, 1e-9, 1e-3, 1.0, 1e4])
def test_fused_backward_matches_autograd_of_the_elementwise_loss(attention: str, scale: float) -> None:
    # reduction="sum"/"mean" run one fused autograd node with a hand-written backward; reduction="none" is
    # autograd through the plain formula. Same values and gradients (float64), the floor of eq. 6 included:
    # at scale 1e-9 the Frobenius norm of the energy is below 1e-12 and the floor binds.
    torch.manual_seed(0)
    se = SqueezeExcitation(8, reduction=2).double()
    m = (torch.randn(2, 8, 3, 5, dtype=torch.float64) * scale).requires_grad_(True)
    m_old = torch.randn(2, 8, 3, 5, dtype=torch.float64) * scale
    elementwise = attentive_distillation_loss(m, m_old, se, attention=attention, reduction="none").sum()
    fused = attentive_distillation_loss(m, m_old, se, attention=attention, reduction="sum")
    torch.testing.assert_close(fused, elementwise, rtol=1e-12, atol=1e-300)
    for got, expected in zip(_grads(m, se, fused), _grads(m, se, elementwise)):
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12 * float(expected.abs().max()))
    mean = attentive_distillation_loss(m, m_old, se, attention=attention)
    torch.testing.assert_close(mean, elementwise / m.numel(), rtol=1e-12, atol=1e-300)


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_gradcheck_with_sum_reduction(attention: str) -> None:
    se = SqueezeExcitation(6, reduction=2).double()
    m = torch.randn(2, 6, 4, 3, dtype=torch.float64, requires_grad=True)
    m_old = torch.randn(2, 6, 4, 3, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda x: attentive_distillation_loss(x, m_old, se, attention=attention, reduction="sum"), (m,)
    )


def test_backward_twice_with_retained_graph_and_channels_last_input() -> None:
    se = SqueezeExcitation(8, reduction=2)
    m = torch.randn(2, 8, 5, 6).to(memory_format=torch.channels_last).requires_grad_(True)
    m_old = torch.randn(2, 8, 5, 6)
    loss = attentive_distillation_loss(m, m_old, se)
    (first,) = torch.autograd.grad(loss, m, retain_graph=True)
    (second,) = torch.autograd.grad(loss, m)
    torch.testing.assert_close(first, second, rtol=0, atol=0)  # the backward pass leaves its saved tensors intact
    m_plain = m.detach().contiguous().requires_grad_(True)
    loss_plain = attentive_distillation_loss(m_plain, m_old, se)
    (plain,) = torch.autograd.grad(loss_plain, m_plain)
    torch.testing.assert_close(loss, loss_plain)
    torch.testing.assert_close(first, plain)


def test_backward_inside_autocast_keeps_float32_gradients() -> None:
    torch.manual_seed(0)
    se = SqueezeExcitation(16, reduction=4)
    m = torch.randn(2, 16, 5, 5, requires_grad=True)
    m_old = torch.randn(2, 16, 5, 5)
    (expected,) = torch.autograd.grad(attentive_distillation_loss(m, m_old, se), m)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        loss = attentive_distillation_loss(m, m_old, se)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (got,) = torch.autograd.grad(loss, m)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-9)


def _weighted_loss_ref(
    m: torch.Tensor, m_old: torch.Tensor, se: SqueezeExcitation, attention: str, weight: torch.Tensor
) -> torch.Tensor:
    """sum_{b,c,p} w_{b,p} (AD(m) - AD(m_old))^2 with explicit loops over the positions."""
    diff = (_ad_ref(m, se, attention) - _ad_ref(m_old, se, attention)) ** 2
    total = torch.zeros((), dtype=torch.float64)
    for b in range(m.shape[0]):
        for i in range(m.shape[2]):
            for j in range(m.shape[3]):
                total = total + weight[b, 0, i, j].double() * diff[b, :, i, j].sum()
    return total


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_weighted_loss_and_gradient_match_float64_reference(attention: str, reduction: str) -> None:
    g = torch.Generator().manual_seed(11)
    se = SqueezeExcitation(8, reduction=2).double()
    m = torch.randn(2, 8, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    m_old = torch.randn(2, 8, 3, 4, generator=g, dtype=torch.float64)
    weight = torch.rand(2, 1, 3, 4, generator=g, dtype=torch.float64)
    weight[0, 0, 0] = 0.0  # a row of positions left out entirely
    loss = attentive_distillation_loss(m, m_old, se, attention=attention, reduction=reduction, weight=weight)
    ref = _weighted_loss_ref(m, m_old.detach(), se, attention, weight)
    if reduction == "mean":
        ref = ref / m.numel()
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-14)
    (grad,) = torch.autograd.grad(loss, m)
    m_ref = m.detach().clone().requires_grad_(True)
    target = _ad_ref(m_old, se, attention).detach()
    diff = ((_ad_ref(m_ref, se, attention) - target) ** 2 * weight).sum() / (m.numel() if reduction == "mean" else 1)
    (grad_ref,) = torch.autograd.grad(diff, m_ref)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-10, atol=1e-13)


@given(attention=st.sampled_from(ATTENTIONS), seed=st.integers(0, 2**16), split=st.floats(0.0, 1.0, allow_nan=False))
def test_weights_split_the_loss_linearly(attention: str, seed: int, split: float) -> None:
    """w and 1 - w partition the unweighted loss; all-ones weights are the unweighted loss."""
    g = torch.Generator().manual_seed(seed)
    se = SqueezeExcitation(4, reduction=2).double()
    m = torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64)
    m_old = torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64)
    w = (torch.rand(2, 1, 3, 3, generator=g, dtype=torch.float64) < split).double()
    full = attentive_distillation_loss(m, m_old, se, attention=attention)
    parts = [attentive_distillation_loss(m, m_old, se, attention=attention, weight=x) for x in (w, 1 - w)]
    torch.testing.assert_close(parts[0] + parts[1], full, rtol=1e-12, atol=1e-15)
    ones = attentive_distillation_loss(m, m_old, se, attention=attention, weight=torch.ones_like(w))
    torch.testing.assert_close(ones, full, rtol=1e-12, atol=1e-15)


def test_weight_of_the_wrong_shape_raises() -> None:
    m = torch.randn(2, 4, 3, 3)
    with pytest.raises(ValueError, match=r"weight must have shape \(B, 1, H, W\)"):
        attentive_distillation_loss(m, m, None, attention="spatial", weight=torch.ones(2, 1, 3, 4))


def test_pixel_weights_are_the_fraction_of_kept_pixels() -> None:
    keep = torch.ones(1, 16, 16, dtype=torch.bool)
    keep[0, :4, :2] = False  # half of the top-left cell (each cell of the 4x4 map covers 4x4 pixels)
    w = pixel_weights(keep, (4, 4))
    assert w.shape == (1, 1, 4, 4)
    assert w[0, 0, 0, 0].item() == pytest.approx(0.5)
    assert torch.all(w.flatten()[1:] == 1.0)
    assert torch.equal(pixel_weights(keep, (16, 16)), keep.float().unsqueeze(1))  # same size: the mask
