"""Streaming mean IoU over a dataset-level confusion matrix, with old / new / all groups and DDP ``sync()``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor

from incseg._checks import check_int, check_num_old_classes
from incseg.metrics._common import (
    check_absent,
    check_class_names,
    check_ignore_index,
)
from incseg.metrics.confusion import confusion_matrix
from incseg.metrics.result import IoUResult

__all__ = ["MeanIoU"]


class MeanIoU:
    r"""Dataset-level mean IoU of incremental segmentation (PROTOCOL "Metrics"), torchmetrics-style.

    One int64 confusion matrix ``C`` (``K x K``, rows target, columns prediction) accumulates every
    :meth:`update`; :meth:`compute` turns it into per-class ``IoU_c = TP_c / (TP_c + FP_c + FN_c)`` and the
    grouped means of :class:`~incseg.metrics.IoUResult` (``old``, ``new``, ``all``, each also with the
    background, ``hmean``, pixel accuracy). IoU is computed once over the whole dataset, not averaged per
    image (unlike torchmetrics' ``segmentation.MeanIoU``).

    :meth:`update` runs on the device of its inputs and never synchronises with the host (value checks run
    on CPU tensors only unless ``incseg.set_validate_values(True)``).

    Distributed evaluation: every rank updates with its shard, then every rank calls :meth:`sync` (one
    ``all_reduce(SUM)``) and :meth:`compute`. The metric keeps this rank's counts apart from the other
    ranks' counts received at the last :meth:`sync`; :meth:`compute` reports their sum. Calling
    :meth:`sync` again replaces (never adds to) the other ranks' counts, so repeated syncs do not double
    count, and updates after a sync are included by :meth:`compute` (and by the next :meth:`sync`).

    Args:
        num_classes: number of classes ``K`` of the step, background included.
        ignore_index: target value of ignored pixels; ``None`` ignores nothing.
        num_old_classes: ``n_old`` of the step (background included, ``Scenario.num_old_classes(t)``),
            which splits the classes into old ``[0, n_old)`` and new ``[n_old, K)``; ``None``: no split.
        class_names: optional ``K`` unique class names (used by the result and :class:`StepHistory`).
        absent: which classes get a NaN IoU and leave the means: ``"union"`` (default: no pixel in target
            nor prediction) or ``"target"`` (no target pixel, MiB / PLOP); see :class:`IoUResult`.
        device: device of the matrix. ``None`` (default): the matrix follows the inputs (it moves to the
            device of the first, and any later, batch); otherwise inputs are moved to ``device``.

    Shape:
        - preds: :math:`(B, H, W)` integer class map, or :math:`(B, K, h, w)` floating logits (``argmax``
          over dim 1, after a bilinear upsampling to :math:`(H, W)` when the sizes differ).
        - target: :math:`(B, H, W)` integer, values in :math:`[0, K) \cup \{ignore\_index\}`.

    Raises:
        TypeError: non-int ``num_classes`` / ``num_old_classes`` / ``ignore_index``, non-str class names.
        ValueError: ``num_classes < 1``, ``num_old_classes`` outside ``[0, K]``, ``K`` names expected,
            duplicate names, unknown ``absent``.

    Example:
        >>> metric = MeanIoU(3, num_old_classes=2)
        >>> target = torch.tensor([[[0, 1, 2], [0, 2, 255]]])
        >>> metric.update(torch.tensor([[[0, 1, 2], [1, 2, 0]]]), target)
        >>> result = metric.compute()
        >>> [round(v, 3) for v in result.iou.tolist()]
        [0.5, 0.5, 1.0]
        >>> result.groups["old"], result.groups["new"], result.groups["all_bg"]
        (0.5, 1.0, 0.6666666666666666)
    """

    def __init__(
        self,
        num_classes: int,
        *,
        ignore_index: int | None = 255,
        num_old_classes: int | None = None,
        class_names: Sequence[str] | None = None,
        absent: Literal["union", "target"] = "union",
        device: torch.device | str | None = None,
    ) -> None:
        self.num_classes = check_int(num_classes, "num_classes")
        self.ignore_index = check_ignore_index(ignore_index)
        self.num_old_classes = check_num_old_classes(num_old_classes, self.num_classes, allow_none=True)
        self.class_names = check_class_names(class_names, self.num_classes)
        self.absent = check_absent(absent)
        self._fixed_device = torch.device(device) if device is not None else None
        self._local = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64, device=self._fixed_device)
        self._others = torch.zeros_like(self._local)

    @property
    def device(self) -> torch.device:
        """Device of the confusion matrix."""
        return self._local.device

    @property
    def confusion(self) -> Tensor:
        """Current ``(K, K)`` int64 confusion matrix: this rank's counts plus the other ranks' at the last sync."""
        return self._local + self._others

    @property
    def local_confusion(self) -> Tensor:
        """This rank's own counts only (what :meth:`sync` contributes to the other ranks)."""
        return self._local.clone()

    def _move(self, device: torch.device) -> None:
        if self._local.device != device:
            self._local = self._local.to(device)
            self._others = self._others.to(device)

    def to(self, device: torch.device | str) -> MeanIoU:
        """Move the matrix to ``device`` (and fix the metric there, as the ``device`` argument). Returns self."""
        self._fixed_device = torch.device(device)
        self._move(self._fixed_device)
        return self

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Add one batch to the confusion matrix (no host synchronisation).

        Args:
            preds: class map ``(B, H, W)`` (integer) or logits ``(B, K, h, w)`` (floating).
            target: ground truth ``(B, H, W)`` (integer), ``ignore_index`` for ignored pixels.

        Raises:
            TypeError: non-tensor inputs, non-integer ``target``, integer 4-D ``preds``.
            ValueError: ``preds`` and ``target`` shapes (or devices) disagree, logits without ``K`` channels,
                or (when values are checked) ``target`` outside ``[0, K) ∪ {ignore_index}`` or class-map
                ``preds`` outside ``[0, K)``.
        """
        if self._fixed_device is not None:
            if isinstance(preds, Tensor):
                preds = preds.to(self._fixed_device)
            if isinstance(target, Tensor):
                target = target.to(self._fixed_device)
        counts = confusion_matrix(preds, target, self.num_classes, ignore_index=self.ignore_index)
        self._move(counts.device)
        self._local += counts

    def compute(self) -> IoUResult:
        """Per-class IoU and grouped means from the current matrix (one copy to the host).

        Returns:
            An :class:`IoUResult`; with no pixel seen yet every IoU and mean is NaN.
        """
        return IoUResult.from_confusion(
            self.confusion,
            num_old_classes=self.num_old_classes,
            class_names=self.class_names,
            absent=self.absent,
        )

    def reset(self) -> None:
        """Zero the matrix (this rank's counts and the other ranks' counts from the last sync)."""
        self._local.zero_()
        self._others.zero_()

    def sync(self, group: Any = None) -> None:
        """Gather the other ranks' counts with one ``all_reduce(SUM)``; a no-op outside ``torch.distributed``.

        A collective: every rank of ``group`` must call it. Afterwards :attr:`confusion` (and
        :meth:`compute`) hold the counts of all ranks. The other ranks' counts are stored apart and replaced at
        each call, so calling it twice, or after more updates, never counts a pixel twice.

        Args:
            group: process group (``None``: the default group).
        """
        if not (dist.is_available() and dist.is_initialized()):
            return
        buffer = self._local.clone()
        if dist.get_backend(group) == "nccl" and buffer.device.type != "cuda":
            buffer = buffer.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=group)
        self._others = buffer.to(self._local.device) - self._local

    def state_dict(self) -> dict[str, Any]:
        """Counts and settings as plain tensors / ints (loadable with ``torch.load(weights_only=True)``).

        Returns:
            ``{"confusion": this rank's counts, "synced": other ranks' counts from the last sync,
            "num_classes", "ignore_index", "num_old_classes"}``; tensors are CPU copies.
        """
        return {
            "confusion": self._local.detach().cpu().clone(),
            "synced": self._others.detach().cpu().clone(),
            "num_classes": self.num_classes,
            "ignore_index": self.ignore_index,
            "num_old_classes": self.num_old_classes,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the counts saved by :meth:`state_dict` (settings other than ``num_classes`` are kept).

        Raises:
            ValueError: missing ``confusion``, a different ``num_classes``, or a matrix of the wrong shape.
        """
        if not isinstance(state_dict, Mapping) or "confusion" not in state_dict:
            raise ValueError("state_dict must be a mapping with a 'confusion' entry (from MeanIoU.state_dict())")
        saved_k = state_dict.get("num_classes", self.num_classes)
        if saved_k != self.num_classes:
            raise ValueError(f"state_dict is for num_classes={saved_k}, this metric has {self.num_classes}")
        shape = (self.num_classes, self.num_classes)
        tensors = []
        for key in ("confusion", "synced"):
            value = state_dict.get(key)
            value = torch.zeros(shape, dtype=torch.int64) if value is None else torch.as_tensor(value)
            if tuple(value.shape) != shape:
                raise ValueError(f"state_dict[{key!r}] must have shape {shape}, got {tuple(value.shape)}")
            tensors.append(value.to(device=self._local.device, dtype=torch.int64).clone())
        self._local, self._others = tensors

    def __repr__(self) -> str:
        return (
            f"MeanIoU(num_classes={self.num_classes}, ignore_index={self.ignore_index}, "
            f"num_old_classes={self.num_old_classes}, absent={self.absent!r}, device={self.device})"
        )
