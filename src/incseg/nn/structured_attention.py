"""Structured attention of the CAF module (paper eq. 1-4)."""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from incseg._checks import check_feature_map, check_int

__all__ = ["AttentionMaps", "StructuredAttention"]

Gate = Literal["sigmoid"]
_GATES = (None, "sigmoid")


class AttentionMaps(NamedTuple):
    """The two factors of the structured attention tensor ``A_STR = A_CH (x) A_SP`` (paper eq. 1-3).

    Attributes:
        channel: ``A_CH``, shape ``(B, C, 1, 1)`` (eq. 2).
        spatial: ``A_SP``, shape ``(B, 1, H, W)`` (eq. 1).
    """

    channel: Tensor
    spatial: Tensor


class StructuredAttention(nn.Module):
    """Structured channel x spatial attention with a residual connection (paper eq. 1-4).

    With ``v`` the fused features and ``conv_sp``, ``conv_ch`` two 1x1 convolutions ``C -> C``:

    - ``A_SP[h, w] = 1/C sum_c conv_sp(v)[c, h, w]`` (eq. 1, channel average), shape ``(B, 1, H, W)``;
    - ``A_CH[c] = 1/(HW) sum_{h,w} conv_ch(v)[c, h, w]`` (eq. 2, global average pooling), shape ``(B, C, 1, 1)``;
    - ``z_bar = (1 + A_CH (x) A_SP) * v`` (eq. 3-4).

    ``gate="sigmoid"`` passes both maps through a sigmoid, bounding them in ``(0, 1)`` (an option, not the
    paper's form).

    The paper only says "convolutional layers"; 1x1 kernels are used, as for every other layer of CAF. For a
    1x1 convolution the averages commute with the convolution, so the block computes the same numbers more
    cheaply: ``A_SP`` with the channel-averaged kernel (one output channel) and ``A_CH`` by convolving the
    spatially averaged features (a ``(B, C, 1, 1)`` input), instead of two full ``C -> C`` convolutions.

    Initialisation: ``conv_ch`` starts at zero (weight and bias) and ``conv_sp`` has PyTorch's default init,
    so ``A_CH = 0`` and the block is the identity ``z_bar = v`` at init, while ``conv_ch`` receives gradients
    from the first step (``conv_sp`` does once ``A_CH != 0``; zeroing both would freeze both forever). With
    ``gate="sigmoid"`` the identity is unreachable: the block starts as ``z_bar = (1 + sigmoid(A_SP) / 2) v``.

    Args:
        channels: number of channels ``C``.
        gate: ``None`` (paper, unbounded maps) or ``"sigmoid"``.

    Shape:
        - v: ``(B, C, H, W)``
        - output: ``(B, C, H, W)``; maps ``(B, C, 1, 1)`` and ``(B, 1, H, W)``

    Raises:
        ValueError: ``channels`` not a positive int, unknown ``gate``, ``v`` of the wrong rank or channel count.
        TypeError: ``v`` is not a floating-point tensor.

    Example:
        >>> attention = StructuredAttention(8)
        >>> v = torch.randn(2, 8, 7, 5)
        >>> z_bar, maps = attention(v, return_maps=True)
        >>> z_bar.shape, maps.channel.shape, maps.spatial.shape
        (torch.Size([2, 8, 7, 5]), torch.Size([2, 8, 1, 1]), torch.Size([2, 1, 7, 5]))
    """

    def __init__(self, channels: int, *, gate: Gate | None = None) -> None:
        super().__init__()
        self.channels = check_int(channels, "channels")
        if gate not in _GATES:
            raise ValueError(f"gate must be one of {list(_GATES)}, got {gate!r}")
        self.gate: Gate | None = gate
        self.conv_sp = nn.Conv2d(channels, channels, kernel_size=1)
        self.conv_ch = nn.Conv2d(channels, channels, kernel_size=1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Default init for ``conv_sp``, zeros for ``conv_ch`` (the block starts as the identity)."""
        self.conv_sp.reset_parameters()
        nn.init.zeros_(self.conv_ch.weight)
        if self.conv_ch.bias is not None:
            nn.init.zeros_(self.conv_ch.bias)

    def attention_maps(self, v: Tensor) -> AttentionMaps:
        """Compute the two attention factors from the fused features.

        Args:
            v: fused features ``v^(l-1, l)``, ``(B, C, H, W)``.

        Returns:
            :class:`AttentionMaps` with ``channel`` = ``A_CH`` (eq. 2, ``(B, C, 1, 1)``) and ``spatial`` = ``A_SP``
            (eq. 1, ``(B, 1, H, W)``), after the gate if any.

        Raises:
            ValueError: ``v`` is not ``(B, C, H, W)`` with ``C == channels``.
            TypeError: ``v`` is not a floating-point tensor.
        """
        check_feature_map(v, "v", channels=self.channels)
        # eq. 1: mean_c (W v + b)_c == (mean_c W_c) v + mean_c b_c for a 1x1 convolution.
        sp_weight = self.conv_sp.weight.mean(dim=0, keepdim=True)
        sp_bias = self.conv_sp.bias.mean(dim=0, keepdim=True) if self.conv_sp.bias is not None else None
        spatial = F.conv2d(v, sp_weight, sp_bias)
        # eq. 2: mean_hw (W v + b) == W (mean_hw v) + b for a 1x1 convolution.
        channel = self.conv_ch(v.mean(dim=(2, 3), keepdim=True))
        if self.gate == "sigmoid":
            spatial, channel = torch.sigmoid(spatial), torch.sigmoid(channel)
        return AttentionMaps(channel=channel, spatial=spatial)

    def forward(self, v: Tensor, return_maps: bool = False) -> Tensor | tuple[Tensor, AttentionMaps]:
        """Apply ``z_bar = (1 + A_CH (x) A_SP) * v`` (eq. 3-4).

        Args:
            v: fused features, ``(B, C, H, W)``.
            return_maps: also return the :class:`AttentionMaps`.

        Returns:
            ``z_bar`` (``(B, C, H, W)``), or ``(z_bar, maps)`` with ``return_maps=True``.

        Raises:
            ValueError: ``v`` is not ``(B, C, H, W)`` with ``C == channels``.
            TypeError: ``v`` is not a floating-point tensor.
        """
        maps = self.attention_maps(v)
        z_bar = v + v * (maps.channel * maps.spatial)
        return (z_bar, maps) if return_maps else z_bar

    def extra_repr(self) -> str:
        return f"channels={self.channels}, gate={self.gate!r}"
