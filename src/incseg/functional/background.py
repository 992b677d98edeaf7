"""Background aggregation of the student's probabilities (eq. 10, 15) and the background balance γ (eq. 11).

Everything works on logits in log space: an aggregated probability ``sum_{s in A} p_s`` is
``logsumexp(logits[A]) - logsumexp(logits)``, never ``log(softmax(...).sum())``. The log-sums over the class
groups come from one autograd function that exponentiates each class once in the forward and once in the backward
pass (and keeps nothing class-sized for backward); it expects finite logits and supports first-order gradients
(no double backward).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from incseg._checks import check_logits
from incseg.functional._common import check_num_old_classes, upcast

__all__ = ["gamma_balance", "new_background_log_probs", "old_background_log_probs"]

# Upper bound of log γ: γ = e^40 ≈ 2.4e17 keeps γ · L_B and its gradient finite in float32. It only binds when
# the old model's image-mean background probability q̄_0 is below ~4e-18, which real networks never reach.
_MAX_LOG_GAMMA = 40.0


class _UnionLogSumExp(torch.autograd.Function):
    """``logsumexp`` of the logits over unions of contiguous class groups, with a fused backward.

    The classes (dim 1) are split into contiguous groups of the given sizes. The forward pass exponentiates each
    class once: per group ``g`` a shift ``m_g`` (the group maximum) and ``s_g = sum exp(x - m_g) >= 1``; a union
    ``U`` is then ``M + log(sum_{g in U} s_g exp(m_g - M))`` with ``M = max_{g in U} m_g``, on ``(B, H, W)``
    maps, free of overflow and underflow. The backward pass writes the gradient of every class in one pass:
    for class ``s`` of group ``g``, ``sum_{U ∋ g} grad_U · exp(x_s - lse_U)``
    ``= exp(x_s - lse_g) · sum_{U ∋ g} grad_U · exp(lse_g - lse_U)`` (each factor at most 1). It keeps no
    class-sized tensor for backward beyond the logits themselves. First-order gradients only.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, sizes: tuple[int, ...], unions: tuple[tuple[int, ...], ...]) -> Tensor:
        shifts, sums = [], []
        for chunk in torch.split(x, list(sizes), dim=1):
            shift = chunk.amax(dim=1, keepdim=True)
            shifts.append(shift.squeeze(1))
            sums.append((chunk - shift).exp_().sum(dim=1))
        outputs = []
        for union in unions:
            top = shifts[union[0]]
            for group in union[1:]:
                top = torch.maximum(top, shifts[group])
            total = sums[union[0]] if len(union) == 1 else sums[union[0]] * (shifts[union[0]] - top).exp()
            for group in union[1:]:
                total = total + sums[group] * (shifts[group] - top).exp()
            outputs.append(total.log() + top)
        group_lse = torch.stack([total.log() + shift for total, shift in zip(sums, shifts)], dim=1)
        out = torch.stack(outputs, dim=1)
        ctx.save_for_backward(x, group_lse, out)
        ctx.sizes, ctx.unions = sizes, unions
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, None, None]:
        x, group_lse, out = ctx.saved_tensors
        grad_x = torch.empty_like(x)
        start = 0
        for group, size in enumerate(ctx.sizes):
            weight = torch.zeros_like(group_lse[:, group])
            for index, union in enumerate(ctx.unions):
                if group in union:
                    weight = weight + grad_out[:, index] * (group_lse[:, group] - out[:, index]).exp()
            chunk = grad_x[:, start : start + size]
            torch.sub(x[:, start : start + size], group_lse[:, group : group + 1], out=chunk)
            chunk.exp_().mul_(weight.unsqueeze(1))
            start += size
        return grad_x, None, None


