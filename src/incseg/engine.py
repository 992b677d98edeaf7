"""A reference training loop around :class:`~incseg.learner.IncrementalLearner`.

The learner is not a trainer; this module is the plain PyTorch loop that ``incseg demo`` and ``incseg train``
use, and a template for your own: SGD with a poly schedule, optional DDP (under ``torchrun``), automatic mixed
precision (bf16 or fp16 with a gradient scaler), non-finite loss guards, rank-0 progress output, a checkpoint
after every epoch and every step (resumable, bit-identical on the CPU with the same seed), and evaluation with
a dataset-level mIoU after every step.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import ConcatDataset, DataLoader, Dataset, DistributedSampler, RandomSampler, Subset

from incseg import distributed as D
from incseg._checks import NonFiniteError
from incseg._progress import Eta, Progress
from incseg.data import IncrementalSegmentation
from incseg.learner import CheckpointError, IncrementalLearner
from incseg.learner.checkpoint import (
    OLD_FORMAT_VERSION,
    check_optimizer_state,
    check_plain,
    read_checkpoint,
    remove_stale_temporaries,
)
from incseg.learner.guard import DivergenceError, DivergenceGuard, NonFiniteLossError, check_finite_module
from incseg.losses import LossOutput
from incseg.methods import Method
from incseg.methods.replay import ReplayMemory
from incseg.metrics import IoUResult, MeanIoU, StepHistory
from incseg.nn import FusionStrategy
from incseg.run_logs import MetricsLog, TensorBoardLog

__all__ = [
    "NON_RESULT_FIELDS",
    "DivergenceError",
    "MetricsLog",
    "NonFiniteLossError",
    "TensorBoardLog",
    "TrainConfig",
    "config_differences",
    "evaluate",
    "format_differences",
    "planned_iterations",
    "train_one_epoch",
    "train_scenario",
]

AmpMode = Literal["none", "bf16", "fp16"]
DatasetFactory = Callable[[int], "tuple[Dataset[Any], Dataset[Any]]"]


@dataclass
class TrainConfig:
    """Hyper-parameters of :func:`train_scenario` (defaults: the paper's VOC setting).

    Attributes:
        epochs: epochs per step (paper: 30 on VOC, 60 on ADE20K).
        epochs_next: epochs of the later steps; ``None`` keeps ``epochs``.
        batch_size: global batch size, split evenly over the processes (paper: 24).
        lr: learning rate of step 0 (paper: 1e-2).
        lr_next: learning rate of the later steps (paper: 1e-3 on VOC, 1e-2 on ADE20K); ``None`` keeps ``lr``.
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        poly_power: exponent of the poly schedule ``lr * (1 - it / max_it) ** power`` over the iterations of each
            step (PyTorch's ``PolynomialLR``, stepped after every iteration; equal to the closed form to 1e-12).
        amp: ``"none"``, ``"bf16"`` (autocast) or ``"fp16"`` (autocast with a gradient scaler).
        num_workers: DataLoader workers per process.
        seed: seed of everything random (initialisation of new heads, shuffling, augmentation).
        nan_policy: on a NaN/Inf loss, ``"stop"`` raises :class:`NonFiniteLossError` with the step, batch,
            rank and recent values, ``"skip"`` drops the batch (reported) and goes on. The weights are never
            updated with it. Whatever the policy, non-finite weights and an exploding loss term (the learner's
            :class:`~incseg.learner.DivergenceGuard`) raise :class:`DivergenceError`.
        eval_batch_size: batch size for evaluation (default: ``batch_size``).
        progress: print a progress bar on rank 0.
        max_iters_per_epoch: cap on iterations per epoch (for quick runs, >= 1); ``None`` for full epochs.
        extra: other settings of the caller that change results and that the loop does not see (``incseg train``
            puts its data and network options here: dataset, task, crop size, model, ...). Plain values; saved
            with the fields in every checkpoint and compared on resume like them.

    Raises:
        TypeError: a field of the wrong type (``epochs=1.5``, ``seed=True``, a non-plain ``extra``).
        ValueError: a value that cannot train as asked: epochs, batch sizes or ``max_iters_per_epoch`` below 1,
            learning rates that are not finite and > 0, a negative or non-finite momentum, weight decay or
            ``poly_power``, negative ``num_workers``, an unknown ``amp`` or ``nan_policy``.
    """

    epochs: int = 30
    epochs_next: int | None = None
    batch_size: int = 24
    lr: float = 1e-2
    lr_next: float | None = 1e-3
    momentum: float = 0.9
    weight_decay: float = 1e-4
    poly_power: float = 0.9
    amp: AmpMode = "none"
    num_workers: int = 0
    seed: int = 0
    nan_policy: Literal["stop", "skip"] = "stop"
    eval_batch_size: int | None = None
    progress: bool = True
    max_iters_per_epoch: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Every value that cannot train as asked is refused here, before anything runs or is written.
        _check_int("epochs", self.epochs, 1)
        _check_int("epochs_next", self.epochs_next, 1, optional=True)
        _check_int("batch_size", self.batch_size, 1)
        _check_number("lr", self.lr, positive=True)
        _check_number("lr_next", self.lr_next, positive=True, optional=True)
        _check_number("momentum", self.momentum)
        _check_number("weight_decay", self.weight_decay)
        _check_number("poly_power", self.poly_power)  # a negative power divides by zero at the last iteration
        if self.amp not in ("none", "bf16", "fp16"):
            raise ValueError(f"amp must be one of 'none', 'bf16', 'fp16', got {self.amp!r}")
        _check_int("num_workers", self.num_workers, 0)
        _check_int("seed", self.seed, None)
        if self.nan_policy not in ("stop", "skip"):
            raise ValueError(f"nan_policy must be 'stop' or 'skip', got {self.nan_policy!r}")
        _check_int("eval_batch_size", self.eval_batch_size, 1, optional=True)
        _check_int("max_iters_per_epoch", self.max_iters_per_epoch, 1, optional=True)  # 0 would train nothing
        if not isinstance(self.extra, dict):
            raise TypeError(f"extra must be a dict of plain values, got {type(self.extra).__name__}")
        check_plain(self.extra, "TrainConfig.extra")  # it is saved in every checkpoint

    def to_dict(self) -> dict[str, Any]:
        """Plain-python view (for logs and checkpoints)."""
        return asdict(self)

    def epochs_at(self, step: int) -> int:
        """Epochs of ``step``: :attr:`epochs` at step 0, :attr:`epochs_next` (if set) later."""
        return self.epochs if step == 0 or self.epochs_next is None else self.epochs_next


def _check_int(name: str, value: object, minimum: int | None, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if type(value) is not int:  # 1.5, True, "3", numpy ints
        kind = "an int or None" if optional else "an int"
        raise TypeError(f"TrainConfig.{name} must be {kind}, got {value!r} ({type(value).__name__})")
    if minimum is not None and value < minimum:
        raise ValueError(f"TrainConfig.{name} must be >= {minimum}, got {value}")


def _check_number(name: str, value: object, *, positive: bool = False, optional: bool = False) -> None:
    if value is None and optional:
        return
    if type(value) not in (int, float):
        raise TypeError(f"TrainConfig.{name} must be a number, got {value!r} ({type(value).__name__})")
    number = float(value)  # type: ignore[arg-type]
    if not math.isfinite(number) or number < 0 or (positive and number == 0):
        rule = "> 0" if positive else ">= 0"
        raise ValueError(f"TrainConfig.{name} must be a finite number {rule}, got {value}")


NON_RESULT_FIELDS = frozenset({"progress", "nan_policy", "eval_batch_size"})
"""Fields of :class:`TrainConfig` that do not change the trained weights (a resume may change them freely)."""


def _plain(value: Any) -> Any:
    """A JSON-like view for comparisons: tuples as lists, paths and other objects as strings."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def config_differences(
    saved: Mapping[str, Any], current: Mapping[str, Any], *, ignore: Iterable[str] = ()
) -> dict[str, tuple[Any, Any]]:
    """The settings that differ between a saved run configuration and the current one.

    Used to refuse resuming a run with settings that change its results (``train_scenario``, ``incseg train``).
    Values are compared in their JSON form (tuples equal lists, paths equal their strings); a key missing on
    one side counts as a difference (``None`` shown for the missing side). Nested dicts are compared key by key
    (``"extra.crop_size"``).

    Args:
        saved: the configuration the run was started with (e.g. ``TrainConfig.to_dict()`` from a checkpoint).
        current: the configuration now.
        ignore: keys that do not change results.

    Returns:
        ``{key: (saved value, current value)}`` for every differing key, sorted by key; empty when they agree.

    Example:
        >>> config_differences({"lr": 0.01, "epochs": 30, "progress": True}, {"lr": 0.5, "epochs": 30,
        ...     "progress": False}, ignore={"progress"})
        {'lr': (0.01, 0.5)}
    """
    skip = set(ignore)
    saved, current = _flatten(saved), _flatten(current)
    out: dict[str, tuple[Any, Any]] = {}
    for key in sorted(set(saved) | set(current)):
        if key in skip:
            continue
        a, b = _plain(saved.get(key)), _plain(current.get(key))
        if a != b or (key in saved) != (key in current):
            out[key] = (saved.get(key), current.get(key))
    return out


def _flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"extra": {"crop_size": 64}}`` -> ``{"extra.crop_size": 64}`` (an empty dict stays a value)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def format_differences(differences: Mapping[str, tuple[Any, Any]]) -> str:
    """``"lr: 0.01 -> 0.5, seed: 0 -> 7"`` (saved -> now)."""
    return ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in differences.items())


