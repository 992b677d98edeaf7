"""Evaluation of incremental segmentation: dataset-level mean IoU with old / new / all groups, DDP sync, history.

- :class:`MeanIoU`: streaming confusion-matrix metric (``update`` / ``compute`` / ``reset`` / ``sync``).
- :class:`IoUResult`: per-class IoU, grouped means (``old``, ``new``, ``all``, ``old_bg``, ``all_bg``),
  harmonic mean, accuracies.
- :class:`StepHistory`: results of successive steps, forgetting, text table, CSV and JSON.
- :func:`confusion_matrix`: the confusion matrix of one batch.
"""

from incseg.metrics.confusion import confusion_matrix
from incseg.metrics.history import StepHistory
from incseg.metrics.mean_iou import MeanIoU
from incseg.metrics.result import IoUResult

__all__ = ["IoUResult", "MeanIoU", "StepHistory", "confusion_matrix"]
