"""Tests of the squeeze-and-excitation channel attention AD_CH (eq. 5)."""

from __future__ import annotations

import pytest
import torch

from incseg.nn.squeeze_excitation import ChannelAttention, SqueezeExcitation


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize(("height", "width"), [(5, 7), (9, 3), (1, 1)])
@pytest.mark.parametrize(("channels", "reduction"), [(32, 16), (8, 16), (3, 1)])
def test_shape_range_and_every_parameter_gets_a_gradient(
    batch: int, height: int, width: int, channels: int, reduction: int
) -> None:
    se = SqueezeExcitation(channels, reduction=reduction)
    with torch.no_grad():  # keep the hidden ReLU units active: a dead unit legitimately has a zero gradient
        se.fc1.bias.fill_(1.0)
    m = torch.randn(batch, channels, height, width, requires_grad=True)
    out = se(m)
    assert out.shape == (batch, channels, 1, 1)
    assert ((out > 0) & (out < 1)).all()
    # weight the channels so that the gradient does not cancel out through the sigmoid's sum
    (out * torch.randn_like(out)).sum().backward()
    for name, p in se.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name
    assert m.grad is not None and torch.isfinite(m.grad).all()


def test_hidden_width() -> None:
    assert SqueezeExcitation(256).fc1.out_channels == 16
    assert SqueezeExcitation(8).fc1.out_channels == 1  # at least one hidden channel
    assert SqueezeExcitation(64, reduction=4).fc2.out_channels == 64


def test_matches_equation_5() -> None:
    se = SqueezeExcitation(12, reduction=3)
    m = torch.randn(2, 12, 5, 6)
    pooled = m.double().mean(dim=(2, 3))
    hidden = torch.relu(pooled @ se.fc1.weight.double()[:, :, 0, 0].T + se.fc1.bias.double())
    expected = torch.sigmoid(hidden @ se.fc2.weight.double()[:, :, 0, 0].T + se.fc2.bias.double())
    torch.testing.assert_close(se(m).double()[:, :, 0, 0], expected, rtol=1e-5, atol=1e-6)


def test_alias() -> None:
    assert ChannelAttention is SqueezeExcitation


def test_bf16_autocast_finite() -> None:
    se = SqueezeExcitation(16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = se(torch.randn(2, 16, 5, 7))
    assert torch.isfinite(out.float()).all()


def test_compiles() -> None:
    se = SqueezeExcitation(16)
    m = torch.randn(2, 16, 5, 7)
    compiled = torch.compile(se, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(m), se(m))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"channels": 0}, "channels"), ({"channels": 4, "reduction": 0}, "reduction"), ({"channels": 2.5}, "channels")],
)
def test_bad_construction_raises(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SqueezeExcitation(**kwargs)


def test_bad_input_raises() -> None:
    se = SqueezeExcitation(8)
    with pytest.raises(ValueError, match="8 channels"):
        se(torch.randn(2, 4, 3, 3))
    with pytest.raises(ValueError, match="4 dims"):
        se(torch.randn(2, 8, 3))
