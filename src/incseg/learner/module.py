"""The training module: student network plus criterion, the part a user wraps in DistributedDataParallel."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from incseg.learner.config import NormPolicy
from incseg.losses import CAFLoss, LossOutput
from incseg.models import IncrementalSegmenter

if TYPE_CHECKING:
    from incseg.methods import Method

__all__ = ["TrainingModule"]


def _never_saw_data(bn: nn.modules.batchnorm._BatchNorm) -> bool:
    """Whether a batch-norm layer still holds its initial running statistics (mean 0, variance 1)."""
    mean, var = bn.running_mean, bn.running_var
    if mean is None or var is None or mean.is_meta:
        return False  # no running statistics: evaluation mode uses the batch's anyway
    with torch.no_grad():
        return bool((mean == 0).all()) and bool((var == 1).all())


class TrainingModule(nn.Module):
    """Student forward pass and loss (eq. 13) in one module, so that one DDP wrapper covers all trained weights.

    ``forward(images, labels, teacher_out)`` runs ``model.forward_features(images, z_old)`` (with
    ``z_old = teacher_out["z"]``, the old model's encoder features, when the model has a CAF module, eq. 1-4)
    and then the criterion with the old logits (eq. 9-12) and the old ``{"z": z_bar, "h": h}`` features
    (eq. 5-8) as the method needs them. Its parameters are exactly the trained ones: the model (CAF module
    included) and the criterion's SE blocks. The frozen teacher is not part of it: compute ``teacher_out``
    with :meth:`IncrementalLearner.teacher_forward` (under ``no_grad``) and pass it in, which is what
    :meth:`IncrementalLearner.training_step` does.

    The learner creates this module and updates :attr:`num_old_classes` in ``begin_step``; build a new DDP
    wrapper after every ``begin_step`` (the set of parameters changes).

    Args:
        model: the student :class:`~incseg.models.IncrementalSegmenter`.
        criterion: the method's criterion module (its trained loss parameters and state); without
            ``method`` it must be a :class:`~incseg.losses.CAFLoss`.
        num_old_classes: ``|S_{t-1}|`` of the current step (0 at step 0).
        method: the :class:`~incseg.methods.Method` whose ``training_loss`` computes the loss (default: the
            CAF family's forward pass with ``criterion``).

    Shape:
        - images: ``(B, C, H, W)``; labels: ``(B, H, W)`` int64 in incremental indices.
        - teacher_out: ``{"z", "z_bar", "h", "logits"}`` of the teacher's ``forward_features``.

    Example:
        >>> import torch
        >>> from incseg.models import small_segmenter
        >>> module = TrainingModule(small_segmenter(3, width=8), CAFLoss(32, 16, kd=None, ad=None))
        >>> out = module(torch.randn(2, 3, 32, 32), torch.randint(0, 3, (2, 32, 32)))
        >>> sorted(out.terms)
        ['seg', 'total']
    """

    def __init__(
        self,
        model: IncrementalSegmenter,
        criterion: nn.Module,
        *,
        num_old_classes: int = 0,
        bn: NormPolicy = "train",
        dropout: NormPolicy = "train",
        method: Method | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(model, IncrementalSegmenter):
            raise TypeError(f"model must be an IncrementalSegmenter, got {type(model).__name__}")
        if method is None and not isinstance(criterion, CAFLoss):
            raise TypeError(f"criterion must be a CAFLoss, got {type(criterion).__name__}")
        if not isinstance(criterion, nn.Module):
            raise TypeError(f"criterion must be an nn.Module, got {type(criterion).__name__}")
        self.model = model
        self.criterion = criterion
        self.method = method
        self.num_old_classes = num_old_classes
        if bn not in ("train", "frozen") or dropout not in ("train", "frozen"):
            raise ValueError(f"bn and dropout must be 'train' or 'frozen', got {bn!r} and {dropout!r}")
        self.bn: NormPolicy = bn
        self.dropout: NormPolicy = dropout
        self._warned_untrained = False

    def train(self, mode: bool = True) -> TrainingModule:
        """Set training mode; at steps > 0, ``bn="frozen"`` / ``dropout="frozen"`` keep the student's batch-norm
        / dropout layers in evaluation mode (the affine weights of batch norm still train)."""
        super().train(mode)
        if mode and self.num_old_classes > 0:
            untrained = 0
            # CAF's own module is new at step 1: its batch norm (after a zero-initialised projection) stays an
            # affine map in evaluation mode, the same in training and at test time.
            fusion = self.model.fusion
            new = {id(m) for m in fusion.modules()} if fusion is not None else set()
            for m in self.model.modules():
                if self.bn == "frozen" and isinstance(m, nn.modules.batchnorm._BatchNorm):
                    if id(m) not in new and _never_saw_data(m):
                        untrained += 1  # eval mode would normalise with mean 0, variance 1: keep batch statistics
                    else:
                        m.eval()
                elif self.dropout == "frozen" and isinstance(m, nn.modules.dropout._DropoutNd):
                    m.eval()
            if untrained and not self._warned_untrained:
                self._warned_untrained = True
                warnings.warn(
                    f"bn='frozen': {untrained} batch-norm layer(s) of the model hold the initial running statistics "
                    "(mean 0, variance 1: they never saw data), so they keep training mode and batch statistics; "
                    "freezing them diverges. Train step 0 (or load trained weights) before the incremental steps.",
                    stacklevel=2,
                )
        return self

    def forward(self, images: Tensor, labels: Tensor, teacher_out: Mapping[str, Any] | None = None) -> LossOutput:
        """Compute the training loss of one batch.

        Args:
            images: input images ``(B, C, H, W)``.
            labels: labels ``(B, H, W)`` in incremental indices (``255`` ignored).
            teacher_out: the teacher's ``forward_features`` output; required at steps > 0 when the method
                distils or has a CAF module, ignored otherwise.

        Returns:
            :class:`~incseg.losses.LossOutput` ``(loss, terms)``.

        Raises:
            ValueError: ``teacher_out`` missing or lacking a key the method needs; errors of the model and
                the criterion for bad shapes.
        """
        if self.method is not None:
            return self.method.training_loss(
                self.model, self.criterion, images, labels, teacher_out, self.num_old_classes
            )
        from incseg.methods.caf import caf_training_loss

        assert isinstance(self.criterion, CAFLoss)
        return caf_training_loss(self.model, self.criterion, images, labels, teacher_out, self.num_old_classes)

    def extra_repr(self) -> str:
        return f"num_old_classes={self.num_old_classes}, bn={self.bn!r}, dropout={self.dropout!r}"
