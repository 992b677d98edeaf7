"""The CAF family: fine-tuning, LwF, MiB, CAF (eq. 1-13), the authors' release and the paper's ablations.

Every method of the paper's tables is one :class:`~incseg.losses.CAFLoss` configuration (``ce``, ``kd``,
``ad``) plus, for ``caf``, the :class:`~incseg.nn.ContinualAttentiveFusion` module inserted at step 1.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from incseg.losses import CAFLoss, LossOutput
from incseg.methods.base import Batch, Method
from incseg.methods.components import FusionComponent, cafs_of, predict_with_fusion
from incseg.methods.config import CAF_FIELDS, MethodConfig
from incseg.methods.registry import register_method, register_preset
from incseg.models import IncrementalSegmenter

if TYPE_CHECKING:
    from incseg.scenarios import Scenario

__all__ = ["CAFMethod", "caf_forward", "caf_loss", "caf_training_loss"]

TEACHER_KEYS = ("z", "z_bar", "h", "logits")


def caf_training_loss(model: IncrementalSegmenter, criterion: CAFLoss, batch: Batch) -> LossOutput:
    """Student forward pass and :class:`~incseg.losses.CAFLoss` of one batch.

    The teacher's outputs are used as the criterion and the model need them (at steps > 0): ``z`` feeds the
    model's CAF module (eq. 1-4), ``logits`` the output distillation (eq. 9-12), ``z_bar`` and ``h`` the
    attentive distillation (eq. 5-8).

    Raises:
        ValueError: ``teacher_out`` missing or lacking a key the method needs.
        TypeError: ``teacher_out`` is not a mapping.
    """
    return caf_loss(criterion, caf_forward(model, criterion, batch), batch)


def caf_forward(model: IncrementalSegmenter, criterion: CAFLoss, batch: Batch) -> dict[str, Any]:
    """The student's ``forward_features`` of one batch, with the teacher's ``z`` for the CAF module (checks
    ``teacher_out`` for every key the criterion and the model need)."""
    n_old, teacher_out = batch.num_old_classes, batch.teacher_out
    needs_logits = n_old > 0 and criterion.kd is not None
    needs_features = n_old > 0 and criterion.ad is not None
    needs_z = n_old > 0 and model.fusion is not None
    if needs_logits or needs_features or needs_z:
        _check_teacher_out(teacher_out, n_old)
        assert teacher_out is not None
    z_old = teacher_out["z"] if needs_z and teacher_out is not None else None
    return dict(model.forward_features(batch.images, z_old))


def caf_loss(criterion: CAFLoss, out: Mapping[str, Any], batch: Batch) -> LossOutput:
    """:class:`~incseg.losses.CAFLoss` of one batch from the student's ``forward_features`` ``out``."""
    n_old, teacher_out = batch.num_old_classes, batch.teacher_out
    needs_logits = n_old > 0 and criterion.kd is not None
    needs_features = n_old > 0 and criterion.ad is not None
    if needs_logits or needs_features:
        _check_teacher_out(teacher_out, n_old)
    old_logits = teacher_out["logits"] if needs_logits and teacher_out is not None else None
    features = old_features = None
    if needs_features and teacher_out is not None:
        features = {"z": out["z_bar"], "h": out["h"]}
        old_features = {"z": teacher_out["z_bar"], "h": teacher_out["h"]}
    result: LossOutput = criterion(
        out["logits"],
        batch.labels,
        num_old_classes=n_old,
        old_logits=old_logits,
        features=features,
        old_features=old_features,
    )
    return result


def _check_teacher_out(teacher_out: Mapping[str, Any] | None, num_old_classes: int) -> None:
    if teacher_out is None:
        raise ValueError(
            f"teacher_out is required at steps > 0 (num_old_classes={num_old_classes}) for this method "
            "(distillation or CAF): compute it with IncrementalLearner.teacher_forward(images) or call "
            "IncrementalLearner.training_step"
        )
    if not isinstance(teacher_out, Mapping):
        raise TypeError(f"teacher_out must be a dict of tensors, got {type(teacher_out).__name__}")
    missing = [k for k in TEACHER_KEYS if k not in teacher_out]
    if missing:
        raise ValueError(
            f"teacher_out must hold the teacher's forward_features keys {list(TEACHER_KEYS)}, missing {missing}"
        )


