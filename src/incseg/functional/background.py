"""Background aggregation of the student's probabilities (eq. 10, 15) and the background balance γ (eq. 11).

Everything works on logits in log space: an aggregated probability ``sum_{s in A} p_s`` is
``logsumexp(logits[A]) - logsumexp(logits)``, never ``log(softmax(...).sum())``. The log-sums over the class
groups come from one autograd function that exponentiates each class once in the forward pass, keeps the
exponentials and writes every gradient of the logits in one backward pass without another ``exp``; it expects
finite logits, supports first-order gradients (no double backward) and compiles without graph breaks.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Hashable, Sequence
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from incseg._checks import check_logits
from incseg.functional._common import check_num_old_classes, upcast

__all__ = ["gamma_balance", "new_background_log_probs", "old_background_log_probs"]

# Upper bound of log γ: γ = e^40 ≈ 2.4e17 keeps γ · L_B and its gradient finite in float32. It only binds when
# the old model's image-mean background probability q̄_0 is below ~4e-18, which real networks never reach.
_MAX_LOG_GAMMA = 40.0


class _Shared:
    """A shareable class-group pass: what it leaves for one following pass on the same logits.

    Filled by the forward pass of a :class:`_GroupLogSumExp` call that takes one (the *leader*): per group the
    shift, the exponentials, ``log(sum e)`` and the group's log-sum, the unions it folded, and the upcast logits
    it ran on. A :class:`_GroupFollower` (the *follower*) reads them instead of exponentiating the classes again.
    In the backward pass the follower runs first (it depends on the leader's token output) and leaves its
    per-pixel gradient factors in ``pending``; the leader adds them to its own and writes the gradient of the
    logits once. The leader's backward pass drops the forward values (``release``).
    """

    __slots__ = (
        "__weakref__",
        "exps",
        "folded",
        "log_sums",
        "lse_groups",
        "pending",
        "request",
        "shifts",
        "sizes",
        "used",
        "x",
    )

    def __init__(self, sizes: tuple[int, ...], used: frozenset[int], request: Hashable) -> None:
        self.sizes, self.used, self.request = sizes, used, request
        self.x: Tensor | None = None
        self.shifts: list[Tensor | None] = []
        self.exps: list[Tensor | None] = []
        self.log_sums: list[Tensor | None] = []
        self.lse_groups: list[Tensor | None] = []
        self.folded: dict[tuple[int, ...], Tensor] = {}
        self.pending: _Pending | None = None

    def release(self) -> None:
        self.x = None
        self.shifts, self.exps, self.log_sums, self.lse_groups, self.folded = [], [], [], [], {}


_Term = tuple[tuple[int, ...], Tensor, Tensor]
"""A term of the gradient of the logits: a union of groups, its log-sum ``lse_U`` and the gradient of a loss
with respect to ``lse_U``, each map ``(B, H, W)``."""


class _Pending(NamedTuple):
    """A follower's share of the gradient of the logits, left for the leader's backward pass: its terms (see
    :func:`_terms`), the gather of its label logits (``label_index`` from ``index_start``, with ``grad_target``)
    and its weighted sum (``weights`` with ``grad_weighted``)."""

    terms: list[_Term]
    label_index: Tensor | None
    index_start: int
    grad_target: Tensor | None
    weights: Tensor | None
    grad_weighted: Tensor | None


def _logaddexp(a: Tensor, b: Tensor) -> Tensor:
    """``log(exp(a) + exp(b))`` of finite maps as ``max + log(1 + exp(min - max))``.

    The same value as :func:`torch.logaddexp` to float rounding (the argument of ``log`` is in ``(1, 2]``),
    about 4x faster on the CPU, whose ``logaddexp`` and ``log1p`` kernels are not vectorised.
    """
    high = torch.maximum(a, b)
    return torch.minimum(a, b).sub_(high).exp_().add_(1.0).log_().add_(high)


def _fold(
    lse_groups: Sequence[Tensor | None], unions: tuple[tuple[int, ...], ...], folded: dict[tuple[int, ...], Tensor]
) -> list[Tensor]:
    """The unions' log-sums as left folds of :func:`_logaddexp` over the groups' log-sums; prefixes are shared
    through ``folded`` (updated). The list may hold a tensor twice or tensors of ``folded``."""
    outputs = []
    for union in unions:
        for end in range(1, len(union) + 1):
            prefix = union[:end]
            if prefix not in folded:
                last = lse_groups[prefix[-1]]
                assert last is not None
                folded[prefix] = last if end == 1 else _logaddexp(folded[prefix[:-1]], last)
        outputs.append(folded[union])
    return outputs


def _weighted_sum(weights: Tensor, shifted: Tensor, log_sum: Tensor, *, scratch: bool) -> tuple[Tensor, Tensor]:
    """``(D, W)``: ``D = sum_s w_s (x_s - m_g) - W log(sum e_g)`` and ``W = sum_s w_s`` over one group, from
    ``shifted = x_g - m_g``; ``scratch=True`` lets it overwrite ``shifted`` (no class-sized allocation)."""
    weight_sum = weights.sum(dim=1)
    product = shifted.mul_(weights) if scratch else weights * shifted
    return product.sum(dim=1) - weight_sum * log_sum.squeeze(1), weight_sum


def _terms(
    unions: tuple[tuple[int, ...], ...],
    lse_unions: Sequence[Tensor],
    grads: Sequence[Tensor | None],
    weighted: tuple[int, Tensor, Tensor, Tensor] | None,
) -> list[_Term]:
    """The gradient terms of a pass: one per union that received a gradient, and for the weighted sum ``D``
    (``weighted``: its group ``g``, ``grad_D``, ``W`` and ``lse_g``) the term ``-grad_D W`` on the union ``(g,)``:
    ``D``'s softmax part ``-grad_D W exp(x_s - lse_g)``."""
    terms = [(union, lse, grad) for union, lse, grad in zip(unions, lse_unions, grads) if grad is not None]
    if weighted is not None:
        group, grad_weighted, weight_sum, lse_weighted = weighted
        terms.append(((group,), lse_weighted, -(grad_weighted * weight_sum)))
    return terms


def _factors(shifts: Sequence[Tensor | None], terms: Sequence[_Term]) -> list[Tensor | None]:
    """Per group ``g`` the factor ``(B, 1, H, W)`` with ``grad_x_s = e_s * factor`` for its classes (``None``:
    no term): ``sum_{U ∋ g} grad_U exp(m_g - lse_U)``, the gradients of one union added first (one ``exp`` per
    group and union)."""
    merged: dict[tuple[int, ...], tuple[Tensor, Tensor]] = {}
    for union, lse, grad in terms:
        merged[union] = (lse, grad) if union not in merged else (lse, merged[union][1] + grad)
    factors: list[Tensor | None] = []
    for group, shift in enumerate(shifts):
        factor = None
        if shift is not None:
            for union, (lse, grad) in merged.items():
                if group in union:
                    term = grad.unsqueeze(1) * (shift - lse.unsqueeze(1)).exp()
                    factor = term if factor is None else factor + term
        factors.append(factor)
    return factors


def _weights_grad(
    x_weighted: Tensor,
    lse_weighted: Tensor,
    weights: Tensor,
    grad_weighted: Tensor | None,
    grad_weight_sum: Tensor | None,
) -> Tensor:
    """Gradient of ``(D, W)`` with respect to the weights."""
    grad_weights = torch.zeros_like(weights)
    if grad_weighted is not None:
        grad_weights = grad_weights + grad_weighted.unsqueeze(1) * (x_weighted - lse_weighted.unsqueeze(1))
    if grad_weight_sum is not None:
        grad_weights = grad_weights + grad_weight_sum.unsqueeze(1)
    return grad_weights


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
    With a :class:`_Shared` ``share`` the pass can lead a :class:`_GroupFollower`: it fills ``share`` and
    returns one more output, a 0-dim token that the follower takes as input (so that the follower's backward
    pass runs first), and its backward pass adds the follower's pending gradient.
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
        share: _Shared | None = None,
    ) -> tuple[Tensor, ...]:
        ctx.set_materialize_grads(False)
        used = {group for union in unions for group in union}
        if weights is not None:
            used.add(weighted_group)
        shifts: list[Tensor | None] = []
        exps: list[Tensor | None] = []
        log_sums: list[Tensor | None] = []
        lse_groups: list[Tensor | None] = []
        map_shape = (x.shape[0], *x.shape[2:])
        weighted, weight_sum = x.new_zeros(map_shape), x.new_zeros(map_shape)  # distinct outputs, never aliased
        for group, chunk in enumerate(torch.split(x, list(sizes), dim=1)):
            if group not in used:
                shifts.append(None)
                exps.append(None)
                log_sums.append(None)
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
            if weights is not None and is_weighted:  # shifted is a scratch tensor once e is formed
                weighted, weight_sum = _weighted_sum(weights, shifted, log_sum, scratch=e is not None)
            shifts.append(shift)
            exps.append(e)
            log_sums.append(log_sum)
            lse_groups.append((shift + log_sum).squeeze(1))
        folded: dict[tuple[int, ...], Tensor] = {}
        outputs: list[Tensor] = []
        for lse in _fold(lse_groups, unions, folded):
            outputs.append(lse.clone() if any(lse is other for other in outputs) else lse)  # never aliased
        target = x.new_zeros(map_shape)
        if index is not None:
            target = x[:, index_start:].gather(1, index.unsqueeze(1)).squeeze(1)
        outputs += [target, weighted, weight_sum]
        lse_weighted = lse_groups[weighted_group] if weights is not None else None
        ctx.save_for_backward(x, index, weights, lse_weighted, *outputs, *shifts, *exps)
        ctx.sizes, ctx.unions, ctx.index_start, ctx.weighted_group = sizes, unions, index_start, weighted_group
        ctx.share = share
        if share is not None:
            share.x, share.shifts, share.exps, share.log_sums = x, shifts, exps, log_sums
            share.lse_groups, share.folded = lse_groups, folded
            outputs.append(x.new_zeros(()))  # the token a follower takes as input
        return tuple(outputs)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        x, index, weights, lse_weighted, *saved = ctx.saved_tensors
        num_groups, num_unions = len(ctx.sizes), len(ctx.unions)
        lse_unions = saved[:num_unions]
        weight_sum = saved[num_unions + 2]
        shifts, exps = saved[num_unions + 3 : num_unions + 3 + num_groups], saved[num_unions + 3 + num_groups :]
        grad_target, grad_weighted, grad_weight_sum = grads[num_unions : num_unions + 3]
        pending = None
        share: _Shared | None = ctx.share
        if share is not None:
            share.release()  # no follower can join once the leader has run backward
            if grads[num_unions + 3] is not None:  # the follower ran backward in this pass: take its share
                pending, share.pending = share.pending, None
        weighted = None
        if weights is not None and grad_weighted is not None:
            weighted = (ctx.weighted_group, grad_weighted, weight_sum, lse_weighted)
        terms = _terms(ctx.unions, lse_unions, grads, weighted)
        # D = sum_s w_s (x_s - lse_g): its softmax part is a term, w_s is added below
        addends: list[tuple[Tensor, Tensor]] = []
        if weights is not None and grad_weighted is not None:
            addends.append((weights, grad_weighted.unsqueeze(1)))
        if pending is not None:
            terms += pending.terms
            if pending.weights is not None and pending.grad_weighted is not None:
                addends.append((pending.weights, pending.grad_weighted.unsqueeze(1)))
        factors = _factors(shifts, terms)
        compiling = torch.compiler.is_compiling()  # dynamo cannot trace out= into a strided slice: build by cat
        grad_x = None if compiling else torch.empty_like(x)
        chunks = []
        start = 0
        for group, size in enumerate(ctx.sizes):
            out = None if grad_x is None else grad_x[:, start : start + size]
            start += size
            factor, e = factors[group], exps[group]
            if factor is None:
                chunk = x.new_zeros(x.shape[0], size, *x.shape[2:]) if out is None else out.zero_()
            elif e is None:
                chunk = factor if out is None else out.copy_(factor)
            else:
                chunk = torch.mul(e, factor) if out is None else torch.mul(e, factor, out=out)
            if group == ctx.weighted_group:
                for add_weights, add_grad in addends:
                    add = chunk.addcmul if out is None else chunk.addcmul_
                    chunk = add(add_weights, add_grad)
            chunks.append(chunk)
        if grad_x is None:
            grad_x = torch.cat(chunks, dim=1)
        if index is not None and grad_target is not None:
            grad_x[:, ctx.index_start :].scatter_add_(1, index.unsqueeze(1), grad_target.unsqueeze(1))
        if pending is not None and pending.label_index is not None and pending.grad_target is not None:
            grad_x[:, pending.index_start :].scatter_add_(
                1, pending.label_index.unsqueeze(1), pending.grad_target.unsqueeze(1)
            )
        grad_weights = None
        needs_weights = grad_weighted is not None or grad_weight_sum is not None
        if weights is not None and ctx.needs_input_grad[2] and needs_weights:
            x_weighted = torch.split(x, list(ctx.sizes), dim=1)[ctx.weighted_group]
            grad_weights = _weights_grad(x_weighted, lse_weighted, weights, grad_weighted, grad_weight_sum)
        return grad_x, None, grad_weights, None, None, None, None, None


