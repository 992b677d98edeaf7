"""Module twin of :func:`incseg.functional.unbiased_cross_entropy` (eq. 14-15)."""

from __future__ import annotations

from torch import Tensor, nn

from incseg.functional._common import Reduction, check_choice
from incseg.functional.cross_entropy import unbiased_cross_entropy

__all__ = ["UnbiasedCrossEntropyLoss"]


class UnbiasedCrossEntropyLoss(nn.Module):
    """Unbiased cross-entropy of MiB, the segmentation loss of CAF (eq. 14-15).

    Labels of old classes count as background: the background label takes the student's total probability of
    the background and the ``num_old_classes - 1`` old classes. With ``num_old_classes <= 1`` this is the plain
    cross-entropy. See :func:`incseg.functional.unbiased_cross_entropy` for the details.

    Args:
        num_old_classes: number of classes of the previous step, background included (0 at the first step).
            Settable attribute, so one instance can serve every step.
        ignore_index: label value of ignored pixels (``None``: every pixel counts).
        reduction: ``"mean"`` over non-ignored pixels, ``"sum"`` or ``"none"``.

    Shape:
        - logits: :math:`(B, K, h, w)`, upsampled bilinearly to the labels' size when different.
        - labels: :math:`(B, H, W)` int64.
        - Output: scalar, or :math:`(B, H, W)` for ``reduction="none"``.

    Raises:
        ValueError: ``num_old_classes`` negative or ``reduction`` unknown (at construction); see the functional
            for the errors at call.

    Example:
        >>> import torch
        >>> criterion = UnbiasedCrossEntropyLoss(num_old_classes=3)
        >>> logits, labels = torch.randn(2, 5, 8, 8), torch.randint(0, 5, (2, 8, 8))
        >>> criterion(logits, labels).shape
        torch.Size([])
    """

    def __init__(self, num_old_classes: int, *, ignore_index: int | None = 255, reduction: Reduction = "mean") -> None:
        super().__init__()
        if isinstance(num_old_classes, bool) or not isinstance(num_old_classes, int) or num_old_classes < 0:
            raise ValueError(f"num_old_classes must be a non-negative int, got {num_old_classes!r}")
        check_choice(reduction, "reduction", ("none", "mean", "sum"))
        self.num_old_classes = num_old_classes
        self.ignore_index = ignore_index
        self.reduction: Reduction = reduction

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Return the unbiased cross-entropy of ``logits`` against ``labels``."""
        return unbiased_cross_entropy(
            logits, labels, self.num_old_classes, ignore_index=self.ignore_index, reduction=self.reduction
        )

    def extra_repr(self) -> str:
        return f"num_old_classes={self.num_old_classes}, ignore_index={self.ignore_index}, reduction={self.reduction!r}"