@register_method
class CAFMethod(Method):
    """The family of :class:`~incseg.losses.CAFLoss` methods: ``L = L_SEG + λ_AD L_AD + λ_D L_D`` (eq. 13) and
    the continual attentive fusion (eq. 1-4) when ``config.caf``.

    Presets: ``ft``, ``joint``, ``lwf``, ``mib``, ``caf``, ``caf-paper``, ``caf-release`` and the ablations of
    the paper's Tables III and VI (see :data:`~incseg.learner.METHODS`).
    """

    family = "caf"
    fields = frozenset(CAF_FIELDS)
    fusion_group = "caf"

    @classmethod
    def uses_teacher(cls, config: MethodConfig) -> bool:
        """Whether training at steps > 0 runs the old model (for KD, AD or the CAF module)."""
        return config.kd is not None or config.ad is not None or config.caf

    def build_criterion(self, model: IncrementalSegmenter) -> CAFLoss:
        config = self.config
        return CAFLoss(
            model.caf_channels,
            model.h_channels,
            ce=config.ce,
            kd=config.kd,
            ad=config.ad,
            lambda_d=config.lambda_d,
            lambda_ad=config.lambda_ad,
            class_reduction=config.class_reduction,
            ad_balance=config.ad_balance,
            gamma_max=config.gamma_max,
            gamma_on_new=config.gamma_on_new,
            ad_on_new=config.ad_on_new,
            ad_maps=config.ad_maps,
            ad_balance_on=config.ad_balance_on,
            ad_balance_every=config.ad_balance_every,
        )

    def __init__(self, config: MethodConfig, model: IncrementalSegmenter, scenario: Scenario) -> None:
        super().__init__(config, model, scenario)
        # the fusion module and its test strategies: the same block as the caf-fusion component of other families
        self._fusion = FusionComponent(config, model, scenario) if config.caf else None

    def has_fusion(self, step: int) -> bool:
        return self._fusion is not None and self._fusion.has_fusion(step)

    def new_fusion(self, model: IncrementalSegmenter) -> nn.Module:
        """One :class:`~incseg.nn.ContinualAttentiveFusion` on ``z_channels`` (one per level of ``caf_levels``
        for a multi-scale encoder)."""
        if self._fusion is None:
            return super().new_fusion(model)
        return self._fusion.new_fusion(model)

    def prepare_model(self, model: IncrementalSegmenter, *, teacher: bool) -> None:
        """The test strategy of the model's CAF modules: ``skip`` for the teacher (no older features exist),
        the configured ``test_strategy`` for the student."""
        for caf in cafs_of(model):
            caf.test_strategy = "skip" if teacher else self.config.test_strategy

    def training_loss(self, model: IncrementalSegmenter, criterion: nn.Module, batch: Batch) -> LossOutput:
        assert isinstance(criterion, CAFLoss)
        return caf_training_loss(model, criterion, batch)

    def loss(self, criterion: nn.Module, out: Mapping[str, Any], batch: Batch) -> LossOutput:
        assert isinstance(criterion, CAFLoss)
        return caf_loss(criterion, out, batch)

    def predict_logits(
        self,
        model: IncrementalSegmenter,
        images: Tensor,
        *,
        teacher_forward: Callable[[Tensor], Mapping[str, Any] | None],
        strategy: str | None = None,
    ) -> Tensor:
        """With a CAF module, ``strategy`` (default: the module's ``test_strategy``) decides what stands in for
        the old features (paper Sec. IV, Fig. 5): ``"skip"`` uses the new projection only (the teacher is not
        run), ``"zero_pad"`` fuses it with zeros, ``"concat"`` fuses it with the teacher's features (runs the
        teacher). Without a CAF module ``strategy`` has no effect.

        Raises:
            ValueError: unknown ``strategy``; ``"concat"`` without a teacher.
        """
        return predict_with_fusion(model, images, teacher_forward=teacher_forward, strategy=strategy)

    def divergence_hints(self) -> dict[str, str]:
        cfg = self.config
        docs = "see 'Divergence' in docs/protocol.md"
        return {
            "ad": f"lower lambda_ad (now {cfg.lambda_ad:g}) or the learning rate; {docs}",
            "kd": f"lower lambda_d (now {cfg.lambda_d:g}) or the learning rate; {docs}",
        }


