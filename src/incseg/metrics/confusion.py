"""Pixel confusion matrix of one batch, without host-device synchronisation.

Rows are the ground truth, columns the prediction: ``C[t, p]`` counts the pixels of class ``t`` predicted as
``p``. Each pixel becomes the bin ``t * K + p``; ignored pixels go to an extra bin ``K * K`` that is dropped
afterwards, so no boolean indexing (and no device-to-host copy) is needed. The bins are counted with one
``torch.bincount`` on CPU and one ``scatter_add_`` into ``K * K + 1`` bins on accelerators.
"""

from __future__ import annotations

from torch import Tensor

from incseg._checks import check_int, check_labels
from incseg.metrics._common import check_ignore_index, class_map, count_pairs

__all__ = ["confusion_matrix"]


def confusion_matrix(preds: Tensor, target: Tensor, num_classes: int, *, ignore_index: int | None = 255) -> Tensor:
    r"""Pixel confusion matrix of a batch: ``C[t, p] = #{pixels with target t and prediction p}``.

    The counts behind every IoU of :mod:`incseg.metrics` (PROTOCOL "Metrics": per-class IoU from a
    dataset-level confusion matrix). Pixels whose target equals ``ignore_index`` are dropped; the sum of two
    batches' matrices is the matrix of the concatenated batch.

    Values are checked (``target`` in ``[0, K) ∪ {ignore_index}``, class-map ``preds`` in ``[0, K)``) on CPU
    tensors, and on accelerators only after ``incseg.set_validate_values(True)`` (a check needs a host sync).
    Unchecked out-of-range values are dropped like ignored pixels instead of corrupting the counts.

    Args:
        preds: predicted class map (integer) or logits (floating; ``argmax`` over dim 1 after a bilinear
            upsampling to ``target``'s size when the spatial sizes differ).
        target: ground-truth class indices (any integer dtype).
        num_classes: number of classes ``K`` (background included).
        ignore_index: target value of ignored pixels; ``None`` ignores nothing.

    Shape:
        - preds: :math:`(B, H, W)` (class map) or :math:`(B, K, h, w)` (logits).
        - target: :math:`(B, H, W)`.
        - Output: :math:`(K, K)`, int64, on ``target``'s device.

    Returns:
        The confusion matrix, rows indexed by the target class, columns by the predicted class.

    Raises:
        TypeError: a non-tensor input, a non-integer ``target``, or integer 4-D ``preds``.
        ValueError: shapes that do not match, logits with ``K' != num_classes`` channels, inputs on different
            devices, or (when checked) values out of range.

    Example:
        >>> import torch
        >>> target = torch.tensor([[[0, 1], [1, 255]]])
        >>> preds = torch.tensor([[[0, 1], [0, 2]]])
        >>> confusion_matrix(preds, target, 3)
        tensor([[1, 0, 0],
                [1, 1, 0],
                [0, 0, 0]])
    """
    num_classes = check_int(num_classes, "num_classes")
    ignore_index = check_ignore_index(ignore_index)
    target = check_labels(target, num_classes, ignore_index=ignore_index, name="target")
    if isinstance(preds, Tensor) and preds.device != target.device:
        raise ValueError(f"preds and target must be on the same device, got {preds.device} and {target.device}")
    pred = class_map(preds, target, num_classes)
    return count_pairs(pred, target.long(), num_classes, ignore_index)
