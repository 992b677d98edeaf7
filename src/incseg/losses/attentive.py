"""Attentive feature distillation over the two feature maps ``z̄`` and ``h`` (eq. 5-8)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from incseg._checks import check_feature_map, check_int
from incseg.functional._common import Reduction, check_choice, resize_to
from incseg.functional.attention import _ATTENTIONS, Attention, attentive_distillation_loss, pixel_weights
from incseg.nn.squeeze_excitation import SqueezeExcitation

__all__ = [
    "AD_BALANCE_ON",
    "AD_MAPS",
    "AttentiveDistillationLoss",
    "WeightBalance",
    "balanced_ad_weights",
    "check_ad_maps",
    "new_class_loss",
    "not_new_pixels",
    "weight_balanced_ad_weight",
    "weighted_ad_term",
]

AD_MAPS = ("z", "h")
"""The feature maps attentive distillation can act on: ``"z"`` (the encoder features ``z̄``) and ``"h"`` (the
refined features, the classifier's input)."""


AD_BALANCE_ON = ("weights", "features")
"""Where the gradient balance of attentive distillation compares the pulls (``ad_balance_on``): ``"weights"``
(the network's parameters, against the new-class pixels' segmentation loss; :func:`weight_balanced_ad_weight`)
or ``"features"`` (each feature map, against all output losses; :func:`balanced_ad_weights`)."""


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
        self.balance = WeightBalance()  # the state of the balance on the weights (ad_balance_on="weights")

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


_GRAD_SCALE = 1024.0


def _trainable_leaves(loss: Tensor) -> dict[int, Tensor]:
    """The tensors that ``loss.backward()`` would write a ``.grad`` into (the trainable leaves of its graph), by
    identity, in the order they are reached."""
    leaves: dict[int, Tensor] = {}
    seen: set[Any] = set()
    stack = [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # AccumulateGrad: the leaf it writes into
        if isinstance(variable, Tensor):
            leaves.setdefault(id(variable), variable)
        stack.extend(child for child, _ in node.next_functions)
    return leaves


@torch.compiler.disable  # autograd.grad inside a traced graph: run eagerly (a graph break under compile)
def weight_balanced_ad_weight(
    reference: Tensor, ad: Tensor, *, lambda_ad: float, kappa: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """The weight of the attentive distillation term balanced on the network's weights (``ad_balance_on=
    "weights"``, the default of :class:`~incseg.losses.CAFLoss`):
    ``λ = min(λ_AD, κ ||∇_θ L_new|| / ||∇_θ L_AD||)`` over the parameters ``θ`` both losses train, where
    ``L_new`` (``reference``) is the segmentation loss of the pixels labelled with a new class
    (:func:`new_class_loss`). So the distillation never steers the weights more than ``κ`` times as hard as the
    new classes' labels do, whatever the network: a batch without new-class pixels gets ``λ = 0``.

    Why the weights and the new classes (docs/lab-notebook.md, "Attentive distillation that lets new classes
    in"): distillation holds new classes back through the convolution weights every position shares, not at
    the positions; a balance on each feature map against all output losses lets the pull on the weights vary
    tenfold with the network.

    Args:
        reference: ``L_new`` with its graph.
        ad: the unweighted attentive distillation loss (``L_z + L_h``) with its graph.
        lambda_ad: the cap ``λ_AD``.
        kappa: the balance ``κ``.

    Returns:
        ``(λ, stats)``, ``λ`` detached; ``stats`` (empty without autograd): ``"ad_pull"``,
        ``λ ||∇_θ L_AD|| / ||∇_θ L_new||`` (at most ``κ``), and ``"ad_cancel"``, the share of the new classes'
        descent on the weights that the weighted distillation cancels, ``max(0, -λ <∇_θ L_AD, ∇_θ L_new>) /
        ||∇_θ L_new||²`` (at most ``κ``).
    """
    lam = reference.new_tensor(float(lambda_ad))
    if not (torch.is_grad_enabled() and reference.requires_grad and ad.requires_grad):
        return lam, {}
    on_ad = _trainable_leaves(ad)
    shared = [leaf for key, leaf in _trainable_leaves(reference).items() if key in on_ad]
    if not shared:
        return lam, {}
    # Both gradients of the losses times 2^10 (exact in binary floating point; the ratios do not change): under
    # float16 autocast the unscaled gradients of the activations would underflow, as GradScaler knows.
    g_ref = torch.autograd.grad(reference * _GRAD_SCALE, shared, retain_graph=True, allow_unused=True)
    g_ad = torch.autograd.grad(ad * _GRAD_SCALE, shared, retain_graph=True, allow_unused=True)
    wide = torch.promote_types(reference.dtype, torch.float32)
    zero = reference.new_zeros((), dtype=wide)
    norm_ref = torch.stack([zero, *(torch.linalg.vector_norm(g, dtype=wide) for g in g_ref if g is not None)])
    norm_ad = torch.stack([zero, *(torch.linalg.vector_norm(g, dtype=wide) for g in g_ad if g is not None)])
    norm_ref, norm_ad = torch.linalg.vector_norm(norm_ref), torch.linalg.vector_norm(norm_ad)
    inner = sum(
        (
            torch.dot(a.reshape(-1).to(wide), r.reshape(-1).to(wide))
            for a, r in zip(g_ad, g_ref)
            if a is not None and r is not None
        ),
        start=zero,
    )
    # No new-class pixel: λ = 0. A zero AD gradient (identical features): the cap does not bind.
    weight = torch.nan_to_num(kappa * norm_ref / norm_ad, nan=float(lambda_ad), posinf=float(lambda_ad))
    weight = weight.clamp(max=float(lambda_ad)).detach()
    stats = {
        "ad_pull": torch.nan_to_num(weight * norm_ad / norm_ref, nan=0.0, posinf=0.0).detach(),
        "ad_cancel": torch.nan_to_num(
            (-weight * inner / norm_ref.square()).clamp(min=0.0), nan=0.0, posinf=0.0
        ).detach(),
    }
    return weight.to(reference.dtype), stats


class WeightBalance(nn.Module):
    """The weight of :func:`weight_balanced_ad_weight`, refreshed every ``every`` training iterations and held in
    between (``every=1``: every iteration, exact; each refresh costs two backward passes of the student).

    It refreshes at the first call, every ``every`` calls after it, and whenever ``num_old_classes`` changes (a
    new step). Calls without autograd (evaluation) return ``λ_AD`` and do not count. The held weight, the call
    count and the step's ``num_old_classes`` are its extra state, saved with the criterion, so that a run
    resumed from a checkpoint refreshes at the same iterations as one that was not interrupted.
    """

    def __init__(self, every: int = 1) -> None:
        super().__init__()
        self.every = every
        self._weight: Tensor | None = None
        self._stats: dict[str, Tensor] = {}
        self._calls = 0
        self._num_old = -1

    @property
    def every(self) -> int:
        """Iterations between two refreshes of the weight."""
        return self._every

    @every.setter
    def every(self, value: int) -> None:
        check_int(value, "ad_balance_every")
        self._every = int(value)

    def forward(
        self,
        reference: Tensor | Callable[[], Tensor],
        ad: Tensor,
        *,
        lambda_ad: float,
        kappa: float,
        num_old_classes: int,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """``(λ, stats)`` of :func:`weight_balanced_ad_weight`, computed now or held from the last refresh.
        ``reference`` may be a function that returns ``L_new``: it is then only called at a refresh."""
        if callable(reference) and not isinstance(reference, Tensor):
            if not (torch.is_grad_enabled() and ad.requires_grad):
                return ad.new_tensor(float(lambda_ad)), {}
        elif not (torch.is_grad_enabled() and reference.requires_grad and ad.requires_grad):
            return reference.new_tensor(float(lambda_ad)), {}
        refresh = self._weight is None or num_old_classes != self._num_old or self._calls % self._every == 0
        if refresh:
            ref = reference() if callable(reference) and not isinstance(reference, Tensor) else reference
            if not ref.requires_grad:  # nothing to balance against (no graph): the fixed weight, not counted
                return ref.new_tensor(float(lambda_ad)), {}
            if num_old_classes != self._num_old:
                self._calls = 0
            self._weight, self._stats = weight_balanced_ad_weight(ref, ad, lambda_ad=lambda_ad, kappa=kappa)
            self._num_old = int(num_old_classes)
        self._calls += 1
        assert self._weight is not None
        # held in the dtype the losses are computed in (float32 under autocast), on their device: moved once
        self._weight = self._weight.to(device=ad.device, dtype=torch.promote_types(ad.dtype, torch.float32))
        return self._weight, dict(self._stats)

    def get_extra_state(self) -> Tensor:
        """``[held (0 or 1), weight, calls, num_old_classes]`` as float64 (finite: checkpoints refuse NaN)."""
        held = self._weight is not None
        weight = float(self._weight) if self._weight is not None else 0.0
        return torch.tensor([float(held), weight, float(self._calls), float(self._num_old)], dtype=torch.float64)

    def set_extra_state(self, state: Any) -> None:
        values = torch.as_tensor(state, dtype=torch.float64).reshape(-1).tolist()
        if len(values) != 4:
            raise ValueError(f"the weight balance's state must hold 4 numbers, got {len(values)}")
        held, weight, calls, num_old = values
        self._weight = torch.tensor(weight, dtype=torch.float64) if held else None
        self._stats = {}
        self._calls, self._num_old = int(calls), int(num_old)

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any, **kwargs: Any) -> None:
        if prefix + "_extra_state" not in state_dict:  # a checkpoint of incseg <= 0.2: start afresh
            self._weight, self._stats, self._calls, self._num_old = None, {}, 0, -1
            return
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"every={self._every}"


def new_class_loss(logits: Tensor, labels: Tensor, num_old_classes: int, ignore_index: int | None = 255) -> Tensor:
    """``L_new``, the segmentation loss of the pixels labelled with a new class (labels ``>= num_old_classes``):
    their cross-entropy, summed and divided by the number of labelled pixels, i.e. their share of the mean
    cross-entropy (MiB's unbiased cross-entropy equals the plain one there). ``logits`` ``(B, K, h, w)`` are
    resized to the size of ``labels`` ``(B, H, W)`` (int64, ``ignore_index`` ignored) as the losses do; returns a
    scalar, 0 (with a graph) when no pixel is new.

    Example:
        >>> logits = torch.zeros(1, 3, 1, 2, requires_grad=True)
        >>> round(new_class_loss(logits, torch.tensor([[[0, 2]]]), 2).item(), 4)  # log(3) / 2
        0.5493
    """
    x = logits if logits.shape[-2:] == labels.shape[-2:] else resize_to(logits, labels.shape[-2:])
    x = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    labels = labels.long()
    new = labels >= num_old_classes
    counted = torch.ones_like(new) if ignore_index is None else labels != ignore_index
    new = new & counted
    per_pixel = torch.nn.functional.cross_entropy(x, torch.where(new, labels, 0), reduction="none")
    return torch.where(new, per_pixel, 0.0).sum() / counted.sum().clamp(min=1)


def weighted_ad_term(
    task: Tensor,
    features: tuple[Any, Tensor],
    losses: tuple[Tensor, Tensor],
    *,
    lambda_ad: float,
    kappa: float | None,
    maps: tuple[str, ...] = AD_MAPS,
    balance_on: str = "features",
    reference: Tensor | Callable[[], Tensor] | None = None,
    balance: WeightBalance | None = None,
    num_old_classes: int = 0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The weighted attentive distillation term ``λ_z L_z + λ_h L_h`` of one batch and its statistics: the fixed
    ``λ_AD`` of eq. 13 when ``kappa`` is ``None``, else the gradient-balanced weight(s): with ``balance_on=
    "weights"`` one weight ``λ`` for both terms from :func:`weight_balanced_ad_weight` (``stats``:
    ``"lambda_ad"``, ``"ad_pull"``, ``"ad_cancel"``), with ``"features"`` one per map from
    :func:`balanced_ad_weights` (``stats``: their mean over the distilled ``maps`` as ``"lambda_ad"``, and the
    opposition shares). :class:`~incseg.losses.CAFLoss` and the attentive-distillation component both use it.

    Args:
        task: the output losses of the batch, with their graph (read only with ``kappa``).
        features: the student's ``(z̄, h)``.
        losses: the unweighted terms ``(L_z, L_h)`` (:meth:`AttentiveDistillationLoss.terms`).
        lambda_ad: ``λ_AD`` (the cap with ``kappa``).
        kappa: the balance ``κ``, or ``None``.
        maps: the distilled maps (``AttentiveDistillationLoss.maps``).
        balance_on: ``"features"`` or ``"weights"`` (:data:`AD_BALANCE_ON`).
        reference: ``L_new`` (:func:`new_class_loss`) with its graph, or a function returning it (called only
            when the weight is computed: ``balance`` holds it between refreshes), for ``balance_on="weights"``.
        balance: the :class:`WeightBalance` that holds the weight between refreshes (``None``: computed now).
        num_old_classes: the step's old classes, for ``balance`` (a change refreshes the weight).

    Raises:
        ValueError: an unknown ``balance_on``; ``"weights"`` without ``reference``.
    """
    loss_z, loss_h = losses
    if kappa is None:
        return lambda_ad * (loss_z + loss_h), {}
    check_choice(balance_on, "ad_balance_on", AD_BALANCE_ON)
    if balance_on == "weights":
        if reference is None:
            raise ValueError("ad_balance_on='weights' needs the new-class loss as reference (new_class_loss)")
        ad = loss_z + loss_h
        if balance is None:
            ref = reference() if callable(reference) and not isinstance(reference, Tensor) else reference
            weight, stats = weight_balanced_ad_weight(ref, ad, lambda_ad=lambda_ad, kappa=kappa)
        else:
            weight, stats = balance(reference, ad, lambda_ad=lambda_ad, kappa=kappa, num_old_classes=num_old_classes)
        stats["lambda_ad"] = weight
        return weight * ad, stats
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
