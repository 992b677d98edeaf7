"""DKD's overall loss (Baek et al., NeurIPS 2022): ``L_mbce + α L_kd + β (L_dkd^+ + L_dkd^-) + L_ac``."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from incseg._checks import check_logits, check_num_old_classes
from incseg.functional._common import resize_to
from incseg.functional.attention import pixel_weights
from incseg.functional.dkd import auxiliary_bce_loss, multilabel_bce_loss, sigmoid_kd_loss
from incseg.losses.caf import LossOutput

__all__ = ["DKDLoss"]

_NEW_PIXELS = ("distil", "free", "negative")


def _weight(value: Any, name: str, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    if not (value > 0 if positive else value >= 0) or value == float("inf"):
        raise ValueError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}, got {value}")
    return value


class DKDLoss(nn.Module):
    r"""DKD's training objective (docs/concepts.md, "DKD"):

    ``L = s (w_mbce L_mbce + w_kd L_kd + w_dkd+ L_dkd+ + w_dkd- L_dkd- + w_ac L_ac)``

    - ``L_mbce`` (:func:`~incseg.functional.multilabel_bce_loss`): the classes of the current step against
      their labels (old classes and background are negatives), positive weight ``base_pos_weight`` at step 0
      and ``pos_weight`` later;
    - ``L_kd`` (:func:`~incseg.functional.sigmoid_kd_loss`): the old foreground classes' logits against the old
      model's sigmoid outputs, at the labels' resolution;
    - ``L_dkd^+`` / ``L_dkd^-``: the same on the positive and negative decomposed logits
      (:func:`~incseg.functional.decompose_logits`), at the features' resolution;
    - ``L_ac`` (:func:`~incseg.functional.auxiliary_bce_loss`): the auxiliary classifier against 0.

    Each term is the sum over classes of the mean over pixels, as the release (every pixel counts, labels
    ``255`` included, unless ``ignore_index`` is set). The distillation terms are absent at step 0. It holds no
    parameters and no state.

    Args:
        mbce_weight: weight of ``L_mbce`` (release: 1).
        kd_weight: weight of ``L_kd`` (release: 5).
        dkd_pos_weight: weight of ``L_dkd^+`` (release: 5).
        dkd_neg_weight: weight of ``L_dkd^-`` (release: 5).
        ac_weight: weight of ``L_ac`` (release: 1).
        pos_weight: positive weight of ``L_mbce`` at steps > 0 (release: 1).
        base_pos_weight: positive weight of ``L_mbce`` at step 0 (release scripts: 2).
        scale: factor of the whole loss (1: the release's loss; for SGD, scaling the loss scales the learning
            rate, see :class:`~incseg.methods.DKDMethod`'s ``loss_scale``).
        ignore_index: label left out of ``L_mbce`` (``None``: the release, every pixel counts).
        new_pixels: what the distillation does at pixels labelled with a new class: ``"distil"`` (the release)
            distils them as any pixel; ``"free"`` leaves them out of ``L_kd`` and, by the share of such pixels
            under each feature position, of ``L_dkd^±``; ``"negative"`` makes every old class a negative there in
            ``L_kd`` (target 0) and leaves them out of ``L_dkd^±``. The old model never saw a new class: in the
            disjoint setting it calls most of its pixels an old class, and distilling that works against the
            label (docs/protocol.md, "DKD").

    Raises:
        TypeError: a weight that is not a number.
        ValueError: a negative or infinite weight, a positive weight ``<= 0``, an unknown ``new_pixels``.

    Example:
        >>> loss = DKDLoss()
        >>> logits, aux = torch.zeros(2, 4, 8, 8), torch.zeros(2, 1, 8, 8)
        >>> labels = torch.randint(0, 4, (2, 8, 8))
        >>> out = loss(logits, labels, num_old_classes=0, aux_logits=aux)
        >>> sorted(out.terms)
        ['ac', 'mbce', 'total']
    """

    def __init__(
        self,
        *,
        mbce_weight: float = 1.0,
        kd_weight: float = 5.0,
        dkd_pos_weight: float = 5.0,
        dkd_neg_weight: float = 5.0,
        ac_weight: float = 1.0,
        pos_weight: float = 1.0,
        base_pos_weight: float = 2.0,
        scale: float = 1.0,
        ignore_index: int | None = None,
        new_pixels: str = "distil",
    ) -> None:
        super().__init__()
        self.mbce_weight = _weight(mbce_weight, "mbce_weight")
        self.kd_weight = _weight(kd_weight, "kd_weight")
        self.dkd_pos_weight = _weight(dkd_pos_weight, "dkd_pos_weight")
        self.dkd_neg_weight = _weight(dkd_neg_weight, "dkd_neg_weight")
        self.ac_weight = _weight(ac_weight, "ac_weight")
        self.pos_weight = _weight(pos_weight, "pos_weight", positive=True)
        self.base_pos_weight = _weight(base_pos_weight, "base_pos_weight", positive=True)
        self.scale = _weight(scale, "scale", positive=True)
        if ignore_index is not None and (isinstance(ignore_index, bool) or not isinstance(ignore_index, int)):
            raise TypeError(f"ignore_index must be an int or None, got {type(ignore_index).__name__}")
        self.ignore_index = ignore_index
        if new_pixels not in _NEW_PIXELS:
            raise ValueError(f"new_pixels must be one of {_NEW_PIXELS}, got {new_pixels!r}")
        self.new_pixels = new_pixels

    def forward(
        self,
        logits: Tensor,
        labels: Tensor,
        *,
        num_old_classes: int,
        aux_logits: Tensor,
        pos_logits: Tensor | None = None,
        neg_logits: Tensor | None = None,
        old_logits: Tensor | None = None,
        old_pos_logits: Tensor | None = None,
        old_neg_logits: Tensor | None = None,
    ) -> LossOutput:
        """The loss of one batch.

        Args:
            logits: the student's logits ``(B, K, h, w)`` (channel 0, the auxiliary classifier, is not read).
            labels: labels ``(B, H, W)`` int64.
            num_old_classes: ``|S_{t-1}|``, background included (0 at step 0).
            aux_logits: the auxiliary classifier's logits ``(B, 1, h, w)`` on detached features.
            pos_logits: the student's positive decomposed logits ``(B, K, h', w')`` (steps > 0).
            neg_logits: the student's negative decomposed logits ``(B, K, h', w')`` (steps > 0).
            old_logits: the old model's logits ``(B, num_old_classes, h, w)`` (steps > 0).
            old_pos_logits: the old model's positive decomposed logits ``(B, num_old_classes, h', w')``.
            old_neg_logits: the old model's negative decomposed logits ``(B, num_old_classes, h', w')``.

        Returns:
            The total and the weighted terms ``"mbce"``, ``"ac"`` and at steps > 0 ``"kd"``, ``"dkd_pos"``,
            ``"dkd_neg"`` (each times its weight and ``scale``), and ``"total"``.

        Raises:
            ValueError: bad shapes, ``num_old_classes`` outside ``[0, K)``, or missing old-model outputs at
                steps > 0.
        """
        logits = check_logits(logits, "logits", min_classes=2)
        num_classes = logits.shape[1]
        n_old = check_num_old_classes(num_old_classes, num_classes, allow_all=False)
        size = labels.shape[-2:]
        pos_weight = self.base_pos_weight if n_old == 0 else self.pos_weight
        mbce = self.mbce_weight * multilabel_bce_loss(
            logits, labels, first_class=max(n_old, 1), pos_weight=pos_weight, ignore_index=self.ignore_index
        )
        ac = self.ac_weight * auxiliary_bce_loss(resize_to(aux_logits, size))
        terms = {"mbce": mbce, "ac": ac}
        if n_old > 0:
            given = {"pos_logits": pos_logits, "neg_logits": neg_logits, "old_logits": old_logits}
            given.update(old_pos_logits=old_pos_logits, old_neg_logits=old_neg_logits)
            missing = [k for k, v in given.items() if v is None]
            if missing:
                raise ValueError(f"DKDLoss needs {missing} at steps > 0 (num_old_classes={n_old})")
            assert old_logits is not None and pos_logits is not None and neg_logits is not None
            assert old_pos_logits is not None and old_neg_logits is not None
            for name, old in (("old_logits", old_logits), ("old_pos_logits", old_pos_logits)):
                if old.ndim != 4 or old.shape[1] != n_old:
                    raise ValueError(f"{name} must have num_old_classes={n_old} channels, got {tuple(old.shape)}")
            keep = kd_w = tgt_w = feat_w = None
            if self.new_pixels != "distil":
                keep = (labels < n_old) | (labels >= num_classes)  # not labelled with a new class
                if self.ignore_index is not None:
                    keep = keep | (labels == self.ignore_index)
                if self.new_pixels == "free":
                    kd_w = keep.to(logits.dtype)
                else:
                    tgt_w = keep.to(logits.dtype)
                feat_w = pixel_weights(keep, pos_logits.shape[-2:])
            kd = sigmoid_kd_loss(
                resize_to(logits, size)[:, 1:n_old],
                resize_to(old_logits, size)[:, 1:],
                weight=kd_w,
                target_weight=tgt_w,
            )
            terms["kd"] = self.kd_weight * kd
            terms["dkd_pos"] = self.dkd_pos_weight * sigmoid_kd_loss(
                pos_logits[:, 1:n_old], old_pos_logits[:, 1:], weight=feat_w
            )
            terms["dkd_neg"] = self.dkd_neg_weight * sigmoid_kd_loss(
                neg_logits[:, 1:n_old], old_neg_logits[:, 1:], weight=feat_w
            )
        terms = {k: self.scale * v for k, v in terms.items()} if self.scale != 1.0 else terms
        total = torch.stack(list(terms.values())).sum()
        out = {k: v.detach() for k, v in terms.items()}
        out["total"] = total.detach()
        return LossOutput(total, out)

    def extra_repr(self) -> str:
        return (
            f"mbce_weight={self.mbce_weight}, kd_weight={self.kd_weight}, dkd_pos_weight={self.dkd_pos_weight}, "
            f"dkd_neg_weight={self.dkd_neg_weight}, ac_weight={self.ac_weight}, pos_weight={self.pos_weight}, "
            f"base_pos_weight={self.base_pos_weight}, scale={self.scale}, new_pixels={self.new_pixels!r}"
        )
