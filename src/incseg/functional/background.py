"""Background aggregation of the student's probabilities (eq. 10, 15) and the background balance γ (eq. 11).

Everything works on logits in log space: an aggregated probability ``sum_{s in A} p_s`` is
``logsumexp(logits[A]) - logsumexp(logits)``, never ``log(softmax(...).sum())``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from incseg._checks import check_logits
from incseg.functional._common import check_num_old_classes, upcast

__all__ = ["gamma_balance", "new_background_log_probs", "old_background_log_probs"]

# Upper bound of log γ: γ = e^40 ≈ 2.4e17 keeps γ · L_B and its gradient finite in float32. It only binds when
# the old model's image-mean background probability q̄_0 is below ~4e-18, which real networks never reach.
_MAX_LOG_GAMMA = 40.0


def _old_background_log_probs(x: Tensor, num_old_classes: int, lse_all: Tensor) -> Tensor:
    """Eq. 10 from logits ``x`` (already upcast) and their ``logsumexp`` over all classes ``(B, H, W)``."""
    num_classes = x.shape[1]
    if num_old_classes < num_classes:
        log_bg = torch.logaddexp(x[:, 0], torch.logsumexp(x[:, num_old_classes:], dim=1))
    else:
        log_bg = x[:, 0]
    lse = lse_all.unsqueeze(1)
    return torch.cat([(log_bg - lse_all).unsqueeze(1), x[:, 1:num_old_classes] - lse], dim=1)


def _new_background_log_probs(x: Tensor, num_old_classes: int, lse_all: Tensor) -> Tensor:
    """Eq. 15 from logits ``x`` (already upcast) and their ``logsumexp`` over all classes ``(B, H, W)``."""
    n_bg = max(num_old_classes, 1)
    log_bg = torch.logsumexp(x[:, :n_bg], dim=1) if n_bg > 1 else x[:, 0]
    lse = lse_all.unsqueeze(1)
    return torch.cat([(log_bg - lse_all).unsqueeze(1), x[:, n_bg:] - lse], dim=1)


def old_background_log_probs(logits: Tensor, num_old_classes: int) -> Tensor:
    r"""Log-probabilities of the old classes, with the new classes merged into the background (eq. 10, φ̂).

    The previous model's background contained the classes that are new now, so for distillation the student's
    background probability is the sum over the background and every new class:
    ``φ̂_0 = p_0 + sum_{s >= n_old} p_s`` and ``φ̂_s = p_s`` for the old classes ``0 < s < n_old``.
    Computed as ``logsumexp`` differences (one ``logsumexp`` over all classes), in float32 for half inputs.

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
    x = upcast(logits)
    return _old_background_log_probs(x, n_old, torch.logsumexp(x, dim=1))


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
    x = upcast(logits)
    return _new_background_log_probs(x, n_old, torch.logsumexp(x, dim=1))


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
