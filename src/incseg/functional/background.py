"""Background aggregation of the student's probabilities (eq. 10, 15) and the background balance γ (eq. 11).

Everything works on logits in log space: an aggregated probability ``sum_{s in A} p_s`` is
``logsumexp(logits[A]) - logsumexp(logits)``, never ``log(softmax(...).sum())``. The log-sums over the class
groups come from one autograd function that exponentiates each class once in the forward pass, keeps the
exponentials and writes every gradient of the logits in one backward pass without another ``exp``; it expects
finite logits, supports first-order gradients (no double backward) and compiles without graph breaks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from incseg._checks import check_logits
from incseg.functional._common import check_num_old_classes, upcast

__all__ = ["gamma_balance", "new_background_log_probs", "old_background_log_probs"]

# Upper bound of log γ: γ = e^40 ≈ 2.4e17 keeps γ · L_B and its gradient finite in float32. It only binds when
# the old model's image-mean background probability q̄_0 is below ~4e-18, which real networks never reach.
_MAX_LOG_GAMMA = 40.0


class _GroupLogSumExp(torch.autograd.Function):
    """``logsumexp`` of the logits over unions of contiguous class groups, plus two linear maps, fused.

    The classes (dim 1) are split into contiguous groups of the given sizes. The forward pass exponentiates each
    class of a group that some union uses once: per group ``g`` a shift ``m_g`` (the group maximum),
    ``e_g = exp(x_g - m_g)`` and ``lse_g = m_g + log(sum e_g)``; a union ``U`` is ``logsumexp_{g in U} lse_g``
    on ``(B, H, W)`` maps (``logaddexp`` folds), free of overflow and underflow. Two maps ride along, so that
    every gradient of the logits comes out of one backward pass: ``x[index_start + index]`` (the label's logit
    of a cross-entropy, indexed within the classes from ``index_start`` on: a gather over fewer classes is
    faster) and, for weights
    ``w`` over one group ``g`` (the teacher's probabilities of a distillation), ``D = sum_s w_s (x_s - lse_g)``
    and ``W = sum_s w_s``. ``D`` is computed as ``sum_s w_s (x_s - m_g) - W log(sum e_g)``, a sum of
    non-positive terms (no cancellation).

    The backward pass writes the gradient of every class once, without another ``exp``: for class ``s`` of group
    ``g``, ``sum_{U ∋ g} grad_U · exp(x_s - lse_U) = e_s · sum_{U ∋ g} grad_U · exp(m_g - lse_U)`` (the saved
    ``e_s <= 1`` times a per-pixel factor), plus ``grad_index`` at the label and
    ``grad_D · (w_s - W e_s exp(m_g - lse_g))`` in the weighted group. Classes of groups in no union get a zero
    gradient and are never exponentiated. It keeps the exponentials (one class-sized float tensor) for
    backward. First-order gradients only.

    Outputs, each ``(B, H, W)``: the unions' log-sums, then ``x[index_start + index]``, ``D`` and ``W`` (each 0
    without ``index`` / ``weights``). Outputs that receive no gradient cost nothing in the backward pass.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        index: Tensor | None,
        weights: Tensor | None,
        sizes: tuple[int, ...],
        unions: tuple[tuple[int, ...], ...],
        index_start: int,
        weighted_group: int,
    ) -> tuple[Tensor, ...]:
        ctx.set_materialize_grads(False)
        used = {group for union in unions for group in union}
        if weights is not None:
            used.add(weighted_group)
        shifts: list[Tensor | None] = []
        exps: list[Tensor | None] = []
        lse_groups: list[Tensor | None] = []
        map_shape = (x.shape[0], *x.shape[2:])
        weighted, weight_sum = x.new_zeros(map_shape), x.new_zeros(map_shape)  # distinct outputs, never aliased
        for group, chunk in enumerate(torch.split(x, list(sizes), dim=1)):
            if group not in used:
                shifts.append(None)
                exps.append(None)
                lse_groups.append(None)
                continue
            is_weighted = weights is not None and group == weighted_group
            if chunk.shape[1] == 1:  # exp(x - max) = 1: nothing to exponentiate
                shift, e, log_sum = chunk, None, torch.zeros_like(chunk)
                shifted = log_sum
            else:
                shift = chunk.amax(dim=1, keepdim=True)
                shifted = torch.sub(chunk, shift)
                e = shifted.exp() if is_weighted else shifted.exp_()
                log_sum = e.sum(dim=1, keepdim=True).log_()
            if weights is not None and is_weighted:
                weight_sum = weights.sum(dim=1)
                weighted = (weights * shifted).sum(dim=1) - weight_sum * log_sum.squeeze(1)
            shifts.append(shift)
            exps.append(e)
            lse_groups.append((shift + log_sum).squeeze(1))
        folded: dict[tuple[int, ...], Tensor] = {}  # unions as left folds of logaddexp, prefixes shared
        outputs: list[Tensor] = []
        for union in unions:
            for end in range(1, len(union) + 1):
                prefix = union[:end]
                if prefix not in folded:
                    last = lse_groups[prefix[-1]]
                    assert last is not None
                    folded[prefix] = last if end == 1 else torch.logaddexp(folded[prefix[:-1]], last)
            lse = folded[union]
            outputs.append(lse.clone() if any(lse is other for other in outputs) else lse)  # never aliased
        target = x.new_zeros(map_shape)
        if index is not None:
            target = x[:, index_start:].gather(1, index.unsqueeze(1)).squeeze(1)
        outputs += [target, weighted, weight_sum]
        lse_weighted = lse_groups[weighted_group] if weights is not None else None
        ctx.save_for_backward(x, index, weights, lse_weighted, *outputs, *shifts, *exps)
        ctx.sizes, ctx.unions, ctx.index_start, ctx.weighted_group = sizes, unions, index_start, weighted_group
        return tuple(outputs)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        x, index, weights, lse_weighted, *saved = ctx.saved_tensors
        num_groups, num_unions = len(ctx.sizes), len(ctx.unions)
        lse_unions = saved[:num_unions]
        weight_sum = saved[num_unions + 2]
        shifts, exps = saved[num_unions + 3 : num_unions + 3 + num_groups], saved[num_unions + 3 + num_groups :]
        grad_target, grad_weighted, grad_weight_sum = grads[num_unions:]
        if grad_weighted is not None:
            grad_weighted = grad_weighted.unsqueeze(1)
        compiling = torch.compiler.is_compiling()  # dynamo cannot trace out= into a strided slice: build by cat
        grad_x = None if compiling else torch.empty_like(x)
        chunks = []
        start = 0
        for group, size in enumerate(ctx.sizes):
            shift = shifts[group]
            out = None if grad_x is None else grad_x[:, start : start + size]
            start += size
            factor = None
            if shift is not None:
                for union, lse_union, grad_union in zip(ctx.unions, lse_unions, grads):
                    if group in union and grad_union is not None:
                        term = grad_union.unsqueeze(1) * (shift - lse_union.unsqueeze(1)).exp()
                        factor = term if factor is None else factor + term
            weighted = None
            if weights is not None and group == ctx.weighted_group and grad_weighted is not None:
                weighted = weights  # D = sum_s w_s (x_s - lse_g): its softmax part here, w_s below
                term = grad_weighted * weight_sum.unsqueeze(1) * (shift - lse_weighted.unsqueeze(1)).exp()
                factor = -term if factor is None else factor - term
            e = exps[group]
            if factor is None:
                chunk = x.new_zeros(x.shape[0], size, *x.shape[2:]) if out is None else out.zero_()
            elif e is None:
                chunk = factor if out is None else out.copy_(factor)
            else:
                chunk = torch.mul(e, factor) if out is None else torch.mul(e, factor, out=out)
            if weighted is not None and grad_weighted is not None:
                add = chunk.addcmul if out is None else chunk.addcmul_
                chunk = add(weighted, grad_weighted)
            chunks.append(chunk)
        if grad_x is None:
            grad_x = torch.cat(chunks, dim=1)
        if index is not None and grad_target is not None:
            grad_x[:, ctx.index_start :].scatter_add_(1, index.unsqueeze(1), grad_target.unsqueeze(1))
        grad_weights = None
        needs_weights = grad_weighted is not None or grad_weight_sum is not None
        if weights is not None and ctx.needs_input_grad[2] and needs_weights:
            x_weighted = torch.split(x, list(ctx.sizes), dim=1)[ctx.weighted_group]
            grad_weights = torch.zeros_like(weights)
            if grad_weighted is not None:
                grad_weights = grad_weights + grad_weighted * (x_weighted - lse_weighted.unsqueeze(1))
            if grad_weight_sum is not None:
                grad_weights = grad_weights + grad_weight_sum.unsqueeze(1)
        return grad_x, None, grad_weights, None, None, None, None


