"""PLOP (Douillard et al., CVPR 2021): Local POD feature distillation and entropy-based pseudo-labels.

Equations and choices: docs/concepts.md ("PLOP"). The published weights (the authors' ``--method PLOP``):
POD factor 0.01 on every feature map and 0.0005 on the logits, scales 1, 2, 4, the schedule
``sqrt(K_t / |C_t|)``, entropy pseudo-labels with per-class median thresholds (floor 0.001), the loss factor
of uncertain images, MiB initialisation of new classes, plain cross-entropy and no output distillation.

The maps POD distils follow the release on the paper's network: the 4 ResNet stage outputs before their final
activation, the ASPP output ``h`` and the logits (``models/resnet.py:118-148`` and ``modules/residual.py:125-137``
of ``arthurdouillard/CVPR2021_PLOP``); on other networks :func:`pod_stage_modules` picks one map per resolution
of a sequential encoder, or the levels of a multi-scale one, and the option ``pod_maps`` names them explicitly.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.resnet import BasicBlock, Bottleneck

from incseg._checks import check_labels, check_logits
from incseg.functional.pod import collapse_new_classes, entropy_pseudo_labels, local_pod_distance, normalized_entropy
from incseg.losses import LossOutput
from incseg.methods.base import Batch, LearnerView, Method
from incseg.methods.config import MethodConfig
from incseg.methods.registry import register_method, register_preset
from incseg.models import IncrementalSegmenter
from incseg.scenarios import IGNORE_INDEX

if TYPE_CHECKING:
    from incseg.scenarios import Scenario

__all__ = ["PLOPLoss", "PLOPMethod", "pod_feature_maps", "pod_stage_modules", "resolve_pod_maps"]


class PLOPLoss(nn.Module):
    """PLOP's state that checkpoints must keep: the entropy threshold of every class (buffer ``thresholds``,
    ``(num_classes,)``) and the number of old classes they were calibrated for (buffer ``calibrated_for``,
    ``-1`` before the first calibration). It has no trained parameters.

    Args:
        num_classes: classes of the whole scenario (background included).
    """

    thresholds: Tensor
    calibrated_for: Tensor

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.register_buffer("thresholds", torch.zeros(num_classes))
        self.register_buffer("calibrated_for", torch.tensor(-1, dtype=torch.int64))


_RESIDUAL_BLOCKS = (BasicBlock, Bottleneck)
_STRIDED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MaxPool2d, nn.AvgPool2d, nn.LPPool2d)


_NOT_ACTIVATIONS = (nn.MultiheadAttention, nn.Softmax, nn.Softmin, nn.LogSoftmax, nn.Softmax2d)


def _is_activation(module: nn.Module) -> bool:
    """An element-wise activation of ``torch.nn`` (ReLU, LeakyReLU, GELU, SiLU, ...)."""
    return type(module).__module__ == nn.ReLU.__module__ and not isinstance(module, _NOT_ACTIVATIONS)


def _final_activation(module: nn.Module) -> nn.Module | None:
    """The activation ``module`` applies last, when it ends with one: a torchvision ResNet block's ``relu``
    (after the residual sum), or the last child of an ``nn.Sequential`` (recursively); else ``None``."""
    if isinstance(module, _RESIDUAL_BLOCKS):
        return module.relu
    if isinstance(module, nn.Sequential) and len(module) > 0:
        last = module[-1]
        return last if _is_activation(last) else _final_activation(last)
    return None


def _is_resnet_stage(module: nn.Module) -> bool:
    return (
        isinstance(module, nn.Sequential) and len(module) > 0 and all(isinstance(m, _RESIDUAL_BLOCKS) for m in module)
    )


def _strided(module: nn.Module) -> bool:
    """Whether ``module`` holds a convolution or pooling with a stride > 1 (it lowers the resolution)."""
    for m in module.modules():
        if isinstance(m, _STRIDED):
            stride = m.stride if m.stride is not None else m.kernel_size  # LPPool2d's default stride
            if any(int(st) > 1 for st in (stride if isinstance(stride, tuple) else (stride,))):
                return True
    return False


def _sequential_body(module: nn.Module, name: str) -> tuple[str, nn.Module] | None:
    """The container under ``module`` that runs its children in order (an ``nn.Sequential`` or torchvision's
    ``IntermediateLayerGetter``), found through wrappers with a single child."""
    while True:
        if isinstance(module, (nn.Sequential, IntermediateLayerGetter)):
            return name, module
        children = list(module.named_children())
        if len(children) != 1:
            return None
        child_name, module = children[0]
        name = f"{name}.{child_name}"


def pod_stage_modules(model: IncrementalSegmenter) -> tuple[str, ...]:
    """The encoder stages whose outputs PLOP distils when ``pod_maps="auto"``, as names of submodules of ``model``.

    - **ResNets** (torchvision's ``BasicBlock`` / ``Bottleneck`` stages, as in
      :func:`~incseg.models.deeplabv3_resnet101` and :func:`~incseg.models.from_torchvision_deeplabv3`): the
      stages ``layer1`` to ``layer4``, as PLOP's release (its ResNet returns the 4 stage outputs before their
      final activation).
    - **Sequential encoders** (an ``nn.Sequential`` or an ``IntermediateLayerGetter``, possibly inside wrappers
      with one child): the last child at each resolution, i.e. every child followed by a child that holds a
      strided convolution or pooling, and the last child.
    - Otherwise (and for multi-scale encoders, whose levels are distilled): none.

    Args:
        model: the segmenter.

    Returns:
        The names, fine to coarse (``()`` when the rule finds no stages).

    Example:
        >>> from incseg.models import small_segmenter
        >>> pod_stage_modules(small_segmenter(3, width=8))
        ('encoder.stage1', 'encoder.stage2', 'encoder.stage3')
    """
    if model.levels is not None:
        return ()
    stages = tuple(f"encoder.{name}" for name, m in model.encoder.named_modules() if name and _is_resnet_stage(m))
    if stages:
        return stages
    found = _sequential_body(model.encoder, "encoder")
    if found is None:
        return ()
    prefix, body = found
    children = list(body.named_children())
    if len(children) < 2:
        return ()
    return tuple(
        f"{prefix}.{name}"
        for i, (name, _) in enumerate(children)
        if i == len(children) - 1 or _strided(children[i + 1][1])
    )


def _parse_names(text: str) -> tuple[str, ...]:
    return tuple(name for name in text.replace(",", " ").split() if name)


def resolve_pod_maps(model: IncrementalSegmenter, pod_maps: str = "auto") -> tuple[str, ...]:
    """The submodules whose outputs POD distils (before ``h`` and the logits), checked against ``model``.

    Args:
        model: the segmenter.
        pod_maps: ``"auto"`` (:func:`pod_stage_modules`; empty for a multi-scale encoder, whose levels are
            distilled, and for an encoder the rule does not recognise, whose output ``z`` is distilled), or names
            of submodules of ``model`` separated by commas or spaces (``"encoder.layer1 encoder.layer3"``).

    Returns:
        The names.

    Raises:
        ValueError: a name that is not a submodule of ``model``.
    """
    if pod_maps.strip() == "auto":
        return pod_stage_modules(model)
    names = _parse_names(pod_maps)
    if not names:
        raise ValueError('pod_maps must be "auto" or names of submodules of the model, separated by commas or spaces')
    known = dict(model.named_modules())
    for name in names:
        if name not in known or not name:
            hint = [n for n, _ in model.encoder.named_children()][:12]
            raise ValueError(
                f"pod_maps names {name!r}, which is not a submodule of the model; use dotted names from "
                f"model.named_modules(), e.g. the encoder's children {['encoder.' + n for n in hint]}"
            )
    return names


@contextlib.contextmanager
def _capture(model: IncrementalSegmenter, names: tuple[str, ...]) -> Iterator[dict[str, Tensor]]:
    """Capture the outputs of the submodules ``names`` during a forward pass; a module that ends with an
    activation (:func:`_final_activation`) gives the input of that activation's last call, cloned before an
    in-place activation overwrites it (for a ResNet block: its final batch norm plus the residual)."""
    found: dict[str, Tensor] = {}
    handles = []
    modules = dict(model.named_modules())
    for name in names:
        module = modules[name]
        activation = _final_activation(module)
        if activation is None:

            def keep_output(_m: nn.Module, _i: Any, out: Any, name: str = name) -> None:
                found[name] = out

            handles.append(module.register_forward_hook(keep_output))
        else:
            pending: list[Tensor] = []

            def keep_input(_m: nn.Module, inputs: tuple[Any, ...], pending: list[Tensor] = pending) -> None:
                pending[:] = [inputs[0].clone()]

            def keep_pending(
                _m: nn.Module, _i: Any, _o: Any, name: str = name, pending: list[Tensor] = pending
            ) -> None:
                if pending:
                    found[name] = pending.pop()

            handles.append(activation.register_forward_pre_hook(keep_input))
            handles.append(module.register_forward_hook(keep_pending))
    try:
        yield found
    finally:
        for handle in handles:
            handle.remove()


def pod_feature_maps(out: Mapping[str, Any], captured: list[Tensor], images: Tensor | None = None) -> list[Tensor]:
    """The feature maps PLOP distils besides the logits, fine to coarse, then the refined features ``h``.

    The captured stage outputs (``captured``, see :func:`resolve_pod_maps`) when there are any; else the levels
    of a multi-scale encoder (every 4-D feature map of ``out["features"]`` with channels, except the input
    ``images`` themselves, which some encoders return as their first level); else the encoder's output ``z``.
    Then ``h`` (PLOP's ``pre_logits``, the ASPP output).
    """
    maps: list[Tensor]
    if captured:
        maps = list(captured)
    elif "features" in out:
        feats = out["features"]
        values = feats.values() if isinstance(feats, Mapping) else feats
        maps = [v for v in values if isinstance(v, Tensor) and v.ndim == 4 and v.shape[1] > 0 and v is not images]
    else:
        maps = [out["z"]]
    return [*maps, out["h"]]


def _forward(
    model: IncrementalSegmenter, images: Tensor, names: tuple[str, ...], z_old: Tensor | None = None
) -> dict[str, Any]:
    with _capture(model, names) as found:
        out = dict(model.forward_features(images, z_old))
    missing = [name for name in names if not isinstance(found.get(name), Tensor)]
    if missing:
        raise ValueError(
            f"POD's maps {missing} were not computed by the forward pass (modules that did not run or do not "
            "return a tensor): name modules the network runs once per forward in pod_maps"
        )
    out["pod"] = pod_feature_maps(out, [found[name] for name in names], images)
    return out


@register_method
class PLOPMethod(Method):
    r"""PLOP: ``L = w · CE(pseudo-labels) + sqrt(K_t / |C_t|) · (1/L) Σ_l λ_l ||Φ(f_l) - Φ(f_l^{old})||``.

    - Pseudo-labels: :func:`~incseg.functional.pod.entropy_pseudo_labels` with the per-class thresholds
      computed by :meth:`calibrate` (the median normalised entropy of the old model's predictions of each
      class over the step's background pixels, at least ``pseudo_min_threshold``).
    - Cross-entropy (plain) on the pseudo-labelled targets, per pixel times the image's share of confident
      background pixels (``adaptive_factor``), summed and divided by all pixels (as the release).
    - Local POD on the encoder's stage outputs (:attr:`pod_modules`, before their final activation) or levels
      and ``h`` (weight ``pod_factor``) and on the logits, the new classes collapsed into the background (weight
      ``pod_logits_factor``), averaged over the ``L`` maps.

    Options: ``pod_factor`` (0.01), ``pod_logits_factor`` (0.0005), ``pod_scales`` (3: scales 1, 2, 4),
    ``pod_normalize`` (False), ``pod_schedule`` (True: times ``sqrt(K_t / |C_t|)``), ``pseudo_min_threshold``
    (0.001), ``pseudo_bins`` (100, histogram bins of the median), ``adaptive_factor`` (True), ``pod_maps``
    (``"auto"``: :func:`pod_stage_modules`; or names of submodules of the model separated by commas or spaces,
    see :func:`resolve_pod_maps`).

    Raises:
        ValueError: ``pod_maps`` names a module the model does not have.
    """

    family = "plop"
    options: ClassVar[Mapping[str, Any]] = {
        "pod_factor": 0.01,
        "pod_logits_factor": 0.0005,
        "pod_scales": 3,
        "pod_normalize": False,
        "pod_schedule": True,
        "pseudo_min_threshold": 0.001,
        "pseudo_bins": 100,
        "adaptive_factor": True,
        "pod_maps": "auto",
    }

    def __init__(self, config: MethodConfig, model: IncrementalSegmenter, scenario: Scenario) -> None:
        super().__init__(config, model, scenario)
        opts = config.options
        self.scales = tuple(2**i for i in range(int(opts["pod_scales"])))
        self.pod_modules = resolve_pod_maps(model, str(opts["pod_maps"]))
        """The submodules whose outputs POD distils before ``h`` (:func:`resolve_pod_maps`)."""

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        out = super().check_options(options)
        for key in ("pod_factor", "pod_logits_factor", "pseudo_min_threshold"):
            if out[key] < 0:
                raise ValueError(f"{key} must be >= 0, got {out[key]}")
        for key in ("pod_scales", "pseudo_bins"):
            if out[key] < 1:
                raise ValueError(f"{key} must be >= 1, got {out[key]}")
        if out["pod_maps"].strip() != "auto" and not _parse_names(out["pod_maps"]):
            raise ValueError(
                f'pod_maps must be "auto" or names of submodules of the model separated by commas or spaces, got '
                f"{out['pod_maps']!r}"
            )
        return out

    def build_criterion(self, model: IncrementalSegmenter) -> PLOPLoss:
        return PLOPLoss(self.scenario.num_classes_at(self.scenario.num_steps - 1))

    def needs_calibration(self, learner: LearnerView) -> bool:
        criterion = learner.criterion
        assert isinstance(criterion, PLOPLoss)
        n_old = learner.num_old_classes
        return n_old > 0 and int(criterion.calibrated_for) != n_old

    def teacher_forward(self, teacher: IncrementalSegmenter, images: Tensor) -> dict[str, Any]:
        return _forward(teacher, images, self.pod_modules)

    @torch.no_grad()
    def calibrate(self, learner: LearnerView, batches: Iterable[Any]) -> None:
        """Per-class thresholds: the median normalised entropy of the old model's background predictions.

        A histogram of ``pseudo_bins`` bins per old class over ``[0, 1]`` is filled with the normalised
        entropy of every pixel labelled background, at the class the old model predicts there; the median is
        interpolated linearly inside its bin. A class never predicted gets ``pseudo_min_threshold``.
        """
        n_old = learner.num_old_classes
        criterion = learner.criterion
        assert isinstance(criterion, PLOPLoss)
        if n_old == 0:
            return
        bins = int(self.config.options["pseudo_bins"])
        hist = torch.zeros(n_old, bins, dtype=torch.float64)
        seen = False
        for batch in batches:
            images, labels = batch[0], batch[1]
            teacher_out = learner.teacher_forward(images)
            assert teacher_out is not None
            logits = teacher_out["logits"].float()
            labels = labels.to(logits.device)
            probs = torch.softmax(F.interpolate(logits, size=labels.shape[-2:], mode="bilinear"), dim=1)
            background = labels == 0
            uncertainty = normalized_entropy(probs)[background]
            predicted = probs.argmax(dim=1)[background]
            index = predicted * bins + (uncertainty * bins).long().clamp(0, bins - 1)
            hist += torch.bincount(index.cpu(), minlength=n_old * bins).view(n_old, bins).double()
            seen = True
        if not seen:
            raise ValueError("calibrate needs at least one batch of the step's training data")
        thresholds = median_from_histogram(hist)
        floor = float(self.config.options["pseudo_min_threshold"])
        criterion.thresholds.zero_()
        criterion.thresholds[:n_old] = thresholds.clamp(min=floor).to(criterion.thresholds)
        criterion.calibrated_for.fill_(n_old)

    def forward(self, model: IncrementalSegmenter, batch: Batch) -> dict[str, Any]:
        """``forward_features`` plus ``"pod"``, the feature maps POD distils (:func:`pod_feature_maps`)."""
        teacher_out = batch.teacher_out
        z_old = None
        if model.fusion is not None and batch.num_old_classes > 0 and teacher_out is not None:
            z_old = teacher_out["z"]
        return _forward(model, batch.images, self.pod_modules, z_old)

    def loss(self, criterion: nn.Module, out: Mapping[str, Any], batch: Batch) -> LossOutput:
        assert isinstance(criterion, PLOPLoss)
        n_old, labels, teacher_out = batch.num_old_classes, batch.labels, batch.teacher_out
        logits = check_logits(out["logits"], "logits")
        num_classes = logits.shape[1]
        check_labels(labels, num_classes, ignore_index=IGNORE_INDEX, batch_shape=(logits.shape[0],))
        wide = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
        x = F.interpolate(wide, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        opts = self.config.options
        if n_old == 0:
            seg = F.cross_entropy(x, labels, ignore_index=IGNORE_INDEX)
            return LossOutput(seg, {"seg": seg.detach(), "total": seg.detach()})
        if teacher_out is None or "pod" not in teacher_out:
            raise ValueError("plop needs teacher_out from IncrementalLearner.teacher_forward (with its 'pod' maps)")
        if int(criterion.calibrated_for) != n_old:
            raise RuntimeError(
                "PLOP's pseudo-label thresholds are not calibrated for this step: pass the step's training batches "
                "to learner.begin_step(step, data=loader) (or call learner.calibrate(batches) after begin_step)"
            )
        target, factor = entropy_pseudo_labels(labels, teacher_out["logits"], criterion.thresholds)
        per_pixel = F.cross_entropy(x, target, ignore_index=IGNORE_INDEX, reduction="none")
        if opts["adaptive_factor"]:
            per_pixel = per_pixel * factor[:, None, None]
        seg = per_pixel.sum() / max(per_pixel.numel(), 1)

        maps, old_maps = out["pod"], teacher_out["pod"]
        if len(maps) != len(old_maps):
            raise ValueError(f"student and teacher give {len(maps)} and {len(old_maps)} POD feature maps")
        weights = [float(opts["pod_factor"])] * len(maps) + [float(opts["pod_logits_factor"])]
        maps = [*maps, collapse_new_classes(logits, n_old)]
        old_maps = [*old_maps, teacher_out["logits"]]
        normalize = bool(opts["pod_normalize"])
        pod = sum(
            (
                w * local_pod_distance(a, b, self.scales, normalize=normalize)
                for w, a, b in zip(weights, maps, old_maps)
            ),
            start=seg.new_zeros(()),
        )
        pod = pod / len(maps)
        if opts["pod_schedule"]:
            pod = pod * math.sqrt(num_classes / (num_classes - n_old))
        total = seg + pod
        stats = {"pseudo": factor.mean().detach()}
        return LossOutput(total, {"seg": seg.detach(), "pod": pod.detach(), "total": total.detach()}, stats)

    def divergence_hints(self) -> dict[str, str]:
        return {"pod": f"lower pod_factor (now {self.config.options['pod_factor']:g}) or the learning rate"}


def median_from_histogram(hist: Tensor) -> Tensor:
    """Per-row median of histograms ``(C, bins)`` over ``[0, 1]``, interpolated linearly inside the bin that
    holds the middle count; 0 for an empty row.

    Example:
        >>> median_from_histogram(torch.tensor([[0.0, 2.0, 0.0, 0.0]])).tolist()
        [0.375]
    """
    bins = hist.shape[1]
    total = hist.sum(dim=1)
    cum = hist.cumsum(dim=1)
    half = total / 2
    index = torch.searchsorted(cum, half[:, None]).squeeze(1).clamp(max=bins - 1)
    before = torch.where(index > 0, cum.gather(1, (index - 1).clamp(min=0)[:, None]).squeeze(1), torch.zeros_like(half))
    inside = hist.gather(1, index[:, None]).squeeze(1)
    frac = torch.where(inside > 0, (half - before) / inside.clamp(min=1e-12), torch.zeros_like(half))
    median = (index.double() + frac.double()) / bins
    return torch.where(total > 0, median, torch.zeros_like(median)).to(hist.dtype)


# CAF's fields take their "off" values (incseg.methods.config.CAF_FIELDS): PLOP does not read them.
# `plop-release` is the authors' code; `plop` normalises POD's embeddings (PODNet's variant), which keeps POD's
# scale independent of the network's activations: the release's unnormalised terms collapse the old classes on
# both networks of the independent check (docs/protocol.md, "PLOP").
_RELEASE = MethodConfig(name="plop-release", family="plop", init="mib", bn="train", dropout="train")
register_preset(_RELEASE.replace(name="plop", pod_normalize=True))
register_preset(_RELEASE)
