"""Unbiased cross-entropy (eq. 14-15): old classes count as background in the segmentation loss."""

from __future__ import annotations

import torch
from torch import Tensor

from incseg._checks import check_labels, check_logits
from incseg.functional._common import Reduction, check_choice, check_num_old_classes, reduce_pixels, resize_to
from incseg.functional.background import _ClassGroups, _UnionName, shared_upcast

__all__ = ["unbiased_cross_entropy"]


def _label_index(labels: Tensor, ignore_index: int | None, start: int) -> tuple[Tensor, Tensor | None]:
    """``(index, valid)`` for :class:`_ClassGroups`: ``labels - start`` where a label is a counted class
    ``>= start``, else 0 (a valid gather index whose value is not used), and the bool mask of counted pixels
    (``None`` when nothing is ignored)."""
    labels = labels.long()
    valid = None if ignore_index is None else labels != ignore_index
    if start == 0:
        return (labels if valid is None else torch.where(valid, labels, 0)), valid
    counted = labels >= start if valid is None else valid & (labels >= start)
    return torch.where(counted, labels - start, 0), valid


def _nll_unions(aggregate_old: bool) -> tuple[_UnionName, ...]:
    """The unions of :class:`_ClassGroups` that :func:`_nll` reads."""
    return ("all", "old") if aggregate_old else ("all",)


def _nll_index_start(num_old_classes: int, aggregate_old: bool) -> int:
    """First class of the label gather: with ``aggregate_old`` only the new classes' logits are read."""
    return max(num_old_classes, 1) if aggregate_old else 0


def _nll(groups: _ClassGroups, labels: Tensor, *, aggregate_old: bool = True) -> Tensor:
    """Per-pixel ``-log φ̃[label]`` (eq. 15), or the plain cross-entropy with ``aggregate_old=False``.

    Args:
        groups: class groups of the upcast logits at label resolution, split at ``n_old``, built with the
            unions of :func:`_nll_unions` and the ``index`` of :func:`_label_index` from
            :func:`_nll_index_start` (so that ``groups.target`` is the label's logit where it is read).
        labels: ``(B, H, W)`` integer labels (already validated).
        aggregate_old: whether labels below ``max(n_old, 1)`` take the aggregated background probability
            (unbiased, eq. 15) or their own class probability (plain cross-entropy).

    Returns:
        The per-pixel loss ``(B, H, W)`` (an arbitrary finite value on ignored pixels).
    """
    target = groups.target
    if aggregate_old:
        target = torch.where(labels < groups.background_size, groups.lse["old"], target)
    return groups.lse["all"] - target


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
    x = resize_to(shared_upcast(logits), labels.shape[-2:])
    start = _nll_index_start(n_old, aggregate_old=True)
    index, valid = _label_index(labels, ignore_index, start)
    groups = _ClassGroups(x, n_old, _nll_unions(True), index=index, index_start=start, share=True, source=logits)
    return reduce_pixels(_nll(groups, labels), valid, reduction)