class _ClassGroups:
    """The log-sums of the student's class probabilities that eq. 10, 14-15 and the distillation losses need.

    The classes split at ``n_bg = max(n_old, 1)`` into the background (class 0), the old foreground classes
    ``1..n_bg-1`` and the new classes ``n_bg..K-1``. One :class:`_UnionLogSumExp` call (each class
    exponentiated once, forward and backward) gives ``(B, H, W)`` maps of:

    - ``background``: the background logit (``logsumexp`` over class 0 alone);
    - ``lse_old``: ``logsumexp`` over the background and the old classes (eq. 15);
    - ``lse_all``: ``logsumexp`` over every class;
    - ``lse_background_new``: ``logsumexp`` over the background and the new classes (eq. 10).

    ``old_foreground`` is the view of the old foreground logits ``(B, n_bg - 1, H, W)``.
    """

    def __init__(self, x: Tensor, num_old_classes: int) -> None:
        num_background = max(num_old_classes, 1)
        num_classes = x.shape[1]
        sizes = [1]
        foreground: tuple[int, ...] = ()
        new: tuple[int, ...] = ()
        if num_background > 1:
            foreground = (len(sizes),)
            sizes.append(num_background - 1)
        if num_classes > num_background:
            new = (len(sizes),)
            sizes.append(num_classes - num_background)
        unions = ((0,), (0, *foreground), (0, *foreground, *new), (0, *new))
        lse = _UnionLogSumExp.apply(x, tuple(sizes), unions)
        self.background, self.lse_old, self.lse_all, self.lse_background_new = lse.unbind(dim=1)
        self.background_size = num_background  # classes aggregated into the background of eq. 15
        self.old_foreground = x[:, 1:num_background]
        self.x = x


def _old_background_log_probs(groups: _ClassGroups) -> Tensor:
    """Eq. 10: ``log φ̂`` ``(B, n_old, H, W)`` from the class groups of the student logits."""
    log_background = (groups.lse_background_new - groups.lse_all).unsqueeze(1)
    return torch.cat([log_background, groups.old_foreground - groups.lse_all.unsqueeze(1)], dim=1)


def _new_background_log_probs(groups: _ClassGroups) -> Tensor:
    """Eq. 15: ``log φ̃`` ``(B, 1 + K - max(n_old, 1), H, W)`` from the class groups of the student logits."""
    log_background = (groups.lse_old - groups.lse_all).unsqueeze(1)
    new = groups.x[:, groups.background_size :]
    return torch.cat([log_background, new - groups.lse_all.unsqueeze(1)], dim=1)


def old_background_log_probs(logits: Tensor, num_old_classes: int) -> Tensor:
    r"""Log-probabilities of the old classes, with the new classes merged into the background (eq. 10, φ̂).

    The previous model's background contained the classes that are new now, so for distillation the student's
    background probability is the sum over the background and every new class:
    ``φ̂_0 = p_0 + sum_{s >= n_old} p_s`` and ``φ̂_s = p_s`` for the old classes ``0 < s < n_old``.
    Computed as ``logsumexp`` differences (one ``exp`` per class), in float32 for half inputs.

    Args:
        logits: student logits, old classes first then the new ones.
        num_old_classes: number of classes ``n_old`` of the previous step, background included
            (``1 <= n_old <= K``; ``n_old == K`` means no new class and gives ``log_softmax``).

    Shape:
        - logits: :math:`(B, K, H, W)`.
        - Output: :math:`(B, n_{old}, H, W)`; ``exp`` of it sums to 1 over dim 1.

    Returns:
        The log-probabilities ``log φ̂`` (float32 for half/bfloat16 inputs, else the input dtype).

    Raises:
        TypeError: ``logits`` is not a floating tensor or ``num_old_classes`` not an ``int``.
        ValueError: ``logits`` is not 4-D, or ``num_old_classes`` is outside ``[1, K]``.

    Example:
        >>> logits = torch.randn(2, 5, 8, 8)
        >>> log_phi = old_background_log_probs(logits, 3)
        >>> log_phi.shape
        torch.Size([2, 3, 8, 8])
        >>> torch.allclose(log_phi.exp().sum(1), torch.ones(2, 8, 8))
        True
    """
    check_logits(logits, "logits")
    n_old = check_num_old_classes(num_old_classes, logits.shape[1], minimum=1, allow_all=True)
    return _old_background_log_probs(_ClassGroups(upcast(logits), n_old))


