"""Squeeze-and-excitation channel attention ``AD_CH`` of the attentive distillation (eq. 5)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from incseg._checks import check_feature_map, check_int

__all__ = ["ChannelAttention", "SqueezeExcitation"]


class SqueezeExcitation(nn.Module):
    r"""Channel attention of a feature map by squeeze-and-excitation (eq. 5).

    ``AD_CH(m) = sigmoid(W_2 * relu(W_1 * AvgPool(m)))`` with 1x1 convolutions (with bias)
    ``W_1: C -> max(C // reduction, 1)`` and ``W_2: -> C``. It returns the weights only (it does not multiply
    them into ``m``). The attentive distillation uses one instance per feature map, shared by the teacher and
    the student features of that map (see :func:`incseg.functional.attentive_distillation_loss`).

    Args:
        channels: number of channels ``C`` of the feature map.
        reduction: channel reduction of the hidden layer (16 in the paper and the SE paper); the hidden layer
            keeps at least one channel.

    Shape:
        - Input: :math:`(B, C, H, W)`.
        - Output: :math:`(B, C, 1, 1)`, values in ``(0, 1)``.

    Raises:
        ValueError: ``channels`` or ``reduction`` not positive (at construction); input of the wrong rank or
            channel count (at call).

    Example:
        >>> se = SqueezeExcitation(64)
        >>> se(torch.randn(2, 64, 9, 7)).shape
        torch.Size([2, 64, 1, 1])
    """

    def __init__(self, channels: int, *, reduction: int = 16) -> None:
        super().__init__()
        self.channels = check_int(channels, "channels")
        self.reduction = check_int(reduction, "reduction")
        hidden = max(channels // reduction, 1)
        self.fc1 = nn.Conv2d(channels, hidden, kernel_size=1)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, channels, kernel_size=1)

    def forward(self, m: Tensor) -> Tensor:
        """Return the channel weights ``AD_CH(m)`` of shape ``(B, C, 1, 1)``."""
        check_feature_map(m, "m", channels=self.channels)
        pooled = m.mean(dim=(2, 3), keepdim=True)
        return torch.sigmoid(self.fc2(self.act(self.fc1(pooled))))

    def extra_repr(self) -> str:
        return f"channels={self.channels}, reduction={self.reduction}"


ChannelAttention = SqueezeExcitation
"""Alias of :class:`SqueezeExcitation` (the paper's ``AD_CH``)."""
