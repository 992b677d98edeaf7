"""The overall CAF objective ``L = L_SEG + λ_AD L_AD + λ_D L_D`` (eq. 13) and its baselines and ablations."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any, Literal, NamedTuple, get_args

import torch
from torch import Tensor, nn

from incseg._checks import check_feature_map, check_finite, check_int, check_labels, check_logits
from incseg.functional._common import (
    ClassReduction,
    check_batch,
    check_choice,
    check_num_old_classes,
    reduce_pixels,
    resize_to,
    upcast,
)
from incseg.functional.attention import Attention
from incseg.functional.background import _ClassGroups, _gamma_balance
from incseg.functional.cross_entropy import _label_index, _nll, _nll_index_start, _nll_unions
from incseg.functional.distillation import _combine, _kd_parts, _kd_unions, _old_probs
from incseg.losses.attentive import (
    AD_BALANCE_ON,
    AD_MAPS,
    AttentiveDistillationLoss,
    check_ad_maps,
    new_class_loss,
    not_new_pixels,
    weighted_ad_term,
)

__all__ = ["ADMode", "CAFLoss", "CEMode", "KDMode", "LossOutput"]

CEMode = Literal["plain", "unbiased"]
"""Segmentation loss ``L_SEG``: plain or unbiased (eq. 14-15) cross-entropy."""
KDMode = Literal["plain", "unbiased", "balanced"]
"""Output distillation ``L_D``: plain LwF KD, unbiased KD (eq. 9-10) or balanced KD (eq. 11-12)."""
ADMode = Attention
"""Feature distillation ``L_AD``: plain, or attentive (eq. 5-8) with spatial, channel or both attentions (the
``attention`` of :func:`~incseg.functional.attentive_distillation_loss`)."""

_CE = get_args(CEMode)
_KD = (None, *get_args(KDMode))
_AD = (None, *get_args(ADMode))


class LossOutput(NamedTuple):
    """A training loss and its named terms for logging.

    Attributes:
        loss: the scalar to call ``backward()`` on.
        terms: detached scalars by name (for :class:`CAFLoss`: ``"seg"``, ``"kd"``, ``"ad"``, ``"total"``,
            only those active), each already multiplied by its weight so that they add up to ``"total"``.
        stats: other detached scalars worth logging that are not terms of the loss (for :class:`CAFLoss` with
            ``ad_balance``: ``"lambda_ad"``, the (mean) weight the AD terms got; with ``ad_balance_on="weights"``
            ``"ad_pull"`` and ``"ad_cancel"``, how hard the distillation steers the weights against the new
            classes' labels (:func:`~incseg.losses.attentive.weight_balanced_ad_weight`), with ``"features"``
            ``"ad_opposition_z"`` / ``"ad_opposition_h"``, the share of the output losses' descent on each
            feature map that the AD gradient cancels); empty by default.
    """

    loss: Tensor
    terms: dict[str, Tensor]
    stats: Mapping[str, Tensor] = MappingProxyType({})


class CAFLoss(nn.Module):
    r"""Overall training objective of CAF, ``L = L_SEG + λ_AD L_AD + λ_D L_D`` (eq. 13).

    One module runs every method of the paper's tables through its switches:

    ============================  ==============  ==============  ==========
    method                        ``ce``          ``kd``          ``ad``
    ============================  ==============  ==============  ==========
    fine-tuning                   ``"plain"``     ``None``        ``None``
    LwF                           ``"plain"``     ``"plain"``     ``None``
    MiB                           ``"unbiased"``  ``"unbiased"``  ``None``
    CAF (default)                 ``"unbiased"``  ``"balanced"``  ``"both"``
    ============================  ==============  ==============  ==========

    and any other combination for the ablations (``ad="plain"`` is plain feature distillation, ``"spatial"``
    and ``"channel"`` use one attention only). The terms are:

    - ``L_SEG``: cross-entropy (``"plain"``) or the unbiased cross-entropy of eq. 14-15 (``"unbiased"``),
      mean over non-ignored pixels;
    - ``L_D``: :func:`~incseg.functional.kd_loss`, :func:`~incseg.functional.unbiased_kd_loss` or
      :func:`~incseg.functional.balanced_kd_loss` (eq. 9-12), mean over all pixels (ignored ones included,
      as MiB);
    - ``L_AD``: :class:`AttentiveDistillationLoss` on ``z̄`` and ``h`` (eq. 5-8), mean over elements.

    Logits are upsampled bilinearly to the labels' size, the old logits to the same size; everything is
    computed in float32 for half/bfloat16 inputs. The student's log-sums over all classes, the old classes and
    the background + new classes are computed once (each class exponentiated once) and shared between
    ``L_SEG`` and ``L_D``. When ``num_old_classes == 0`` (the
    first step) only ``L_SEG`` runs and ``old_logits`` / ``features`` / ``old_features`` are not used.

    With ``ad`` in ``{"both", "channel"}`` the module owns trainable SE blocks (``ad_loss.se_z``,
    ``ad_loss.se_h``): give ``CAFLoss.parameters()`` to the optimizer (or keep the loss inside the module that
    is optimised). The returned :class:`LossOutput` has ``terms`` ``"seg"``, ``"kd"`` (``λ_D L_D``), ``"ad"``
    (``λ_AD L_AD``) for the active terms and ``"total"``; they are the weighted contributions, detached, and
    add up to ``"total"``.

    Args:
        z_channels: channels of ``z̄`` (needed when ``ad`` is not ``None``; may be ``None`` otherwise), or
            ``{str(level): channels}`` when CAF sees several levels of a multi-scale encoder (then ``"z"`` of
            the features is a dict level -> map and every level is distilled, see
            :class:`AttentiveDistillationLoss`).
        h_channels: channels of ``h`` (same).
        ce: ``"unbiased"`` (default) or ``"plain"``.
        kd: ``"balanced"`` (default), ``"unbiased"``, ``"plain"`` or ``None``.
        ad: ``"both"`` (default), ``"channel"``, ``"spatial"``, ``"plain"`` or ``None``.
        lambda_d: weight ``λ_D`` of the distillation on outputs (10, PROTOCOL).
        lambda_ad: weight ``λ_AD`` of the attentive distillation (1000, PROTOCOL).
        class_reduction: class normalisation of ``L_D`` (``"mean"``: divide by ``n_old``; ``"sum"``: eq. 9).
        ignore_index: label value of ignored pixels (``None``: every pixel counts).
        se_reduction: channel reduction of the SE blocks.
        ad_balance: ``None`` (default: the fixed ``λ_AD`` of eq. 13) or the cap ``κ > 0`` of the gradient
            balance: the AD term of each feature map ``m`` (``z̄`` and ``h``) gets the weight
            ``λ_m = min(λ_AD, κ ||∂L_task/∂m|| / ||∂L_AD(m)/∂m||)`` (detached), with ``L_task = L_SEG + λ_D L_D``
            the output losses, so that attentive distillation never pulls a feature map harder than ``κ`` times
            the output losses. It needs the features to be ancestors of the logits (as in
            :class:`~incseg.learner.TrainingModule`); where they are not, or without gradients, ``λ_AD`` is used.
            ``stats["lambda_ad"]`` of the output reports the mean weight used. Where the pulls are compared is
            ``ad_balance_on``.
        ad_balance_on: with ``ad_balance``, ``"weights"`` (default) compares the pulls on the network's weights,
            against the segmentation loss of the pixels labelled new only: one weight
            ``λ = min(λ_AD, κ ||∇_θ L_new|| / ||∇_θ L_AD||)`` for both maps
            (:func:`~incseg.losses.attentive.weight_balanced_ad_weight`; two more backward passes per batch),
            so that the distillation never steers the weights more than ``κ`` times as hard as the new classes'
            labels, on any network (``stats``: ``"lambda_ad"``, ``"ad_pull"``, ``"ad_cancel"``); ``"features"``
            balances each feature map against all output losses as above (the 0.2 recipe; ``stats``:
            ``"lambda_ad"``, ``"ad_opposition_z"``, ``"ad_opposition_h"``). See docs/protocol.md, "Attentive
            distillation".
        ad_balance_every: with ``ad_balance_on="weights"``, the training iterations between two refreshes of
            ``λ`` (held in between, and refreshed at the first call and whenever ``num_old_classes`` changes;
            :class:`~incseg.losses.attentive.WeightBalance`, saved with the criterion's state): 10 (default) costs
            about as much as the balance on the features, 1 (exact) two more backward passes per iteration.
        gamma_max: ``None`` (default: the paper's γ) or an upper bound of the balance γ of eq. 11
            (``1.0``: γ only ever lowers the background term).
        gamma_on_new: ``True`` (default, the paper) weights the background term of every pixel by its image's
            γ; ``False`` keeps ``γ = 1`` (MiB's unbiased KD) on pixels whose label is a new class, where a
            ``γ < 1`` would pull the student towards the old classes against the label (docs/lab-notebook.md).
        ad_on_new: ``True`` (default, the paper) distils the features at every position; ``False`` leaves the
            positions of pixels labelled with a new class out of ``L_AD`` (each position of ``z̄`` and ``h`` is
            weighted by the fraction of its pixels that are not labelled new, see
            :func:`~incseg.functional.pixel_weights`): the old model knows nothing of a new class, and holding
            its features there works against the label (docs/protocol.md, "Attentive distillation").
        ad_maps: the feature maps ``L_AD`` distils: ``("z", "h")`` (default, eq. 8), ``("z",)`` (the encoder
            features ``z̄`` only: the classifier's input ``h`` is left to the output losses) or ``("h",)``; a
            string ``"z"``, ``"h"`` or ``"z+h"`` is accepted too.

    Shape:
        - logits: :math:`(B, K, h, w)`; labels: :math:`(B, H, W)` int64.
        - old_logits: :math:`(B, n_{old}, h', w')`.
        - features / old_features: ``{"z": (B, C_z, H_z, W_z), "h": (B, C_h, H_h, W_h)}``.

    Raises:
        ValueError: unknown switch, negative weight, missing channels for ``ad`` (at construction); at call
            see :meth:`forward`.

    Example:
        >>> import torch
        >>> criterion = CAFLoss(64, 32)
        >>> logits, labels = torch.randn(2, 6, 16, 16), torch.randint(0, 6, (2, 16, 16))
        >>> old_logits = torch.randn(2, 4, 16, 16)
        >>> feats = {"z": torch.randn(2, 64, 4, 4), "h": torch.randn(2, 32, 4, 4)}
        >>> old_feats = {"z": torch.randn(2, 64, 4, 4), "h": torch.randn(2, 32, 4, 4)}
        >>> out = criterion(logits, labels, num_old_classes=4, old_logits=old_logits, features=feats,
        ...                 old_features=old_feats)
        >>> sorted(out.terms)
        ['ad', 'kd', 'seg', 'total']
    """

    ad_loss: AttentiveDistillationLoss | None

    def __init__(
        self,
        z_channels: int | Mapping[str, int] | None,
        h_channels: int | None,
        *,
        ce: CEMode = "unbiased",
        kd: KDMode | None = "balanced",
        ad: ADMode | None = "both",
        lambda_d: float = 10.0,
        lambda_ad: float = 1000.0,
        class_reduction: ClassReduction = "mean",
        ignore_index: int | None = 255,
        se_reduction: int = 16,
        ad_balance: float | None = None,
        gamma_max: float | None = None,
        gamma_on_new: bool = True,
        ad_on_new: bool = True,
        ad_maps: Sequence[str] | str = AD_MAPS,
        ad_balance_on: str = "weights",
        ad_balance_every: int = 10,
    ) -> None:
        super().__init__()
        check_choice(ce, "ce", _CE)
        check_choice(kd, "kd", _KD)
        check_choice(ad, "ad", _AD)
        check_choice(class_reduction, "class_reduction", ("mean", "sum"))
        for name, value in (("lambda_d", lambda_d), ("lambda_ad", lambda_ad)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
                raise ValueError(f"{name} must be a non-negative number, got {value!r}")
        for name, opt in (("ad_balance", ad_balance), ("gamma_max", gamma_max)):
            if opt is not None and (
                not isinstance(opt, (int, float)) or isinstance(opt, bool) or not 0 < opt < float("inf")
            ):
                raise ValueError(f"{name} must be None or a finite number > 0, got {opt!r}")
        self.ad_balance = None if ad_balance is None else float(ad_balance)
        check_choice(ad_balance_on, "ad_balance_on", AD_BALANCE_ON)
        self.ad_balance_on = ad_balance_on
        check_int(ad_balance_every, "ad_balance_every")
        self.gamma_max = None if gamma_max is None else float(gamma_max)
        if not isinstance(gamma_on_new, bool):
            raise ValueError(f"gamma_on_new must be a bool, got {gamma_on_new!r}")
        self.gamma_on_new = gamma_on_new
        if not isinstance(ad_on_new, bool):
            raise ValueError(f"ad_on_new must be a bool, got {ad_on_new!r}")
        self.ad_on_new = ad_on_new
        self.ad_maps = check_ad_maps(ad_maps)
        self.ce = ce
        self.kd = kd
        self.ad = ad
        self.lambda_d = float(lambda_d)
        self.lambda_ad = float(lambda_ad)
        self.class_reduction: ClassReduction = class_reduction
        self.ignore_index = ignore_index
        if ad is None:
            self.ad_loss = None
        else:
            if z_channels is None or h_channels is None:
                raise ValueError(f"ad={ad!r} needs z_channels and h_channels, got {z_channels!r} and {h_channels!r}")
            self.ad_loss = AttentiveDistillationLoss(
                z_channels, h_channels, attention=ad, reduction="mean", se_reduction=se_reduction, maps=self.ad_maps
            )
            self.ad_loss.balance.every = ad_balance_every

    def forward(
        self,
        logits: Tensor,
        labels: Tensor,
        *,
        num_old_classes: int,
        old_logits: Tensor | None = None,
        features: Mapping[str, Any] | None = None,
        old_features: Mapping[str, Any] | None = None,
    ) -> LossOutput:
        """Compute the loss of one batch.

        Args:
            logits: student logits, old classes first.
            labels: int64 labels in incremental indices, ``ignore_index`` for ignored pixels.
            num_old_classes: classes of the previous step, background included (0 at the first step).
            old_logits: teacher logits over the ``num_old_classes`` old classes (needed when ``kd`` is set and
                ``num_old_classes > 0``).
            features: student ``{"z": z̄, "h": h}`` (needed when ``ad`` is set and ``num_old_classes > 0``).
            old_features: teacher ``{"z": z̄_old, "h": h_old}`` (same).

        Returns:
            :class:`LossOutput` ``(loss, terms)``.

        Raises:
            TypeError: non-floating logits or features, non-integer labels.
            ValueError: wrong ranks or batch sizes, ``num_old_classes`` outside ``[0, K)``, labels out of range,
                missing or mis-shaped ``old_logits`` (class count other than ``num_old_classes``), missing
                feature maps, feature channel or shape mismatch.
        """
        check_logits(logits, "logits")
        num_classes = logits.shape[1]
        n_old = check_num_old_classes(num_old_classes, num_classes, minimum=0, allow_all=False)
        check_labels(labels, num_classes, ignore_index=self.ignore_index, batch_shape=(logits.shape[0],))
        distill = n_old > 0
        kd = self.kd if distill else None
        ad_loss = self.ad_loss if distill else None

        x = resize_to(upcast(logits), labels.shape[-2:])
        q = None
        if kd is not None:
            if old_logits is None:
                raise ValueError(f"kd={kd!r} needs old_logits when num_old_classes > 0 (got num_old_classes={n_old})")
            check_logits(old_logits, "old_logits")
            check_batch(logits, old_logits, "logits", "old_logits")
            if old_logits.shape[1] != n_old:
                raise ValueError(
                    f"old_logits must have num_old_classes={n_old} channels, got shape {tuple(old_logits.shape)}"
                )
            x_old = resize_to(upcast(old_logits, x.dtype), x.shape[-2:])
            q = _old_probs(x_old)
        # One split of the student's classes at n_old, shared by L_SEG and L_D: each class goes through one exp,
        # and every gradient of the logits comes out of one backward pass.
        aggregate_old = self.ce == "unbiased"
        start = _nll_index_start(n_old, aggregate_old)
        index, valid = _label_index(labels, self.ignore_index, start)
        kd_kind = "plain" if kd == "plain" else "unbiased"
        unions = _nll_unions(aggregate_old) + (() if kd is None else _kd_unions(kd_kind))
        weights = None if q is None else q[:, 1:]
        groups = _ClassGroups(x, n_old, unions, index=index, index_start=start, old_foreground_weights=weights)
        total = reduce_pixels(_nll(groups, labels, aggregate_old=aggregate_old), valid, "mean")
        terms = {"seg": total.detach()}
        stats: dict[str, Tensor] = {}

        if kd is not None and q is not None:
            background, others = _kd_parts(groups, q, kd_kind)
            gamma = _gamma_balance(x_old) if kd == "balanced" else None
            if gamma is not None and self.gamma_max is not None:
                gamma = gamma.clamp(max=self.gamma_max)
            if gamma is not None and not self.gamma_on_new:  # pixels labelled new keep γ = 1 (MiB's KD)
                new = labels >= n_old
                if self.ignore_index is not None:
                    new = new & (labels != self.ignore_index)
                gamma = torch.where(new, gamma.new_ones(()), gamma.view(-1, 1, 1))
            per_pixel = _combine(background, others, gamma, self.class_reduction, n_old)
            kd_term = self.lambda_d * (per_pixel.mean() if per_pixel.numel() else per_pixel.sum())  # empty: 0
            terms["kd"] = kd_term.detach()
            total = total + kd_term

        if ad_loss is not None:
            z, z_old, h, h_old = self._features(features, old_features)
            for name, feat in (
                ("features['z']", z),
                ("old_features['z']", z_old),
                ("features['h']", h),
                ("old_features['h']", h_old),
            ):
                levels = feat.items() if isinstance(feat, Mapping) else [(None, feat)]  # multi-scale: by level
                for level, x in levels:
                    where = name if level is None else f"{name}[{level!r}]"
                    check_batch(logits, check_feature_map(x, where), "logits", where)
                    check_finite(x, where)
            keep = None if self.ad_on_new else not_new_pixels(labels, n_old, self.ignore_index)
            loss_z, loss_h = ad_loss.terms(z, z_old, h, h_old, keep=keep)
            ad_term, ad_stats = weighted_ad_term(
                total,
                (z, h),
                (loss_z, loss_h),
                lambda_ad=self.lambda_ad,
                kappa=self.ad_balance,
                maps=self.ad_maps,
                balance_on=self.ad_balance_on,
                reference=lambda: new_class_loss(logits, labels, n_old, self.ignore_index),
                balance=ad_loss.balance,
                num_old_classes=n_old,
            )
            stats.update(ad_stats)
            terms["ad"] = ad_term.detach()
            total = total + ad_term

        terms["total"] = total.detach()
        return LossOutput(total, terms, stats)

    def _features(
        self, features: Mapping[str, Any] | None, old_features: Mapping[str, Any] | None
    ) -> tuple[Any, Any, Tensor, Tensor]:
        checked: list[Mapping[str, Any]] = []
        for name, feats in (("features", features), ("old_features", old_features)):
            if feats is None:
                raise ValueError(f"ad={self.ad!r} needs {name} when num_old_classes > 0, got None")
            if not isinstance(feats, Mapping):
                raise TypeError(f"{name} must be a mapping {{'z': z_bar, 'h': h}}, got {type(feats).__name__}")
            missing = [key for key in ("z", "h") if key not in feats]
            if missing:
                raise ValueError(f"{name} must map 'z' and 'h' to feature maps, missing {missing}")
            checked.append(feats)
        new, old = checked
        return new["z"], old["z"], new["h"], old["h"]

    def extra_repr(self) -> str:
        return (
            f"ce={self.ce!r}, kd={self.kd!r}, ad={self.ad!r}, lambda_d={self.lambda_d}, lambda_ad={self.lambda_ad}, "
            f"class_reduction={self.class_reduction!r}, ignore_index={self.ignore_index}, "
            f"ad_balance={self.ad_balance}, gamma_max={self.gamma_max}, gamma_on_new={self.gamma_on_new}, "
            f"ad_on_new={self.ad_on_new}, ad_maps={self.ad_maps}, ad_balance_on={self.ad_balance_on!r}"
        )
