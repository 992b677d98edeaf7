"""Tests for the CAF fusion module (concat + 1x1 conv 2C -> C)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from incseg.nn.fusion import FeatureFusion

SIZES = [(1, 7, 5), (2, 7, 5), (1, 8, 12), (2, 8, 12)]


def _reference(fusion: FeatureFusion, v_old: torch.Tensor, v_new: torch.Tensor) -> torch.Tensor:
    """Explicit sum over the concatenated channels: out[o] = sum_c W[o, c] v_old[c] + W[o, C + c] v_new[c] + b[o]."""
    weight, bias = fusion.conv.weight[:, :, 0, 0], fusion.conv.bias
    assert bias is not None
    channels = fusion.channels
    out = torch.empty_like(v_new)
    for o in range(channels):
        acc = bias[o] + torch.zeros_like(v_new[:, 0])
        for c in range(channels):
            acc = acc + weight[o, c] * v_old[:, c] + weight[o, channels + c] * v_new[:, c]
        out[:, o] = acc
    return out


@pytest.mark.parametrize(("batch", "height", "width"), SIZES)
def test_shape_and_float64_reference(batch: int, height: int, width: int) -> None:
    fusion = FeatureFusion(5).double()
    with torch.no_grad():
        for p in fusion.parameters():
            p.normal_()
    v_old = torch.randn(batch, 5, height, width, dtype=torch.float64)
    v_new = torch.randn(batch, 5, height, width, dtype=torch.float64)
    out = fusion(v_old, v_new)
    assert out.shape == (batch, 5, height, width)
    torch.testing.assert_close(out, _reference(fusion, v_old, v_new), rtol=1e-12, atol=1e-12)


@given(channels=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_average_at_init(channels: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    fusion = FeatureFusion(channels).double()
    v_old = torch.randn(2, channels, 3, 4, generator=gen, dtype=torch.float64)
    v_new = torch.randn(2, channels, 3, 4, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(fusion(v_old, v_new), (v_old + v_new) / 2, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(fusion(v_new, v_new), v_new, rtol=1e-14, atol=1e-14)


def test_old_features_come_first() -> None:
    fusion = FeatureFusion(3)
    with torch.no_grad():
        fusion.conv.weight.zero_()
        fusion.conv.weight[:, :3] = torch.eye(3)[:, :, None, None]  # keep only the first half (v_old)
    v_old, v_new = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(fusion(v_old, v_new), v_old)


def test_every_parameter_gets_gradient() -> None:
    fusion = FeatureFusion(4)
    v_old = torch.randn(2, 4, 7, 5, requires_grad=True)
    v_new = torch.randn(2, 4, 7, 5, requires_grad=True)
    out = fusion(v_old, v_new)
    (out * torch.randn_like(out)).sum().backward()
    for name, p in [*fusion.named_parameters(), ("v_old", v_old), ("v_new", v_new)]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_bf16_autocast_finite() -> None:
    fusion = FeatureFusion(4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fusion(torch.randn(2, 4, 7, 5), torch.randn(2, 4, 7, 5))
    assert out.shape == (2, 4, 7, 5) and torch.isfinite(out).all()


def test_torch_compile_smoke() -> None:
    fusion = FeatureFusion(4)
    v_old, v_new = torch.randn(2, 4, 7, 5), torch.randn(2, 4, 7, 5, requires_grad=True)
    out = torch.compile(fusion, fullgraph=True, backend="aot_eager")(v_old, v_new)
    torch.testing.assert_close(out, fusion(v_old, v_new))
    out.sum().backward()
    assert v_new.grad is not None and torch.isfinite(v_new.grad).all()


def test_rejects_bad_input() -> None:
    fusion = FeatureFusion(4)
    with pytest.raises(ValueError, match=r"\(2, 4, 7, 5\) and \(2, 4, 5, 7\)"):
        fusion(torch.randn(2, 4, 7, 5), torch.randn(2, 4, 5, 7))
    with pytest.raises(ValueError, match="v_new must have 4 channels"):
        fusion(torch.randn(2, 4, 7, 5), torch.randn(2, 3, 7, 5))
    with pytest.raises(TypeError, match="v_old"):
        fusion(torch.ones(2, 4, 7, 5, dtype=torch.long), torch.randn(2, 4, 7, 5))
    with pytest.raises(ValueError, match="must be an int >= 1"):
        FeatureFusion(0)