class _GroupFollower(torch.autograd.Function):
    """The outputs of :class:`_GroupLogSumExp` for other unions, label index and weights, from the forward
    values that a leading pass on the same logits left in ``share``: no class is exponentiated again.

    Same inputs and outputs as :class:`_GroupLogSumExp`, with the leader's token (an input that only orders the
    backward passes) and the :class:`_Shared` state. Every output is computed by the same operations as the
    leader would (the same values, bit for bit). The backward pass forms only per-pixel maps: the factors of
    the groups, its label gradient and its weighted gradient go to ``share.pending`` and the leader's backward
    pass, which runs next, writes them into the gradient of the logits with its own. The gradient of the
    weights is computed here.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        token: Tensor,
        index: Tensor | None,
        weights: Tensor | None,
        share: _Shared,
        unions: tuple[tuple[int, ...], ...],
        index_start: int,
        weighted_group: int,
    ) -> tuple[Tensor, ...]:
        ctx.set_materialize_grads(False)
        map_shape = (x.shape[0], *x.shape[2:])
        shared = {id(t) for t in share.folded.values()}
        folded = dict(share.folded)
        outputs: list[Tensor] = []
        for lse in _fold(share.lse_groups, unions, folded):
            reused = id(lse) in shared or any(lse is other for other in outputs)
            outputs.append(lse.clone() if reused else lse)  # never an alias of the leader's or another output
        target = x.new_zeros(map_shape)
        if index is not None:
            target = x[:, index_start:].gather(1, index.unsqueeze(1)).squeeze(1)
        weighted, weight_sum = x.new_zeros(map_shape), x.new_zeros(map_shape)
        lse_weighted = None
        if weights is not None:
            chunk = torch.split(x, list(share.sizes), dim=1)[weighted_group]
            shift, log_sum = share.shifts[weighted_group], share.log_sums[weighted_group]
            assert shift is not None and log_sum is not None
            scratch = chunk.shape[1] > 1
            shifted = torch.sub(chunk, shift) if scratch else log_sum
            weighted, weight_sum = _weighted_sum(weights, shifted, log_sum, scratch=scratch)
            lse_weighted = share.lse_groups[weighted_group]
        outputs += [target, weighted, weight_sum]
        ctx.save_for_backward(x, index, weights, lse_weighted, *outputs)
        ctx.unions, ctx.index_start, ctx.weighted_group, ctx.sizes = unions, index_start, weighted_group, share.sizes
        ctx.share = share
        return tuple(outputs)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        x, index, weights, lse_weighted, *saved = ctx.saved_tensors
        num_unions = len(ctx.unions)
        lse_unions = saved[:num_unions]
        weight_sum = saved[num_unions + 2]
        grad_target, grad_weighted, grad_weight_sum = grads[num_unions:]
        weighted = None
        if weights is not None and grad_weighted is not None:
            weighted = (ctx.weighted_group, grad_weighted, weight_sum, lse_weighted)
        ctx.share.pending = _Pending(
            _terms(ctx.unions, lse_unions, grads, weighted),
            index if grad_target is not None else None,
            ctx.index_start,
            grad_target,
            weights if weighted is not None else None,
            grad_weighted,
        )
        grad_weights = None
        needs_weights = grad_weighted is not None or grad_weight_sum is not None
        if weights is not None and ctx.needs_input_grad[3] and needs_weights:
            x_weighted = torch.split(x, list(ctx.sizes), dim=1)[ctx.weighted_group]
            grad_weights = _weights_grad(x_weighted, lse_weighted, weights, grad_weighted, grad_weight_sum)
        token = x.new_zeros(())  # a defined gradient: the leader's backward pass takes the pending share
        return None, token, None, grad_weights, None, None, None, None


class _Entry(NamedTuple):
    """The last shareable class-group pass of a thread: its logits (weakly) and their version, its token and
    state, and the half/bfloat16 tensor its logits were upcast from (weakly, with its version) if any."""

    x: weakref.ref[Tensor]
    version: int
    token: Tensor
    share: _Shared
    source: weakref.ref[Tensor] | None
    source_version: int


_SLOT = threading.local()  # .entry: an _Entry or None


def _can_share(x: Tensor) -> bool:
    """Whether a class-group pass on ``x`` may lead or follow: eager mode with a graph being recorded."""
    return torch.is_grad_enabled() and x.requires_grad and not torch.compiler.is_compiling()


def _follow(
    x: Tensor, sizes: tuple[int, ...], used: frozenset[int], request: Hashable
) -> tuple[Tensor, _Shared] | None:
    """The token and state of the last shareable pass of this thread if a pass on ``x`` with these groups can
    follow it: same tensor, unchanged since (same version), same split, every needed group exponentiated, no
    follower yet, and another ``request`` (unions, label gather, weights) than the leader's. The last rule
    keeps a loss called twice on the same tensor (``gradcheck``, which changes the values through ``.data``
    without a new version, or a second evaluation for logging) from reading the first call's values."""
    if not _can_share(x):
        return None
    entry: _Entry | None = getattr(_SLOT, "entry", None)
    if entry is None:
        return None
    share = entry.share
    if entry.x() is not x or x._version != entry.version or share.sizes != sizes or not used <= share.used:
        return None
    if share.request == request:
        return None
    if share.x is None:  # the leader has run backward
        return None
    _SLOT.entry = None  # one follower per leader; the slot lets go of the leader's graph
    return entry.token, share


