"""Output distillation: plain (LwF), unbiased (MiB, eq. 9-10) and balanced (CAF, eq. 11-12) knowledge distillation.

All three share one per-pixel form. With ``q = softmax(old_logits)`` over the ``n_old`` old classes and
``log p̂`` the student's log-probabilities of those classes,

``ℓ = -(γ · q_0 log p̂_0 + sum_{0 < s < n_old} q_s log p̂_s) / d``

where ``d = n_old`` for ``class_reduction="mean"`` (MiB and the CAF release) and ``d = 1`` for ``"sum"``
(eq. 9 exactly). ``log p̂`` is ``log_softmax(logits[:, :n_old])`` for :func:`kd_loss` and eq. 10 (new classes
merged into the background) for the unbiased and balanced losses; ``γ`` is 1 except in :func:`balanced_kd_loss`
(eq. 11). The pixel reduction then averages (``"mean"``) or sums over the counted pixels.
"""

from __future__ import annotations

import torch
from torch import Tensor

from incseg._checks import check_logits
from incseg.functional._common import (
    ClassReduction,
    Reduction,
    check_batch,
    check_choice,
    check_mask,
    reduce_pixels,
    resize_to,
    upcast,
)
from incseg.functional.background import _ClassGroups, _gamma_balance, _UnionName, shared_upcast

__all__ = ["balanced_kd_loss", "kd_loss", "unbiased_kd_loss"]


