"""The training module: student network plus criterion, the part a user wraps in DistributedDataParallel."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from incseg.losses import LossOutput
from incseg.methods.base import Batch, Method
from incseg.methods.config import NormPolicy
from incseg.models import IncrementalSegmenter

__all__ = ["TrainingModule"]


def _never_saw_data(bn: nn.modules.batchnorm._BatchNorm) -> bool:
    """Whether a batch-norm layer still holds its initial running statistics (mean 0, variance 1)."""
    mean, var = bn.running_mean, bn.running_var
    if mean is None or var is None or mean.is_meta:
        return False  # no running statistics: evaluation mode uses the batch's anyway
    with torch.no_grad():
        return bool((mean == 0).all()) and bool((var == 1).all())


class TrainingModule(nn.Module):
    """Student forward pass and loss in one module, so that one DDP wrapper covers all trained weights.

    ``forward(images, labels, teacher_out)`` calls the method's
    :meth:`~incseg.methods.Method.training_loss` on the model, the criterion and the :class:`~incseg.methods.Batch`
    of the call. Its parameters are exactly the trained ones: the model (fusion module included) and the
    criterion's. The frozen teacher is not part of it: compute ``teacher_out`` with
    :meth:`IncrementalLearner.teacher_forward` (under ``no_grad``) and pass it in, which is what
    :meth:`IncrementalLearner.training_step` does.

    The learner creates this module and updates :attr:`num_old_classes` in ``begin_step``; build a new DDP
    wrapper after every ``begin_step`` (the set of parameters changes).

    Args:
        model: the student :class:`~incseg.models.IncrementalSegmenter`.
        criterion: the method's criterion module (its trained loss parameters and state), from
            :meth:`~incseg.methods.Method.build_criterion`.
        method: the :class:`~incseg.methods.Method` whose ``training_loss`` computes the loss.
        num_old_classes: ``|S_{t-1}|`` of the current step (0 at step 0).
        bn, dropout: the batch-norm and dropout policy of steps > 0 (``"train"`` or ``"frozen"``).

    Shape:
        - images: ``(B, C, H, W)``; labels: ``(B, H, W)`` int64 in incremental indices.
        - teacher_out: what the method's ``teacher_forward`` returns.

    Example:
        >>> import torch
        >>> from incseg.methods import METHODS, get_family
        >>> from incseg.models import small_segmenter
        >>> from incseg.scenarios import Scenario
        >>> model = small_segmenter(3, width=8)
        >>> config = METHODS["mib"]
        >>> method = get_family(config.family)(config, model, Scenario([[1, 2], [3]]))
        >>> module = TrainingModule(model, method.build_criterion(model), method)
        >>> out = module(torch.randn(2, 3, 32, 32), torch.randint(0, 3, (2, 32, 32)))
        >>> sorted(out.terms)
        ['seg', 'total']
    """

    def __init__(
        self,
        model: IncrementalSegmenter,
        criterion: nn.Module,
        method: Method,
        *,
        num_old_classes: int = 0,
        bn: NormPolicy = "train",
        dropout: NormPolicy = "train",
    ) -> None:
        super().__init__()
        if not isinstance(model, IncrementalSegmenter):
            raise TypeError(f"model must be an IncrementalSegmenter, got {type(model).__name__}")
        if not isinstance(method, Method):
            raise TypeError(f"method must be an incseg.methods.Method, got {type(method).__name__}")
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
            # The fusion module is new at its first step: its batch norm (CAF's follows a zero-initialised
            # projection) stays an affine map in evaluation mode, the same in training and at test time.
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
            teacher_out: what the method's ``teacher_forward`` returned; required at steps > 0 when the method
                uses the teacher, ignored otherwise.

        Returns:
            :class:`~incseg.losses.LossOutput` ``(loss, terms)``.

        Raises:
            ValueError: ``teacher_out`` missing or lacking a key the method needs; errors of the model and
                the criterion for bad shapes.
        """
        batch = Batch(images, labels, teacher_out, self.num_old_classes)
        return self.method.training_loss(self.model, self.criterion, batch)

    def extra_repr(self) -> str:
        return f"num_old_classes={self.num_old_classes}, bn={self.bn!r}, dropout={self.dropout!r}"
