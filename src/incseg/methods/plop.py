"""PLOP (Douillard et al., CVPR 2021): Local POD feature distillation and entropy-based pseudo-labels.

Equations and choices: docs/concepts.md ("PLOP"). The published weights (the authors' ``--method PLOP``):
POD factor 0.01 on every feature map and 0.0005 on the logits, scales 1, 2, 4, the schedule
``sqrt(K_t / |C_t|)``, entropy pseudo-labels with per-class median thresholds (floor 0.001), the loss factor
of uncertain images, MiB initialisation of new classes, plain cross-entropy and no output distillation.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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

__all__ = ["PLOPLoss", "PLOPMethod", "pod_feature_maps"]


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


@contextlib.contextmanager
def _stage_outputs(model: IncrementalSegmenter) -> Iterator[list[Tensor]]:
    """Capture the outputs of the stages of a sequential single-tensor encoder during a forward pass."""
    found: list[Tensor] = []
    encoder = model.encoder
    stages = list(encoder.children()) if model.levels is None and isinstance(encoder, nn.Sequential) else []
    handles = (
        [m.register_forward_hook(lambda _m, _i, out: found.append(out)) for m in stages] if len(stages) > 1 else []
    )
    try:
        yield found
    finally:
        for handle in handles:
            handle.remove()


def pod_feature_maps(out: Mapping[str, Any], stages: list[Tensor]) -> list[Tensor]:
    """The feature maps PLOP distils, from fine to coarse, then the refined features ``h``.

    The encoder's levels (every feature map of ``out["features"]`` for a multi-scale encoder), else the
    outputs of the stages of a sequential encoder (``stages``), else its output ``z``; then ``h`` (PLOP's
    ``pre_logits``, the ASPP output).
    """
    maps: list[Tensor]
    if "features" in out:
        feats = out["features"]
        values = feats.values() if isinstance(feats, Mapping) else feats
        maps = [v for v in values if isinstance(v, Tensor) and v.ndim == 4 and v.shape[1] > 0]
    elif stages:
        maps = [s for s in stages if isinstance(s, Tensor) and s.ndim == 4]
    else:
        maps = [out["z"]]
    return [*maps, out["h"]]


def _forward(model: IncrementalSegmenter, images: Tensor, z_old: Tensor | None = None) -> dict[str, Any]:
    with _stage_outputs(model) as stages:
        out = dict(model.forward_features(images, z_old))
    out["pod"] = pod_feature_maps(out, stages)
    return out


@register_method
class PLOPMethod(Method):
    r"""PLOP: ``L = w · CE(pseudo-labels) + sqrt(K_t / |C_t|) · (1/L) Σ_l λ_l ||Φ(f_l) - Φ(f_l^{old})||``.

    - Pseudo-labels: :func:`~incseg.functional.pod.entropy_pseudo_labels` with the per-class thresholds
      computed by :meth:`calibrate` (the median normalised entropy of the old model's predictions of each
      class over the step's background pixels, at least ``pseudo_min_threshold``).
    - Cross-entropy (plain) on the pseudo-labelled targets, per pixel times the image's share of confident
      background pixels (``adaptive_factor``), summed and divided by all pixels (as the release).
    - Local POD on the encoder's stages or levels and ``h`` (weight ``pod_factor``) and on the logits, the new
      classes collapsed into the background (weight ``pod_logits_factor``), averaged over the ``L`` maps.

    Options: ``pod_factor`` (0.01), ``pod_logits_factor`` (0.0005), ``pod_scales`` (3: scales 1, 2, 4),
    ``pod_normalize`` (False), ``pod_schedule`` (True: times ``sqrt(K_t / |C_t|)``), ``pseudo_min_threshold``
    (0.001), ``pseudo_bins`` (100, histogram bins of the median), ``adaptive_factor`` (True).
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
    }

    def __init__(self, config: MethodConfig, model: IncrementalSegmenter, scenario: Scenario) -> None:
        super().__init__(config, model, scenario)
        opts = config.options
        self.scales = tuple(2**i for i in range(int(opts["pod_scales"])))

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        out = super().check_options(options)
        for key in ("pod_factor", "pod_logits_factor", "pseudo_min_threshold"):
            if out[key] < 0:
                raise ValueError(f"{key} must be >= 0, got {out[key]}")
        for key in ("pod_scales", "pseudo_bins"):
            if out[key] < 1:
                raise ValueError(f"{key} must be >= 1, got {out[key]}")
        return out

    def build_criterion(self, model: IncrementalSegmenter) -> PLOPLoss:
        return PLOPLoss(self.scenario.num_classes_at(self.scenario.num_steps - 1))

    def needs_calibration(self, learner: LearnerView) -> bool:
        criterion = learner.criterion
        assert isinstance(criterion, PLOPLoss)
        n_old = learner.num_old_classes
        return n_old > 0 and int(criterion.calibrated_for) != n_old

    def teacher_forward(self, teacher: IncrementalSegmenter, images: Tensor) -> dict[str, Any]:
        return _forward(teacher, images)

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
        return _forward(model, batch.images, z_old)

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
register_preset(MethodConfig(name="plop", family="plop", init="mib", bn="train", dropout="train"))
