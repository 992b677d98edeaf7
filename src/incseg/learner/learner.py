"""The incremental learner: step lifecycle, frozen teacher, training module, parameter groups, checkpoints."""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from incseg._checks import NonFiniteError, check_feature_map
from incseg._wrappers import unwrap_module
from incseg.learner._devices import device_of, images_for
from incseg.learner._freeze import freeze
from incseg.learner._groups import parameter_groups
from incseg.learner._steps import check_classifier, check_next_step
from incseg.learner.checkpoint import (
    learner_state,
    load_learner_state,
    method_from,
    read_checkpoint,
    save_learner,
    scenario_from,
)
from incseg.learner.guard import DivergenceGuard
from incseg.learner.module import TrainingModule
from incseg.losses import LossOutput
from incseg.methods import Method, MethodConfig, build_method
from incseg.models import IncrementalSegmenter
from incseg.scenarios import Scenario

__all__ = ["IncrementalLearner", "unwrap_module"]


class IncrementalLearner:
    """Class-incremental learning of a segmenter over the steps of a scenario, with any method of the paper.

    The learner is not a trainer: it owns no loop, optimizer or DDP wrapper, so it fits a plain PyTorch loop,
    Lightning or Accelerate. It keeps the state that incremental learning adds to ordinary training:

    - the step lifecycle (:meth:`begin_step`, :meth:`end_step`): at each step ``t > 0`` the current model is
      snapshot as the frozen teacher (the model of step ``t-1`` in Fig. 2), the classifier grows by
      ``|U_t|`` outputs (MiB or random initialisation) and, when the method has a fusion module (CAF's, eq.
      1-4), it is inserted between encoder and refiner;
    - the *training module* :attr:`module`, holding the student :attr:`model` and the method's
      :attr:`criterion`: ``module(images, labels, teacher_out)`` returns the loss. It is what you wrap in
      ``DistributedDataParallel``; the teacher is never part of it;
    - :meth:`training_step`: teacher forward pass under ``no_grad`` and the training module;
    - :meth:`param_groups`: every trained parameter once (backbone, classifier head, fusion module, the
      criterion's; the paper's public release forgot the CAF parameters, PROTOCOL.md);
    - :meth:`predict`, with the method's test strategies (CAF's ``skip``, ``zero_pad``, ``concat``);
    - checkpoints (:meth:`save`, :meth:`load`, :meth:`from_checkpoint`) as plain dictionaries of tensors
      loadable with ``torch.load(weights_only=True)``, written atomically, validated before any change.

    Everything method-specific is a hook of the :class:`~incseg.methods.Method` named by ``config.family``.

    Args:
        model: the :class:`~incseg.models.IncrementalSegmenter` (its classifier with the
            ``scenario.num_classes_at(0)`` outputs of step 0, no fusion module). A DDP/``torch.compile``
            wrapper is unwrapped.
        scenario: the :class:`~incseg.scenarios.Scenario` to learn.
        method: a preset name of :data:`~incseg.learner.METHODS` (``"ft"``, ``"lwf"``, ``"mib"``, ``"caf"``,
            ``"joint"``, ablations) or a :class:`~incseg.learner.MethodConfig`.
        **overrides: fields of :class:`~incseg.learner.MethodConfig` to change, e.g. ``lambda_ad=100.0``.

    Attributes:
        guard: the :class:`~incseg.learner.DivergenceGuard` run by :meth:`training_step` (set thresholds on it;
            ``None`` turns it off). The other attributes are the properties below.

    Raises:
        TypeError: ``model`` is not an ``IncrementalSegmenter`` or ``scenario`` not a ``Scenario``.
        ValueError: unknown method or invalid override (the message lists the valid ones).

    Example:
        >>> import torch
        >>> from incseg.models import small_segmenter
        >>> from incseg.scenarios import Scenario
        >>> scenario = Scenario([[1, 2], [3]])
        >>> learner = IncrementalLearner(small_segmenter(3, width=8), scenario, "caf")
        >>> images, labels = torch.randn(2, 3, 32, 32), torch.randint(0, 4, (2, 32, 32))
        >>> for step in range(scenario.num_steps):
        ...     learner.begin_step(step)
        ...     optimizer = torch.optim.SGD(learner.param_groups(0.01), lr=0.01)
        ...     out = learner.training_step(images, labels.clamp(max=scenario.num_classes_at(step) - 1))
        ...     optimizer.zero_grad(); out.loss.backward(); optimizer.step()
        ...     learner.end_step()
        >>> learner.predict(images).shape
        torch.Size([2, 4, 32, 32])
    """

    def __init__(
        self, model: IncrementalSegmenter, scenario: Scenario, method: str | MethodConfig = "caf", **overrides: Any
    ) -> None:
        unwrapped = unwrap_module(model)
        if not isinstance(unwrapped, IncrementalSegmenter):
            raise TypeError(
                "model must be an incseg.models.IncrementalSegmenter (convert a network with incseg.models.adapt or "
                f"incseg.models.from_named_submodules), got {type(model).__name__}"
            )
        if not isinstance(scenario, Scenario):
            raise TypeError(f"scenario must be an incseg.scenarios.Scenario, got {type(scenario).__name__}")
        if isinstance(method, MethodConfig):
            config = method.replace(**overrides) if overrides else method
        elif isinstance(method, str):
            config = MethodConfig.preset(method, **overrides)
        else:
            raise TypeError(f"method must be a method name or a MethodConfig, got {type(method).__name__}")
        self._method: Method = build_method(config, unwrapped, scenario)
        criterion = self._method.build_criterion(unwrapped)
        found = device_of(unwrapped)
        if found is not None:  # the SE blocks of the attentive distillation run on the model's features
            criterion.to(device=found[0], dtype=found[1] if found[1].is_floating_point else None)
        criterion.requires_grad_(False)  # the SE blocks only train once there is a teacher (step > 0)
        self._scenario = scenario
        self._config = config
        self._module = TrainingModule(
            unwrapped, criterion, self._method, num_old_classes=0, bn=config.bn, dropout=config.dropout
        )
        self._teacher: IncrementalSegmenter | None = None
        self._step = -1
        self._step_finished = False
        self.guard: DivergenceGuard | None = DivergenceGuard()

    # ------------------------------------------------------------------ properties
    @property
    def step(self) -> int:
        """The current step (``-1`` before the first :meth:`begin_step`)."""
        return self._step

    @property
    def step_finished(self) -> bool:
        """Whether :meth:`end_step` was called for the current step."""
        return self._step_finished

    @property
    def scenario(self) -> Scenario:
        """The scenario being learnt."""
        return self._scenario

    @property
    def config(self) -> MethodConfig:
        """The method configuration."""
        return self._config

    @property
    def model(self) -> IncrementalSegmenter:
        """The student network (the one being trained; never a DDP wrapper)."""
        return self._module.model

    @property
    def teacher(self) -> IncrementalSegmenter | None:
        """The frozen model of the previous step (evaluation mode, no gradients), ``None`` at step 0."""
        return self._teacher

    @property
    def method(self) -> Method:
        """The :class:`~incseg.methods.Method` plugin implementing :attr:`config`."""
        return self._method

    @property
    def criterion(self) -> nn.Module:
        """The loss module of the method (for the CAF family the :class:`~incseg.losses.CAFLoss` of eq. 13,
        built for the model's ``z``/``h`` channels)."""
        return self._module.criterion

    @property
    def module(self) -> TrainingModule:
        """The training module (model + criterion): wrap this one in DDP, rebuild the wrapper every step."""
        return self._module

    @property
    def num_old_classes(self) -> int:
        """``|S_{t-1}|`` at the current step (0 at step 0 and before it)."""
        return self._module.num_old_classes

    def __repr__(self) -> str:
        model, cfg = self.model, self._config
        return (
            f"IncrementalLearner(method={cfg.name!r}, scenario={self._scenario!r}, step={self._step}, finished="
            f"{self._step_finished}, num_classes={model.num_classes}, fusion={model.fusion is not None})"
        )

    def begin_step(self, step: int, *, data: Iterable[Any] | None = None) -> None:
        """Start learning step ``step``; steps go in order ``0, 1, ...`` (or resume with :meth:`load`).

        At step 0 the model's classifier must already have the ``scenario.num_classes_at(0)`` outputs of the
        first step. At a step ``t > 0``: the teacher becomes a frozen copy of the current model (evaluation
        mode kept across ``.train()``, no gradients, prepared by the method's
        :meth:`~incseg.methods.Method.prepare_model`), the classifier grows by ``len(scenario.classes_at(t))``
        outputs with the configured initialisation, and the method's fusion module is inserted (on the model's
        device) at the first step where :meth:`~incseg.methods.Method.has_fusion` holds; for ``caf``: a
        :class:`~incseg.nn.ContinualAttentiveFusion` at step 1. The criterion's parameters start training at
        step 1.

        The set of trained parameters changes: rebuild the optimizer from :meth:`param_groups` (and any DDP
        wrapper of :attr:`module`) after this call.

        Args:
            step: the step to begin, ``learner.step + 1``.
            data: the step's training batches ``(images, labels, ...)``, e.g. a ``DataLoader``: the method
                calibrates on them when it needs to (:attr:`needs_calibration`, PLOP's pseudo-label thresholds),
                else they are not read. Without it, call :meth:`calibrate` before training such a method.

        Raises:
            TypeError: ``step`` is not an int.
            ValueError: ``step`` out of the scenario's range or out of order; at step 0 a classifier whose
                size is not ``scenario.num_classes_at(0)`` or a model that already has a fusion module.
            RuntimeError: the previous step was not ended with :meth:`end_step`, or the model's classifier
                no longer matches the scenario (changed outside the learner).
        """
        check_next_step(step, self._step, self._step_finished, self._scenario.num_steps)
        model = self.model
        check_classifier(model, self._scenario, step)
        if step > 0:
            teacher = freeze(copy.deepcopy(model))
            self._method.prepare_model(teacher, teacher=True)
            model.classifier.add_classes(len(self._scenario.classes_at(step)), init=self._config.init)
            if self._method.has_fusion(step) and model.fusion is None:
                model.fusion = self._new_fusion(model)
            self._teacher = teacher
        self._step = step
        self._step_finished = False
        self._module.num_old_classes = self._scenario.num_old_classes(step)
        self._module.train(self._module.training)  # apply the bn / dropout policy of steps > 0
        self.criterion.requires_grad_(step > 0)
        if self.guard is not None:
            self.guard.reset()  # the loss terms of a new step start from new values
        self._method.on_begin_step(self, step)
        if data is not None and self.needs_calibration:
            self.calibrate(data)

    def end_step(self, *, data: Iterable[Any] | None = None) -> None:
        """Mark the current step as finished (saved in checkpoints; :meth:`begin_step` of the next needs it).

        Args:
            data: the step's training batches ``(images, labels, ...)``, e.g. a ``DataLoader``: the method
                consolidates on them when it needs to (:attr:`needs_consolidation`, STAR's class prototypes),
                else they are not read. Without it, call :meth:`consolidate` before ending such a method's step.

        Raises:
            RuntimeError: no step in progress, or the method needs consolidation and got no data.
        """
        if self._step < 0 or self._step_finished:
            raise RuntimeError("end_step() needs a step in progress: call begin_step() first")
        if self.needs_consolidation:
            if data is None:
                raise RuntimeError(
                    f"method {self._config.name!r} needs a pass over the step's training data after training: "
                    "pass the step's training batches to learner.end_step(data=loader) (or call "
                    "learner.consolidate(batches) before end_step())"
                )
            self.consolidate(data)
        self._method.on_end_step(self)
        self._step_finished = True

    def _new_fusion(self, model: IncrementalSegmenter) -> nn.Module:
        fusion = self._method.new_fusion(model)
        found = device_of(model)
        if found is not None:
            fusion.to(device=found[0], dtype=found[1])
        if any(isinstance(m, nn.SyncBatchNorm) for m in model.modules()):
            fusion = nn.SyncBatchNorm.convert_sync_batchnorm(fusion)
        return fusion

    # ------------------------------------------------------------------ training
    @property
    def needs_calibration(self) -> bool:
        """Whether the method wants :meth:`calibrate` on the current step's training data before training
        (PLOP's pseudo-label thresholds at steps > 0; never for the CAF family)."""
        return self._step >= 0 and self._method.needs_calibration(self)

    def calibrate(self, batches: Iterable[Any]) -> None:
        """Let the method look at the current step's training data before training (a no-op for methods
        without :attr:`needs_calibration`).

        Args:
            batches: ``(images, labels, ...)`` batches of the step's training set, e.g. a ``DataLoader``
                (only the first two entries of each are used; they are moved to the model's device).

        Raises:
            RuntimeError: no step begun yet.
        """
        if self._step < 0:
            raise RuntimeError("call begin_step() before calibrate()")
        found = device_of(self.model)
        device = found[0] if found is not None else None
        self._method.calibrate(self, ((batch[0].to(device), batch[1].to(device)) for batch in batches))

    @property
    def needs_consolidation(self) -> bool:
        """Whether the method wants :meth:`consolidate` on the current step's training data after training
        (STAR's class prototypes; never for the CAF and PLOP families)."""
        return self._step >= 0 and not self._step_finished and self._method.needs_consolidation(self)

    def consolidate(self, batches: Iterable[Any]) -> None:
        """Let the method look at the current step's training data after training (a no-op for methods
        without :attr:`needs_consolidation`); :meth:`end_step` calls it when given ``data``.

        Args:
            batches: ``(images, labels, ...)`` batches of the step's training set, e.g. a ``DataLoader``
                (only the first two entries of each are used; they are moved to the model's device).

        Raises:
            RuntimeError: no step in progress.
        """
        if self._step < 0 or self._step_finished:
            raise RuntimeError("call begin_step() before consolidate() (and consolidate before end_step())")
        found = device_of(self.model)
        device = found[0] if found is not None else None
        self._method.consolidate(self, ((batch[0].to(device), batch[1].to(device)) for batch in batches))

    def teacher_forward(self, images: Tensor) -> dict[str, Tensor] | None:
        """What the method needs from the frozen teacher for ``images`` ``(B, C, H, W)``, under ``no_grad``
        (:meth:`~incseg.methods.Method.teacher_forward`; by default its ``forward_features``: ``{"z", "z_bar",
        "h", "logits"}``), or ``None`` at step 0. The teacher stays in evaluation mode; it is moved to the device
        of ``images`` on first use if the student was moved after :meth:`begin_step`."""
        teacher = self._teacher
        if teacher is None:
            return None
        found = device_of(teacher)
        if found is not None and isinstance(images, Tensor) and found[0] != images.device:
            teacher.to(images.device)
        with torch.no_grad():
            return self._method.teacher_forward(teacher, images)

    def training_step(
        self, images: Tensor, labels: Tensor, *, module: nn.Module | None = None, guard: bool = True
    ) -> LossOutput:
        """Loss of one batch: teacher forward (no grad), then the training module (student and criterion).

        With ``guard`` (default) :attr:`guard` checks the loss terms and the weights with one host
        synchronisation (see :class:`~incseg.learner.DivergenceGuard`).

        Args:
            images: input images ``(B, C, H, W)``.
            labels: labels ``(B, H, W)`` int64 in incremental indices of the current step (``255`` ignored).
            module: the training module to call, e.g. its ``DistributedDataParallel`` or ``torch.compile``
                wrapper (default :attr:`module`).
            guard: run :attr:`guard` (if set); ``False`` saves its host synchronisation.

        Returns:
            :class:`~incseg.losses.LossOutput`: ``loss`` to back-propagate and detached ``terms`` for logs.

        Raises:
            RuntimeError: no step begun yet.
            ValueError: ``module`` does not wrap :attr:`module`; bad shapes or labels; images or weights on the
                meta device, or images on another device than the model (another floating dtype is converted).
            DivergenceError: a loss term or the weights are non-finite, or a term exploded (``guard``).
        """
        if self._step < 0:
            raise RuntimeError("call begin_step(0) before training_step()")
        if module is None:
            module = self._module
        elif unwrap_module(module) is not self._module:
            raise ValueError(
                "module must be learner.module or a wrapper of it (DistributedDataParallel, torch.compile), "
                f"got a {type(module).__name__} around another module"
            )
        check_feature_map(images, "images")
        others = [self.criterion] + ([self._teacher] if self._teacher is not None else [])
        images = images_for(self.model, images, *others)
        uses_teacher = self._teacher is not None and self._config.uses_teacher
        teacher_out = self.teacher_forward(images) if uses_teacher else None
        try:
            out: LossOutput = module(images, labels, teacher_out)
        except NonFiniteError:  # non-finite logits (value checks): say whether the weights are the cause
            if guard and self.guard is not None:
                self.guard.check(
                    {"loss": torch.full((), math.nan)},
                    tensors=self.guarded_tensors(),
                    where=f"step {self._step}",
                    hints=self.divergence_hints(),
                    inputs={"images": images},
                )
            raise
        if guard and self.guard is not None:
            terms = {"loss": out.loss, **{k: v for k, v in out.terms.items() if k != "total"}}
            self.guard.check(
                terms,
                tensors=self.guarded_tensors(),
                where=f"step {self._step}",
                hints=self.divergence_hints(),
                inputs={"images": images},
            )
        return out

    def guarded_tensors(self) -> list[Tensor]:
        """What the divergence guard checks after each optimizer step: trained parameters, floating buffers."""
        params = [p for p in self._module.parameters() if p.requires_grad]
        return params + [b for b in self._module.buffers() if b.is_floating_point()]

    def divergence_hints(self) -> dict[str, str]:
        """Likely fix of a diverging loss term, by term name (used in :class:`~incseg.learner.DivergenceError`)."""
        docs = "see 'Divergence' in docs/protocol.md"
        return {
            **self._method.divergence_hints(),
            "*": f"lower the learning rate, check the inputs and labels, or train without fp16; {docs}",
        }

    def param_groups(
        self, lr: float, *, weight_decay: float = 1e-4, head_lr: float | None = None
    ) -> list[dict[str, Any]]:
        """Optimizer parameter groups holding every trainable parameter of :attr:`module` exactly once.

        Groups (empty ones left out): ``"backbone"`` (encoder and refiner), ``"head"`` (classifier, learning
        rate ``head_lr``), the fusion module under the method's :attr:`~incseg.methods.Method.fusion_group`
        (``"caf"`` for CAF's: all its parameters are trained, PROTOCOL.md) and ``"criterion"`` (e.g. the SE
        blocks of attentive distillation, eq. 5, from step 1 on). Parameters with
        ``requires_grad=False`` are left out. A method may give parts of the model groups of their own with scaled
        rates and weight decay (:meth:`~incseg.methods.Method.param_group_factors`: the release ratios of ``star``
        and ``dkd``). Call it after every :meth:`begin_step`.

        Args:
            lr: learning rate of all groups but the head.
            weight_decay: weight decay of all groups.
            head_lr: learning rate of the classifier (default ``lr``).

        Returns:
            A list of dicts ``{"name", "params", "lr", "weight_decay"}`` for any ``torch.optim`` optimizer.

        Raises:
            TypeError, ValueError: a non-positive or non-finite learning rate, negative weight decay.

        Example:
            >>> from incseg.models import small_segmenter
            >>> from incseg.scenarios import Scenario
            >>> learner = IncrementalLearner(small_segmenter(3, width=8), Scenario([[1, 2], [3]]))
            >>> [g["name"] for g in learner.param_groups(0.01)]
            ['backbone', 'head']
        """
        return parameter_groups(self._module, self._method, max(self._step, 0), lr, weight_decay, head_lr)

    # ------------------------------------------------------------------ inference
    def predict(self, images: Tensor, *, strategy: str | None = None) -> Tensor:
        """Logits of the current model at image resolution (evaluation mode, no gradients).

        Every submodule's train/eval mode is restored afterwards. ``strategy`` is a test-time choice of the
        method family (:meth:`~incseg.methods.Method.predict_logits`): for CAF (``None``: ``test_strategy``)
        ``"skip"``, ``"zero_pad"`` or ``"concat"`` (paper Sec. IV, Fig. 5; ``concat`` runs the teacher).

        Args:
            images: input images ``(B, C, H, W)``.
            strategy: ``None`` or a test strategy of the method family.

        Returns:
            float32 logits ``(B, K, H, W)``, bilinearly upsampled (``align_corners=False``) to the image size
            (images of another floating dtype are converted to the model's).

        Raises:
            ValueError: unknown ``strategy``; ``"concat"`` without a teacher; bad image shapes; images or weights
                on the meta device, or images on another device than the model.
            TypeError: ``images`` is not a floating tensor.
        """
        check_feature_map(images, "images")
        model = self.model
        images = images_for(model, images, *([self._teacher] if self._teacher is not None else []))
        modes = [(m, m.training) for m in model.modules()]
        try:
            model.eval()
            with torch.no_grad():
                logits = self._method.predict_logits(
                    model, images, teacher_forward=self.teacher_forward, strategy=strategy
                )
                with torch.autocast(device_type=logits.device.type, enabled=False):
                    return F.interpolate(logits.float(), size=images.shape[-2:], mode="bilinear", align_corners=False)
        finally:
            for m, training in modes:
                m.training = training

    def to(self, *args: Any, **kwargs: Any) -> IncrementalLearner:
        """Move the training module (model, criterion) and the teacher, as ``nn.Module.to``; returns ``self``."""
        self._module.to(*args, **kwargs)
        if self._teacher is not None:
            self._teacher.to(*args, **kwargs)
        return self

    # ------------------------------------------------------------------ checkpoints
    # The code is in incseg.learner.checkpoint (learner_state, save_learner, load_learner_state).
    def state_dict(
        self, *, optimizer: torch.optim.Optimizer | None = None, extra: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """The learner's complete state as a plain dictionary (what :meth:`save` writes): the scenario, the
        method's configuration, the step, the structure and the state dicts of model, teacher, criterion and
        ``optimizer``, and ``extra``. Only tensors and plain python values: loadable with
        ``torch.load(weights_only=True)`` and storable inside, e.g., a Lightning checkpoint.

        Args:
            optimizer: an optimizer whose state to include.
            extra: user data of plain types (epoch, RNG states as tensors, scheduler state, ...).

        Raises:
            RuntimeError: no step begun yet.
            TypeError: ``extra`` is not plain data, or ``optimizer`` is not a ``torch.optim.Optimizer``.
        """
        return learner_state(self, optimizer=optimizer, extra=extra)

    def save(
        self,
        path: str | os.PathLike[str],
        *,
        optimizer: torch.optim.Optimizer | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        """Write :meth:`state_dict` atomically (temporary file in the same folder, fsync, ``os.replace``), with a
        checksum of its content that :meth:`load` verifies. On any error no partial file is left and an existing
        ``path`` is untouched.

        Args:
            path: destination file (its folder must exist).
            optimizer: include this optimizer's state (to resume in the middle of a step).
            extra: user data of plain types, returned by :meth:`load`.

        Raises:
            RuntimeError, TypeError: as :meth:`state_dict`.
            NonFiniteError: NaN/Inf weights (a diverged run is not saved over a good checkpoint).
            FileNotFoundError: the folder of ``path`` does not exist.
        """
        save_learner(self, path, optimizer=optimizer, extra=extra)

    def load(
        self,
        path: str | os.PathLike[str],
        *,
        optimizer: torch.optim.Optimizer | None = None,
        map_location: Any = "cpu",
    ) -> dict[str, Any]:
        """Restore a checkpoint written by :meth:`save` (same scenario, method and network).

        The structure is rebuilt to the saved step (classifier heads, fusion module, teacher), then the weights,
        the step and its finished flag are restored; everything is validated on copies first, so on any error
        the learner (and ``optimizer``) are left as they were. An ``optimizer`` must have been built from
        :meth:`param_groups` on the saved structure (load once without it first, see :meth:`from_checkpoint`).

        Args:
            path: the checkpoint file.
            optimizer: an optimizer to restore (the checkpoint must hold optimizer state).
            map_location: passed to ``torch.load`` (tensors are copied into the model's own device anyway).

        Returns:
            The ``extra`` dictionary given to :meth:`save`.

        Raises:
            FileNotFoundError: no such file.
            CheckpointError: a corrupt or damaged file (checksum), pickled objects, another format version,
                NaN/Inf weights or weights of another dtype (never cast silently), another scenario, method or
                network (mismatched keys or shapes), or an optimizer that does not match.

        Example:
            >>> import tempfile, torch
            >>> from incseg.models import small_segmenter
            >>> from incseg.scenarios import Scenario
            >>> learner = IncrementalLearner(small_segmenter(3, width=8), Scenario([[1, 2], [3]]), "mib")
            >>> learner.begin_step(0); learner.end_step(); learner.begin_step(1)
            >>> path = tempfile.mkdtemp() + "/ckpt.pt"
            >>> learner.save(path, extra={"epoch": 3})
            >>> fresh = IncrementalLearner(small_segmenter(3, width=8), Scenario([[1, 2], [3]]), "mib")
            >>> fresh.load(path), fresh.step, fresh.model.num_classes
            ({'epoch': 3}, 1, 4)
        """
        return self.load_state_dict(read_checkpoint(path, map_location=map_location), optimizer=optimizer)

    @classmethod
    def from_checkpoint(
        cls, path: str | os.PathLike[str], model: IncrementalSegmenter, *, map_location: Any = "cpu"
    ) -> IncrementalLearner:
        """Build a learner from a checkpoint: its scenario and method, ``model``'s architecture, saved weights
        (``model``: a fresh network of the same architecture built for step 0). Then build the optimizer from
        :meth:`param_groups` and ``learner.load(path, optimizer=optimizer)`` to restore its state and the extra
        data.

        Raises:
            FileNotFoundError, CheckpointError: as :meth:`load`.
        """
        data = read_checkpoint(path, map_location=map_location)
        learner = cls(model, scenario_from(data), method_from(data))
        learner.load_state_dict(data)
        return learner

    def load_state_dict(
        self, state: Mapping[str, Any], *, optimizer: torch.optim.Optimizer | None = None
    ) -> dict[str, Any]:
        """Restore a :meth:`state_dict` (what :meth:`load` does after reading the file); returns ``extra``.

        Raises:
            CheckpointError: see :meth:`load`; the learner is unchanged when it is raised.
        """
        return load_learner_state(self, state, optimizer=optimizer)
