"""Attentive feature distillation over the two feature maps ``z̄`` and ``h`` (eq. 5-8)."""

from __future__ import annotations

from torch import Tensor, nn

from incseg._checks import check_feature_map
from incseg.functional._common import Reduction, check_choice
from incseg.functional.attention import _ATTENTIONS, Attention, attentive_distillation_loss
from incseg.nn.squeeze_excitation import SqueezeExcitation

__all__ = ["AttentiveDistillationLoss"]


class AttentiveDistillationLoss(nn.Module):
    r"""Structured self-attention distillation ``L_AD`` of CAF (eq. 8).

    ``L_AD = ||AD(z̄) - AD(z̄_old)||^2 + ||AD(h) - AD(h_old)||^2`` with
    ``AD(m) = (AD_CH(m) ⊗ AD_SP(m) + 1) ⊙ m`` (eq. 7). Each map has its own trainable
    :class:`~incseg.nn.squeeze_excitation.SqueezeExcitation` (``se_z``, ``se_h``; eq. 5), shared by the
    student and teacher features of that map; the teacher side is a detached target (see
    :func:`incseg.functional.attentive_distillation_loss`). The module therefore has parameters when
    ``attention`` is ``"both"`` or ``"channel"``: they must be given to the optimizer.

    Args:
        channels_z: channels of the encoder features ``z̄``.
        channels_h: channels of the refined features ``h``.
        attention: ``"both"`` (eq. 7), ``"spatial"``, ``"channel"`` or ``"none"`` (plain feature distillation,
            the ablations of Table VI); ``se_z``/``se_h`` are ``None`` for ``"spatial"`` and ``"none"``.
        reduction: ``"mean"`` over the elements of each map (PROTOCOL default), ``"sum"`` (squared Frobenius
            norms, eq. 8 exactly); the two maps' terms are added either way.
        se_reduction: channel reduction of the SE blocks.

    Shape:
        - z, z_old: :math:`(B, C_z, H_z, W_z)`; h, h_old: :math:`(B, C_h, H_h, W_h)`.
        - Output: scalar.

    Raises:
        ValueError: non-positive channels, unknown ``attention`` or ``reduction`` (at construction); features
            of the wrong rank, channel count or mismatching shapes (at call).

    Example:
        >>> import torch
        >>> criterion = AttentiveDistillationLoss(64, 32)
        >>> z, h = torch.randn(2, 64, 9, 9), torch.randn(2, 32, 9, 9)
        >>> criterion(z, z + 0.1, h, h - 0.1).shape
        torch.Size([])
    """

    se_z: SqueezeExcitation | None
    se_h: SqueezeExcitation | None

    def __init__(
        self,
        channels_z: int,
        channels_h: int,
        *,
        attention: Attention = "both",
        reduction: Reduction = "mean",
        se_reduction: int = 16,
    ) -> None:
        super().__init__()
        for name, value in (("channels_z", channels_z), ("channels_h", channels_h)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        check_choice(attention, "attention", _ATTENTIONS)
        check_choice(reduction, "reduction", ("mean", "sum"))
        self.channels_z = channels_z
        self.channels_h = channels_h
        self.attention: Attention = attention
        self.reduction: Reduction = reduction
        if attention in ("both", "channel"):
            self.se_z = SqueezeExcitation(channels_z, reduction=se_reduction)
            self.se_h = SqueezeExcitation(channels_h, reduction=se_reduction)
        else:
            self.se_z = None
            self.se_h = None

    def forward(self, z: Tensor, z_old: Tensor, h: Tensor, h_old: Tensor) -> Tensor:
        """Return ``L_AD`` for the student features ``(z, h)`` and the teacher features ``(z_old, h_old)``."""
        for name, x, channels in (
            ("z", z, self.channels_z),
            ("z_old", z_old, self.channels_z),
            ("h", h, self.channels_h),
            ("h_old", h_old, self.channels_h),
        ):
            check_feature_map(x, name, channels=channels)
        loss_z = attentive_distillation_loss(z, z_old, self.se_z, attention=self.attention, reduction=self.reduction)
        loss_h = attentive_distillation_loss(h, h_old, self.se_h, attention=self.attention, reduction=self.reduction)
        return loss_z + loss_h

    def extra_repr(self) -> str:
        return (
            f"channels_z={self.channels_z}, channels_h={self.channels_h}, attention={self.attention!r}, "
            f"reduction={self.reduction!r}"
        )