def autocast_context(device: torch.device, amp: AmpMode) -> contextlib.AbstractContextManager[Any]:
    """The autocast context for ``amp`` on ``device`` (a null context for ``"none"``)."""
    if amp == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


_ORDER_SALT = 0x9E3779B9  # keeps the image order's generator apart from the global (augmentation) RNG


def _seed_for(seed: int, step: int, epoch: int = -1) -> int:
    return seed * 1_000_003 + step * 1009 + (epoch + 1)


def _loader(
    dataset: Dataset[Any], batch_size: int, *, shuffle: bool, seed: int, num_workers: int, drop_last: bool
) -> DataLoader[Any]:
    world = D.get_world_size()
    per_rank = max(1, batch_size // world)
    if shuffle:
        if D.is_distributed():
            sampler: Any = DistributedSampler(dataset, shuffle=True, seed=seed, drop_last=drop_last)
        else:
            sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(seed))  # type: ignore[arg-type]
    else:
        if D.is_distributed():  # shard without padding so no image is counted twice
            dataset = Subset(dataset, list(range(D.get_rank(), len(dataset), world)))  # type: ignore[arg-type]
        sampler = None
    return DataLoader(
        dataset,
        batch_size=per_rank,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=drop_last and shuffle,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,
    )


@torch.no_grad()
def evaluate(
    learner: IncrementalLearner,
    dataset: Dataset[Any],
    *,
    device: torch.device,
    batch_size: int = 8,
    amp: AmpMode = "none",
    num_workers: int = 0,
    strategy: FusionStrategy | None = None,
    progress: bool = False,
    num_old_classes: int | None = None,
    split: Literal["base", "step"] = "base",
) -> IoUResult:
    """Dataset-level mIoU of the learner's current model on ``dataset`` (all ranks take part).

    The old/new groups follow the field's convention by default (``split="base"``): *old* are the classes of
    step 0 and *new* every class learnt after it, whatever the step (for VOC 15-1 after step 5: old = 1-15,
    new = 16-20). ``split="step"`` gives the per-step split instead: old = the classes learnt before the
    learner's step, new = those of that step (VOC 15-1 after step 5: old = 1-19, new = 20).
    :class:`~incseg.metrics.StepHistory` reports both.

    Args:
        learner: the learner (its current step sets the number of classes).
        dataset: yields ``(image (3,H,W), target (H,W))`` in incremental indices (future classes = 255).
        device: where to run.
        batch_size: images per batch (per process).
        amp: autocast mode for the forward pass.
        num_workers: DataLoader workers.
        strategy: CAF test strategy override (``None``: the learner's).
        progress: show a progress bar on rank 0.
        num_old_classes: ``n_old`` (background included) overriding ``split``, e.g. to score the joint model
            with the incremental scenario's split (``scenario.num_classes_at(0)``).
        split: ``"base"`` (default, ``n_old = scenario.num_classes_at(0)``) or ``"step"``
            (``n_old = scenario.num_old_classes(learner.step)``).

    Returns:
        The :class:`~incseg.metrics.IoUResult` of the whole dataset (synchronised over processes).

    Raises:
        ValueError: unknown ``split``.
        NonFiniteError: the model's weights or its logits are NaN/Inf (a diverged model has no score).
    """
    if split not in ("base", "step"):
        raise ValueError(f"split must be 'base' (old = classes of step 0) or 'step', got {split!r}")
    step = learner.step
    scenario = learner.scenario
    if num_old_classes is None:
        num_old_classes = scenario.num_classes_at(0) if split == "base" else scenario.num_old_classes(step)
    metric = MeanIoU(
        scenario.num_classes_at(step),
        num_old_classes=num_old_classes,
        class_names=scenario.class_names_at(step),
        device=device,
    )
    check_finite_module(learner.model, "the model to evaluate")  # argmax of NaN logits would invent a score
    loader = _loader(dataset, batch_size, shuffle=False, seed=0, num_workers=num_workers, drop_last=False)
    bar = Progress(loader, desc=f"  eval step {step}", enabled=progress and D.is_main_process())
    images: torch.Tensor
    targets: torch.Tensor
    non_finite = torch.zeros((), device=device)  # checked once at the end: no host sync per batch
    for images, targets in bar:
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with autocast_context(device, amp):
            logits = learner.predict(images, strategy=strategy)
        non_finite += (~torch.isfinite(logits)).any()
        metric.update(logits.argmax(1), targets)
    metric.sync()
    if D.is_distributed():
        torch.distributed.all_reduce(non_finite, op=torch.distributed.ReduceOp.SUM)
    if float(non_finite) > 0:
        raise NonFiniteError(
            f"the model produced NaN/Inf logits on {int(non_finite)} evaluation batches at step {step} (finite "
            "weights: check the inputs, or evaluate with amp='none'); no score was computed"
        )
    return metric.compute()