# The stabilisers of the default recipe (docs/concepts.md, "The default recipe: stabilisers"), each attached
# to the component it stabilises: attentive distillation gets its gradient balance and deterministic student
# features (dropout off), CAF its fusion dropout, the balanced KD (not in the recipe, which uses
# MiB's KD, but in the +bkd ablations) its bounded γ and MiB's KD on new pixels. The fields'
# defaults are the recipe; presets without a component get the paper's (neutral) value of its stabilisers.
_NO_AD: dict[str, Any] = {
    "ad_balance": None,
    "ad_balance_on": "weights",
    "ad_balance_every": 10,
    "ad_on_new": True,
    "ad_maps": ("z", "h"),
    "bn": "train",
    "dropout": "train",
}
_NO_CAF: dict[str, Any] = {"fusion_dropout": 0.0}
_NO_BKD: dict[str, Any] = {"gamma_max": None, "gamma_on_new": True}
NEUTRAL: dict[str, Any] = {**_NO_AD, **_NO_CAF, **_NO_BKD}
"""The neutral values of the recipe's stabilisers (for presets without AD, CAF module and balanced KD)."""


def _presets() -> list[MethodConfig]:
    plain = MethodConfig(name="ft", ce="plain", kd=None, ad=None, caf=False, init="random", **NEUTRAL)
    baseline = MethodConfig(name="baseline", ce="unbiased", kd=None, ad=None, caf=False, init="mib", **NEUTRAL)
    recipe = MethodConfig(name="caf")
    ad = {k: getattr(recipe, k) for k in _NO_AD}
    caf = {k: getattr(recipe, k) for k in _NO_CAF}
    bkd = {k: getattr(recipe, k) for k in _NO_BKD}
    return [
        plain,
        plain.replace(name="joint"),
        plain.replace(name="lwf", kd="plain"),
        baseline.replace(name="mib", kd="unbiased"),
        recipe,
        recipe.replace(name="caf-paper", kd="balanced", **NEUTRAL),
        # the authors' public release: MiB plus plain MSE feature distillation x1000 on the encoder output and
        # the refined features; its CAF module is commented out and its gamma never used
        baseline.replace(name="caf-release", kd="unbiased", ad="plain"),
        # ablations of the paper's Table III (baseline = unbiased CE, MiB init) and Table VI (AD variants), each
        # with the stabilisers of the components it has
        baseline,
        baseline.replace(name="baseline+kd", kd="unbiased"),
        baseline.replace(name="baseline+bkd", kd="balanced", **bkd),
        baseline.replace(name="baseline+ad", ad="both", **ad),
        baseline.replace(name="baseline+ad+bkd", ad="both", kd="balanced", **ad, **bkd),
        baseline.replace(name="baseline+caf", caf=True, **caf),
        baseline.replace(name="baseline+caf+bkd", caf=True, kd="balanced", **caf, **bkd),
        baseline.replace(name="baseline+caf+ad", caf=True, ad="both", **ad, **caf),
        baseline.replace(name="baseline+fd", ad="plain", **ad),
        baseline.replace(name="baseline+ad_sp", ad="spatial", **ad),
        baseline.replace(name="baseline+ad_ch", ad="channel", **ad),
    ]


for _config in _presets():
    register_preset(_config)