def new_background_log_probs(logits: Tensor, num_old_classes: int) -> Tensor:
    r"""Log-probabilities of the new classes, with the old classes merged into the background (eq. 15, φ̃).

    Labels of the current step mark old classes as background, so for the segmentation loss the student's
    background probability is the sum over the background and every old class:
    ``φ̃_0 = sum_{s < n_old} p_s`` and ``φ̃_s = p_s`` for the new classes ``s >= n_old``.
    With ``num_old_classes <= 1`` there is nothing to aggregate and the result is ``log_softmax(logits)``.

    Args:
        logits: student logits, old classes first then the new ones.
        num_old_classes: number of classes ``n_old`` of the previous step, background included
            (``0 <= n_old < K``; 0 at the first step).

    Shape:
        - logits: :math:`(B, K, H, W)`.
        - Output: :math:`(B, 1 + K - \max(n_{old}, 1), H, W)`: channel 0 the aggregated background, then the
          new classes in order; ``exp`` of it sums to 1 over dim 1.

    Returns:
        The log-probabilities ``log φ̃`` (float32 for half/bfloat16 inputs, else the input dtype).

    Raises:
        TypeError: ``logits`` is not a floating tensor or ``num_old_classes`` not an ``int``.
        ValueError: ``logits`` is not 4-D, or ``num_old_classes`` is outside ``[0, K)``.

    Example:
        >>> logits = torch.randn(2, 5, 8, 8)
        >>> new_background_log_probs(logits, 3).shape
        torch.Size([2, 3, 8, 8])
    """
    check_logits(logits, "logits")
    n_old = check_num_old_classes(num_old_classes, logits.shape[1], minimum=0, allow_all=False)
    return _new_background_log_probs(_ClassGroups(upcast(logits), n_old))


def _gamma_balance(x_old: Tensor) -> Tensor:
    """Eq. 11 from old logits ``x_old`` (already upcast); see :func:`gamma_balance`."""
    pooled = x_old.detach().mean(dim=(2, 3))  # (B, n_old)
    log_gamma = torch.logsumexp(pooled[:, 1:], dim=1) - pooled[:, 0]  # -inf (γ = 0) when n_old == 1
    return log_gamma.clamp(max=_MAX_LOG_GAMMA).exp()


def gamma_balance(old_logits: Tensor) -> Tensor:
    r"""Per-image background balance γ of the balanced distillation (eq. 11).

    ``q̄ = softmax(AvgPool(old_logits))`` over the old classes (spatial mean of the logits, then softmax), and
    ``γ = sum_{s > 0} q̄_s / q̄_0 = (1 - q̄_0) / q̄_0``, computed in log space as ``exp(logsumexp(a[1:]) - a[0])``
    with ``a`` the spatially averaged logits.
    γ is detached (a weight, not a path for gradients) and clamped to at most ``e^40`` so that it stays
    finite in float32 (the clamp only binds when ``q̄_0 < 4e-18``). With a single old class (background only)
    γ is 0.

    Args:
        old_logits: logits of the previous model, background first.

    Shape:
        - old_logits: :math:`(B, n_{old}, H, W)`.
        - Output: :math:`(B,)`.

    Returns:
        γ per image, detached, float32 for half/bfloat16 inputs.

    Raises:
        TypeError: ``old_logits`` is not a floating tensor.
        ValueError: ``old_logits`` is not 4-D or has no class.

    Example:
        >>> old_logits = torch.zeros(2, 4, 8, 8)  # uniform: q̄ = 1/4 for every class
        >>> gamma_balance(old_logits)
        tensor([3., 3.])
    """
    check_logits(old_logits, "old_logits")
    return _gamma_balance(upcast(old_logits))
