"""Tests for the structured attention of CAF (paper eq. 1-4)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor, nn

from incseg.nn.structured_attention import AttentionMaps, StructuredAttention

SIZES = [(1, 7, 5), (2, 7, 5), (1, 8, 12), (2, 8, 12)]


def _randomize(attention: StructuredAttention) -> None:
    with torch.no_grad():
        for p in attention.parameters():
            p.normal_(0.0, 0.5)


def _reference(attention: StructuredAttention, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Eq. 1-4 written out: full C -> C convolutions, then the averages, the outer product and the residual."""
    _, channels, height, width = v.shape

    def conv(layer: nn.Conv2d) -> Tensor:  # (w * v)[c, h, w] = sum_k W[c, k] v[k, h, w] + b[c]
        assert layer.bias is not None
        return torch.einsum("ck,bkhw->bchw", layer.weight[:, :, 0, 0], v) + layer.bias[None, :, None, None]

    sp_full, ch_full = conv(attention.conv_sp), conv(attention.conv_ch)
    a_sp = sum(sp_full[:, c] for c in range(channels)) / channels  # eq. 1, (B, H, W)
    a_ch = sum(ch_full[:, :, h, w] for h in range(height) for w in range(width)) / (height * width)  # eq. 2, (B, C)
    assert isinstance(a_sp, Tensor) and isinstance(a_ch, Tensor)
    if attention.gate == "sigmoid":
        a_sp, a_ch = torch.sigmoid(a_sp), torch.sigmoid(a_ch)
    a_str = torch.einsum("bc,bhw->bchw", a_ch, a_sp)  # eq. 3, tensor product
    z_bar = v + a_str * v  # eq. 4, (I + A_STR) v
    return z_bar, a_ch[:, :, None, None], a_sp[:, None]


@pytest.mark.parametrize(("batch", "height", "width"), SIZES)
@pytest.mark.parametrize("gate", [None, "sigmoid"])
def test_float64_reference(batch: int, height: int, width: int, gate: str | None) -> None:
    attention = StructuredAttention(6, gate=gate).double()  # type: ignore[arg-type]
    _randomize(attention)
    v = torch.randn(batch, 6, height, width, dtype=torch.float64)
    z_bar, maps = attention(v, return_maps=True)
    ref, ref_ch, ref_sp = _reference(attention, v)
    assert isinstance(maps, AttentionMaps)
    assert (
        z_bar.shape == v.shape
        and maps.channel.shape == (batch, 6, 1, 1)
        and maps.spatial.shape == (batch, 1, height, width)
    )
    torch.testing.assert_close(z_bar, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(maps.channel, ref_ch, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(maps.spatial, ref_sp, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(attention(v), z_bar, rtol=0, atol=0)


@given(
    channels=st.integers(1, 5),
    height=st.integers(1, 6),
    width=st.integers(1, 6),
    gate=st.sampled_from([None, "sigmoid"]),
    seed=st.integers(0, 2**16),
)
def test_properties(channels: int, height: int, width: int, gate: str | None, seed: int) -> None:
    torch.manual_seed(seed)
    attention = StructuredAttention(channels, gate=gate).double()  # type: ignore[arg-type]
    _randomize(attention)
    v = torch.randn(2, channels, height, width, dtype=torch.float64)
    z_bar, maps = attention(v, return_maps=True)
    torch.testing.assert_close(z_bar, _reference(attention, v)[0], rtol=1e-10, atol=1e-10)
    # Per image, z_bar / v - 1 is the rank-1 tensor A_CH (x) A_SP.
    torch.testing.assert_close(z_bar - v, v * maps.channel * maps.spatial, rtol=1e-12, atol=1e-12)
    if gate == "sigmoid":
        assert ((maps.channel > 0) & (maps.channel < 1)).all() and ((maps.spatial > 0) & (maps.spatial < 1)).all()
        assert (z_bar.abs() >= v.abs()).all() and (z_bar.abs() <= 2 * v.abs()).all()
    # Each image is attended independently of the others in the batch.
    torch.testing.assert_close(attention(v[1:]), z_bar[1:], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("batch", "height", "width"), SIZES)
def test_identity_at_init(batch: int, height: int, width: int) -> None:
    attention = StructuredAttention(8)
    v = torch.randn(batch, 8, height, width)
    z_bar, maps = attention(v, return_maps=True)
    torch.testing.assert_close(z_bar, v, rtol=0, atol=0)
    assert not maps.channel.any() and maps.spatial.any()


def test_sigmoid_gate_at_init() -> None:
    attention = StructuredAttention(8, gate="sigmoid")
    v = torch.randn(2, 8, 7, 5)
    z_bar, maps = attention(v, return_maps=True)
    torch.testing.assert_close(maps.channel, torch.full_like(maps.channel, 0.5))
    torch.testing.assert_close(z_bar, (1 + 0.5 * maps.spatial) * v)


def test_every_parameter_gets_gradient() -> None:
    attention = StructuredAttention(8)
    v = torch.randn(2, 8, 7, 5, requires_grad=True)
    out = attention(v)
    (out * torch.randn_like(out)).sum().backward()
    for name, p in attention.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # The zero-initialised conv_ch learns from the first step; conv_sp once A_CH != 0.
    assert attention.conv_ch.weight.grad is not None and attention.conv_ch.weight.grad.abs().sum() > 0
    attention.zero_grad()
    _randomize(attention)
    out = attention(v)
    (out * torch.randn_like(out)).sum().backward()
    for name, p in attention.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("gate", [None, "sigmoid"])
def test_bf16_autocast_finite(gate: str | None) -> None:
    attention = StructuredAttention(8, gate=gate)  # type: ignore[arg-type]
    _randomize(attention)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z_bar, maps = attention(torch.randn(2, 8, 7, 5), return_maps=True)
    assert torch.isfinite(z_bar).all() and torch.isfinite(maps.channel).all() and torch.isfinite(maps.spatial).all()


def test_torch_compile_smoke() -> None:
    attention = StructuredAttention(8)
    _randomize(attention)
    v = torch.randn(2, 8, 7, 5, requires_grad=True)
    compiled = torch.compile(attention, fullgraph=True, backend="aot_eager")
    out, maps = compiled(v, return_maps=True)
    torch.testing.assert_close(out, attention(v))
    (out.sum() + maps.spatial.sum()).backward()
    assert v.grad is not None and torch.isfinite(v.grad).all()


def test_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match=r"gate must be one of \[None, 'sigmoid'\]"):
        StructuredAttention(8, gate="softmax")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="must be an int >= 1"):
        StructuredAttention(-1)
    attention = StructuredAttention(8)
    with pytest.raises(ValueError, match="8 channels"):
        attention(torch.randn(2, 3, 7, 5))
    with pytest.raises(TypeError, match="floating-point"):
        attention(torch.ones(2, 8, 7, 5, dtype=torch.int32))