_UnionName = Literal["background", "old", "all", "background_new", "foreground"]


class _ClassGroups:
    """The log-sums of the student's class probabilities that eq. 10, 14-15 and the distillation losses need.

    The classes split at ``n_bg = max(n_old, 1)`` into the background (class 0), the old foreground classes
    ``1..n_bg-1`` and the new classes ``n_bg..K-1``. One :class:`_GroupLogSumExp` call (each class
    exponentiated once, and one backward pass for every gradient of the logits) gives ``(B, H, W)`` maps:

    - ``lse[name]`` for each requested union: ``"background"`` (the background logit), ``"old"`` (background
      and old classes, eq. 15), ``"all"`` (every class), ``"background_new"`` (background and new classes,
      eq. 10), ``"foreground"`` (the old foreground classes; the background logit when there is none);
    - ``target``: ``x[index_start + index]`` when ``index`` ``(B, H, W)`` is given (the label's logit of a
      cross-entropy), else 0;
    - ``weighted_log_probs``: ``sum_{0 < s < n_bg} w_s (x_s - lse["foreground"])`` and ``weight_sum``:
      ``sum_s w_s``, when ``old_foreground_weights`` ``w`` is given (the teacher's probabilities of the old
      foreground classes in a distillation), else 0.

    Only the requested unions are formed (each costs ``exp``/``log`` of ``(B, H, W)`` maps, forward and
    backward). With ``old_only=True`` the new classes are left out (never exponentiated, zero gradient), as
    the plain distillation of LwF needs: ``"all"`` is then the old classes and ``"background_new"`` the
    background. ``old_foreground`` is the view of the old foreground logits ``(B, n_bg - 1, H, W)``.
    """

    def __init__(
        self,
        x: Tensor,
        num_old_classes: int,
        unions: Sequence[_UnionName],
        *,
        index: Tensor | None = None,
        index_start: int = 0,
        old_foreground_weights: Tensor | None = None,
        old_only: bool = False,
    ) -> None:
        num_background = max(num_old_classes, 1)
        num_classes = x.shape[1]
        sizes = [1]
        foreground: tuple[int, ...] = ()
        new: tuple[int, ...] = ()
        if num_background > 1:
            foreground = (len(sizes),)
            sizes.append(num_background - 1)
        else:
            old_foreground_weights = None  # no old foreground class: the weighted sum is empty
        if num_classes > num_background:
            new = () if old_only else (len(sizes),)
            sizes.append(num_classes - num_background)
        groups: dict[str, tuple[int, ...]] = {
            "background": (0,),
            "old": (0, *foreground),
            "all": (0, *foreground, *new),
            "background_new": (0, *new),
            "foreground": foreground or (0,),
        }
        names = tuple(dict.fromkeys(unions))
        out = _GroupLogSumExp.apply(
            x,
            index,
            old_foreground_weights,
            tuple(sizes),
            tuple(groups[name] for name in names),
            index_start,
            foreground[0] if foreground else 0,
        )
        self.lse: dict[str, Tensor] = dict(zip(names, out))
        self.target, self.weighted_log_probs, self.weight_sum = out[len(names) :]
        self.background_size = num_background  # classes aggregated into the background of eq. 15
        self.old_foreground = x[:, 1:num_background]
        self.x = x


def _old_background_log_probs(groups: _ClassGroups) -> Tensor:
    """Eq. 10: ``log φ̂`` ``(B, n_old, H, W)`` from the class groups of the student logits."""
    lse_all = groups.lse["all"]
    log_background = (groups.lse["background_new"] - lse_all).unsqueeze(1)
    return torch.cat([log_background, groups.old_foreground - lse_all.unsqueeze(1)], dim=1)


def _new_background_log_probs(groups: _ClassGroups) -> Tensor:
    """Eq. 15: ``log φ̃`` ``(B, 1 + K - max(n_old, 1), H, W)`` from the class groups of the student logits."""
    lse_all = groups.lse["all"]
    log_background = (groups.lse["old"] - lse_all).unsqueeze(1)
    new = groups.x[:, groups.background_size :]
    return torch.cat([log_background, new - lse_all.unsqueeze(1)], dim=1)


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
    return _old_background_log_probs(_ClassGroups(upcast(logits), n_old, ("all", "background_new")))


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
    return _new_background_log_probs(_ClassGroups(upcast(logits), n_old, ("all", "old")))


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
