"""Continual Attentive Fusion (CAF) module (paper Section III-A, Fig. 3, eq. 1-4)."""

from __future__ import annotations

from typing import Literal, cast, get_args

import torch
from torch import Tensor, nn

from incseg._checks import check_feature_map, check_int, check_same_shape
from incseg.nn.fusion import FeatureFusion
from incseg.nn.non_local import NonLocalProjection
from incseg.nn.structured_attention import AttentionMaps, Gate, StructuredAttention

__all__ = ["ContinualAttentiveFusion", "FusionStrategy"]

FusionStrategy = Literal["skip", "zero_pad", "concat"]
_STRATEGIES: tuple[str, ...] = get_args(FusionStrategy)


class ContinualAttentiveFusion(nn.Module):
    """CAF: fuse the non-local projections of the new and old encoder features, then structured attention.

    Training with old features (``self.training`` and ``z_old`` given)::

        v_new = projection_new(z_new);  v_old = projection_old(z_old)
        v_fused = fusion(v_old, v_new)                      # concat on channels, 1x1 conv 2C -> C
        z_bar = (1 + A_CH (x) A_SP) * v_fused               # eq. 1-4, StructuredAttention

    Otherwise (evaluation mode, or no old features: step 0 and the teacher itself) ``test_strategy`` decides:

    - ``"skip"`` (default): ``v_new`` stands for ``v_fused`` (fusion and ``z_old`` unused, paper Fig. 3);
    - ``"zero_pad"``: ``v_fused = fusion(0, v_new)``, the old projection replaced by zeros;
    - ``"concat"``: ``v_fused = fusion(projection_old(z_old), v_new)``, as in training; needs ``z_old`` (the
      old model at inference).

    ``z_old`` is expected to be the (detached) teacher's encoder output; CAF does not detach it, so gradients
    reach it only if it requires grad. All parameters (both projections, fusion, attention) are meant to be
    trained. Every sub-block starts as the identity (projections, attention) or the average (fusion), so at
    the start of a step, when ``z_new == z_old``, ``z_bar == z_new``.

    Args:
        channels: channels ``C`` of the encoder features.
        inner_channels: inner channels of the non-local projections (default ``C // 2``).
        subsample: 2x2 max-pool keys and values in the non-local projections.
        test_strategy: ``"skip"``, ``"zero_pad"`` or ``"concat"``; a settable attribute.
        gate: ``None`` (paper) or ``"sigmoid"`` for the structured attention maps.
        fusion_dropout: in training with old features, the probability per image that the fusion is replaced
            by the ``skip`` path (``v_new`` alone), so that ``skip`` at test time sees what it was trained on
            (0, the paper: always fuse in training).

    Shape:
        - z_new: ``(B, C, H, W)``
        - z_old: ``(B, C, H, W)`` or ``None``
        - output: ``(B, C, H, W)``; with ``return_maps``, also :class:`AttentionMaps`
          (``(B, C, 1, 1)``, ``(B, 1, H, W)``)

    Raises:
        ValueError: unknown ``test_strategy`` or ``gate``; ``z_new``/``z_old`` of the wrong rank, channel count or
            different shapes; ``"concat"`` needed ``z_old`` and got ``None``.
        TypeError: inputs are not floating-point tensors.

    Example:
        >>> caf = ContinualAttentiveFusion(8)
        >>> z_new, z_old = torch.randn(2, 8, 7, 5), torch.randn(2, 8, 7, 5)
        >>> caf(z_new, z_old).shape
        torch.Size([2, 8, 7, 5])
        >>> z_bar, maps = caf.eval()(z_new, return_maps=True)  # "skip": z_old not needed
        >>> maps.spatial.shape
        torch.Size([2, 1, 7, 5])
    """

    def __init__(
        self,
        channels: int,
        *,
        inner_channels: int | None = None,
        subsample: bool = True,
        test_strategy: FusionStrategy = "skip",
        gate: Gate | None = None,
        fusion_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.channels = check_int(channels, "channels")
        if isinstance(fusion_dropout, bool) or not isinstance(fusion_dropout, (int, float)):
            raise TypeError(f"fusion_dropout must be a float, got {type(fusion_dropout).__name__}")
        if not 0.0 <= fusion_dropout <= 1.0:
            raise ValueError(f"fusion_dropout must be in [0, 1], got {fusion_dropout}")
        self.fusion_dropout = float(fusion_dropout)
        self.test_strategy = test_strategy
        self.projection_new = NonLocalProjection(channels, inner_channels=inner_channels, subsample=subsample)
        self.projection_old = NonLocalProjection(channels, inner_channels=inner_channels, subsample=subsample)
        self.fusion = FeatureFusion(channels)
        self.attention = StructuredAttention(channels, gate=gate)

    @property
    def test_strategy(self) -> FusionStrategy:
        """What stands in for the fusion at test time or without old features (``skip``/``zero_pad``/``concat``)."""
        return self._test_strategy

    @test_strategy.setter
    def test_strategy(self, value: FusionStrategy) -> None:
        if value not in _STRATEGIES:
            raise ValueError(f"test_strategy must be one of {list(_STRATEGIES)}, got {value!r}")
        self._test_strategy = cast(FusionStrategy, value)

    def fuse(self, z_new: Tensor, z_old: Tensor | None = None) -> Tensor:
        """Return ``v^(l-1, l)``, the input of the structured attention, following the mode and strategy.

        Args:
            z_new: encoder features of the model being trained, ``(B, C, H, W)``.
            z_old: encoder features of the old (teacher) model, same shape, or ``None``.

        Returns:
            The fused features, ``(B, C, H, W)``.

        Raises:
            ValueError: bad shapes, or ``"concat"`` without ``z_old``.
        """
        check_feature_map(z_new, "z_new", channels=self.channels)
        if z_old is not None:
            check_feature_map(z_old, "z_old", channels=self.channels)
            check_same_shape(z_old, z_new, "z_old", "z_new")
        v_new = self.projection_new(z_new)
        strategy = "concat" if self.training and z_old is not None else self._test_strategy
        if strategy == "skip":
            return v_new
        if strategy == "zero_pad":
            return self.fusion(torch.zeros_like(v_new), v_new)
        if z_old is None:
            raise ValueError(
                'test_strategy="concat" needs the old features z_old, got None; pass z_old or use "skip"/"zero_pad"'
            )
        fused = self.fusion(self.projection_old(z_old), v_new)
        if self.training and self.fusion_dropout > 0:
            keep = torch.rand(v_new.shape[0], 1, 1, 1, device=v_new.device) >= self.fusion_dropout
            fused = torch.where(keep, fused, v_new)
        return fused

    def forward(
        self, z_new: Tensor, z_old: Tensor | None = None, *, return_maps: bool = False
    ) -> Tensor | tuple[Tensor, AttentionMaps]:
        """Compute ``z_bar`` (eq. 4) from the new (and old) encoder features.

        Args:
            z_new: encoder features of the model being trained, ``(B, C, H, W)``.
            z_old: encoder features of the old (teacher) model, same shape, or ``None``. Fused in training mode;
                otherwise used only by ``test_strategy="concat"``.
            return_maps: also return the :class:`AttentionMaps` (``A_CH``, ``A_SP``).

        Returns:
            ``z_bar`` (``(B, C, H, W)``), or ``(z_bar, maps)`` with ``return_maps=True``.

        Raises:
            ValueError: bad shapes (the message names both), or ``"concat"`` without ``z_old``.
            TypeError: inputs are not floating-point tensors.
        """
        return self.attention(self.fuse(z_new, z_old), return_maps=return_maps)

    def extra_repr(self) -> str:
        extra = f", fusion_dropout={self.fusion_dropout}" if self.fusion_dropout else ""
        return f"channels={self.channels}, test_strategy={self._test_strategy!r}{extra}"
