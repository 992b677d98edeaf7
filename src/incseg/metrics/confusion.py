"""Pixel confusion matrix of one batch, without host-device synchronisation.

Rows are the ground truth, columns the prediction: ``C[t, p]`` counts the pixels of class ``t`` predicted as
``p``. Ignored pixels are dropped. On CPU the counts come from one ``torch.bincount`` of ``t * K + p``; on
accelerators from one ``scatter_add_`` into ``K * K + 1`` bins, the last of which collects the dropped pixels,
so that no boolean indexing (and no device-to-host copy) is needed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from incseg._checks import check_labels, check_logits, check_same_shape

__all__ = ["confusion_matrix"]


def check_num_classes(num_classes: object, name: str = "num_classes") -> int:
    """Check that ``num_classes`` is an ``int >= 1`` and return it."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int):
        raise TypeError(f"{name} must be an int, got {type(num_classes).__name__}")
    if num_classes < 1:
        raise ValueError(f"{name} must be >= 1, got {num_classes}")
    return num_classes


def check_ignore_index(ignore_index: object) -> int | None:
    """Check that ``ignore_index`` is an ``int`` or ``None`` and return it."""
    if ignore_index is not None and (isinstance(ignore_index, bool) or not isinstance(ignore_index, int)):
        raise TypeError(f"ignore_index must be an int or None, got {type(ignore_index).__name__}")
    return ignore_index


def class_map(preds: object, target: Tensor, num_classes: int) -> Tensor:
    """Turn ``preds`` (class map or logits) into an int64 class map shaped like ``target`` (which is checked).

    Integer ``preds`` of shape ``(B, H, W)`` must equal ``target``'s shape; floating ``preds`` of shape
    ``(B, K, h, w)`` are logits: upsampled bilinearly (``align_corners=False``) to ``target``'s size when
    ``(h, w)`` differs, then reduced with ``argmax`` over the classes.
    """
    if not isinstance(preds, Tensor):
        raise TypeError(f"preds must be a torch.Tensor (class map (B, H, W) or logits (B, K, h, w)), got {type(preds).__name__}")
    if preds.is_floating_point():
        logits = check_logits(preds, "preds")
        if logits.shape[1] != num_classes:
            raise ValueError(
                f"preds (logits) must have num_classes={num_classes} channels, got shape {tuple(logits.shape)}"
            )
        if target.ndim != 3 or target.shape[0] != logits.shape[0]:
            raise ValueError(
                f"target must have shape (B, H, W) with B={logits.shape[0]} like preds (logits) "
                f"{tuple(logits.shape)}, got {tuple(target.shape)}"
            )
        if logits.shape[-2:] != target.shape[-2:]:
            if logits.dtype in (torch.float16, torch.bfloat16):
                logits = logits.float()
            logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
        return logits.argmax(dim=1)
    if preds.ndim == 4:
        raise TypeError(f"preds of shape {tuple(preds.shape)} look like logits but have dtype {preds.dtype}, not float")
    labels = check_labels(preds, num_classes, ignore_index=None, name="preds")
    check_same_shape(labels, target, "preds", "target")
    return labels.long()


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
        >>> target = torch.tensor([[[0, 1], [1, 255]]])
        >>> preds = torch.tensor([[[0, 1], [0, 2]]])
        >>> confusion_matrix(preds, target, 3)
        tensor([[1, 0, 0],
                [1, 1, 0],
                [0, 0, 0]])
    """
    num_classes = check_num_classes(num_classes)
    ignore_index = check_ignore_index(ignore_index)
    target = check_labels(target, num_classes, ignore_index=ignore_index, name="target")
    if isinstance(preds, Tensor) and preds.device != target.device:
        raise ValueError(f"preds and target must be on the same device, got {preds.device} and {target.device}")
    pred = class_map(preds, target, num_classes)
    return _count(pred, target.long(), num_classes, ignore_index)


def _count(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int | None) -> Tensor:
    """``(K, K)`` counts of the ``(target, pred)`` pairs of two int64 maps of equal shape (no value checks)."""
    k = num_classes
    valid = (target >= 0) & (target < k) & (pred >= 0) & (pred < k)
    if ignore_index is not None and 0 <= ignore_index < k:
        valid &= target != ignore_index
    dump = k * k  # extra bin for dropped pixels: no boolean indexing, hence no host sync
    flat = torch.where(valid, target * k + pred, torch.full_like(target, dump)).reshape(-1)
    if flat.device.type == "cpu":
        counts = torch.bincount(flat, minlength=dump + 1)
    else:  # CUDA bincount reads the maximum on the host; scatter_add_ into a fixed size does not
        counts = torch.zeros(dump + 1, dtype=torch.int64, device=flat.device)
        counts.scatter_add_(0, flat, torch.ones_like(flat))
    return counts[:dump].reshape(k, k)
