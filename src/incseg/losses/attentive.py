"""Attentive feature distillation over the two feature maps ``z̄`` and ``h`` (eq. 5-8)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from incseg._checks import check_feature_map, check_int
from incseg.functional._common import Reduction, check_choice
from incseg.functional.attention import _ATTENTIONS, Attention, attentive_distillation_loss, pixel_weights
from incseg.nn.squeeze_excitation import SqueezeExcitation

__all__ = [
    "AD_MAPS",
    "AttentiveDistillationLoss",
    "balanced_ad_weights",
    "check_ad_maps",
    "not_new_pixels",
    "weighted_ad_term",
]

AD_MAPS = ("z", "h")
"""The feature maps attentive distillation can act on: ``"z"`` (the encoder features ``z̄``) and ``"h"`` (the
refined features, the classifier's input)."""


def check_ad_maps(maps: object) -> tuple[str, ...]:
    """``maps`` as a tuple of the names in :data:`AD_MAPS`, in that order: a sequence of names or a string
    ``"z"``, ``"h"``, ``"z+h"``.

    Raises:
        ValueError: an empty selection, an unknown or repeated name.

    Example:
        >>> check_ad_maps("h+z"), check_ad_maps(["z"])
        (('z', 'h'), ('z',))
    """
    names = maps.split("+") if isinstance(maps, str) else maps
    if not isinstance(names, Sequence) or not names or not all(isinstance(n, str) for n in names):
        raise ValueError(f"ad_maps must name some of {list(AD_MAPS)} (e.g. ('z', 'h') or 'z'), got {maps!r}")
    unknown = [n for n in names if n not in AD_MAPS]
    if unknown or len(set(names)) != len(names):
        raise ValueError(f"ad_maps must name each of {list(AD_MAPS)} at most once, got {maps!r}")
    return tuple(n for n in AD_MAPS if n in names)


class AttentiveDistillationLoss(nn.Module):
    r"""Structured self-attention distillation ``L_AD`` of CAF (eq. 8).

    ``L_AD = ||AD(z̄) - AD(z̄_old)||^2 + ||AD(h) - AD(h_old)||^2`` with
    ``AD(m) = (AD_CH(m) ⊗ AD_SP(m) + 1) ⊙ m`` (eq. 7). Each map has its own trainable
    :class:`~incseg.nn.squeeze_excitation.SqueezeExcitation` (``se_z``, ``se_h``; eq. 5), shared by the
    student and teacher features of that map; the teacher side is a detached target (see
    :func:`incseg.functional.attentive_distillation_loss`). The module therefore has parameters when
    ``attention`` is ``"both"`` or ``"channel"``: they must be given to the optimizer.

    With a multi-scale encoder (CAF on several levels) ``channels_z`` maps each level (``str(level)``) to its
    channels, ``z``/``z_old`` are dicts level -> feature map, ``se_z`` is an ``nn.ModuleDict`` of one SE block
    per level, and the ``z̄`` term is the sum over the levels.

    Args:
        channels_z: channels of the encoder features ``z̄``, or ``{str(level): channels}`` for several levels.
        channels_h: channels of the refined features ``h``.
        attention: ``"both"`` (eq. 7), ``"spatial"``, ``"channel"`` or ``"plain"`` (plain feature distillation,
            the ablations of Table VI); ``se_z``/``se_h`` are ``None`` for ``"spatial"`` and ``"plain"``.
        reduction: ``"mean"`` over the elements of each map (PROTOCOL default), ``"sum"`` (squared Frobenius
            norms, eq. 8 exactly); the two maps' terms are added either way.
        se_reduction: channel reduction of the SE blocks.
        maps: the maps to distil, ``("z", "h")`` (default, eq. 8), ``("z",)`` or ``("h",)`` (see
            :func:`check_ad_maps`); the term of a map left out is 0 and has no SE block.

    Shape:
        - z, z_old: :math:`(B, C_z, H_z, W_z)`; h, h_old: :math:`(B, C_h, H_h, W_h)`.
        - Output: scalar.

    Raises:
        ValueError: non-positive channels, unknown ``attention`` or ``reduction`` (at construction); features
            of the wrong rank, channel count or mismatching shapes (at call).

    Example:
        >>> import torch
        >>> criterion = AttentiveDistillationLoss(64, 32)
        >>> z, h = torch.randn(2, 64, 9, 9), torch.randn(2, 32, 9, 9)
        >>> criterion(z, z + 0.1, h, h - 0.1).shape
        torch.Size([])
    """

    se_z: SqueezeExcitation | nn.ModuleDict | None
    se_h: SqueezeExcitation | None

    def __init__(
        self,
        channels_z: int | Mapping[str, int],
        channels_h: int,
        *,
        attention: Attention = "both",
        reduction: Reduction = "mean",
        se_reduction: int = 16,
        maps: Sequence[str] | str = AD_MAPS,
    ) -> None:
        super().__init__()
        self.maps = check_ad_maps(maps)
        levels = dict(channels_z) if isinstance(channels_z, Mapping) else None
        if levels is not None and not levels:
            raise ValueError("channels_z must map at least one level to its channels")
        named: list[tuple[str, object]] = [(f"channels_z[{k!r}]", v) for k, v in (levels or {}).items()]
        named = named or [("channels_z", channels_z)]
        for name, value in [*named, ("channels_h", channels_h)]:
            check_int(value, name)
        check_choice(attention, "attention", _ATTENTIONS)
        check_choice(reduction, "reduction", ("mean", "sum"))
        self.channels_z = channels_z if levels is None else {str(k): v for k, v in levels.items()}
        self.channels_h = channels_h
        self.attention: Attention = attention
        self.reduction: Reduction = reduction
        self.se_z = None
        self.se_h = None
        if attention in ("both", "channel") and "z" in self.maps:
            self.se_z = (
                SqueezeExcitation(channels_z, reduction=se_reduction)  # type: ignore[arg-type]
                if levels is None
                else nn.ModuleDict({str(k): SqueezeExcitation(v, reduction=se_reduction) for k, v in levels.items()})
            )
        if attention in ("both", "channel") and "h" in self.maps:
            self.se_h = SqueezeExcitation(channels_h, reduction=se_reduction)

    def forward(
        self,
        z: Tensor | Mapping[Any, Tensor],
        z_old: Tensor | Mapping[Any, Tensor],
        h: Tensor,
        h_old: Tensor,
        *,
        keep: Tensor | None = None,
    ) -> Tensor:
        """Return ``L_AD`` for the student features ``(z, h)`` and the teacher features ``(z_old, h_old)``.

        ``z`` and ``z_old`` are dicts level -> feature map when ``channels_z`` is a mapping (keys compared as
        ``str(level)``). ``keep`` (optional, ``(B, H, W)`` at any resolution, usually the labels'): the pixels to
        distil; each position of a feature map is weighted by the fraction of kept pixels it covers (see
        :func:`~incseg.functional.pixel_weights`), e.g. all but the pixels labelled with a new class.
        """
        loss_z, loss_h = self.terms(z, z_old, h, h_old, keep=keep)
        return loss_z + loss_h

    def terms(
        self,
        z: Tensor | Mapping[Any, Tensor],
        z_old: Tensor | Mapping[Any, Tensor],
        h: Tensor,
        h_old: Tensor,
        *,
        keep: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Return the two terms of ``L_AD`` (eq. 8), ``(||AD(z̄) - AD(z̄_old)||², ||AD(h) - AD(h_old)||²)``; the
        first sums over the levels of a multi-scale ``z``; the term of a map not in :attr:`maps` is a constant 0.
        ``keep``: as in :meth:`forward`."""
        for name, x, channels in (("h", h, self.channels_h), ("h_old", h_old, self.channels_h)):
            check_feature_map(x, name, channels=channels)
        if keep is not None and (keep.dim() != 3 or keep.shape[0] != h.shape[0]):
            raise ValueError(f"keep must be a (B, H, W) mask with B = {h.shape[0]}, got shape {tuple(keep.shape)}")

        def weight(x: Tensor) -> Tensor | None:
            return None if keep is None else pixel_weights(keep, x.shape[-2:]).to(x.device)

        zero = h.new_zeros(())
        if isinstance(self.channels_z, Mapping):
            new, old = _by_level(z, "z", self.channels_z), _by_level(z_old, "z_old", self.channels_z)
            levels = list(self.channels_z) if "z" in self.maps else []
            se = self.se_z if isinstance(self.se_z, nn.ModuleDict) else None
            loss_z = sum(
                (
                    attentive_distillation_loss(
                        new[key],
                        old[key],
                        None if se is None else se[key],
                        attention=self.attention,
                        reduction=self.reduction,
                        weight=weight(new[key]),
                    )
                    for key in levels
                ),
                start=zero,
            )
        else:
            check_feature_map(z, "z", channels=self.channels_z)
            check_feature_map(z_old, "z_old", channels=self.channels_z)
            assert isinstance(z, Tensor) and isinstance(z_old, Tensor)
            se_z = self.se_z if isinstance(self.se_z, SqueezeExcitation) else None
            loss_z = (
                attentive_distillation_loss(
                    z, z_old, se_z, attention=self.attention, reduction=self.reduction, weight=weight(z)
                )
                if "z" in self.maps
                else zero
            )
        loss_h = (
            attentive_distillation_loss(
                h, h_old, self.se_h, attention=self.attention, reduction=self.reduction, weight=weight(h)
            )
            if "h" in self.maps
            else zero
        )
        return loss_z, loss_h

    def extra_repr(self) -> str:
        return (
            f"channels_z={self.channels_z}, channels_h={self.channels_h}, attention={self.attention!r}, "
            f"reduction={self.reduction!r}, maps={self.maps}"
        )


def _by_level(features: object, name: str, channels: Mapping[str, int]) -> dict[str, Tensor]:
    """``{str(level): map}`` of a dict of per-level feature maps, checked against ``channels``."""
    if not isinstance(features, Mapping):
        raise TypeError(
            f"{name} must be a dict level -> (B, C, H, W) feature map for the levels {list(channels)}, "
            f"got {type(features).__name__}"
        )
    by_key = {str(k): v for k, v in features.items()}
    if set(by_key) != set(channels):
        raise ValueError(f"{name} must hold the levels {list(channels)}, got {list(by_key)}")
    for key, c in channels.items():
        check_feature_map(by_key[key], f"{name}[{key!r}]", channels=c)
    return by_key


@torch.compiler.disable  # autograd.grad inside a traced graph: run eagerly (a graph break under compile)
def balanced_ad_weights(
    task: Tensor, maps: tuple[Any, Tensor], losses: tuple[Tensor, Tensor], *, lambda_ad: float, kappa: float
) -> tuple[tuple[Tensor, Tensor], dict[str, Tensor]]:
    """The gradient-balanced weights of the two attentive distillation terms (``ad_balance`` of
    :class:`~incseg.losses.CAFLoss`): ``λ_m = min(λ_AD, κ ||∂task/∂m|| / ||∂L_AD(m)/∂m||)`` per feature map
    ``m`` in ``maps`` (``(z̄, h)``; detached; ``λ_AD`` where a gradient is unavailable, e.g. without autograd or
    for the constant 0 term of a map left out of the distillation).
    A multi-scale ``z̄`` (dict of levels) counts as one map: the norms run over all its levels.

    Args:
        task: the output losses (segmentation and output distillation) of the batch, with their graph.
        maps: the student's ``(z̄, h)`` (``z̄`` possibly a dict level -> map).
        losses: the unweighted AD terms of the two maps (:meth:`AttentiveDistillationLoss.terms`).
        lambda_ad: the cap ``λ_AD``.
        kappa: the balance ``κ``.

    Also returns, per map ``m`` (``"ad_opposition_z"``, ``"ad_opposition_h"``), the share of the output
    losses' descent on ``m`` that the weighted AD gradient cancels,
    ``max(0, -λ_m <∂L_AD/∂m, ∂task/∂m>) / ||∂task/∂m||²`` (0: AD does not oppose the labels, 1: the two
    pulls cancel along the task's direction); free, since both gradients are computed anyway."""
    lam = float(lambda_ad)
    groups = [list(m.values()) if isinstance(m, Mapping) else [m] for m in maps]
    fixed = (task.new_tensor(lam), task.new_tensor(lam))
    if not (torch.is_grad_enabled() and task.requires_grad and all(t.requires_grad for g in groups for t in g)):
        return fixed, {}
    # One backward of the task losses to every map's tensors (the classifier's backward is shared).
    flat = [t for g in groups for t in g]
    g_task_all = torch.autograd.grad(task, flat, retain_graph=True, allow_unused=True)
    weights = []
    opposition: dict[str, Tensor] = {}
    start = 0
    for name, tensors, loss in zip(("z", "h"), groups, losses):
        g_task = g_task_all[start : start + len(tensors)]
        start += len(tensors)
        if not loss.requires_grad:
            weights.append(task.new_tensor(lam))
            continue
        g_ad = torch.autograd.grad(loss, tensors, retain_graph=True, allow_unused=True)
        if any(g is None for g in g_task) or any(g is None for g in g_ad):
            weights.append(task.new_tensor(lam))
            continue
        wide = torch.promote_types(tensors[0].dtype, torch.float32)  # norms of half gradients in float32
        norm_task = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, dtype=wide) for g in g_task]))
        norm_ad = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, dtype=wide) for g in g_ad]))
        ratio = kappa * norm_task / norm_ad
        # A zero AD gradient (identical features) gives an infinite ratio: the cap then does not bind.
        weight = torch.nan_to_num(ratio, nan=lam, posinf=lam).clamp(max=lam).detach()
        weights.append(weight)
        # <g_AD, g_task> as dot products of flat views: no feature-sized product on this per-iteration path
        inner = sum(
            (torch.dot(a.reshape(-1).to(wide), t.reshape(-1).to(wide)) for a, t in zip(g_ad, g_task)),
            start=task.new_zeros((), dtype=wide),
        )
        share = (-weight * inner / norm_task.square()).clamp(min=0.0)
        opposition[f"ad_opposition_{name}"] = torch.nan_to_num(share, nan=0.0, posinf=0.0).detach()
    return (weights[0], weights[1]), opposition


