"""DKD's losses (Baek et al., NeurIPS 2022): sigmoid classifiers, decomposed knowledge distillation.

Every class ``c`` has its own binary (sigmoid) classifier; the background is not a class but the absence of
every class, so a pixel is background when no class scores above ``sigmoid = 0.5``. The losses:

- :func:`multilabel_bce_loss`, ``L_mbce``: per-class binary cross-entropy of the classes learnt at the
  current step against the one-hot labels, summed over classes and averaged over pixels;
- :func:`sigmoid_kd_loss`, ``L_kd`` and ``L_dkd``: binary cross-entropy of the student's logits against the
  old model's probabilities ``sigmoid(x_old)``, summed over classes and averaged over pixels;
- :func:`decompose_logits`: the positive and negative knowledge ``h * W^+`` and ``h * W^-`` of a classifier
  ``W = W^+ + W^-`` (its positive and negative weights, no bias), distilled by ``L_dkd``;
- :func:`auxiliary_bce_loss`, ``L_ac``: the auxiliary (background) classifier trained to answer "no class"
  everywhere, whose weights initialise the classifiers of new classes;
- :func:`threshold_background`: the test-time rule as logits whose ``argmax`` is DKD's prediction.

Equations and the release's choices: docs/concepts.md ("DKD") and docs/protocol.md.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from incseg._checks import check_feature_map, check_labels, check_logits, check_same_shape
from incseg.functional._common import Reduction, check_batch, check_choice, reduce_pixels, resize_to, upcast

__all__ = [
    "auxiliary_bce_loss",
    "decompose_logits",
    "multilabel_bce_loss",
    "sigmoid_kd_loss",
    "threshold_background",
]

_REDUCTIONS = ("none", "mean", "sum")


def _bce_with_logits(x: Tensor, target: Tensor, pos_weight: float = 1.0) -> Tensor:
    """Element-wise ``-[p y log σ(x) + (1 - y) log(1 - σ(x))]`` in a stable form: ``(1 - y) x + (1 + (p - 1) y)
    softplus(-x)``."""
    weight = 1.0 + (pos_weight - 1.0) * target if pos_weight != 1.0 else 1.0
    return (1.0 - target) * x + weight * F.softplus(-x)


def multilabel_bce_loss(
    logits: Tensor,
    labels: Tensor,
    *,
    first_class: int,
    pos_weight: float = 1.0,
    ignore_index: int | None = None,
    reduction: Reduction = "mean",
) -> Tensor:
    r"""DKD's ``L_mbce``: binary cross-entropy of each class ``c >= first_class`` against ``[y = c]``.

    ``ℓ(i) = -sum_{c >= c_0} p [y_i = c] log σ(x_{c,i}) + [y_i != c] log(1 - σ(x_{c,i}))``

    with ``p = pos_weight``. Classes below ``first_class`` (the background and the old classes) get no term:
    their pixels are negatives of every scored class. The logits are bilinearly resized to the labels' size.
    With ``ignore_index=None`` (the release) every pixel counts, a label ``255`` being a negative of every
    class; with an ``ignore_index`` those pixels are left out.

    Args:
        logits: logits ``(B, K, h, w)`` of all classes (background at 0).
        labels: labels ``(B, H, W)`` int64 in ``[0, K)`` (or ``ignore_index``; with ``None``, any value
            outside ``[first_class, K)`` is a negative).
        first_class: the first scored class ``c_0`` in ``[1, K)`` (the number of old classes, or 1 at step 0).
        pos_weight: weight ``p > 0`` of the positive term (the release's ``pos_weight``).
        ignore_index: label of pixels to leave out, or ``None``.
        reduction: ``"mean"`` over the counted pixels, ``"sum"``, or ``"none"`` (``(B, H, W)``, 0 at left-out
            pixels).

    Returns:
        The loss (float32 for half inputs).

    Raises:
        ValueError: bad shapes, ``first_class`` outside ``[1, K)``, ``pos_weight <= 0`` or unknown
            ``reduction``.

    Example:
        >>> logits = torch.zeros(1, 3, 2, 2)
        >>> labels = torch.tensor([[[0, 1], [2, 2]]])
        >>> round(float(multilabel_bce_loss(logits, labels, first_class=1)), 4)  # 2 log 2 per pixel
        1.3863
    """
    logits = check_logits(logits, "logits", min_classes=2)
    num_classes = logits.shape[1]
    check_labels(labels, 1 << 30 if ignore_index is None else num_classes, ignore_index=ignore_index)
    check_batch(logits, labels, "logits", "labels")
    check_choice(reduction, "reduction", _REDUCTIONS)
    if isinstance(first_class, bool) or not isinstance(first_class, int) or not 1 <= first_class < num_classes:
        raise ValueError(f"first_class must be an int in [1, K) = [1, {num_classes}), got {first_class!r}")
    if isinstance(pos_weight, bool) or not isinstance(pos_weight, (int, float)) or not 0 < pos_weight < math.inf:
        raise ValueError(f"pos_weight must be a finite number > 0, got {pos_weight!r}")
    x = resize_to(upcast(logits), labels.shape[-2:])[:, first_class:]
    classes = torch.arange(first_class, num_classes, device=labels.device)
    target = (labels[:, None] == classes[None, :, None, None]).to(x.dtype)
    per_pixel = _bce_with_logits(x, target, float(pos_weight)).sum(dim=1)
    valid = None if ignore_index is None else labels != ignore_index
    return reduce_pixels(per_pixel, valid, reduction)


def sigmoid_kd_loss(
    logits: Tensor,
    old_logits: Tensor,
    *,
    weight: Tensor | None = None,
    target_weight: Tensor | None = None,
    reduction: Reduction = "mean",
) -> Tensor:
    r"""Binary cross-entropy of the student's logits against the old model's probabilities (DKD's ``L_kd``
    on the outputs and ``L_dkd`` on the decomposed logits).

    ``ℓ(i) = -sum_c σ(x^old_{c,i}) log σ(x_{c,i}) + (1 - σ(x^old_{c,i})) log(1 - σ(x_{c,i}))``

    With ``weight`` ``w_i`` each pixel's term is multiplied by ``w_i`` (the mean still divides by every pixel);
    with ``target_weight`` ``m_i`` the target is ``m_i σ(x^{old}_{c,i})`` (``m_i = 0``: every class is a negative
    at pixel ``i``).

    Args:
        logits: the student's logits ``(B, C, H, W)`` of the distilled classes.
        old_logits: the old model's logits of the same shape (no gradient flows to them).
        weight: optional per-pixel weights ``(B, H, W)`` or ``(B, 1, H, W)`` (no gradient flows to them).
        target_weight: optional per-pixel factors ``(B, H, W)`` or ``(B, 1, H, W)`` of the targets, in
            ``[0, 1]``.
        reduction: ``"mean"`` over the pixels, ``"sum"``, or ``"none"`` (``(B, H, W)``).

    Returns:
        The loss (float32 for half inputs); 0 when ``C = 0``.

    Raises:
        ValueError: different shapes, a ``weight`` or ``target_weight`` of another batch or size, or an unknown
            ``reduction``.

    Example:
        >>> x = torch.zeros(1, 2, 1, 1)
        >>> round(float(sigmoid_kd_loss(x, x)), 4)  # 2 log 2
        1.3863
    """
    logits = check_feature_map(logits, "logits")
    old_logits = check_feature_map(old_logits, "old_logits")
    check_same_shape(logits, old_logits, "logits", "old_logits")
    check_choice(reduction, "reduction", _REDUCTIONS)
    x = upcast(logits)
    target = torch.sigmoid(upcast(old_logits.detach(), x.dtype))
    if target_weight is not None:
        target = target * _pixel_map(target_weight, x, "target_weight")
    per_pixel = _bce_with_logits(x, target)
    if weight is not None:
        per_pixel = per_pixel * _pixel_map(weight, x, "weight")
    return reduce_pixels(per_pixel.sum(dim=1), None, reduction)


def _pixel_map(value: Tensor, x: Tensor, name: str) -> Tensor:
    """``value`` ``(B, H, W)`` or ``(B, 1, H, W)`` of ``x``'s batch and size as ``(B, 1, H, W)`` in ``x``'s dtype."""
    if not isinstance(value, torch.Tensor) or value.ndim not in (3, 4):
        raise ValueError(f"{name} must be a tensor (B, H, W) or (B, 1, H, W)")
    value = value if value.ndim == 4 else value[:, None]
    if value.shape[1] != 1 or value.shape[0] != x.shape[0] or value.shape[-2:] != x.shape[-2:]:
        raise ValueError(f"{name} must be (B, 1, H, W) = {(x.shape[0], 1, *x.shape[-2:])}, got {tuple(value.shape)}")
    return value.detach().to(x.dtype)


def decompose_logits(h: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    r"""The positive and negative knowledge of a classifier: ``h * W^+`` and ``h * W^-`` with
    ``W^+ = [W > 0] W`` and ``W^- = [W < 0] W``, without bias, so that ``h * W = h * W^+ + h * W^-``.

    Args:
        h: features ``(B, C, H, W)``.
        weight: the classifier's convolution weights ``(K, C, k, k)`` (odd ``k``, padding ``k // 2`` as
            :class:`~incseg.models.IncrementalClassifier`) or ``(K, C)``.

    Returns:
        ``(positive, negative)``, each ``(B, K, H, W)``.

    Raises:
        ValueError: channel counts differ or the kernel is not square and odd.

    Example:
        >>> h, w = torch.randn(1, 4, 3, 3), torch.randn(2, 4, 1, 1)
        >>> pos, neg = decompose_logits(h, w)
        >>> torch.allclose(pos + neg, torch.nn.functional.conv2d(h, w), atol=1e-6)
        True
    """
    h = check_feature_map(h, "h")
    if not isinstance(weight, torch.Tensor) or weight.ndim not in (2, 4):
        raise ValueError("weight must be a tensor (K, C, k, k) or (K, C)")
    if weight.ndim == 2:
        weight = weight[:, :, None, None]
    k = weight.shape[-1]
    if weight.shape[-2] != k or k % 2 == 0:
        raise ValueError(f"weight must have a square odd kernel, got shape {tuple(weight.shape)}")
    if weight.shape[1] != h.shape[1]:
        raise ValueError(f"weight has {weight.shape[1]} input channels but h has {h.shape[1]}: {tuple(h.shape)}")
    zero = torch.zeros((), dtype=weight.dtype, device=weight.device)
    positive = F.conv2d(h, torch.where(weight > 0, weight, zero), padding=k // 2)
    negative = F.conv2d(h, torch.where(weight < 0, weight, zero), padding=k // 2)
    return positive, negative


def auxiliary_bce_loss(logits: Tensor, *, reduction: Reduction = "mean") -> Tensor:
    r"""DKD's ``L_ac``: binary cross-entropy of the auxiliary classifier's logits against 0 everywhere,
    ``softplus(x) = -log(1 - σ(x))`` per pixel.

    Args:
        logits: logits ``(B, 1, H, W)`` of the auxiliary classifier (computed on detached features).
        reduction: ``"mean"`` over the pixels, ``"sum"``, or ``"none"`` (``(B, H, W)``).

    Returns:
        The loss (float32 for half inputs).

    Raises:
        ValueError: more than one channel or an unknown ``reduction``.

    Example:
        >>> round(float(auxiliary_bce_loss(torch.zeros(1, 1, 2, 2))), 4)
        0.6931
    """
    logits = check_feature_map(logits, "logits")
    if logits.shape[1] != 1:
        raise ValueError(f"logits of the auxiliary classifier must have one channel, got {tuple(logits.shape)}")
    check_choice(reduction, "reduction", _REDUCTIONS)
    return reduce_pixels(F.softplus(upcast(logits))[:, 0], None, reduction)


def threshold_background(logits: Tensor, threshold: float = 0.5) -> Tensor:
    """DKD's prediction as logits: channel 0 is replaced by ``logit(threshold)``, so that ``argmax`` gives the
    class of highest ``sigmoid`` score when that score exceeds ``threshold``, and the background otherwise (a
    tie goes to the background, as the release's ``> 0.5``).

    Args:
        logits: logits ``(B, K, H, W)`` of the sigmoid classifiers (channel 0: the auxiliary classifier).
        threshold: the probability a class must exceed, in ``(0, 1)``.

    Returns:
        ``(B, K, H, W)`` logits, channel 0 constant.

    Raises:
        ValueError: ``threshold`` outside ``(0, 1)``.

    Example:
        >>> x = torch.tensor([[[[5.0]], [[-1.0]], [[-2.0]]]])
        >>> int(threshold_background(x).argmax(1))
        0
    """
    logits = check_feature_map(logits, "logits")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold < 1:
        raise ValueError(f"threshold must be a probability in (0, 1), got {threshold!r}")
    background = torch.full_like(logits[:, :1], math.log(threshold / (1 - threshold)))
    return torch.cat([background, logits[:, 1:]], dim=1)
