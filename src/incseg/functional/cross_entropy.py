"""Unbiased cross-entropy (eq. 14-15): old classes count as background in the segmentation loss."""

from __future__ import annotations

import torch
from torch import Tensor

from incseg._checks import check_labels, check_logits
from incseg.functional._common import Reduction, check_choice, check_num_old_classes, reduce_pixels, resize_to, upcast
from incseg.functional.background import _ClassGroups

__all__ = ["unbiased_cross_entropy"]


def _nll(
    groups: _ClassGroups, labels: Tensor, ignore_index: int | None, *, aggregate_old: bool = True
) -> tuple[Tensor, Tensor | None]:
    """Per-pixel ``-log φ̃[label]`` (eq. 15), or the plain cross-entropy with ``aggregate_old=False``.

    Args:
        groups: class groups of the upcast logits at label resolution, split at ``n_old``.
        labels: ``(B, H, W)`` integer labels (already validated).
        ignore_index: ignored label value or ``None``.
        aggregate_old: whether labels below ``max(n_old, 1)`` take the aggregated background probability
            (unbiased, eq. 15) or their own class probability (plain cross-entropy).

    Returns:
        ``(nll, valid)``: the per-pixel loss ``(B, H, W)`` (arbitrary finite value on ignored pixels) and the
        bool mask of counted pixels (``None`` when nothing is ignored).
    """
    labels = labels.long()
    valid = None if ignore_index is None else labels != ignore_index
    index = labels if valid is None else torch.where(valid, labels, torch.zeros_like(labels))
    target = groups.x.gather(1, index.unsqueeze(1)).squeeze(1)
    if aggregate_old and groups.background_size > 1:
        target = torch.where(labels < groups.background_size, groups.lse_old, target)
    return groups.lse_all - target, valid


def unbiased_cross_entropy(
    logits: Tensor,
    labels: Tensor,
    num_old_classes: int,
    *,
    ignore_index: int | None = 255,
    reduction: Reduction = "mean",
) -> Tensor:
    r"""Unbiased cross-entropy of MiB, the segmentation loss of CAF (eq. 14-15).

    At step ``t`` the labels mark every old class as background, so the probability of the background label
    is the student's total probability of the background and all old classes (eq. 15):
    ``-log φ̃ = logsumexp(logits) - logsumexp(logits[:n_old])`` for labels ``< n_old`` and
    ``logsumexp(logits) - logits[label]`` for a new class. Labels of old classes ``1..n_old-1`` (which the
    protocol's label maps never produce, but a user might) count as background too. With
    ``num_old_classes <= 1`` there is nothing to aggregate and this is :func:`torch.nn.functional.cross_entropy`.

    Logits of a spatial size other than the labels' are upsampled bilinearly (``align_corners=False``).
    Computed in float32 for half/bfloat16 logits, in log space, without host synchronisation.

    Args:
        logits: student logits, old classes first then the new ones.
        labels: int64 class indices in ``[0, K)`` or ``ignore_index``.
        num_old_classes: number of classes ``n_old`` of the previous step, background included
            (``0 <= n_old < K``; 0 at the first step).
        ignore_index: label value of ignored pixels (``None``: every pixel counts).
        reduction: ``"mean"`` over non-ignored pixels (all ignored gives a graph-connected 0), ``"sum"``, or
            ``"none"`` (per-pixel map with ignored pixels set to 0).

    Shape:
        - logits: :math:`(B, K, h, w)`.
        - labels: :math:`(B, H, W)`.
        - Output: scalar, or :math:`(B, H, W)` for ``reduction="none"``.

    Returns:
        The loss (float32 for half/bfloat16 logits, else the logits' dtype).

    Raises:
        TypeError: ``logits`` is not floating, ``labels`` is not an integer tensor, ``num_old_classes`` is not
            an ``int``.
        ValueError: wrong ranks, batch mismatch, ``num_old_classes`` outside ``[0, K)``, label values outside
            ``[0, K) ∪ {ignore_index}`` (checked on CPU tensors, see :func:`incseg._checks.set_validate_values`),
            unknown ``reduction``.

    Example:
        >>> logits = torch.randn(2, 5, 8, 8)
        >>> labels = torch.randint(0, 5, (2, 8, 8))
        >>> loss = unbiased_cross_entropy(logits, labels, num_old_classes=3)
        >>> loss.shape
        torch.Size([])
    """
    check_logits(logits, "logits")
    check_choice(reduction, "reduction", ("none", "mean", "sum"))
    num_classes = logits.shape[1]
    n_old = check_num_old_classes(num_old_classes, num_classes, minimum=0, allow_all=False)
    check_labels(labels, num_classes, ignore_index=ignore_index, batch_shape=(logits.shape[0],))
    x = resize_to(upcast(logits), labels.shape[-2:])
    nll, valid = _nll(_ClassGroups(x, n_old), labels, ignore_index)
    return reduce_pixels(nll, valid, reduction)
