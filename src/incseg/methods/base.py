"""The contract every incremental method implements: its settings, its hooks around a step, its loss."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from torch import Tensor, nn

if TYPE_CHECKING:
    from incseg.losses import LossOutput
    from incseg.methods.config import MethodConfig
    from incseg.models import IncrementalSegmenter
    from incseg.scenarios import Scenario

__all__ = ["Batch", "LearnerView", "Method", "check_option_values"]


def check_option_values(options: Mapping[str, Any], defaults: Mapping[str, Any], owner: str) -> dict[str, Any]:
    """``options`` (a subset of ``defaults``) checked against the defaults' types and completed with them.

    Raises:
        ValueError: an unknown option (the message lists the valid ones) or a non-finite number.
        TypeError: a value whose type differs from its default's.
    """
    unknown = [k for k in options if k not in defaults]
    if unknown:
        raise ValueError(f"unknown options {unknown} for {owner}; valid: {list(defaults)}")
    out = dict(defaults)
    for key, value in options.items():
        default = defaults[key]
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if type(value) is not type(default):
            raise TypeError(f"{key} must be a {type(default).__name__}, got {type(value).__name__}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{key} must be finite, got {value}")
        out[key] = value
    return out


@dataclass(frozen=True)
class Batch:
    """One training batch as :meth:`Method.training_loss` sees it.

    Attributes:
        images: input images ``(B, C, H, W)``.
        labels: labels ``(B, H, W)`` int64 in incremental indices (``255`` ignored).
        teacher_out: what :meth:`Method.teacher_forward` returned for ``images`` (``None`` at step 0 or when
            the method runs no teacher).
        num_old_classes: ``|S_{t-1}|`` of the current step (0 at step 0).
    """

    images: Tensor
    labels: Tensor
    teacher_out: Mapping[str, Any] | None
    num_old_classes: int


class LearnerView(Protocol):
    """What a method's lifecycle hooks see of the :class:`~incseg.learner.IncrementalLearner`."""

    @property
    def step(self) -> int: ...

    @property
    def config(self) -> MethodConfig: ...

    @property
    def model(self) -> IncrementalSegmenter: ...

    @property
    def teacher(self) -> IncrementalSegmenter | None: ...

    @property
    def criterion(self) -> nn.Module: ...

    @property
    def num_old_classes(self) -> int: ...

    def teacher_forward(self, images: Tensor) -> dict[str, Any] | None: ...


PARAM_PARTS = ("encoder", "refiner", "old_classifier", "new_classifier", "fusion", "criterion")
"""The parts of a model :meth:`Method.param_group_factors` may give their own learning-rate and weight-decay
factors."""


def check_param_group_factors(factors: Mapping[str, Any]) -> dict[str, tuple[float, float]]:
    """``factors`` of :meth:`Method.param_group_factors` as a dict of float pairs.

    Raises:
        TypeError: not a mapping of pairs of numbers.
        ValueError: an unknown part or a negative or non-finite factor.

    Example:
        >>> check_param_group_factors({"encoder": (0.1, 1)})
        {'encoder': (0.1, 1.0)}
    """
    if not isinstance(factors, Mapping):
        raise TypeError(f"param_group_factors must return a mapping, got {type(factors).__name__}")
    out: dict[str, tuple[float, float]] = {}
    for part, pair in factors.items():
        if part not in PARAM_PARTS:
            raise ValueError(f"unknown part {part!r} in param_group_factors; parts: {PARAM_PARTS}")
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise TypeError(f"param_group_factors[{part!r}] must be (lr_factor, weight_decay_factor), got {pair!r}")
        for what, value in zip(("lr", "weight decay"), pair):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"the {what} factor of {part!r} must be a number, got {value!r}")
            if not 0 <= value < math.inf:
                raise ValueError(f"the {what} factor of {part!r} must be finite and >= 0, got {value}")
        out[part] = (float(pair[0]), float(pair[1]))
    return out


