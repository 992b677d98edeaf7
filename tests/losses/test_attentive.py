"""Tests of AttentiveDistillationLoss, L_AD over the two feature maps z-bar and h (eq. 8)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from incseg.functional import attentive_distillation_loss
from incseg.losses import AttentiveDistillationLoss

ATTENTIONS = ["both", "spatial", "channel", "plain"]


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_module_equals_sum_of_functionals(attention: str, reduction: str) -> None:
    criterion = AttentiveDistillationLoss(32, 16, attention=attention, reduction=reduction)
    z, z_old = torch.randn(2, 32, 5, 5), torch.randn(2, 32, 5, 5)
    h, h_old = torch.randn(2, 16, 9, 7), torch.randn(2, 16, 9, 7)
    expected = attentive_distillation_loss(
        z, z_old, criterion.se_z, attention=attention, reduction=reduction
    ) + attentive_distillation_loss(h, h_old, criterion.se_h, attention=attention, reduction=reduction)
    torch.testing.assert_close(criterion(z, z_old, h, h_old), expected)


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_parameters_and_gradients(attention: str) -> None:
    criterion = AttentiveDistillationLoss(32, 16, attention=attention, se_reduction=4)
    has_se = attention in ("both", "channel")
    assert (criterion.se_z is not None) == has_se
    assert (criterion.se_h is not None) == has_se
    z = torch.randn(2, 32, 5, 5, requires_grad=True)
    h = torch.randn(2, 16, 5, 5, requires_grad=True)
    criterion(z, torch.randn(2, 32, 5, 5), h, torch.randn(2, 16, 5, 5)).backward()
    assert z.grad is not None and h.grad is not None
    params = list(criterion.named_parameters())
    assert len(params) == (8 if has_se else 0)
    for name, p in params:
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_bf16_autocast_gives_finite_float32() -> None:
    criterion = AttentiveDistillationLoss(32, 16)
    z, h = torch.randn(2, 32, 4, 4), torch.randn(2, 16, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = criterion(z.bfloat16(), z.bfloat16() + 1, h.bfloat16(), h.bfloat16() - 1)
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss)


Z, H = torch.randn(2, 32, 4, 4), torch.randn(2, 16, 4, 4)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((torch.randn(2, 16, 4, 4), Z, H, H), "z must have 32 channels"),
        ((Z, Z, H, torch.randn(2, 32, 4, 4)), "h_old must have 16 channels"),
        ((Z, torch.randn(2, 32, 2, 2), H, H), "same shape"),
        ((Z[0], Z, H, H), "4 dims"),
    ],
)
def test_bad_inputs_raise(args: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        AttentiveDistillationLoss(32, 16)(*args)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"channels_z": 0, "channels_h": 4}, "channels_z"),
        ({"channels_z": 4, "channels_h": 4, "attention": "full"}, "attention"),
        ({"channels_z": 4, "channels_h": 4, "reduction": "none"}, "reduction"),
    ],
)
def test_bad_construction_raises(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        AttentiveDistillationLoss(**kwargs)


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_several_levels_sum_one_term_per_level(attention: str) -> None:
    criterion = AttentiveDistillationLoss({"1": 8, "3": 16}, 4, attention=attention, se_reduction=4).double()
    z = {1: torch.randn(2, 8, 6, 6, dtype=torch.float64), 3: torch.randn(2, 16, 3, 3, dtype=torch.float64)}
    z_old = {level: t + 0.1 * torch.randn_like(t) for level, t in z.items()}
    h, h_old = torch.randn(2, 4, 6, 6, dtype=torch.float64), torch.randn(2, 4, 6, 6, dtype=torch.float64)
    se = criterion.se_z
    expected = attentive_distillation_loss(h, h_old, criterion.se_h, attention=attention)
    for level in (1, 3):
        block = None if se is None else se[str(level)]  # type: ignore[index]
        expected = expected + attentive_distillation_loss(z[level], z_old[level], block, attention=attention)
    torch.testing.assert_close(criterion(z, z_old, h, h_old), expected)
    with pytest.raises(ValueError, match="levels"):
        criterion({1: z[1]}, z_old, h, h_old)
    with pytest.raises(TypeError, match="dict level"):
        criterion(z[1], z_old, h, h_old)


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    attention=st.sampled_from(ATTENTIONS),
    multi_level=st.booleans(),
    masked=st.booleans(),
)
def test_ad_maps_split_the_two_terms_float64(seed: int, attention: str, multi_level: bool, masked: bool) -> None:
    """``maps=("z",)`` and ``maps=("h",)`` give the two terms of the full loss (same SE blocks), each alone:
    their sum is the paper's L_AD, and the term of a map left out is a constant 0 with no gradient."""
    g = torch.Generator().manual_seed(seed)
    channels_z = {"1": 8, "3": 16} if multi_level else 16
    full = AttentiveDistillationLoss(channels_z, 4, attention=attention, se_reduction=4).double()
    parts = [
        AttentiveDistillationLoss(channels_z, 4, attention=attention, se_reduction=4, maps=m).double()
        for m in (("z",), ("h",))
    ]
    for part in parts:
        part.load_state_dict(full.state_dict(), strict=False)
    assert sum(len(list(p.parameters())) for p in parts) == len(list(full.parameters()))

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    if multi_level:
        z: object = {"1": rand(2, 8, 6, 6).requires_grad_(True), "3": rand(2, 16, 3, 3).requires_grad_(True)}
        z_old: object = {k: rand(*t.shape) for k, t in z.items()}  # type: ignore[attr-defined]
    else:
        z, z_old = rand(2, 16, 5, 5).requires_grad_(True), rand(2, 16, 5, 5)
    h, h_old = rand(2, 4, 6, 6).requires_grad_(True), rand(2, 4, 6, 6)
    keep = torch.rand(2, 12, 12, generator=g) > 0.3 if masked else None
    want = full.terms(z, z_old, h, h_old, keep=keep)
    z_only = parts[0].terms(z, z_old, h, h_old, keep=keep)
    h_only = parts[1].terms(z, z_old, h, h_old, keep=keep)
    torch.testing.assert_close(z_only[0], want[0], rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(h_only[1], want[1], rtol=1e-12, atol=1e-15)
    assert z_only[1].item() == 0.0 and not z_only[1].requires_grad
    assert h_only[0].item() == 0.0 and not h_only[0].requires_grad
    torch.testing.assert_close(
        parts[0](z, z_old, h, h_old, keep=keep) + parts[1](z, z_old, h, h_old, keep=keep),
        full(z, z_old, h, h_old, keep=keep),
        rtol=1e-12,
        atol=1e-15,
    )


def test_ad_maps_is_checked_and_shown() -> None:
    assert AttentiveDistillationLoss(8, 4).maps == ("z", "h")
    assert "maps=('h',)" in repr(AttentiveDistillationLoss(8, 4, maps="h"))
    with pytest.raises(ValueError, match="ad_maps"):
        AttentiveDistillationLoss(8, 4, maps=())