def weighted_ad_term(
    task: Tensor,
    features: tuple[Any, Tensor],
    losses: tuple[Tensor, Tensor],
    *,
    lambda_ad: float,
    kappa: float | None,
    maps: tuple[str, ...] = AD_MAPS,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The weighted attentive distillation term ``λ_z L_z + λ_h L_h`` of one batch and its statistics: the fixed
    ``λ_AD`` of eq. 13 when ``kappa`` is ``None``, else the gradient-balanced weights of
    :func:`balanced_ad_weights` (``stats``: their mean over the distilled ``maps`` as ``"lambda_ad"``, and the
    opposition shares). :class:`~incseg.losses.CAFLoss` and the attentive-distillation component both use it.

    Args:
        task: the output losses of the batch, with their graph (read only with ``kappa``).
        features: the student's ``(z̄, h)``.
        losses: the unweighted terms ``(L_z, L_h)`` (:meth:`AttentiveDistillationLoss.terms`).
        lambda_ad: ``λ_AD`` (the cap with ``kappa``).
        kappa: the balance ``κ``, or ``None``.
        maps: the distilled maps (``AttentiveDistillationLoss.maps``).
    """
    loss_z, loss_h = losses
    if kappa is None:
        return lambda_ad * (loss_z + loss_h), {}
    (lam_z, lam_h), stats = balanced_ad_weights(task, features, losses, lambda_ad=lambda_ad, kappa=kappa)
    used = [lam for name, lam in zip(AD_MAPS, (lam_z, lam_h)) if name in maps]
    stats["lambda_ad"] = (sum(used[1:], start=used[0]) / len(used)).detach()
    return lam_z * loss_z + lam_h * loss_h, stats


def not_new_pixels(labels: Tensor, num_old_classes: int, ignore_index: int | None = 255) -> Tensor:
    """The pixels attentive distillation keeps with ``ad_on_new=False``: all but those labelled with a new class
    (labels ``>= num_old_classes`` other than ``ignore_index``), as a bool mask of ``labels``' shape.

    Example:
        >>> not_new_pixels(torch.tensor([[0, 2, 3, 255]]), 3).tolist()
        [[True, True, False, True]]
    """
    keep = labels < num_old_classes
    if ignore_index is not None:
        keep = keep | (labels == ignore_index)
    return keep
