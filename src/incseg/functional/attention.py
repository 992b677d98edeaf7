"""Self-attention of a feature map (eq. 5-7) and the attentive feature distillation loss (eq. 8)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from incseg._checks import check_feature_map, check_same_shape
from incseg.functional._common import Reduction, check_choice, upcast

__all__ = ["Attention", "attentive_distillation_loss", "pixel_weights", "spatial_attention"]

Attention = Literal["both", "spatial", "channel", "plain"]
_ATTENTIONS = ("both", "spatial", "channel", "plain")

# Floor of the Frobenius norm in eq. 6. Since every entry of sum_c m_c^2 is at most its norm, the map stays in
# [0, 1] whether or not the floor binds (it only binds for an all-but-zero feature map).
_EPS = 1e-12


def _spatial_attention(x: Tensor) -> Tensor:
    # Computed on x / s with s = max |x| per image (the map does not depend on the scale), so that the squared
    # sums cannot overflow for large features (float32 overflows at |x| ~ 1e19); the floor scales with s^2.
    s = x.detach().abs().amax(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
    y = x / s.clamp_min(torch.finfo(x.dtype).tiny)
    energy = y.square().sum(dim=1, keepdim=True)  # (B, 1, H, W)
    norm = torch.linalg.vector_norm(energy, dim=(2, 3), keepdim=True)  # (B, 1, 1, 1)
    return energy / torch.maximum(norm, _EPS / s.square())


def spatial_attention(m: Tensor) -> Tensor:
    r"""Spatial self-attention ``AD_SP`` of a feature map (eq. 6).

    ``AD_SP(m) = sum_c m_c^2 / ||sum_c m_c^2||_F`` per image: the channel energy of every position, normalised
    to unit Frobenius norm over the image. An all-zero map gives zeros (the norm is floored at 1e-12), never NaN.
    Computed in float32 for half/bfloat16 inputs and returned in the input dtype.

    Args:
        m: feature map.

    Shape:
        - m: :math:`(B, C, H, W)`.
        - Output: :math:`(B, 1, H, W)`, values in ``[0, 1]``.

    Returns:
        The attention map.

    Raises:
        TypeError: ``m`` is not a floating tensor.
        ValueError: ``m`` is not 4-D.

    Example:
        >>> m = torch.randn(2, 16, 5, 7)
        >>> a = spatial_attention(m)
        >>> a.shape
        torch.Size([2, 1, 5, 7])
        >>> torch.allclose(a.square().sum(dim=(1, 2, 3)), torch.ones(2))
        True
    """
    check_feature_map(m, "m")
    return _spatial_attention(upcast(m)).to(m.dtype)


def _channel_attention(se: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    weights = se(x)
    expected = (x.shape[0], x.shape[1], 1, 1)
    if tuple(weights.shape) != expected:
        raise ValueError(
            f"se(m) must return channel weights of shape (B, C, 1, 1) = {expected}, got {tuple(weights.shape)}"
        )
    return weights


def _attend(x: Tensor, se: Callable[[Tensor], Tensor] | None, attention: str) -> Tensor:
    """``AD(m)`` of eq. 7 (or its ablations): the features reweighted by ``1 + attention``."""
    if attention == "plain":
        return x
    if attention == "spatial":
        return (1.0 + _spatial_attention(x)) * x
    if se is None:
        raise ValueError(f"attention={attention!r} needs a channel attention module se, got None")
    channel = _channel_attention(se, x)
    if attention == "channel":
        return (1.0 + channel) * x
    return (1.0 + channel * _spatial_attention(x)) * x


def attentive_distillation_loss(
    m: Tensor,
    m_old: Tensor,
    se: Callable[[Tensor], Tensor] | None,
    *,
    attention: Attention = "both",
    reduction: Reduction = "mean",
    weight: Tensor | None = None,
) -> Tensor:
    r"""Attentive feature distillation of one feature map (one term of eq. 8).

    ``AD(m) = (AD_CH(m) ⊗ AD_SP(m) + 1) ⊙ m`` (eq. 7) with ``AD_CH = se`` (eq. 5, a
    :class:`~incseg.nn.squeeze_excitation.SqueezeExcitation`) and ``AD_SP`` = :func:`spatial_attention`
    (eq. 6); the loss is ``||AD(m) - AD(m_old)||^2``. The same ``se`` weights the student and the teacher
    features. The teacher side is a fixed target: ``m_old`` is detached and ``AD(m_old)`` is computed without
    gradient, so ``se`` learns from the student side only. Ablations (Table VI): ``attention="spatial"`` uses
    ``(AD_SP + 1) ⊙ m``, ``"channel"`` uses ``(AD_CH + 1) ⊙ m``, ``"plain"`` is plain feature distillation
    ``||m - m_old||^2``. Computed in float32 for half/bfloat16 features.

    ``weight`` weights the squared differences per position, ``sum_{b,c,p} w_{b,p} (AD(m) - AD(m_old))^2``
    (divided by the number of elements for ``"mean"``, as without it): the attention maps still see the whole
    image, only the distillation target is restricted. :class:`~incseg.losses.CAFLoss` uses it with
    ``ad_on_new=False`` to leave the positions of new-class pixels free (see :func:`pixel_weights`).

    Args:
        m: student feature map (``z̄`` or ``h`` of the current step).
        m_old: teacher feature map of the same shape.
        se: channel attention module returning ``(B, C, 1, 1)`` weights; required for ``"both"`` and
            ``"channel"``, unused (may be ``None``) otherwise.
        attention: ``"both"`` (eq. 7), ``"spatial"``, ``"channel"`` or ``"plain"``.
        reduction: ``"mean"`` over all elements (PROTOCOL default, as the public release's MSE), ``"sum"`` (the
            squared Frobenius norm of eq. 8), or ``"none"`` (element-wise squared differences).
        weight: optional non-negative weights of the positions (``None``: every position counts 1).

    Shape:
        - m, m_old: :math:`(B, C, H, W)`.
        - weight: :math:`(B, 1, H, W)`.
        - Output: scalar, or :math:`(B, C, H, W)` for ``reduction="none"``.

    Returns:
        The loss (float32 for half/bfloat16 features).

    Raises:
        TypeError: non-floating features.
        ValueError: wrong ranks, ``m`` and ``m_old`` of different shapes (e.g. a channel mismatch), ``se``
            missing when needed or returning the wrong shape, unknown ``attention`` or ``reduction``, a
            ``weight`` of another shape than ``(B, 1, H, W)``.

    Example:
        >>> from incseg.nn.squeeze_excitation import SqueezeExcitation
        >>> se = SqueezeExcitation(32)
        >>> m, m_old = torch.randn(2, 32, 9, 9), torch.randn(2, 32, 9, 9)
        >>> attentive_distillation_loss(m, m_old, se).shape
        torch.Size([])
    """
    check_feature_map(m, "m")
    check_feature_map(m_old, "m_old")
    check_same_shape(m, m_old, "m", "m_old")
    check_choice(attention, "attention", _ATTENTIONS)
    check_choice(reduction, "reduction", ("none", "mean", "sum"))
    if attention in ("both", "channel") and se is None:
        raise ValueError(f"attention={attention!r} needs a channel attention module se, got None")
    x = upcast(m)
    x_old = upcast(m_old, x.dtype).detach()
    w = None
    if weight is not None:
        check_feature_map(weight, "weight", channels=1)
        expected = (m.shape[0], 1, *m.shape[2:])
        if tuple(weight.shape) != expected:
            raise ValueError(f"weight must have shape (B, 1, H, W) = {expected}, got {tuple(weight.shape)}")
        w = weight.detach().to(x.dtype)
    if reduction != "none" and x.numel() > 0:
        if attention == "plain" and w is None:
            return F.mse_loss(x, x_old, reduction=reduction)
        if attention != "plain":
            return _fused_loss(x, x_old, se, attention, reduction, w)
    with torch.no_grad():
        target = _attend(x_old, se, attention)
    diff = (_attend(x, se, attention) - target).square()
    if w is not None:
        diff = diff * w
    if reduction == "none":
        return diff
    if reduction == "mean" and diff.numel() > 0:
        return diff.sum() / diff.numel()
    return diff.sum()  # "sum", or an empty batch: 0, not NaN


def pixel_weights(keep: Tensor, size: tuple[int, int] | torch.Size) -> Tensor:
    """Per-position weights of a feature map from a label-resolution mask: the fraction of kept pixels.

    Every position of a ``size`` feature map gets the mean of ``keep`` over the label pixels it covers (adaptive
    average pooling), e.g. the fraction of pixels *not* labelled with a new class for ``ad_on_new=False``.

    Args:
        keep: ``(B, H, W)`` boolean or ``[0, 1]`` floating mask at label resolution.
        size: spatial size ``(h, w)`` of the feature map.

    Returns:
        ``(B, 1, h, w)`` float32 weights in ``[0, 1]``.

    Example:
        >>> keep = torch.ones(1, 8, 8, dtype=torch.bool)
        >>> keep[0, :4, :4] = False  # the top-left quarter is a new class
        >>> pixel_weights(keep, (2, 2)).flatten().tolist()
        [0.0, 1.0, 1.0, 1.0]
    """
    mask = keep.to(torch.float32).unsqueeze(1)
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    return F.adaptive_avg_pool2d(mask, (int(size[0]), int(size[1])))


def _fused_loss(
    x: Tensor,
    x_old: Tensor,
    se: Callable[[Tensor], Tensor] | None,
    attention: str,
    reduction: str,
    weight: Tensor | None = None,
) -> Tensor:
    """``||AD(x) - AD(x_old)||^2`` (summed, or averaged over the elements; each position weighted by ``weight``
    ``(B, 1, H, W)`` if given) through one autograd node.

    The channel weights come from ``se`` through autograd as usual (``se`` and the features get their
    gradient from it); the spatial maps, the reweighting, the difference and its square are
    :class:`_AttentiveDistillation`.
    """
    b, c = x.shape[:2]
    channel = channel_old = None
    if attention in ("both", "channel"):
        assert se is not None
        channel = _channel_attention(se, x).to(x.dtype).reshape(b, c, 1)
        with torch.no_grad():
            channel_old = _channel_attention(se, x_old).to(x.dtype).reshape(b, c, 1)
    divisor = float(x.numel()) if reduction == "mean" else 1.0
    w = None if weight is None else weight.reshape(b, 1, -1)
    loss: Tensor = _AttentiveDistillation.apply(
        x.reshape(b, c, -1), channel, x_old.reshape(b, c, -1), channel_old, attention != "channel", divisor, w
    )
    return loss


def _reweight(x: Tensor, c: Tensor | None, spatial: bool, keep: bool) -> tuple[Tensor, list[Tensor]]:
    """``AD(x) = (1 + c a) x`` of ``x`` ``(B, C, N)`` in a new tensor, and (``keep``) what the backward pass needs.

    ``a`` is the spatial map of eq. 6 computed as in :func:`_spatial_attention` (on ``y = x / s`` with
    ``s = max |x|`` per image), or 1 when not ``spatial``; ``c`` is ``(B, C, 1)`` or ``None`` (no channel
    attention). Returns ``(AD(x), [y, a, s, norm, denom])`` (an empty list without ``spatial``).
    """
    if not spatial:
        assert c is not None
        return x * (1.0 + c), []
    s = torch.maximum(x.amax(dim=(1, 2), keepdim=True), x.amin(dim=(1, 2), keepdim=True).neg())
    s = s.clamp_min(torch.finfo(x.dtype).tiny)  # (B, 1, 1)
    y = x / s
    out = y.square() if keep else y.square_()
    energy = out.sum(dim=1, keepdim=True)  # (B, 1, N)
    norm = torch.linalg.vector_norm(energy, dim=2, keepdim=True)  # (B, 1, 1)
    denom = torch.maximum(norm, _EPS / s.square())
    a = energy / denom
    if c is None:
        torch.mul(1.0 + a, x, out=out)
    else:
        torch.mul(c, a, out=out).add_(1.0).mul_(x)
    return out, ([y, a, s, norm, denom] if keep else [])


class _AttentiveDistillation(torch.autograd.Function):
    """``sum(w (AD(x) - AD(x_old))^2) / divisor`` with ``AD(x) = (1 + c a) x`` (eq. 7), as one autograd node.

    ``x``, ``x_old``: ``(B, C, N)`` features (``x_old`` a constant target); ``c``, ``c_old``: ``(B, C, 1)``
    channel weights or ``None``; ``spatial``: whether ``a`` is the spatial map of eq. 6 (else 1); ``w``:
    ``(B, 1, N)`` constant position weights or ``None`` (all 1). The loss's gradient with respect to ``AD(x)`` is
    ``2 w diff / divisor``: the backward pass is the unweighted one with ``w diff`` in place of ``diff``. Autograd's
    chain of broadcast products saves and writes several feature-sized tensors; here every feature-sized
    operation runs in place in one of three buffers, backward included, which writes the features' gradient
    once from the saved difference and ``x / s``, with the products over channels and positions as ``bmm``.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        c: Tensor | None,
        x_old: Tensor,
        c_old: Tensor | None,
        spatial: bool,
        divisor: float,
        w: Tensor | None = None,
    ) -> Tensor:
        diff, parts = _reweight(x, c, spatial, keep=True)
        target, _ = _reweight(x_old, c_old, spatial, keep=False)
        diff.sub_(target)
        squares = torch.mul(diff, diff, out=target)
        if w is not None:
            squares.mul_(w)
            diff.mul_(w)  # from here on diff is w (AD(x) - AD(x_old)), what the backward pass needs
        loss = squares.sum() / divisor
        ctx.spatial, ctx.divisor = spatial, divisor
        if spatial:
            ctx.save_for_backward(diff, c, *parts)
        else:
            ctx.save_for_backward(diff, c, x)
        return loss

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        k = grad * (2.0 / ctx.divisor)
        if not ctx.spatial:
            diff, c, x = ctx.saved_tensors
            g = diff * x
            dc = g.sum(dim=2, keepdim=True).mul_(k) if ctx.needs_input_grad[1] else None
            return torch.mul(1.0 + c, diff, out=g).mul_(k), dc, None, None, None, None, None
        diff, c, y, a, s, norm, denom = ctx.saved_tensors
        g = diff * y  # d loss / d AD(x) = k * diff, and AD(x) = (1 + c a) s y
        dc = None
        with _no_autocast(g):
            if c is None:
                da = g.sum(dim=1, keepdim=True).mul_(s)
            else:
                da = torch.bmm(c.transpose(1, 2), g).mul_(s)  # (B, 1, N), without k
                if ctx.needs_input_grad[1]:
                    dc = torch.bmm(g, a.transpose(1, 2)).mul_(s).mul_(k)  # (B, C, 1)
        # a = e / max(||e||, floor) with e = sum_c y^2: d/de = (da - a <a, da>) / ||e|| unless the floor binds
        tangent = a * (a * da).sum(dim=2, keepdim=True)
        de = (da - torch.where(norm >= denom, tangent, torch.zeros_like(tangent))) / denom
        f = (2.0 * de) / s  # d/dx of e is 2 y / s
        if c is None:
            torch.mul(1.0 + a, diff, out=g)
        else:
            torch.mul(c, a, out=g).add_(1.0).mul_(diff)
        return g.addcmul_(y, f).mul_(k), dc, None, None, None, None, None


def _no_autocast(x: Tensor) -> contextlib.AbstractContextManager[object]:
    """Autocast off for ``x``'s device if it is on (a backward pass run inside autocast would otherwise compute
    the ``bmm`` in low precision)."""
    kind = x.device.type
    if torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind):
        return torch.autocast(kind, enabled=False)
    return contextlib.nullcontext()
