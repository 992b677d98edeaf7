"""Feature fusion of the CAF module: concatenate old and new projections, 1x1 conv back to C (Section III-A)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from incseg._checks import check_feature_map, check_int, check_same_shape
from incseg.nn.non_local import _conv1x1

__all__ = ["FeatureFusion"]


class FeatureFusion(nn.Module):
    """Fusion module of CAF: ``v^(l-1, l) = conv_1x1(concat(v^(l-1), v^l))`` (paper Section III-A, Fig. 3).

    The projected features of the old and the new model are concatenated along channels (old first) and a
    1x1 convolution with bias halves the channels back to ``C``.

    Initialisation: the convolution starts as the average of its two inputs (weight ``[I/2, I/2]``, bias 0),
    so ``fusion(v, v) == v``. At the start of an incremental step the student is a copy of the teacher, both
    projections are the identity and ``v_old == v_new``: the fused tensor then equals what the ``"skip"``
    strategy feeds the refiner, and inserting the fusion does not perturb the network. (A random init would
    scramble the features entering the already trained refiner.) Every weight still receives gradients.

    Args:
        channels: number of channels ``C`` of each input.

    Shape:
        - v_old: ``(B, C, H, W)``
        - v_new: ``(B, C, H, W)``
        - output: ``(B, C, H, W)``

    Raises:
        ValueError: ``channels`` not a positive int; inputs of the wrong rank, channel count or different shapes.
        TypeError: inputs are not floating-point tensors.

    Example:
        >>> fusion = FeatureFusion(4)
        >>> v = torch.randn(2, 4, 7, 5)
        >>> torch.allclose(fusion(v, v), v, atol=1e-6)
        True
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = check_int(channels, "channels")
        self.conv = nn.Conv2d(2 * channels, channels, kernel_size=1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise the convolution to the average of its two inputs (weight ``[I/2, I/2]``, bias 0)."""
        with torch.no_grad():
            eye = torch.eye(self.channels, dtype=self.conv.weight.dtype, device=self.conv.weight.device)
            self.conv.weight.copy_(torch.cat([eye, eye], dim=1).mul_(0.5)[:, :, None, None])
            if self.conv.bias is not None:
                nn.init.zeros_(self.conv.bias)

    def forward(self, v_old: Tensor, v_new: Tensor) -> Tensor:
        """Fuse the old and new projections into ``v^(l-1, l)``.

        Args:
            v_old: projection of the old model's features, ``(B, C, H, W)``.
            v_new: projection of the new model's features, same shape.

        Returns:
            The fused features, ``(B, C, H, W)``.

        Raises:
            ValueError: wrong rank or channel count, or ``v_old`` and ``v_new`` of different shapes.
            TypeError: an input is not a floating-point tensor.
        """
        check_feature_map(v_old, "v_old", channels=self.channels)
        check_feature_map(v_new, "v_new", channels=self.channels)
        check_same_shape(v_old, v_new, "v_old", "v_new")
        return _conv1x1(torch.cat([v_old, v_new], dim=1), self.conv.weight, self.conv.bias)

    def extra_repr(self) -> str:
        return f"channels={self.channels}"
