"""Module twins of the output distillation functionals: :class:`KDLoss`, :class:`UnbiasedKDLoss`,
:class:`BalancedKDLoss` (eq. 9-12)."""

from __future__ import annotations

from torch import Tensor, nn

from incseg.functional._common import ClassReduction, Reduction, check_choice
from incseg.functional.distillation import balanced_kd_loss, kd_loss, unbiased_kd_loss

__all__ = ["BalancedKDLoss", "KDLoss", "UnbiasedKDLoss"]


class _KDBase(nn.Module):
    def __init__(self, *, class_reduction: ClassReduction = "mean", reduction: Reduction = "mean") -> None:
        super().__init__()
        check_choice(class_reduction, "class_reduction", ("mean", "sum"))
        check_choice(reduction, "reduction", ("none", "mean", "sum"))
        self.class_reduction: ClassReduction = class_reduction
        self.reduction: Reduction = reduction

    def extra_repr(self) -> str:
        return f"class_reduction={self.class_reduction!r}, reduction={self.reduction!r}"


class KDLoss(_KDBase):
    """Plain knowledge distillation of LwF on the old classes (module twin of :func:`incseg.functional.kd_loss`).

    The student's log-softmax is restricted to the ``n_old`` old classes and matched to the old model's softmax.

    Args:
        class_reduction: ``"mean"`` divides the class sum by ``n_old`` (default, as MiB), ``"sum"`` keeps it.
        reduction: ``"mean"`` over counted pixels, ``"sum"`` or ``"none"``.

    Shape:
        - logits: :math:`(B, K, H, W)`; old_logits: :math:`(B, n_{old}, h, w)`; mask: :math:`(B, H, W)` bool.
        - Output: scalar, or :math:`(B, H, W)` for ``reduction="none"``.

    Raises:
        ValueError: unknown ``class_reduction`` or ``reduction`` (at construction); see the functional for
            the errors at call.

    Example:
        >>> import torch
        >>> KDLoss()(torch.randn(2, 6, 8, 8), torch.randn(2, 4, 8, 8)).shape
        torch.Size([])
    """

    def forward(self, logits: Tensor, old_logits: Tensor, mask: Tensor | None = None) -> Tensor:
        """Return the distillation loss; ``mask`` (``True`` = pixel counts) optionally excludes pixels."""
        return kd_loss(logits, old_logits, class_reduction=self.class_reduction, reduction=self.reduction, mask=mask)


class UnbiasedKDLoss(_KDBase):
    """Unbiased knowledge distillation of MiB (eq. 9-10; module twin of :func:`incseg.functional.unbiased_kd_loss`).

    The student's background probability is aggregated over the background and the new classes (eq. 10).

    Args:
        class_reduction: ``"mean"`` divides the class sum by ``n_old`` (default, MiB and the CAF release),
            ``"sum"`` gives eq. 9 exactly.
        reduction: ``"mean"`` over counted pixels, ``"sum"`` or ``"none"``.

    Shape:
        - logits: :math:`(B, K, H, W)`; old_logits: :math:`(B, n_{old}, h, w)`; mask: :math:`(B, H, W)` bool.
        - Output: scalar, or :math:`(B, H, W)` for ``reduction="none"``.

    Raises:
        ValueError: unknown ``class_reduction`` or ``reduction`` (at construction); see the functional for
            the errors at call.

    Example:
        >>> import torch
        >>> UnbiasedKDLoss()(torch.randn(2, 6, 8, 8), torch.randn(2, 4, 8, 8)).shape
        torch.Size([])
    """

    def forward(self, logits: Tensor, old_logits: Tensor, mask: Tensor | None = None) -> Tensor:
        """Return the distillation loss; ``mask`` (``True`` = pixel counts) optionally excludes pixels."""
        return unbiased_kd_loss(
            logits, old_logits, class_reduction=self.class_reduction, reduction=self.reduction, mask=mask
        )


class BalancedKDLoss(_KDBase):
    """Balanced knowledge distillation of CAF, ``L_D = γ L_B + L_N`` (eq. 11-12).

    Module twin of :func:`incseg.functional.balanced_kd_loss`: the unbiased distillation whose background term
    is weighted per image by the detached ``γ`` of :func:`incseg.functional.gamma_balance`.

    Args:
        class_reduction: ``"mean"`` divides the class sum by ``n_old`` (default, MiB and the CAF release),
            ``"sum"`` keeps the plain sum of eq. 9.
        reduction: ``"mean"`` over counted pixels, ``"sum"`` or ``"none"``.

    Shape:
        - logits: :math:`(B, K, H, W)`; old_logits: :math:`(B, n_{old}, h, w)`; mask: :math:`(B, H, W)` bool.
        - Output: scalar, or :math:`(B, H, W)` for ``reduction="none"``.

    Raises:
        ValueError: unknown ``class_reduction`` or ``reduction`` (at construction); see the functional for
            the errors at call.

    Example:
        >>> import torch
        >>> BalancedKDLoss()(torch.randn(2, 6, 8, 8), torch.randn(2, 4, 8, 8)).shape
        torch.Size([])
    """

    def forward(self, logits: Tensor, old_logits: Tensor, mask: Tensor | None = None) -> Tensor:
        """Return the distillation loss; ``mask`` (``True`` = pixel counts) optionally excludes pixels."""
        return balanced_kd_loss(
            logits, old_logits, class_reduction=self.class_reduction, reduction=self.reduction, mask=mask
        )