def _optimizer(learner: IncrementalLearner, lr: float, config: TrainConfig) -> torch.optim.Optimizer:
    groups = learner.param_groups(lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(groups, lr=lr, momentum=config.momentum, nesterov=False)


def _iterations_per_epoch(train_set: Dataset[Any], config: TrainConfig) -> int:
    """Optimizer updates per epoch of ``train_set`` (full batches per process, capped by the config)."""
    iters = len(_loader(train_set, config.batch_size, shuffle=True, seed=0, num_workers=0, drop_last=True))
    return iters if config.max_iters_per_epoch is None else min(iters, config.max_iters_per_epoch)


def planned_iterations(
    datasets: DatasetFactory,
    config: TrainConfig,
    steps: Iterable[int],
    *,
    memory: ReplayMemory | None = None,
    method: Method | None = None,
) -> dict[int, int]:
    """Training iterations of each step of ``steps`` as :func:`train_scenario` runs them.

    For an overall time estimate (``incseg demo`` adds those of every method). It builds every step's datasets
    (their class-set caches make that cheap after the first time); the images a method's data hook adds (a
    replay component's memory, :meth:`~incseg.methods.Method.extra_train_images`) count with their full budget.

    Args:
        datasets: ``datasets(step) -> (train_dataset, test_dataset)``, as for :func:`train_scenario`.
        config: its epochs, batch size and ``max_iters_per_epoch`` count.
        steps: the steps to plan.
        memory: deprecated (the ``memory=`` of :func:`train_scenario`).
        method: the learner's method (``learner.method``), whose data hooks add images.

    Returns:
        ``{step: iterations}`` (epochs times optimizer updates per epoch).
    """
    plan = {}
    for step in steps:
        train_set = datasets(step)[0]
        iters = _iterations_per_epoch(train_set, config) if len(train_set) else 0  # type: ignore[arg-type]
        extra = method.extra_train_images(step) if method is not None else 0
        if memory is not None and step > 0:
            extra += memory.budget
        if config.max_iters_per_epoch is None:
            iters += extra // config.batch_size
        plan[step] = config.epochs_at(step) * iters
    return plan


def _poly_factor(it: int, max_it: int, power: float) -> float:
    """``(1 - it / max_it) ** power``: the poly schedule in closed form (1 when ``max_it`` is 0)."""
    return (1.0 - it / max_it) ** power if max_it > 0 else 1.0


def _poly_scheduler(
    optimizer: torch.optim.Optimizer, max_it: int, power: float, resume_state: Mapping[str, Any] | None, start_it: int
) -> torch.optim.lr_scheduler.PolynomialLR:
    """PyTorch's ``PolynomialLR`` over the ``max_it`` iterations of a step, stepped after every iteration.

    On a resume the optimizer already holds the learning rates of the next iteration and the checkpoint the
    scheduler's state, so the chained schedule continues bit-identically. A checkpoint without scheduler state
    (written by the hand-written schedule of incseg 0.1) restarts it from the closed form at ``start_it``.
    """
    scheduler = torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=max_it, power=power)
    if resume_state is None:
        return scheduler
    saved = resume_state.get("extra", {}).get("scheduler")
    if saved is not None:
        scheduler.load_state_dict(saved)
    else:
        scheduler.last_epoch = start_it
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * _poly_factor(start_it, max_it, power)
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]  # type: ignore[misc]
    return scheduler