def _prepare(logits: Tensor, old_logits: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Validate the KD inputs; return the upcast student logits and old logits resized to the student's size."""
    check_logits(logits, "logits")
    check_logits(old_logits, "old_logits")
    check_batch(logits, old_logits, "logits", "old_logits")
    if old_logits.shape[1] > logits.shape[1]:
        raise ValueError(
            f"old_logits has more classes than logits: got shapes {tuple(old_logits.shape)} and "
            f"{tuple(logits.shape)} (the student must keep every old class, in the same order, first)"
        )
    if mask is not None:
        check_mask(mask, (logits.shape[0], *logits.shape[2:]))
    x = shared_upcast(logits)  # the float32 copy a class-group pass on the same logits made, if any
    x_old = upcast(old_logits)
    dtype = torch.promote_types(x.dtype, x_old.dtype)
    x, x_old = x.to(dtype), x_old.to(dtype)
    return x, resize_to(x_old, x.shape[-2:])


def _old_probs(x_old: Tensor) -> Tensor:
    """``q = softmax(x_old)`` over dim 1 (the teacher's class probabilities).

    On the CPU PyTorch's softmax over a non-last dimension is slower than its parts (measured about 2x on
    ``(4, 16, 128, 128)``), so there it is written out; the shift is detached (softmax does not depend on it).
    """
    if x_old.device.type != "cpu":
        return torch.softmax(x_old, dim=1)
    e = torch.sub(x_old, x_old.detach().amax(dim=1, keepdim=True)).exp_()
    if e.requires_grad:  # exp_'s backward reads e: divide out of place
        return e / e.sum(dim=1, keepdim=True)
    return e.div_(e.sum(dim=1, keepdim=True))


def _kd_unions(kind: str) -> tuple[_UnionName, ...]:
    """The unions of :class:`_ClassGroups` that :func:`_kd_parts` reads."""
    return ("old", "background", "foreground") if kind == "plain" else ("all", "background_new", "foreground")


def _kd_groups(x: Tensor, q: Tensor, kind: str, source: Tensor | None = None) -> _ClassGroups:
    """The student's class groups for a distillation with teacher probabilities ``q`` (``(B, n_old, H, W)``),
    shared with a class-group pass on the same logits when one can lead (see :class:`_ClassGroups`).

    Args:
        x: upcast student logits ``(B, K, H, W)``.
        q: the teacher's probabilities at the student's size.
        kind: ``"plain"`` (only the old classes matter) or ``"unbiased"``.
        source: the logits ``x`` was upcast from, if any.
    """
    return _ClassGroups(
        x,
        q.shape[1],
        _kd_unions(kind),
        old_foreground_weights=q[:, 1:],
        old_only=kind == "plain",
        share=True,
        source=source,
    )


def _kd_parts(groups: _ClassGroups, q: Tensor, kind: str) -> tuple[Tensor, Tensor]:
    """Per-pixel ``(q_0 log p̂_0, sum_{0 < s < n_old} q_s log p̂_s)``, each ``(B, H, W)``.

    ``sum_{s > 0} q_s (x_s - log_norm) = sum_{s > 0} q_s (x_s - lse_fg) + (sum_{s > 0} q_s)(lse_fg - log_norm)``
    with ``lse_fg`` the log-sum over the old foreground classes: two sums of non-positive terms, both from
    the class groups, so no class-sized tensor is formed here.

    Args:
        groups: the student's class groups split at ``n_old``, built with ``old_foreground_weights=q[:, 1:]``
            and the unions of :func:`_kd_unions` (:func:`_kd_groups`).
        q: the teacher's probabilities ``(B, n_old, H, W)``.
        kind: ``"plain"`` (log-softmax over the old classes) or ``"unbiased"`` (eq. 10).
    """
    if kind == "plain":
        log_norm = groups.lse["old"]
        log_background = groups.lse["background"] - log_norm
    else:
        log_norm = groups.lse["all"]
        log_background = groups.lse["background_new"] - log_norm
    others = groups.weighted_log_probs + groups.weight_sum * (groups.lse["foreground"] - log_norm)
    return q[:, 0] * log_background, others


def _combine(background: Tensor, others: Tensor, gamma: Tensor | None, class_reduction: str, n_old: int) -> Tensor:
    """Per-pixel KD loss ``-(γ · background + others) / d`` (see the module docstring)."""
    if gamma is not None:  # one γ per image (B,) or per pixel (B, H, W)
        background = (gamma.view(-1, 1, 1) if gamma.dim() == 1 else gamma) * background
    per_pixel = -(background + others)
    return per_pixel / n_old if class_reduction == "mean" else per_pixel


def _kd(
    logits: Tensor,
    old_logits: Tensor,
    *,
    kind: str,
    balanced: bool,
    class_reduction: str,
    reduction: str,
    mask: Tensor | None,
) -> Tensor:
    check_choice(class_reduction, "class_reduction", ("mean", "sum"))
    check_choice(reduction, "reduction", ("none", "mean", "sum"))
    x, x_old = _prepare(logits, old_logits, mask)
    q = _old_probs(x_old)
    background, others = _kd_parts(_kd_groups(x, q, kind, source=logits), q, kind)
    gamma = _gamma_balance(x_old) if balanced else None
    per_pixel = _combine(background, others, gamma, class_reduction, x_old.shape[1])
    return reduce_pixels(per_pixel, mask, reduction)


def kd_loss(
    logits: Tensor,
    old_logits: Tensor,
    *,
    class_reduction: ClassReduction = "mean",
    reduction: Reduction = "mean",
    mask: Tensor | None = None,
) -> Tensor:
    """Plain knowledge distillation of LwF on the old classes.

    The student's distribution is ``log_softmax(logits[:, :n_old])`` (restricted to the old classes, new
    classes ignored); the loss is the cross-entropy ``-sum_s q_s log p_s`` with ``q = softmax(old_logits)``,
    divided by ``n_old`` for ``class_reduction="mean"`` (as MiB's LwF baseline).

    Args:
        logits: student logits, old classes first then the new ones.
        old_logits: logits of the previous (teacher) model over its ``n_old`` classes; resized bilinearly to the
            student's spatial size when different. Gradients flow into them only if they require grad (the
            teacher normally runs under ``torch.no_grad``).
        class_reduction: ``"mean"`` divides the class sum by ``n_old`` (MiB and the CAF release, the default),
            ``"sum"`` keeps the plain sum over classes (eq. 9).
        reduction: ``"mean"`` over counted pixels (all excluded gives a graph-connected 0), ``"sum"``, or
            ``"none"`` (per-pixel map, excluded pixels set to 0).
        mask: optional bool mask, ``True`` where a pixel counts; ``None`` counts every pixel.

    Shape:
        - logits: :math:`(B, K, H, W)`.
        - old_logits: :math:`(B, n_{old}, h, w)`, ``1 <= n_old <= K``.
        - mask: :math:`(B, H, W)`.
        - Output: scalar, or :math:`(B, H, W)` for ``reduction="none"``.

    Returns:
        The loss, float32 for half/bfloat16 inputs (else the promoted input dtype).

    Raises:
        TypeError: non-floating logits or a non-bool mask.
        ValueError: wrong ranks, batch mismatch, more old classes than student classes, a mask of the wrong
            shape, unknown ``class_reduction`` or ``reduction``.

    Example:
        >>> logits, old_logits = torch.randn(2, 6, 8, 8), torch.randn(2, 4, 8, 8)
        >>> kd_loss(logits, old_logits).shape
        torch.Size([])
    """
    return _kd(
        logits,
        old_logits,
        kind="plain",
        balanced=False,
        class_reduction=class_reduction,
        reduction=reduction,
        mask=mask,
    )


def unbiased_kd_loss(
    logits: Tensor,
    old_logits: Tensor,
    *,
    class_reduction: ClassReduction = "mean",
    reduction: Reduction = "mean",
    mask: Tensor | None = None,
) -> Tensor:
    """Unbiased knowledge distillation of MiB (eq. 9 with the student's probabilities of eq. 10).

    The old model's background stood for every class that is new now, so the student's background
    probability is aggregated over the background and the new classes (:func:`old_background_log_probs`):
    ``ℓ = -sum_{s < n_old} q_s log φ̂_s`` per pixel with ``q = softmax(old_logits)``, divided by ``n_old``
    for ``class_reduction="mean"``. When ``n_old == K`` (no new class) this equals :func:`kd_loss`.

    Args:
        logits: student logits, old classes first then the new ones.
        old_logits: logits of the previous (teacher) model over its ``n_old`` classes; resized bilinearly to the
            student's spatial size when different. Gradients flow into them only if they require grad (the
            teacher normally runs under ``torch.no_grad``).
        class_reduction: ``"mean"`` divides the class sum by ``n_old`` (MiB and the CAF release, the default),
            ``"sum"`` keeps the plain sum over classes (eq. 9).
        reduction: ``"mean"`` over counted pixels (all excluded gives a graph-connected 0), ``"sum"``, or
            ``"none"`` (per-pixel map, excluded pixels set to 0).
        mask: optional bool mask, ``True`` where a pixel counts; ``None`` counts every pixel.

    Shape:
        - logits: :math:`(B, K, H, W)`.
        - old_logits: :math:`(B, n_{old}, h, w)`, ``1 <= n_old <= K``.
        - mask: :math:`(B, H, W)`.
        - Output: scalar, or :math:`(B, H, W)` for ``reduction="none"``.

    Returns:
        The loss, float32 for half/bfloat16 inputs (else the promoted input dtype).

    Raises:
        TypeError: non-floating logits or a non-bool mask.
        ValueError: wrong ranks, batch mismatch, more old classes than student classes, a mask of the wrong
            shape, unknown ``class_reduction`` or ``reduction``.

    Example:
        >>> logits, old_logits = torch.randn(2, 6, 8, 8), torch.randn(2, 4, 8, 8)
        >>> unbiased_kd_loss(logits, old_logits).shape
        torch.Size([])
    """
    return _kd(
        logits,
        old_logits,
        kind="unbiased",
        balanced=False,
        class_reduction=class_reduction,
        reduction=reduction,
        mask=mask,
    )


def balanced_kd_loss(
    logits: Tensor,
    old_logits: Tensor,
    *,
    class_reduction: ClassReduction = "mean",
    reduction: Reduction = "mean",
    mask: Tensor | None = None,
) -> Tensor:
    """Balanced knowledge distillation of CAF (eq. 11-12): ``L_D = γ L_B + L_N``.

    The unbiased distillation of :func:`unbiased_kd_loss` split into its background term
    ``L_B = -q_0 log φ̂_0`` and the rest ``L_N = -sum_{0 < s < n_old} q_s log φ̂_s``; the background term of each
    image is weighted by that image's ``γ = (1 - q̄_0) / q̄_0`` (:func:`gamma_balance`, from the old logits
    after resizing to the student's size, all pixels, detached). With ``γ = 1`` this is
    :func:`unbiased_kd_loss`.

    Args:
        logits: student logits, old classes first then the new ones.
        old_logits: logits of the previous (teacher) model over its ``n_old`` classes; resized bilinearly to the
            student's spatial size when different. Gradients flow into them only if they require grad (the
            teacher normally runs under ``torch.no_grad``).
        class_reduction: ``"mean"`` divides the class sum by ``n_old`` (MiB and the CAF release, the default),
            ``"sum"`` keeps the plain sum over classes (eq. 9).
        reduction: ``"mean"`` over counted pixels (all excluded gives a graph-connected 0), ``"sum"``, or
            ``"none"`` (per-pixel map, excluded pixels set to 0).
        mask: optional bool mask, ``True`` where a pixel counts; ``None`` counts every pixel.

    Shape:
        - logits: :math:`(B, K, H, W)`.
        - old_logits: :math:`(B, n_{old}, h, w)`, ``1 <= n_old <= K``.
        - mask: :math:`(B, H, W)`.
        - Output: scalar, or :math:`(B, H, W)` for ``reduction="none"``.

    Returns:
        The loss, float32 for half/bfloat16 inputs (else the promoted input dtype).

    Raises:
        TypeError: non-floating logits or a non-bool mask.
        ValueError: wrong ranks, batch mismatch, more old classes than student classes, a mask of the wrong
            shape, unknown ``class_reduction`` or ``reduction``.

    Example:
        >>> logits, old_logits = torch.randn(2, 6, 8, 8), torch.randn(2, 4, 8, 8)
        >>> balanced_kd_loss(logits, old_logits).shape
        torch.Size([])
    """
    return _kd(
        logits,
        old_logits,
        kind="unbiased",
        balanced=True,
        class_reduction=class_reduction,
        reduction=reduction,
        mask=mask,
    )
