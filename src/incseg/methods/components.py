"""Components: parts of a method that compose with any family (CAF's fusion module, attentive distillation,
replay, weight fusion).

A method is one *family* (:class:`~incseg.methods.Method`: the supervised loss, what it needs from the teacher)
plus any number of *components* named by :attr:`MethodConfig.components <incseg.methods.MethodConfig.components>`.
A component adds loss terms computed from the family's forward pass, a module between encoder and refiner, a
hook at the start or end of a step, or a data hook; :class:`ComposedMethod` runs the family and its components
behind the one :class:`~incseg.methods.Method` interface the learner consumes. Register your own with
:func:`register_component`; the design is in docs/architecture.md ("Composable methods").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, get_args

import torch
from torch import Tensor, nn

from incseg.losses import LossOutput
from incseg.losses.attentive import AttentiveDistillationLoss, new_class_loss, not_new_pixels, weighted_ad_term
from incseg.methods.base import Batch, LearnerView, Method, check_option_values
from incseg.methods.registry import get_component, get_family, register_component
from incseg.nn.caf import ContinualAttentiveFusion, FusionStrategy
from incseg.scenarios import IGNORE_INDEX

if TYPE_CHECKING:
    from incseg.methods.config import MethodConfig
    from incseg.models import IncrementalSegmenter
    from incseg.scenarios import Scenario

__all__ = [
    "AttentiveDistillationComponent",
    "Component",
    "ComposedCriterion",
    "ComposedMethod",
    "FusionComponent",
    "WeightFusionComponent",
    "build_method",
    "fuse_weights",
]

_STRATEGIES = get_args(FusionStrategy)


class Component:
    """Base class of a component: the hooks of :class:`~incseg.methods.Method` that compose.

    - :meth:`build_criterion`: a module of trained loss parameters or state (saved in checkpoints, trained in the
      ``"criterion"`` parameter group), or ``None``;
    - :meth:`has_fusion` / :meth:`new_fusion` / :meth:`predict_logits`: a module between encoder and refiner and
      its test-time strategies (at most one component of a method owns the fusion slot);
    - :meth:`prepare_model`, :meth:`on_begin_step`, :meth:`on_end_step`: as the family's hooks, run after them;
    - :meth:`loss_terms`: weighted loss terms from the family's forward pass (added to the family's loss);
    - :meth:`train_set` / :meth:`observe_train_set`: data hooks (replay): the training set of a step, and the
      step's own training set once the step is trained (:func:`~incseg.engine.train_scenario` calls both).

    Settings: the fields of :data:`~incseg.methods.config.CAF_FIELDS` the component reads (:attr:`fields`) and
    options of its own (:attr:`options`, plain scalars with their defaults), passed like any setting
    (``MethodConfig.preset("plop+caf", lambda_ad=100.0)``).

    Args:
        config: the method configuration (its ``components`` name this one).
        model: the student network.
        scenario: the scenario being learnt.
    """

    name: ClassVar[str] = ""
    """Registry key (what ``MethodConfig.components`` lists)."""
    options: ClassVar[Mapping[str, Any]] = {}
    """The component's own settings and their defaults."""
    fields: ClassVar[frozenset[str]] = frozenset()
    """The fields of :data:`~incseg.methods.config.CAF_FIELDS` the component reads."""
    fusion_group: ClassVar[str] = "fusion"
    """Optimizer group name of the fusion module, for a component that owns it."""

    def __init__(self, config: MethodConfig, model: IncrementalSegmenter, scenario: Scenario) -> None:
        self.config = config
        self.scenario = scenario

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        """Validate ``options`` (a subset of :attr:`options`) and fill in the defaults (see
        :meth:`Method.check_options <incseg.methods.Method.check_options>`)."""
        return check_option_values(options, cls.options, f"component {cls.name!r}")

    @classmethod
    def uses_teacher(cls, config: MethodConfig) -> bool:
        """Whether the component needs the teacher's forward pass at steps > 0 (default: yes)."""
        return True

    def build_criterion(self, model: IncrementalSegmenter) -> nn.Module | None:
        """The component's loss parameters and state (default: none)."""
        return None

    def has_fusion(self, step: int) -> bool:
        """Whether the model has this component's fusion module at ``step`` (default: never)."""
        return False

    def new_fusion(self, model: IncrementalSegmenter) -> nn.Module:
        """A new fusion module for ``model``."""
        raise NotImplementedError(f"component {self.name!r} has no fusion module")

    def prepare_model(self, model: IncrementalSegmenter, *, teacher: bool) -> None:
        """State of ``model`` its weights do not hold (after the teacher snapshot and after loading)."""

    def on_begin_step(self, learner: LearnerView, step: int) -> None:
        """Called after the family's :meth:`~incseg.methods.Method.on_begin_step`."""

    def on_end_step(self, learner: LearnerView) -> None:
        """Called after the family's :meth:`~incseg.methods.Method.on_end_step`."""

    def loss_terms(
        self, criterion: nn.Module | None, out: Mapping[str, Any], batch: Batch, task: Tensor
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Weighted loss terms (with their graph) and statistics to add to the family's loss.

        Args:
            criterion: what :meth:`build_criterion` returned.
            out: the family's forward pass of the batch (:meth:`~incseg.methods.Method.forward`).
            batch: the batch.
            task: the family's total loss of the batch, with its graph (for gradient balancing).
        """
        return {}, {}

    def train_set(self, step: int, dataset: Any) -> Any:
        """The training set of ``step`` given the step's own ``dataset`` (default: ``dataset``)."""
        return dataset

    def observe_train_set(self, step: int, dataset: Any) -> None:
        """Called with the step's own training set once the step is trained (default: nothing)."""

    def extra_train_images(self, step: int) -> int:
        """At most how many images :meth:`train_set` adds at ``step`` (for time estimates; default 0)."""
        return 0

    def predict_logits(
        self,
        model: IncrementalSegmenter,
        images: Tensor,
        *,
        teacher_forward: Callable[[Tensor], Mapping[str, Any] | None],
        strategy: str | None = None,
    ) -> Tensor:
        """Test-time logits, for the component that owns the fusion module."""
        raise NotImplementedError(f"component {self.name!r} has no test-time prediction")

    def divergence_hints(self) -> dict[str, str]:
        """Likely fix per loss term name, shown when that term diverges."""
        return {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class ComposedCriterion(nn.Module):
    """The criterion of a composed method: the family's (``family``) and one module per component that has one
    (``components``, by component name)."""

    def __init__(self, family: nn.Module, components: Mapping[str, nn.Module]) -> None:
        super().__init__()
        self.family = family
        self.components = nn.ModuleDict(dict(components))


class ComposedMethod(Method):
    """One family and its components behind the :class:`~incseg.methods.Method` interface (what
    :func:`build_method` returns for a configuration with ``components``).

    The family computes the student's forward pass (:meth:`~incseg.methods.Method.forward`) and its loss; every
    component adds its :meth:`~Component.loss_terms`; the terms add up to ``"total"``. Lifecycle hooks run the
    family's first, then the components' in order. The fusion module and test-time prediction belong to the
    family or to the one component that has a fusion module.

    Raises:
        ValueError: two parts own a fusion module.
    """

    def __init__(self, config: MethodConfig, model: IncrementalSegmenter, scenario: Scenario) -> None:
        super().__init__(config, model, scenario)
        self.base: Method = get_family(config.family)(config, model, scenario)
        self.parts: list[Component] = [get_component(name)(config, model, scenario) for name in config.components]
        owners = [p for p in self.parts if any(p.has_fusion(s) for s in range(scenario.num_steps))]
        if len(owners) + any(self.base.has_fusion(s) for s in range(scenario.num_steps)) > 1:
            raise ValueError(
                f"method {config.name!r}: more than one part has a fusion module (family {config.family!r}, "
                f"components {list(config.components)})"
            )
        self._fusion_owner: Component | None = owners[0] if owners else None
        self.family = self.base.family  # type: ignore[misc]
        self.fusion_group = self._fusion_owner.fusion_group if self._fusion_owner else self.base.fusion_group  # type: ignore[misc]

    # ------------------------------------------------------------------ structure
    def build_criterion(self, model: IncrementalSegmenter) -> nn.Module:
        parts = {p.name: p.build_criterion(model) for p in self.parts}
        return ComposedCriterion(self.base.build_criterion(model), {k: v for k, v in parts.items() if v is not None})

    def has_fusion(self, step: int) -> bool:
        owner = self._fusion_owner
        return owner.has_fusion(step) if owner is not None else self.base.has_fusion(step)

    def new_fusion(self, model: IncrementalSegmenter) -> nn.Module:
        owner = self._fusion_owner
        return owner.new_fusion(model) if owner is not None else self.base.new_fusion(model)

    def prepare_model(self, model: IncrementalSegmenter, *, teacher: bool) -> None:
        self.base.prepare_model(model, teacher=teacher)
        for part in self.parts:
            part.prepare_model(model, teacher=teacher)

    def param_group_factors(self, step: int) -> Mapping[str, tuple[float, float]]:
        return self.base.param_group_factors(step)

    # ------------------------------------------------------------------ lifecycle
    def on_begin_step(self, learner: LearnerView, step: int) -> None:
        self.base.on_begin_step(_FamilyView(learner), step)
        for part in self.parts:
            part.on_begin_step(learner, step)

    def on_end_step(self, learner: LearnerView) -> None:
        self.base.on_end_step(_FamilyView(learner))
        for part in self.parts:
            part.on_end_step(learner)

    def needs_calibration(self, learner: LearnerView) -> bool:
        return self.base.needs_calibration(_FamilyView(learner))

    def calibrate(self, learner: LearnerView, batches: Any) -> None:
        self.base.calibrate(_FamilyView(learner), batches)

    def needs_consolidation(self, learner: LearnerView) -> bool:
        return self.base.needs_consolidation(_FamilyView(learner))

    def consolidate(self, learner: LearnerView, batches: Any) -> None:
        self.base.consolidate(_FamilyView(learner), batches)

    def train_set(self, step: int, dataset: Any) -> Any:
        for part in self.parts:
            dataset = part.train_set(step, dataset)
        return dataset

    def observe_train_set(self, step: int, dataset: Any) -> None:
        for part in self.parts:
            part.observe_train_set(step, dataset)

    def extra_train_images(self, step: int) -> int:
        return sum(part.extra_train_images(step) for part in self.parts)

    # ------------------------------------------------------------------ training
    def teacher_forward(self, teacher: IncrementalSegmenter, images: Tensor) -> dict[str, Any]:
        return self.base.teacher_forward(teacher, images)

    def forward(self, model: IncrementalSegmenter, batch: Batch) -> dict[str, Any]:
        return self.base.forward(model, batch)

    def loss(self, criterion: nn.Module, out: Mapping[str, Any], batch: Batch) -> LossOutput:
        if not isinstance(criterion, ComposedCriterion):
            raise TypeError(f"a composed method needs its ComposedCriterion, got {type(criterion).__name__}")
        result = self.base.loss(criterion.family, out, batch)
        total, terms, stats = result.loss, dict(result.terms), dict(result.stats)
        terms.pop("total", None)
        for part in self.parts:
            extra = criterion.components[part.name] if part.name in criterion.components else None
            added, part_stats = part.loss_terms(extra, out, batch, result.loss)
            for name, value in added.items():
                if name in terms:
                    raise ValueError(f"component {part.name!r} adds a loss term {name!r} the method already has")
                total = total + value
                terms[name] = value.detach()
            stats.update(part_stats)
        terms["total"] = total.detach()
        return LossOutput(total, terms, stats)

    def training_loss(self, model: IncrementalSegmenter, criterion: nn.Module, batch: Batch) -> LossOutput:
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
        owner = self._fusion_owner
        if owner is not None:
            return owner.predict_logits(model, images, teacher_forward=teacher_forward, strategy=strategy)
        return self.base.predict_logits(model, images, teacher_forward=teacher_forward, strategy=strategy)

    def divergence_hints(self) -> dict[str, str]:
        hints = self.base.divergence_hints()
        for part in self.parts:
            hints.update(part.divergence_hints())
        return hints

    def __repr__(self) -> str:
        return f"ComposedMethod({self.config.name!r}: {self.base!r} + {self.parts!r})"


class _FamilyView:
    """The learner as the family of a composition sees it: its own criterion, not the composed one."""

    def __init__(self, learner: LearnerView) -> None:
        self._learner = learner

    @property
    def criterion(self) -> nn.Module:
        criterion = self._learner.criterion
        return criterion.family if isinstance(criterion, ComposedCriterion) else criterion

    def __getattr__(self, name: str) -> Any:
        return getattr(self._learner, name)


def build_method(config: MethodConfig, model: IncrementalSegmenter, scenario: Scenario) -> Method:
    """The :class:`~incseg.methods.Method` that runs ``config``: its family's plugin, or a
    :class:`ComposedMethod` when ``config.components`` is not empty."""
    if config.components:
        return ComposedMethod(config, model, scenario)
    return get_family(config.family)(config, model, scenario)


# ---------------------------------------------------------------------------------------------- CAF's blocks
def cafs_of(model: nn.Module) -> list[ContinualAttentiveFusion]:
    """The CAF modules of a segmenter's fusion: the fusion itself, or the values of its ``nn.ModuleDict``."""
    fusion = getattr(model, "fusion", None)
    modules = fusion.values() if isinstance(fusion, nn.ModuleDict) else [fusion]
    return [m for m in modules if isinstance(m, ContinualAttentiveFusion)]


@register_component
class FusionComponent(Component):
    """CAF's continual attentive fusion (eq. 1-4) between encoder and refiner from step 1 on, with its test-time
    strategies (``test_strategy``: ``"skip"``, ``"zero_pad"``, ``"concat"``), on any family.

    Reads ``caf_inner_channels``, ``test_strategy`` and ``fusion_dropout``. The CAF family has this module built
    in (``caf=True``); this component gives it to the others (``plop+caf``, ``dkd+caf``).
    """

    name = "caf-fusion"
    fields = frozenset({"caf_inner_channels", "test_strategy", "fusion_dropout"})
    fusion_group = "caf"

    def has_fusion(self, step: int) -> bool:
        return step >= 1

    def new_fusion(self, model: IncrementalSegmenter) -> nn.Module:
        """One :class:`~incseg.nn.ContinualAttentiveFusion` on ``z_channels`` (one per level of ``caf_levels``
        for a multi-scale encoder)."""
        channels = model.caf_channels
        if isinstance(channels, int):
            return self._new_caf(channels)
        return nn.ModuleDict({level: self._new_caf(c) for level, c in channels.items()})

    def _new_caf(self, channels: int) -> ContinualAttentiveFusion:
        return ContinualAttentiveFusion(
            channels,
            inner_channels=self.config.caf_inner_channels,
            test_strategy=self.config.test_strategy,
            fusion_dropout=self.config.fusion_dropout,
        )

    def prepare_model(self, model: IncrementalSegmenter, *, teacher: bool) -> None:
        """The test strategy of the model's CAF modules: ``skip`` for the teacher (no older features exist),
        the configured ``test_strategy`` for the student."""
        for caf in cafs_of(model):
            caf.test_strategy = "skip" if teacher else self.config.test_strategy

    def predict_logits(
        self,
        model: IncrementalSegmenter,
        images: Tensor,
        *,
        teacher_forward: Callable[[Tensor], Mapping[str, Any] | None],
        strategy: str | None = None,
    ) -> Tensor:
        """``strategy`` (default: the module's ``test_strategy``): see :func:`predict_with_fusion`."""
        return predict_with_fusion(model, images, teacher_forward=teacher_forward, strategy=strategy)


def predict_with_fusion(
    model: IncrementalSegmenter,
    images: Tensor,
    *,
    teacher_forward: Callable[[Tensor], Mapping[str, Any] | None],
    strategy: str | None = None,
) -> Tensor:
    """The logits of ``model`` with CAF modules at test time: ``strategy`` (default: the modules'
    ``test_strategy``) decides what stands in for the old features (paper Sec. IV, Fig. 5): ``"skip"`` uses the
    new projection only (the teacher is not run), ``"zero_pad"`` fuses it with zeros, ``"concat"`` fuses it with
    the teacher's features (runs the teacher).

    Raises:
        ValueError: unknown ``strategy``; ``"concat"`` without a teacher.
    """
    if strategy is not None and strategy not in _STRATEGIES:
        raise ValueError(f"strategy must be None or one of {list(_STRATEGIES)}, got {strategy!r}")
    cafs = cafs_of(model)
    z_old = None
    saved = [caf.test_strategy for caf in cafs]
    try:
        if cafs:
            effective = strategy if strategy is not None else cafs[0].test_strategy
            if effective == "concat":
                teacher_out = teacher_forward(images)
                if teacher_out is None:
                    raise ValueError('strategy "concat" needs the teacher (old model), but there is none')
                z_old = teacher_out["z"]
            for caf in cafs:
                caf.test_strategy = effective  # type: ignore[assignment]
        logits: Tensor = model.forward_features(images, z_old)["logits"]
        return logits
    finally:
        for caf, value in zip(cafs, saved):
            caf.test_strategy = value


@register_component
class AttentiveDistillationComponent(Component):
    """CAF's attentive feature distillation ``λ_AD L_AD`` (eq. 5-8) on the encoder features ``z̄`` and the refined
    features ``h``, on any family: loss term ``"ad"``.

    Reads ``ad`` (the attention, ``"both"`` by default), ``lambda_ad``, ``ad_balance``, ``ad_balance_on`` and
    ``ad_balance_every`` (the gradient balance: on the weights against the new-class pixels' cross-entropy,
    :func:`~incseg.losses.attentive.weight_balanced_ad_weight`, or on the features against the family's loss,
    :func:`~incseg.losses.attentive.balanced_ad_weights`), ``ad_on_new`` and ``ad_maps``, with the defaults of
    the ``caf`` recipe; the SE blocks of the channel attention and the balance's state live in its criterion.
    """

    name = "attentive-distillation"
    fields = frozenset({"ad", "lambda_ad", "ad_balance", "ad_balance_on", "ad_balance_every", "ad_on_new", "ad_maps"})

    def __init__(self, config: MethodConfig, model: IncrementalSegmenter, scenario: Scenario) -> None:
        super().__init__(config, model, scenario)
        if config.ad is None:
            raise ValueError("the attentive-distillation component needs ad set (e.g. 'both'), got None")

    def build_criterion(self, model: IncrementalSegmenter) -> AttentiveDistillationLoss:
        assert self.config.ad is not None
        criterion = AttentiveDistillationLoss(
            model.caf_channels, model.h_channels, attention=self.config.ad, maps=self.config.ad_maps
        )
        criterion.balance.every = self.config.ad_balance_every
        return criterion

    def loss_terms(
        self, criterion: nn.Module | None, out: Mapping[str, Any], batch: Batch, task: Tensor
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        n_old = batch.num_old_classes
        if n_old == 0:
            return {}, {}
        assert isinstance(criterion, AttentiveDistillationLoss)
        teacher_out = batch.teacher_out
        missing = [k for k in ("z_bar", "h") if teacher_out is None or k not in teacher_out]
        if missing:
            raise ValueError(f"attentive distillation needs the teacher's {missing} (teacher_out of forward_features)")
        assert teacher_out is not None
        cfg = self.config
        keep = None if cfg.ad_on_new else not_new_pixels(batch.labels, n_old, IGNORE_INDEX)
        z, h = out["z_bar"], out["h"]
        loss_z, loss_h = criterion.terms(z, teacher_out["z_bar"], h, teacher_out["h"], keep=keep)
        term, stats = weighted_ad_term(
            task,
            (z, h),
            (loss_z, loss_h),
            lambda_ad=cfg.lambda_ad,
            kappa=cfg.ad_balance,
            maps=criterion.maps,
            balance_on=cfg.ad_balance_on,
            reference=lambda: new_class_loss(out["logits"], batch.labels, n_old, IGNORE_INDEX),
            balance=criterion.balance,
            num_old_classes=n_old,
        )
        return {"ad": term}, stats

    def divergence_hints(self) -> dict[str, str]:
        return {"ad": f"lower lambda_ad (now {self.config.lambda_ad:g}) or the learning rate"}


@register_component
class WeightFusionComponent(Component):
    """Endpoints weight fusion (EWF, Xiao et al., CVPR 2023), on any family: at the end of every step ``t > 0``
    each weight and buffer the old model had becomes ``(1 - w) · old + w · new`` (:func:`fuse_weights`; the new
    classes' classifier rows keep their trained values).

    Options, with the release's defaults (``run.py`` of schuy1er/EWF_official, lines 512-534, and its scripts'
    ``--fix_pre_cls``):

    - ``ewf_schedule`` (True): ``w = sqrt(|C_t| / (|C_t| + |S_{t-1}|))``, the new classes' share of the classes
      seen (background included); False: ``w = 1 - ewf_alpha``;
    - ``ewf_alpha`` (0.5): the old model's share when ``ewf_schedule`` is False;
    - ``ewf_freeze_old_heads`` (True): the classifier heads of earlier steps do not train at steps > 0.
    """

    name = "ewf"
    options: ClassVar[Mapping[str, Any]] = {"ewf_schedule": True, "ewf_alpha": 0.5, "ewf_freeze_old_heads": True}

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        out = super().check_options(options)
        if not 0.0 <= out["ewf_alpha"] <= 1.0:
            raise ValueError(f"ewf_alpha must be in [0, 1], got {out['ewf_alpha']}")
        return out

    @classmethod
    def uses_teacher(cls, config: MethodConfig) -> bool:
        return False  # it uses the old weights at end_step, not the teacher's forward pass

    def old_share(self, step: int) -> float:
        """The old model's share ``1 - w`` at the end of ``step`` (> 0)."""
        opts = self.config.options
        if not opts["ewf_schedule"]:
            return float(opts["ewf_alpha"])
        n_new = len(self.scenario.classes_at(step))
        n_old = self.scenario.num_old_classes(step)
        return 1.0 - math.sqrt(n_new / (n_new + n_old))

    def on_begin_step(self, learner: LearnerView, step: int) -> None:
        self.prepare_model(learner.model, teacher=False)

    def prepare_model(self, model: IncrementalSegmenter, *, teacher: bool) -> None:
        if teacher or not self.config.options["ewf_freeze_old_heads"]:
            return
        classifier = model.classifier
        for i in range(classifier.num_steps - 1):  # the heads of earlier steps
            classifier.head(i).requires_grad_(False)

    def on_end_step(self, learner: LearnerView) -> None:
        teacher = learner.teacher
        if teacher is None:
            return
        fuse_weights(learner.model, teacher, self.old_share(learner.step))


@torch.no_grad()
def fuse_weights(model: nn.Module, old: nn.Module, alpha: float) -> int:
    """In place: every floating-point parameter and buffer of ``model`` that ``old`` has under the same name
    becomes ``alpha · old + (1 - alpha) · new``; for a classifier that grew, the rows ``old`` had are fused and
    the new rows keep their values. Integer buffers (batch-norm counters) keep ``model``'s.

    Args:
        model: the model just trained.
        old: the model of the previous step.
        alpha: the share of ``old``, in ``[0, 1]``.

    Returns:
        The number of tensors fused.

    Raises:
        ValueError: ``alpha`` outside ``[0, 1]``, or a shared tensor whose shape differs other than by grown rows.

    Example:
        >>> new, old = nn.Linear(2, 3), nn.Linear(2, 2)
        >>> with torch.no_grad():
        ...     _ = new.weight.fill_(1.0), new.bias.fill_(1.0), old.weight.fill_(0.0), old.bias.fill_(0.0)
        >>> fuse_weights(new, old, 0.25)
        2
        >>> new.bias.tolist()
        [0.75, 0.75, 1.0]
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
    old_state = old.state_dict()
    fused = 0
    for name, value in _named_tensors(model):
        prior = old_state.get(name)
        if prior is None or not value.is_floating_point():
            continue
        if prior.shape != value.shape:
            if prior.dim() != value.dim() or prior.shape[1:] != value.shape[1:] or prior.shape[0] > value.shape[0]:
                raise ValueError(f"{name}: old shape {tuple(prior.shape)} cannot be fused into {tuple(value.shape)}")
            target = value[: prior.shape[0]]
        else:
            target = value
        target.mul_(1.0 - alpha).add_(prior.to(target), alpha=alpha)
        fused += 1
    return fused


def _named_tensors(model: nn.Module) -> Iterable[tuple[str, Tensor]]:
    yield from model.named_parameters()
    yield from model.named_buffers()
