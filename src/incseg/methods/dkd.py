"""DKD (Baek et al., NeurIPS 2022): sigmoid classifiers and decomposed knowledge distillation.

Equations and choices: docs/concepts.md ("DKD"); where incseg differs from the authors' release
(github.com/cvlab-yonsei/DKD): docs/protocol.md. The release's defaults (``configs/config_voc.json`` and
``scripts/voc/overlapped/*.sh``): ``L_mbce`` x1 with positive weight 2 at step 0 and 1 later, ``L_kd`` x5,
``L_dkd^+`` x5, ``L_dkd^-`` x5, ``L_ac`` x1, new classifiers initialised from the auxiliary classifier, batch
norm and dropout frozen at steps > 0, and a pixel is background when no class has ``sigmoid > 0.5``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from incseg.functional.dkd import decompose_logits, threshold_background
from incseg.losses import LossOutput
from incseg.losses.dkd import DKDLoss
from incseg.methods.base import Batch, LearnerView, Method
from incseg.methods.config import MethodConfig
from incseg.methods.registry import register_method, register_preset
from incseg.models import IncrementalClassifier, IncrementalSegmenter

if TYPE_CHECKING:
    from incseg.scenarios import Scenario

__all__ = ["DKDMethod", "dkd_outputs"]


def _classifier(model: IncrementalSegmenter) -> IncrementalClassifier:
    clf = model.classifier
    if not isinstance(clf, IncrementalClassifier):
        raise TypeError(
            f"DKD decomposes the weights of an incseg.models.IncrementalClassifier, got {type(clf).__name__}"
        )
    return clf


def dkd_outputs(model: IncrementalSegmenter, out: Mapping[str, Any], *, auxiliary: bool = True) -> dict[str, Any]:
    """``out`` (a :meth:`~incseg.models.IncrementalSegmenter.forward_features` dict of ``model``) plus what DKD
    distils and trains: ``"pos_logits"`` and ``"neg_logits"``, the decomposed logits of the refined features
    ``h`` by every classifier row (:func:`~incseg.functional.decompose_logits`, at the features' resolution),
    and with ``auxiliary`` ``"aux_logits"``, the background row on ``h`` detached (the auxiliary classifier,
    which trains its own weights only).

    Raises:
        TypeError: the model's classifier is not an :class:`~incseg.models.IncrementalClassifier`.
    """
    clf = _classifier(model)
    h = out["h"]
    weight = torch.cat([clf.head(i).weight for i in range(clf.num_steps)], dim=0)
    pos, neg = decompose_logits(h, weight)
    result = {**out, "pos_logits": pos, "neg_logits": neg}
    if auxiliary:
        result["aux_logits"] = clf(h.detach())[:, :1]
    return result


@register_method
class DKDMethod(Method):
    r"""DKD: ``L = L_mbce + 5 L_kd + 5 L_dkd^+ + 5 L_dkd^- + L_ac`` with one sigmoid classifier per class.

    - The model's logits are read as independent binary classifiers; channel 0 (the background row) is DKD's
      auxiliary classifier, computed on detached features and trained towards "no class" (``L_ac``); it
      initialises the rows of new classes (``init="aux"``).
    - ``L_mbce``: binary cross-entropy of the current step's classes (the old classes and the background are
      negatives; no pseudo-labels).
    - ``L_kd``: the old classes' logits against the old model's sigmoid outputs; ``L_dkd^±``: the same on the
      decomposed logits ``h * W^+`` and ``h * W^-`` (:func:`dkd_outputs`).
    - Prediction (:meth:`predict_logits`): the class of highest sigmoid score, background when none exceeds
      0.5.

    Options (incseg's defaults; the release's where they differ in brackets): ``mbce_weight`` (1.0),
    ``kd_weight`` (5.0), ``dkd_pos_weight`` (5.0), ``dkd_neg_weight`` (5.0), ``ac_weight`` (1.0), ``pos_weight``
    (1.0, steps > 0), ``base_pos_weight`` (2.0, step 0), ``threshold`` (0.5, the test-time probability a class
    must exceed), ``loss_scale`` (1.0, a factor of the whole loss), ``new_pixels`` (``"free"``; release
    ``"distil"``: pixels labelled with a new class are distilled too, see :class:`~incseg.losses.DKDLoss`),
    ``base_prior`` (0.01: the classifier's biases at step 0 start at ``logit(0.01)``, :meth:`on_begin_step`;
    release: PyTorch's initialisation, ``0``), ``base_encoder_lr_factor`` (1.0 at step 0; release 0.1),
    ``encoder_lr_factor`` (0.1 at steps > 0, the release's), ``refiner_lr_factor`` (0.1 at steps > 0; release
    1.0) and ``release_weight_decay`` (``True``): the learning-rate and weight-decay factors of
    :meth:`param_group_factors`. The preset's new classes start at probability 0.01 (``init="prior"``; the
    release copies the auxiliary classifier, ``init="aux"``). Why incseg differs: docs/protocol.md ("DKD").
    """

    family = "dkd"
    options: ClassVar[Mapping[str, Any]] = {
        "mbce_weight": 1.0,
        "kd_weight": 5.0,
        "dkd_pos_weight": 5.0,
        "dkd_neg_weight": 5.0,
        "ac_weight": 1.0,
        "pos_weight": 1.0,
        "base_pos_weight": 2.0,
        "threshold": 0.5,
        "loss_scale": 1.0,
        "new_pixels": "free",
        "base_prior": 0.01,
        "base_encoder_lr_factor": 1.0,
        "encoder_lr_factor": 0.1,
        "refiner_lr_factor": 0.1,
        "release_weight_decay": True,
    }

    def __init__(self, config: MethodConfig, model: IncrementalSegmenter, scenario: Scenario) -> None:
        super().__init__(config, model, scenario)
        _classifier(model)

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        out = super().check_options(options)
        for key in ("mbce_weight", "kd_weight", "dkd_pos_weight", "dkd_neg_weight", "ac_weight"):
            if out[key] < 0:
                raise ValueError(f"{key} must be >= 0, got {out[key]}")
        for key in ("pos_weight", "base_pos_weight", "loss_scale"):
            if out[key] <= 0:
                raise ValueError(f"{key} must be > 0, got {out[key]}")
        if not 0 < out["threshold"] < 1:
            raise ValueError(f"threshold must be in (0, 1), got {out['threshold']}")
        if out["new_pixels"] not in ("distil", "free", "negative"):
            raise ValueError(f"new_pixels must be 'distil', 'free' or 'negative', got {out['new_pixels']!r}")
        if not 0 <= out["base_prior"] < 1:
            raise ValueError(f"base_prior must be in [0, 1) (0: keep the model's biases), got {out['base_prior']}")
        for key in ("base_encoder_lr_factor", "encoder_lr_factor", "refiner_lr_factor"):
            if not 0 < out[key] <= 1:
                raise ValueError(f"{key} must be in (0, 1], got {out[key]}")
        return out

    @classmethod
    def check_config(cls, config: MethodConfig) -> None:
        if config.init == "aux" and config.options["ac_weight"] == 0:
            raise ValueError(
                "init='aux' copies the auxiliary classifier, which only ac_weight > 0 trains; with ac_weight=0 "
                "set init='random' (as the release does)"
            )

    def build_criterion(self, model: IncrementalSegmenter) -> DKDLoss:
        opts = self.config.options
        return DKDLoss(
            mbce_weight=float(opts["mbce_weight"]),
            kd_weight=float(opts["kd_weight"]),
            dkd_pos_weight=float(opts["dkd_pos_weight"]),
            dkd_neg_weight=float(opts["dkd_neg_weight"]),
            ac_weight=float(opts["ac_weight"]),
            pos_weight=float(opts["pos_weight"]),
            base_pos_weight=float(opts["base_pos_weight"]),
            scale=float(opts["loss_scale"]),
            new_pixels=str(opts["new_pixels"]),
        )

    def param_group_factors(self, step: int) -> dict[str, tuple[float, float]]:
        """Learning-rate and weight-decay factors of the model's parts.

        - At steps > 0 the encoder at ``encoder_lr_factor`` (0.1) times the learning rate: the release's ratio of
          its backbone to its ASPP and classifiers (``train_voc.py:127-143``); at step 0 at
          ``base_encoder_lr_factor`` (1.0; the release's 0.1 keeps an ImageNet backbone, and slowed networks
          trained from scratch, docs/protocol.md).
        - At steps > 0 the refiner at ``refiner_lr_factor`` (0.1; the release trains its ASPP at the
          classifiers' rate, 1.0): only the classifier learns at the full rate, the features that the
          distillation holds move ten times slower (docs/protocol.md, "DKD").
        - With ``release_weight_decay``, at steps > 0 no weight decay but on the new classifier (the release).
        """
        opts = self.config.options
        enc = float(opts["encoder_lr_factor" if step > 0 else "base_encoder_lr_factor"])
        ref = float(opts["refiner_lr_factor"])
        wd = 0.0 if step > 0 and opts["release_weight_decay"] else 1.0
        factors = {"encoder": (enc, wd), "refiner": (ref if step > 0 else 1.0, wd), "old_classifier": (1.0, wd)}
        return {k: v for k, v in factors.items() if v != (1.0, 1.0)}

    def on_begin_step(self, learner: LearnerView, step: int) -> None:
        """At step 0 with ``base_prior > 0``: every bias of the classifier becomes ``logit(base_prior)``, so
        that the sigmoid classifiers start at probability ``base_prior`` rather than about 0.5 (the weights are
        kept). From 0.5, the first iterations of ``L_mbce`` are spent pushing every class down on the pixels of
        every other class (docs/protocol.md, "DKD")."""
        prior = float(self.config.options["base_prior"])
        if step == 0 and prior > 0:
            clf = _classifier(learner.model)
            with torch.no_grad():
                for i in range(clf.num_steps):
                    bias = clf.head(i).bias
                    if bias is not None:
                        bias.fill_(math.log(prior / (1 - prior)))

    def teacher_forward(self, teacher: IncrementalSegmenter, images: Tensor) -> dict[str, Any]:
        """The teacher's ``forward_features`` plus its decomposed logits (:func:`dkd_outputs`)."""
        return dkd_outputs(teacher, teacher.forward_features(images), auxiliary=False)

    def forward(self, model: IncrementalSegmenter, batch: Batch) -> dict[str, Any]:
        """:meth:`Method.forward` (``forward_features``, fused with the teacher's ``z`` when the model has a
        fusion module) plus ``"pos_logits"``, ``"neg_logits"`` and ``"aux_logits"`` (:func:`dkd_outputs`)."""
        return dkd_outputs(model, super().forward(model, batch))

    def loss(self, criterion: nn.Module, out: Mapping[str, Any], batch: Batch) -> LossOutput:
        assert isinstance(criterion, DKDLoss)
        n_old, teacher_out = batch.num_old_classes, batch.teacher_out
        old: dict[str, Tensor] = {}
        if n_old > 0:
            if teacher_out is None or "pos_logits" not in teacher_out:
                raise ValueError(
                    "dkd needs teacher_out from IncrementalLearner.teacher_forward (with 'pos_logits') at steps > 0"
                )
            old = {
                "old_logits": teacher_out["logits"],
                "old_pos_logits": teacher_out["pos_logits"],
                "old_neg_logits": teacher_out["neg_logits"],
            }
        loss: LossOutput = criterion(
            out["logits"],
            batch.labels,
            num_old_classes=n_old,
            aux_logits=out["aux_logits"],
            pos_logits=out["pos_logits"] if n_old > 0 else None,
            neg_logits=out["neg_logits"] if n_old > 0 else None,
            **old,
        )
        return loss

    def predict_logits(
        self,
        model: IncrementalSegmenter,
        images: Tensor,
        *,
        teacher_forward: Callable[[Tensor], Mapping[str, Any] | None],
        strategy: str | None = None,
    ) -> Tensor:
        """The sigmoid classifiers' logits with channel 0 set to ``logit(threshold)``
        (:func:`~incseg.functional.threshold_background`): their ``argmax`` is the class of highest score, or
        the background where no class exceeds ``threshold``."""
        logits = super().predict_logits(model, images, teacher_forward=teacher_forward, strategy=strategy)
        return threshold_background(logits, float(self.config.options["threshold"]))

    def divergence_hints(self) -> dict[str, str]:
        opts = self.config.options
        return {
            name: f"lower {name}_weight (now {opts[name + '_weight']:g}) or the learning rate"
            for name in ("kd", "dkd_pos", "dkd_neg")
        }


# CAF's fields take their "off" values (incseg.methods.config.CAF_FIELDS): DKD does not read them. The release
# freezes batch norm (``--freeze_bn``: evaluation mode, affine weights trained) and dropout at steps > 0.
register_preset(MethodConfig(name="dkd", family="dkd", init="prior", bn="frozen", dropout="frozen"))