class Method:
    """Base class of a method family: one subclass per method, registered with
    :func:`~incseg.methods.register_method`, configured by a :class:`~incseg.methods.MethodConfig` whose
    ``family`` names it.

    The :class:`~incseg.learner.IncrementalLearner` keeps everything that is not method-specific: the step
    lifecycle, the frozen teacher (a copy of the model at the end of the previous step), the growth of the
    classifier (``config.init``), parameter groups, prediction and checkpoints. It calls these hooks:

    - :meth:`uses_teacher` (class method): whether training at steps > 0 runs the teacher at all;
    - :meth:`build_criterion`: the ``nn.Module`` holding the method's trained loss parameters and its state
      (saved in checkpoints, in the ``"criterion"`` parameter group); the default has none;
    - :meth:`has_fusion` / :meth:`new_fusion`: a module the learner inserts between encoder and refiner (its
      parameters form the optimizer group :attr:`fusion_group`);
    - :meth:`param_group_factors`: learning-rate and weight-decay factors of parts of the model (encoder, refiner,
      old and new classifier, ...) that :meth:`~incseg.learner.IncrementalLearner.param_groups` applies;
    - :meth:`prepare_model`: the state of the student or the frozen teacher that weights do not hold (after
      the teacher snapshot and after loading a checkpoint);
    - :meth:`on_begin_step` (after the teacher snapshot and the classifier growth) and :meth:`on_end_step`;
    - :meth:`teacher_forward`: what the method needs from the teacher (under ``no_grad``);
    - :meth:`forward` and :meth:`loss`: the student's forward pass of a :class:`Batch` and the loss computed from
      it, as named terms (a :class:`~incseg.losses.LossOutput` whose ``terms`` add up to ``"total"``);
      :meth:`training_loss` runs both (components of a composition read the forward pass in between);
    - :meth:`calibrate`: an optional pass over the step's training data before training (PLOP's thresholds);
    - :meth:`consolidate`: an optional pass over the step's training data after training, before
      :meth:`on_end_step` (STAR's class prototypes);
    - :meth:`predict_logits`: the model's logits at test time (CAF's test strategies).

    Method-specific settings live in :attr:`options` (name -> default): they become keyword overrides
    (``IncrementalLearner(model, scenario, "plop", pod_factor=0.02)``) and entries of
    ``MethodConfig.to_dict()``. Values must be plain ``float``, ``int``, ``bool`` or ``str``. The fields of
    :data:`~incseg.methods.config.CAF_FIELDS` a family reads are listed in :attr:`fields`.

    Args:
        config: the method configuration (``config.family == self.family``).
        model: the student network.
        scenario: the scenario being learnt.
    """

    family: ClassVar[str] = ""
    """Registry key of the family (the ``family`` field of its configurations)."""
    options: ClassVar[Mapping[str, Any]] = {}
    """The family's own settings and their defaults."""
    fields: ClassVar[frozenset[str]] = frozenset()
    """The fields of :data:`~incseg.methods.config.CAF_FIELDS` the family reads (others are refused)."""
    fusion_group: ClassVar[str] = "fusion"
    """Name of the optimizer parameter group of the fusion module (:meth:`new_fusion`)."""

    def __init__(self, config: MethodConfig, model: IncrementalSegmenter, scenario: Scenario) -> None:
        self.config = config
        self.scenario = scenario

    # ------------------------------------------------------------------ configuration
    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        """Validate ``options`` (a subset of :attr:`options`) and fill in the defaults.

        Raises:
            ValueError: an unknown option (the message lists the valid ones) or a non-finite number.
            TypeError: a value whose type differs from its default's.
        """
        return check_option_values(options, cls.options, f"method family {cls.family!r}")

    @classmethod
    def check_config(cls, config: MethodConfig) -> None:
        """Reject field combinations the family does not implement (called by ``MethodConfig``)."""

    @classmethod
    def uses_teacher(cls, config: MethodConfig) -> bool:
        """Whether training at steps > 0 runs the old model (default: yes)."""
        return True

    # ------------------------------------------------------------------ structure
    def build_criterion(self, model: IncrementalSegmenter) -> nn.Module:
        """The module holding the loss's trained parameters and state (default: an empty module)."""
        return nn.Module()

    def has_fusion(self, step: int) -> bool:
        """Whether the model has a fusion module (:attr:`IncrementalSegmenter.fusion`) at ``step``."""
        return False

    def new_fusion(self, model: IncrementalSegmenter) -> nn.Module:
        """A new fusion module for ``model`` (called when :meth:`has_fusion` first holds)."""
        raise NotImplementedError(f"method family {self.family!r} has no fusion module")

    def prepare_model(self, model: IncrementalSegmenter, *, teacher: bool) -> None:
        """Set the state of ``model`` that its weights do not hold: called on the frozen teacher after the
        snapshot of :meth:`~incseg.learner.IncrementalLearner.begin_step` and on the student and the teacher
        after a checkpoint is loaded (default: nothing)."""

    def param_group_factors(self, step: int) -> Mapping[str, tuple[float, float]]:
        """Learning-rate and weight-decay factors of parts of the model at ``step`` (default: none).

        :meth:`IncrementalLearner.param_groups <incseg.learner.IncrementalLearner.param_groups>` gives each part
        named here a parameter group of its own, named after the part, with ``lr * factors[0]`` (``head_lr`` for
        the classifier parts) and ``weight_decay * factors[1]``. Parts: ``"encoder"``, ``"refiner"``,
        ``"old_classifier"`` (the heads of earlier steps), ``"new_classifier"`` (the head of ``step``),
        ``"fusion"`` and ``"criterion"`` (:data:`PARAM_PARTS`).

        Returns:
            ``{part: (lr_factor, weight_decay_factor)}``, factors finite and ``>= 0``.
        """
        return {}

    # ------------------------------------------------------------------ lifecycle
    def on_begin_step(self, learner: LearnerView, step: int) -> None:
        """Called by :meth:`IncrementalLearner.begin_step` after the teacher snapshot and classifier growth."""

    def on_end_step(self, learner: LearnerView) -> None:
        """Called by :meth:`IncrementalLearner.end_step`."""

    def needs_calibration(self, learner: LearnerView) -> bool:
        """Whether :meth:`calibrate` must run (on the current step's data) before training (default: never)."""
        return False

    def calibrate(self, learner: LearnerView, batches: Any) -> None:
        """Optional pass over ``(images, labels)`` batches of the step's training data before training."""

    def train_set(self, step: int, dataset: Any) -> Any:
        """Data hook: the training set of ``step`` given the step's own ``dataset`` (default: ``dataset``;
        a replay component adds its memory). :func:`~incseg.engine.train_scenario` calls it."""
        return dataset

    def observe_train_set(self, step: int, dataset: Any) -> None:
        """Data hook: the step's own training set once the step is trained (a replay component selects its
        exemplars). :func:`~incseg.engine.train_scenario` calls it after ``end_step``."""

    def extra_train_images(self, step: int) -> int:
        """At most how many images :meth:`train_set` adds at ``step`` (for time estimates; default 0)."""
        return 0

    def needs_consolidation(self, learner: LearnerView) -> bool:
        """Whether :meth:`consolidate` must run (on the current step's data) after training, before
        :meth:`~incseg.learner.IncrementalLearner.end_step` completes (default: never)."""
        return False

    def consolidate(self, learner: LearnerView, batches: Any) -> None:
        """Optional pass over ``(images, labels)`` batches of the step's training data after training (the mirror
        of :meth:`calibrate`; STAR computes its class prototypes here)."""

    # ------------------------------------------------------------------ training
    def teacher_forward(self, teacher: IncrementalSegmenter, images: Tensor) -> dict[str, Any]:
        """What the loss needs from the teacher (run under ``no_grad``): by default its ``forward_features``."""
        return teacher.forward_features(images)

    def forward(self, model: IncrementalSegmenter, batch: Batch) -> dict[str, Any]:
        """The student's forward pass of one batch: by default ``model.forward_features(images, z_old)``, where
        ``z_old`` is the teacher's ``"z"`` when the model has a fusion module (at steps > 0), else ``None``.

        Components (:class:`~incseg.methods.Component`) read what this returns, so a family that overrides it
        keeps the keys of :meth:`~incseg.models.IncrementalSegmenter.forward_features` (``z``, ``z_bar``,
        ``h``, ``logits``) and adds its own."""
        z_old = None
        if model.fusion is not None and batch.num_old_classes > 0:
            teacher_out = batch.teacher_out
            if teacher_out is None or "z" not in teacher_out:
                raise ValueError(
                    "the model's fusion module needs the teacher's 'z' (teacher_out from "
                    "IncrementalLearner.teacher_forward) at steps > 0"
                )
            z_old = teacher_out["z"]
        return dict(model.forward_features(batch.images, z_old))

    def loss(self, criterion: nn.Module, out: Mapping[str, Any], batch: Batch) -> LossOutput:
        """The family's loss of one batch from the student's forward pass ``out`` (:meth:`forward`)."""
        raise NotImplementedError(f"method family {self.family!r} implements neither loss nor training_loss")

    def training_loss(self, model: IncrementalSegmenter, criterion: nn.Module, batch: Batch) -> LossOutput:
        """The student's forward pass and the loss of one batch (called inside
        :class:`~incseg.learner.TrainingModule`, so that a DDP wrapper sees it): :meth:`loss` of
        :meth:`forward` by default."""
        return self.loss(criterion, self.forward(model, batch), batch)

    # ------------------------------------------------------------------ inference
    def predict_logits(
        self,
        model: IncrementalSegmenter,
        images: Tensor,
        *,
        teacher_forward: Callable[[Tensor], Mapping[str, Any] | None],
        strategy: str | None = None,
    ) -> Tensor:
        """The logits of ``model`` (at its output resolution) for evaluation; the learner calls it in evaluation
        mode under ``no_grad``. ``strategy`` is a test-time choice of the family (CAF's), ``teacher_forward``
        runs the frozen teacher if the strategy needs it.

        Raises:
            ValueError: ``strategy`` given to a family that has none.
        """
        if strategy is not None:
            raise ValueError(f"method family {self.family!r} has no test strategies, got strategy={strategy!r}")
        logits: Tensor = model.forward_features(images)["logits"]
        return logits

    def divergence_hints(self) -> dict[str, str]:
        """Likely fix per loss term name, shown when that term diverges."""
        return {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config.name!r})"