def shared_upcast(logits: Tensor) -> Tensor:
    """``upcast(logits)``; for half/bfloat16 ``logits`` that the last shareable class-group pass of this thread
    upcast, unchanged since, the float32 tensor it ran on (so that a pass on them can follow it)."""
    if logits.dtype not in (torch.float16, torch.bfloat16) or not _can_share(logits):
        return upcast(logits)
    entry: _Entry | None = getattr(_SLOT, "entry", None)
    if entry is not None and entry.source is not None:
        leader_x = entry.share.x
        if entry.source() is logits and logits._version == entry.source_version and leader_x is not None:
            if leader_x.dtype == torch.float32 and leader_x.shape == logits.shape:
                return leader_x
    return upcast(logits)


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

    ``share=True`` (the loss functionals) lets two consecutive passes on the same logits tensor share one
    exponentiation and one gradient write, as ``CAFLoss`` does within one call: a pass that finds the last
    shareable pass of its thread on the same tensor (unchanged since, same split, the groups it needs
    exponentiated, not yet followed, its backward not yet run) follows it (:class:`_GroupFollower`); otherwise
    it leads (:class:`_GroupLogSumExp` with a :class:`_Shared` state) and takes the thread's slot, which holds
    its token (and so its graph) until a pass follows it or the next pass leads. So
    ``unbiased_cross_entropy(logits, ...) + unbiased_kd_loss(logits, ...)`` costs one class-group pass, like
    ``CAFLoss``, with the same values. Sharing needs a graph being recorded in eager mode; under ``no_grad`` or
    ``torch.compile`` every pass runs on its own. ``source``: the half/bfloat16 tensor ``x`` was upcast from
    (:func:`shared_upcast` then finds the leader's float32 copy for a follower).
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
        share: bool = False,
        source: Tensor | None = None,
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
        group_unions = tuple(groups[name] for name in names)
        weighted_group = foreground[0] if foreground else 0
        used = {group for union in group_unions for group in union}
        if old_foreground_weights is not None:
            used.add(weighted_group)
        args = (old_foreground_weights, tuple(sizes), group_unions, index_start, weighted_group)
        request = (group_unions, index is not None, index_start, old_foreground_weights is not None)
        leader = _follow(x, tuple(sizes), frozenset(used), request) if share else None
        if leader is not None:
            token, state = leader
            out = _GroupFollower.apply(x, token, index, old_foreground_weights, state, *args[2:])
        elif share and _can_share(x):
            state = _Shared(tuple(sizes), frozenset(used), request)
            *out, token = _GroupLogSumExp.apply(x, index, *args, state)
            _SLOT.entry = _Entry(
                weakref.ref(x),
                x._version,
                token,
                state,
                None if source is None or source is x else weakref.ref(source),
                0 if source is None else source._version,
            )
        else:
            out = _GroupLogSumExp.apply(x, index, *args)
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
    groups = _ClassGroups(shared_upcast(logits), n_old, ("all", "background_new"), share=True, source=logits)
    return _old_background_log_probs(groups)


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
    groups = _ClassGroups(shared_upcast(logits), n_old, ("all", "old"), share=True, source=logits)
    return _new_background_log_probs(groups)


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