def _step_scheduler(scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
    """``scheduler.step()`` without PyTorch's warning when the first optimizer step was skipped (a non-finite
    batch, or fp16's gradient scaler): the schedule follows the iterations, whether or not they updated."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
        scheduler.step()


def _distillation_note(means: dict[str, float]) -> str:
    """How hard attentive distillation pulled against the labels over the step (means of its stats), in words:
    ``ad_pull`` and ``ad_cancel`` of the balance on the weights (the default), or the ``ad_opposition_*`` shares
    of the balance on the features. How to read them: docs/concepts.md, "Is distillation holding the new
    classes back?"."""
    if "ad_pull" in means:
        text = (
            f"attentive distillation steered the weights at {means['ad_pull']:.2f}x the new classes' labels "
            f"and cancelled {means.get('ad_cancel', 0.0):.1%} of their descent (mean over the step"
        )
        return text + "; measured: 0.1x lets them in, 0.3x cost up to a quarter of them, 3x half)"
    shares = {k.removeprefix("ad_opposition_"): v for k, v in means.items() if k.startswith("ad_opposition_")}
    if not shares:
        return ""
    text = "attentive distillation cancelled " + ", ".join(f"{v:.1%} on {k}" for k, v in shares.items())
    return text + " of the output losses' descent on the features (mean over the step)"


def _guard_terms(out: LossOutput | None) -> dict[str, torch.Tensor]:
    """The loss first, then the named terms (``total`` is the loss); a NaN loss when none was computed."""
    if out is None:
        return {"loss": torch.full((), math.nan)}
    return {"loss": out.loss, **{k: v for k, v in out.terms.items() if k != "total"}}


def train_one_epoch(
    learner: IncrementalLearner,
    train_set: Dataset[Any],
    config: TrainConfig,
    *,
    step: int,
    epoch: int,
    epochs: int,
    iters_per_epoch: int,
    device: torch.device,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    guard: DivergenceGuard,
    log: Callable[[str], None],
    on_iteration: Callable[[dict[str, Any]], None] | None = None,
    stats: dict[str, torch.Tensor] | None = None,
    eta: Eta | None = None,
) -> int:
    """One epoch of step ``step``: ``iters_per_epoch`` batches of ``train_set`` in the order of ``(seed, step,
    epoch)``, each a :meth:`~incseg.learner.IncrementalLearner.training_step` through ``module`` (the training
    module or its DDP wrapper), one guard check (one host synchronisation), the optimizer and scheduler steps.

    A non-finite loss stops the run (``config.nan_policy == "stop"``) or drops the batch (``"skip"``); non-finite
    weights and exploding terms always stop it (:class:`~incseg.learner.DivergenceError`).
    ``on_iteration`` gets every update's record (see :func:`train_scenario`). ``stats``, if given, accumulates
    the sum of every ``LossOutput.stats`` entry over the updates (on the device, no host synchronisation).
    ``eta``: the overall time estimate of the run, shown by the progress bar.

    Returns:
        The number of updates (batches not skipped).
    """
    main = D.is_main_process()
    guarded = learner.guarded_tensors()
    hints = learner.divergence_hints()
    buffers = [b for b in learner.module.buffers() if b.is_floating_point() or b.dtype == torch.long]
    updates = 0
    torch.manual_seed(_seed_for(config.seed, step, epoch))
    # A new image order every epoch: single-process from the seed of (seed, step, epoch), DDP from the
    # sampler's set_epoch; both depend on nothing else, so a resumed run draws the same orders.
    distributed = D.is_distributed()
    loader = _loader(
        train_set,
        config.batch_size,
        shuffle=True,
        seed=_seed_for(config.seed, step) if distributed else _seed_for(config.seed, step, epoch) + _ORDER_SALT,
        num_workers=config.num_workers,
        drop_last=True,
    )
    if isinstance(loader.sampler, DistributedSampler):
        loader.sampler.set_epoch(epoch)
    learner.module.train()
    bar = Progress(
        itertools.islice(loader, iters_per_epoch),  # loads exactly the batches it trains on
        total=iters_per_epoch,
        desc=f"step {step} epoch {epoch + 1}/{epochs}",
        enabled=config.progress and main,
        remaining_after=(epochs - epoch - 1) * iters_per_epoch,
        eta=eta,
    )
    running = 0.0
    images: torch.Tensor
    labels: torch.Tensor
    for i, (images, labels) in enumerate(bar):
        it = epoch * iters_per_epoch + i
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        out, refused = None, ""
        # A batch to skip must leave no trace: its forward pass updates the batch-norm statistics.
        statistics = [b.clone() for b in buffers] if config.nan_policy == "skip" else []
        try:
            with autocast_context(device, config.amp):
                out = learner.training_step(images, labels, module=module, guard=False)
        except NonFiniteError as err:  # the loss refused non-finite logits (value checks on)
            refused = str(err)
        # One host sync: every term, the loss and the largest weight of every process (the weights after
        # the previous optimizer step). Non-finite weights and exploding terms always stop the run.
        report = guard.check(
            _guard_terms(out),
            tensors=guarded,
            where=f"step {step}, epoch {epoch}, batch {i}",
            hints=hints,
            reduce=True,
            skip_nonfinite=True,
            inputs={"images": images},
        )
        value = report.values.get("loss", math.nan)
        if not report.finite:
            msg = report.message + (f" ({refused})" if refused else "")
            if config.nan_policy == "stop":
                raise NonFiniteLossError(msg + " (use nan_policy='skip' to drop such batches)")
            log(msg + " -> batch skipped")
            with torch.no_grad():
                for buffer, saved_value in zip(buffers, statistics):
                    buffer.copy_(saved_value)
            optimizer.zero_grad(set_to_none=True)
            _step_scheduler(scheduler)
            continue
        assert out is not None  # a finite loss was computed
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(out.loss).backward()
        scaler.step(optimizer)
        scaler.update()
        updates += 1
        running = value if i == 0 else 0.9 * running + 0.1 * value
        if stats is not None:
            for key, stat in out.stats.items():
                stats[key] = stats[key] + stat.detach().float() if key in stats else stat.detach().float()
        if on_iteration is not None:
            logged = {**out.terms, **out.stats}
            names = list(logged)
            values = torch.stack([logged[k].detach().float() for k in names]).tolist() if names else []
            record = {"step": step, "epoch": epoch, "iteration": it, "lr": optimizer.param_groups[0]["lr"]}
            on_iteration({**record, "loss": value, **dict(zip(names, values))})
        _step_scheduler(scheduler)
        bar.set_postfix(f"loss={running:.4f}")
    return updates


def train_scenario(
    learner: IncrementalLearner,
    datasets: DatasetFactory,
    config: TrainConfig,
    *,
    device: torch.device,
    checkpoint_dir: str | Path | None = None,
    resume: bool = True,
    steps: range | None = None,
    log: Callable[[str], None] | None = None,
    on_step_end: Callable[[int, IoUResult], None] | None = None,
    history: StepHistory | None = None,
    on_iteration: Callable[[dict[str, Any]], None] | None = None,
    allow_config_change: bool = False,
    memory: ReplayMemory | None = None,
    eta: Eta | None = None,
) -> StepHistory:
    """Train ``learner`` over every step of its scenario, evaluating after each step.

    Args:
        learner: the learner (its model on ``device``). Under ``torchrun`` its training module is wrapped in
            :class:`~torch.nn.parallel.DistributedDataParallel` per step; the teacher never is.
        datasets: ``datasets(step) -> (train_dataset, test_dataset)`` for that step.
        config: hyper-parameters.
        device: where to train.
        checkpoint_dir: where ``last.pt`` (after every epoch) and ``step{t}.pt`` (after every step) go; rank 0
            writes them (each with a content checksum, verified on resume). Temporary files of saves that were
            killed before their rename are removed when the run starts. ``None``: no checkpoints.
        resume: continue from ``checkpoint_dir/last.pt`` when it exists.
        steps: which steps to run (default: all of the scenario).
        log: where status lines go (default: ``print`` on rank 0).
        on_step_end: called with ``(step, result)`` after each step's evaluation.
        history: results of earlier steps to continue (e.g. when ``steps`` starts after a step trained
            elsewhere); default: a new history.
        on_iteration: called on rank 0 after every optimizer update with ``{"step", "epoch", "iteration"
            (within the step), "lr", "loss", <term>: value}`` (plain floats, the terms of the loss on rank 0),
            e.g. a :class:`~incseg.engine.MetricsLog`.
        allow_config_change: resume even when ``config`` differs from the checkpoint's in a setting that
            changes results (every field but those of :data:`NON_RESULT_FIELDS`); the differences are logged.
        memory: deprecated since 0.3 (removed in 0.4): use the ``replay`` component
            (``MethodConfig.components``, e.g. the ``mib-m`` preset, or ``incseg train --memory N``), which the
            method's data hooks run. A :class:`~incseg.methods.ReplayMemory` given here still selects exemplars
            after each step and adds them to the training sets of later steps, saved in the checkpoints' extra
            data.
        eta: the overall time estimate (an ``incseg._progress.Eta``) of a larger run this call is part of
            (``incseg demo``: every method's steps); the progress lines end with it. Default (with
            ``config.progress``): one for the steps run here, from :func:`planned_iterations`, so the progress
            lines end with the time left for all of them.

    Returns:
        The per-step history of results (per-class IoU, old/new/all, forgetting).

    Raises:
        NonFiniteLossError: a NaN/Inf loss with ``nan_policy="stop"``.
        DivergenceError: non-finite weights or an exploding loss term (any ``nan_policy``); the message names
            the term, its recent values, the rank and the likely fix.
        NonFiniteError: evaluation or a checkpoint met non-finite weights or logits.
        ValueError: resuming with a ``config`` that changes results (the message lists the differences),
            unless ``allow_config_change``.
        CheckpointError: ``last.pt`` was not written by this loop (e.g. by ``learner.save``) or is unreadable.
    """
    main = D.is_main_process()
    say = log if log is not None else (print if main else (lambda _msg: None))
    if memory is not None:
        warnings.warn(
            "train_scenario(memory=...) is deprecated and will be removed in incseg 0.4: add the 'replay' component "
            "to the method instead (e.g. the 'mib-m' preset, or MethodConfig.replace(components=[..., 'replay'], "
            "memory_size=N))",
            DeprecationWarning,
            stacklevel=2,
        )
    scenario = learner.scenario
    steps = steps if steps is not None else range(scenario.num_steps)
    if history is None:
        history = StepHistory(class_names=list(scenario.class_names_at(scenario.num_steps - 1)))
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    run = _Run(
        learner=learner,
        config=config,
        device=device,
        say=say,
        history=history,
        scaler=torch.amp.GradScaler(device.type, enabled=config.amp == "fp16"),
        ckpt_dir=ckpt_dir,
        on_iteration=on_iteration if main else None,
        memory=memory,
    )
    if ckpt_dir is not None and main and ckpt_dir.is_dir():
        for stale in remove_stale_temporaries(ckpt_dir):  # left by a save that was killed before its rename
            say(f"removed {stale.name}, the temporary file of an interrupted checkpoint save")
    start = _ResumePoint(steps.start)
    if resume and run.last_path is not None and run.last_path.exists():
        start = _resume(run, allow_config_change)
    run.eta = _time_estimate(run, datasets, steps, start, eta) if config.progress and main else None
    for step in steps:
        if step < start.step:
            continue
        train_set, test_set = datasets(step)
        resumed = start if step == start.step and start.state is not None else None
        _train_step(run, step, train_set, resumed, num_test=len(test_set))  # type: ignore[arg-type]
        _finish_step(run, step, test_set, on_step_end)
    return run.history


@dataclass
class _Run:
    """What the steps of one :func:`train_scenario` call share."""

    learner: IncrementalLearner
    config: TrainConfig
    device: torch.device
    say: Callable[[str], None]
    history: StepHistory
    scaler: torch.amp.GradScaler
    ckpt_dir: Path | None
    on_iteration: Callable[[dict[str, Any]], None] | None
    memory: ReplayMemory | None  # deprecated: the replay component's data hooks replace it
    eta: Eta | None = None

    @property
    def last_path(self) -> Path | None:
        return self.ckpt_dir / "last.pt" if self.ckpt_dir is not None else None

    def save(
        self,
        path: Path,
        optimizer: torch.optim.Optimizer | None,
        *,
        epoch: int,
        finished: bool,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    ) -> None:
        _save(
            self.learner,
            path,
            optimizer,
            self.scaler,
            self.history,
            self.config,
            epoch=epoch,
            finished=finished,
            scheduler=scheduler,
            memory=self.memory,
        )


@dataclass
class _ResumePoint:
    """Where the run starts: a step, the epochs of it already trained, and the checkpoint to resume it from
    (``state``: ``None`` when the step starts afresh)."""

    step: int
    epoch: int = 0
    state: Mapping[str, Any] | None = None
    config_changed: bool = False


def _resume(run: _Run, allow_config_change: bool) -> _ResumePoint:
    """Load ``last.pt`` into the learner (checked: written by this loop, with compatible settings) and say where
    the run goes on."""
    path = run.last_path
    assert path is not None
    saved = read_checkpoint(path, map_location=run.device)
    config_changed = _check_resume(path, saved, run.config, allow_config_change, run.say)
    history = _history_from(path, saved)
    extra = run.learner.load_state_dict(saved)
    run.history = history
    if run.memory is not None and isinstance(extra.get("memory"), dict):
        run.memory.load_state_dict(extra["memory"])
    if extra.get("step_finished", False):
        start = _ResumePoint(run.learner.step + 1, config_changed=config_changed)
    else:
        start = _ResumePoint(run.learner.step, int(extra["epoch"]), saved, config_changed)
    run.say(f"resumed from {path}: step {start.step}, epoch {start.epoch}")
    return start


def _time_estimate(run: _Run, datasets: DatasetFactory, steps: range, start: _ResumePoint, eta: Eta | None) -> Eta:
    """The run's time estimate (or the caller's, for a larger run), past the iterations a resume skips."""
    config = run.config
    plan = planned_iterations(datasets, config, steps, memory=run.memory, method=run.learner.method)
    if eta is None:
        eta = Eta(sum(plan.values()))
    done_before = sum(n for s, n in plan.items() if s < start.step)
    if start.step in plan:  # the epochs of the resumed step that are not repeated
        done_before += plan[start.step] // config.epochs_at(start.step) * start.epoch
    eta.skip(done_before)
    return eta


def _train_step(run: _Run, step: int, step_set: Dataset[Any], resume: _ResumePoint | None, *, num_test: int) -> None:
    """Train one step: the method's data hooks, ``begin_step`` (unless resumed in the middle of the step), the
    optimizer and learning-rate schedule, calibration, every epoch (``last.pt`` after each), consolidation and
    ``end_step``."""
    learner, config, device, say = run.learner, run.config, run.device, run.say
    scenario = learner.scenario
    if len(step_set) == 0:  # type: ignore[arg-type]
        raise ValueError(f"step {step} has no training images: check the dataset and the scenario's rules")
    train_set = learner.method.train_set(step, step_set)  # data hooks: a replay component adds its memory
    if train_set is not step_set:
        say(f"step {step}: training on {len(train_set)} images, {len(step_set)} of the step")  # type: ignore[arg-type]
    memory = run.memory
    if memory is not None and len(memory) > 0 and step > 0:
        if not isinstance(step_set, IncrementalSegmentation):
            raise TypeError(f"a replay memory needs IncrementalSegmentation training sets, got {step_set!r}")
        train_set = ConcatDataset([train_set, memory.dataset(step_set)])
        say(f"step {step}: replaying {len(memory)} memory images")
    first_epoch = resume.epoch if resume is not None else 0
    if resume is None:
        torch.manual_seed(_seed_for(config.seed, step))
        learner.begin_step(step)
    learner.model.to(device)
    learner.module.to(device)
    lr = config.lr if step == 0 or config.lr_next is None else config.lr_next
    optimizer = _optimizer(learner, lr, config)
    if resume is not None and resume.state is not None:
        state = resume.state
        if state.get("optimizer") is not None:
            try:  # optimizer.load_state_dict alone keeps state of any shape and casts dtypes silently
                check_optimizer_state(optimizer, state["optimizer"])
            except CheckpointError as err:
                raise CheckpointError(f"cannot resume {run.last_path}: {err}") from err
            optimizer.load_state_dict(state["optimizer"])
        if "scaler" in state.get("extra", {}):
            run.scaler.load_state_dict(state["extra"]["scaler"])
    module: nn.Module = learner.module
    if D.is_distributed():
        module = DistributedDataParallel(learner.module, device_ids=[device.index] if device.type == "cuda" else None)
    iters_per_epoch = len(_loader(train_set, config.batch_size, shuffle=True, seed=0, num_workers=0, drop_last=True))
    if iters_per_epoch == 0:  # drop_last: no full batch, so every epoch would train nothing
        raise ValueError(
            f"step {step} has {len(train_set)} training images, fewer than one batch of {config.batch_size} "  # type: ignore[arg-type]
            f"({max(1, config.batch_size // D.get_world_size())} per process): nothing would be trained; lower "
            "the batch size (--batch-size) or check the dataset and the scenario's rules"
        )
    if config.max_iters_per_epoch is not None:
        iters_per_epoch = min(iters_per_epoch, config.max_iters_per_epoch)
    epochs = config.epochs_at(step)
    if resume is not None and resume.state is not None:
        _check_resume_schedule(run.last_path, resume.state, epochs, iters_per_epoch, resume.config_changed)
    scheduler = _poly_scheduler(
        optimizer,
        epochs * iters_per_epoch,
        config.poly_power,
        resume.state if resume is not None else None,
        first_epoch * iters_per_epoch,
    )
    say(
        f"step {step}/{scenario.num_steps - 1}: classes {list(scenario.classes_at(step))}, "
        f"{len(train_set)} train / {num_test} test images, method {learner.config.name}, lr {lr:g}"  # type: ignore[arg-type]
    )
    if learner.needs_calibration:  # e.g. PLOP's pseudo-label thresholds: the teacher on this step's data
        calibration = DataLoader(train_set, batch_size=config.batch_size, num_workers=config.num_workers)
        learner.calibrate((images.to(device), labels.to(device)) for images, labels in calibration)
        say(f"step {step}: calibrated the method on {len(train_set)} training images")  # type: ignore[arg-type]
    t0 = time.monotonic()
    guard = learner.guard if learner.guard is not None else DivergenceGuard(check_weights=False)
    guard.reset()
    stat_sums: dict[str, torch.Tensor] = {}  # the loss's stats summed over the step (no host sync)
    stat_count = 0
    for epoch in range(first_epoch, epochs):
        stat_count += train_one_epoch(
            learner,
            train_set,
            config,
            step=step,
            epoch=epoch,
            epochs=epochs,
            iters_per_epoch=iters_per_epoch,
            device=device,
            module=module,
            optimizer=optimizer,
            scaler=run.scaler,
            scheduler=scheduler,
            guard=guard,
            log=say,
            on_iteration=run.on_iteration,
            stats=stat_sums,
            eta=run.eta,
        )
        if run.last_path is not None:
            run.save(run.last_path, optimizer, epoch=epoch + 1, finished=False, scheduler=scheduler)
    consolidation = None
    if learner.needs_consolidation:  # e.g. STAR's class prototypes: the trained model on this step's data
        loader = DataLoader(train_set, batch_size=config.batch_size, num_workers=config.num_workers)
        consolidation = ((images.to(device), labels.to(device)) for images, labels in loader)
        say(f"step {step}: consolidating the method on {len(train_set)} training images")  # type: ignore[arg-type]
    learner.end_step(data=consolidation)
    say(f"step {step} trained in {time.monotonic() - t0:.1f}s")
    if stat_count:
        note = _distillation_note({k: float(v) / stat_count for k, v in stat_sums.items()})
        if note:
            say(f"step {step}: {note}")
    learner.method.observe_train_set(step, step_set)  # data hooks: a replay component picks its exemplars
    if memory is not None:
        if not isinstance(step_set, IncrementalSegmentation):
            raise TypeError(f"a replay memory needs IncrementalSegmentation training sets, got {step_set!r}")
        memory.update(step_set)


def _finish_step(
    run: _Run, step: int, test_set: Dataset[Any], on_step_end: Callable[[int, IoUResult], None] | None
) -> None:
    """Evaluate the trained step, add it to the history, save ``step{t}.pt`` and ``last.pt``."""
    config = run.config
    result = evaluate(
        run.learner,
        test_set,
        device=run.device,
        batch_size=config.eval_batch_size or config.batch_size,
        amp=config.amp,
        num_workers=config.num_workers,
        progress=config.progress,
    )
    run.history.add(step, result)
    run.say(f"step {step} result: " + _summary(result))
    if on_step_end is not None:
        on_step_end(step, result)
    if run.ckpt_dir is not None and run.last_path is not None:
        epochs = config.epochs_at(step)
        run.save(run.ckpt_dir / f"step{step}.pt", None, epoch=epochs, finished=True)
        run.save(run.last_path, None, epoch=epochs, finished=True)


def _check_resume(
    path: Path, saved: Mapping[str, Any], config: TrainConfig, allow: bool, say: Callable[[str], None]
) -> bool:
    """Refuse a ``last.pt`` without the loop's state, with values the loop never writes, or one trained with
    settings that change results; return whether the settings changed (``allow``)."""
    extra = saved.get("extra")
    missing = [
        k
        for k in ("history", "epoch", "step_finished", "train_config")
        if not isinstance(extra, dict) or k not in extra
    ]
    if missing or not isinstance(extra, dict):
        raise CheckpointError(
            f"{path} was not written by train_scenario (no {', '.join(missing)} in its extra data; a file from "
            "learner.save?): to start from its weights, load them with learner.load() and train into another "
            "checkpoint_dir, or move the file away"
        )
    fix = "it is damaged or was edited; use another copy, an earlier checkpoint, or start again (--no-resume)"
    finished, epoch, step = extra["step_finished"], extra["epoch"], saved.get("step")
    if type(finished) is not bool or finished is not saved.get("step_finished"):
        raise CheckpointError(
            f"{path} says both step_finished={saved.get('step_finished')!r} and, in its loop state, {finished!r}: {fix}"
        )
    if not isinstance(extra["train_config"], dict):
        raise CheckpointError(f"{path} holds a train_config of type {type(extra['train_config']).__name__}: {fix}")
    differences = config_differences(extra["train_config"], config.to_dict(), ignore=NON_RESULT_FIELDS)
    if saved.get("format_version") == OLD_FORMAT_VERSION:  # incseg 0.1 saved no TrainConfig.extra: not a change
        differences = {k: v for k, v in differences.items() if not (k.startswith("extra") and v[0] in (None, {}))}
    if differences and not allow:
        raise ValueError(
            f"cannot resume {path}: the run was started with other settings that change its results "
            f"({format_differences(differences)}, checkpoint -> now); use the original settings, another output "
            "folder, or allow_config_change=True (incseg train --allow-config-change) to resume anyway"
        )
    if type(epoch) is not int or type(step) is not int or step < 0:
        raise CheckpointError(f"{path} holds epoch {epoch!r} at step {step!r}, which the loop never writes: {fix}")
    epochs = config.epochs_at(step)
    if not finished:
        if not 1 <= epoch <= epochs:
            raise CheckpointError(
                f"{path} is after epoch {epoch} of step {step}, which has {epochs} epochs (1 to {epochs} in the "
                f"middle of a step): {fix}"
            )
        if saved.get("optimizer") is None:
            raise CheckpointError(
                f"{path} is in the middle of step {step} but holds no optimizer state (its momentum would restart "
                f"from zero): {fix}"
            )
        if saved.get("format_version") != OLD_FORMAT_VERSION and not isinstance(extra.get("scheduler"), dict):
            raise CheckpointError(f"{path} is in the middle of step {step} but holds no learning-rate schedule: {fix}")
    if differences:
        say(f"resuming {path} with changed settings: {format_differences(differences)}")
    return bool(differences)


def _history_from(path: Path, saved: Mapping[str, Any]) -> StepHistory:
    """The results of the steps before the checkpoint's (and of its own once finished), checked."""
    extra = saved["extra"]
    try:
        history = StepHistory.from_dict(extra["history"])
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise CheckpointError(f"{path} holds a malformed result history ({err}): use another copy") from err
    step: int = saved["step"]  # an int: checked by _check_resume
    last = step if extra["step_finished"] else step - 1
    late = [s for s in history.steps if s > last]
    if late:
        raise CheckpointError(
            f"{path} is at step {step} (finished: {extra['step_finished']}) but holds results of steps {late}: it is "
            "damaged or was edited; use another copy or an earlier checkpoint"
        )
    return history


def _check_resume_schedule(
    path: Path | None, saved: Mapping[str, Any], epochs: int, iters_per_epoch: int, config_changed: bool
) -> None:
    """The saved learning-rate schedule must be where the loop left it: after ``epoch`` full epochs."""
    schedule = saved["extra"].get("scheduler")
    if schedule is None or config_changed:  # incseg 0.1 (closed form), or changed on purpose
        return
    epoch = saved["extra"]["epoch"]
    expected = {"last_epoch": epoch * iters_per_epoch, "total_iters": epochs * iters_per_epoch}
    found = {k: schedule.get(k) for k in expected}
    if found != expected:
        raise CheckpointError(
            f"{path} holds a learning-rate schedule at {found}, but after epoch {epoch} of {epochs} with "
            f"{iters_per_epoch} iterations per epoch the loop leaves it at {expected}: it is damaged or was edited; "
            "use another copy, an earlier checkpoint, or start again (--no-resume)"
        )


def _summary(result: IoUResult) -> str:
    g = result.groups
    parts = [f"{k}={100 * v:.1f}" for k, v in g.items() if not math.isnan(v)]
    return " ".join(parts)


def _save(
    learner: IncrementalLearner,
    path: Path,
    optimizer: torch.optim.Optimizer | None,
    scaler: torch.amp.GradScaler,
    history: StepHistory,
    config: TrainConfig,
    *,
    epoch: int,
    finished: bool,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    memory: ReplayMemory | None = None,
) -> None:
    if D.is_main_process():
        path.parent.mkdir(parents=True, exist_ok=True)
        extra = {
            "epoch": epoch,
            "step_finished": finished,
            "history": history.to_dict(),
            "scaler": scaler.state_dict(),
            "train_config": config.to_dict(),
        }
        if scheduler is not None:
            extra["scheduler"] = scheduler.state_dict()
        if memory is not None:
            extra["memory"] = memory.state_dict()
        learner.save(path, optimizer=optimizer, extra=extra)
    D.barrier()
