"""STAR (Chen et al., NeurIPS 2023): prototype replay, background repetition, OCFM and SAD losses.

Equations and choices: docs/concepts.md ("STAR"); where incseg follows the authors' release
(github.com/jinpeng0528/STAR) rather than the paper: docs/protocol.md ("STAR"). The release's weights: positive
weight 4 of the binary cross-entropy, OCFM 5, SAD 0.05; random initialisation of new classes, batch norm frozen
(statistics and affine weights) and dropout off at steps > 0, the old classifier unchanged, and the release's
learning-rate ratios (:meth:`STARMethod.param_group_factors`).

The per-class state (prototypes, spreads, norm statistics, pixel counts) lives in the buffers of
:class:`STARLoss`, the method's criterion, so that checkpoints keep it. It is computed by
:meth:`STARMethod.consolidate` on the step's training data after training
(``learner.end_step(data=loader)``); the replay and background weights of a step by
:meth:`STARMethod.calibrate` before training (``learner.begin_step(step, data=loader)``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from incseg._checks import check_labels, check_logits
from incseg.functional._common import resize_to, upcast
from incseg.functional.star import (
    FeatureStatistics,
    class_feature_statistics,
    ocfm_loss,
    prototypes_from_statistics,
    replay_features,
    sad_loss,
    sample_labels,
    sigmoid_predictions,
    star_classification_loss,
)
from incseg.losses import LossOutput
from incseg.methods.base import Batch, LearnerView, Method
from incseg.methods.config import MethodConfig
from incseg.methods.registry import register_method, register_preset
from incseg.models import IncrementalClassifier, IncrementalSegmenter
from incseg.scenarios import IGNORE_INDEX

if TYPE_CHECKING:
    pass

__all__ = ["STARLoss", "STARMethod"]

# The release's background bookkeeping of the overlapped setting (trainer/trainer_voc.py:327-384): the old
# background holds about 1% of every new class, and half of the current background counts as new background.
_FUTURE_SHARE = 0.01
_OVERLAP_DISCOUNT = 0.5


class STARLoss(nn.Module):
    """STAR's state that checkpoints must keep; it has no trained parameters. Buffers, sized for the whole
    scenario (``K`` classes, background included, ``C`` channels of the features ``h``):

    - ``prototypes`` ``(K, C)``, ``noise`` ``(K, C)``: the normalised prototype of each class and the
      per-channel spread of the normalised features around it;
    - ``norm_mean`` ``(K,)``, ``norm_std`` ``(K,)``: mean and standard deviation of the feature norms;
    - ``counts`` ``(K,)`` int64: pixels of each class (row 0: background) on the feature grid of the training
      data seen so far, as the release counts them;
    - ``pred_counts`` ``(K,)`` int64: pixels labelled background in the current step's data where the old
      model predicts each class (row 0: background);
    - ``replay_counts`` ``(K,)`` int64: prototypes replayed per iteration for each old class;
    - ``background_ratio``: the repetition factor of the background features;
    - ``calibrated_for``: the number of old classes of the last calibration (``-1`` before);
    - ``consolidated_for``: the number of classes whose statistics are stored (0 before).

    Args:
        num_classes: classes of the whole scenario (background included).
        channels: channels of the features ``h`` the classifier sees.
    """

    prototypes: Tensor
    noise: Tensor
    norm_mean: Tensor
    norm_std: Tensor
    counts: Tensor
    pred_counts: Tensor
    replay_counts: Tensor
    background_ratio: Tensor
    calibrated_for: Tensor
    consolidated_for: Tensor

    def __init__(self, num_classes: int, channels: int) -> None:
        super().__init__()
        self.register_buffer("prototypes", torch.zeros(num_classes, channels))
        self.register_buffer("noise", torch.zeros(num_classes, channels))
        self.register_buffer("norm_mean", torch.zeros(num_classes))
        self.register_buffer("norm_std", torch.zeros(num_classes))
        for name in ("counts", "pred_counts", "replay_counts"):
            self.register_buffer(name, torch.zeros(num_classes, dtype=torch.int64))
        self.register_buffer("background_ratio", torch.zeros(()))
        self.register_buffer("calibrated_for", torch.tensor(-1, dtype=torch.int64))
        self.register_buffer("consolidated_for", torch.tensor(0, dtype=torch.int64))


def _head_logits(classifier: IncrementalClassifier, features: Tensor) -> Tensor:
    """The classifier's heads on ``features`` ``(B, C, h, w)`` at their own resolution (no upsampling), or on
    feature vectors ``(N, C)`` (as ``1 x 1`` maps; the centre tap of a ``k x k`` head), giving ``(N, K)``."""
    vectors = features.ndim == 2
    x = features[:, :, None, None] if vectors else features
    weight = classifier.head(0).weight
    x = x.to(weight.dtype) if not torch.is_autocast_enabled() else x
    out = torch.cat([classifier.head(i)(x) for i in range(classifier.num_steps)], dim=1)
    return out[:, :, 0, 0] if vectors else out


def _is_batch_norm(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.batchnorm._BatchNorm)


@register_method
class STARMethod(Method):
    r"""STAR: ``L = λ_BCE Σ_c (L_cur + a L_rep + b L_bg)_c / (1 + a + b) + λ_OCFM L_OCFM + λ_SAD L_SAD``.

    - Sigmoid classification of the current step's classes (:func:`~incseg.functional.star.star_classification_loss`),
      positive weight ``pos_weight``; the background has no logit. At step 0 only ``L_cur``.
    - Prototype replay (``replay``): per iteration and old class ``c``, ``replay_counts[c]`` features sampled
      around the stored prototype (:func:`~incseg.functional.star.replay_features`) are negatives of the new
      classes, with weight ``a = N_rep / (B h w)``.
    - Background repetition (``background_reweight``): the features of pixels that the labels and the old
      model both call background are negatives once more, ``b = background_ratio · M / (B h w)``.
    - OCFM (weight ``ocfm_factor``) on ``h`` where the old model predicts an old class on a background pixel
      (logit above ``pseudo_threshold``); SAD (weight ``sad_factor``) between the new classes' centres and the
      old prototypes.

    Prediction: the most likely class where its sigmoid exceeds 1/2, background elsewhere
    (:meth:`predict_logits` returns logits with a constant 0 in the background channel).

    Options: ``pos_weight`` (4.0), ``bce_factor`` (1.0), ``ocfm_factor`` (5.0), ``sad_factor`` (0.05),
    ``replay`` (True), ``background_reweight`` (True), ``pseudo_threshold`` (0.5, a logit), ``freeze_bn_affine``
    (True: the affine weights of batch norm do not train at steps > 0, as the release's ``--freeze_bn``),
    ``backbone_lr_scale`` (0.1) and ``head_lr_scale`` (10.0, steps > 0 only): factors on the learning rates of
    the encoder and refiner and of the new head (:meth:`param_group_factors`).
    """

    family = "star"
    options: ClassVar[Mapping[str, Any]] = {
        "pos_weight": 4.0,
        "bce_factor": 1.0,
        "ocfm_factor": 5.0,
        "sad_factor": 0.05,
        "replay": True,
        "background_reweight": True,
        "pseudo_threshold": 0.5,
        "freeze_bn_affine": True,
        "backbone_lr_scale": 0.1,
        "head_lr_scale": 10.0,
    }

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        out = super().check_options(options)
        for key in ("pos_weight", "bce_factor", "ocfm_factor", "sad_factor"):
            if out[key] < 0:
                raise ValueError(f"{key} must be >= 0, got {out[key]}")
        for key in ("backbone_lr_scale", "head_lr_scale"):
            if out[key] <= 0:
                raise ValueError(f"{key} must be > 0, got {out[key]}")
        return out

    def param_group_factors(self, step: int) -> Mapping[str, tuple[float, float]]:
        """The release's learning rates relative to those of cross-entropy methods (MiB's, incseg's defaults):
        its backbone trains at a tenth of them at every step (``--lr`` 1e-3 then 1e-4 against MiB's 1e-2 and
        1e-3) while its classifier keeps them at step 0 and its new classifier trains at 10x at steps > 0
        (``train_voc.py:123-142``, ``scripts/voc/*``): ``backbone_lr_scale`` on the encoder and the refiner,
        ``head_lr_scale`` on the new head at steps > 0 (weight decay unchanged)."""
        backbone = float(self.config.options["backbone_lr_scale"])
        factors = {"encoder": (backbone, 1.0), "refiner": (backbone, 1.0)}
        if step > 0:
            factors["new_classifier"] = (float(self.config.options["head_lr_scale"]), 1.0)
        return factors

    def build_criterion(self, model: IncrementalSegmenter) -> STARLoss:
        return STARLoss(self.scenario.num_classes_at(self.scenario.num_steps - 1), model.h_channels)

    # ------------------------------------------------------------------ structure
    def _freeze(self, model: IncrementalSegmenter) -> None:
        """The release trains neither the old classifier nor (``--freeze_bn``) batch norm at steps > 0."""
        if model.classifier.num_steps > 1:
            model.classifier.freeze_old()
            if self.config.options["freeze_bn_affine"]:
                for m in model.modules():
                    if _is_batch_norm(m):
                        m.requires_grad_(False)

    def prepare_model(self, model: IncrementalSegmenter, *, teacher: bool) -> None:
        if not teacher:
            self._freeze(model)

    def on_begin_step(self, learner: LearnerView, step: int) -> None:
        if step > 0:
            self._freeze(learner.model)

    # ------------------------------------------------------------------ calibration (before training)
    def needs_calibration(self, learner: LearnerView) -> bool:
        criterion = learner.criterion
        assert isinstance(criterion, STARLoss)
        n_old = learner.num_old_classes
        return n_old > 0 and int(criterion.calibrated_for) != n_old

    @torch.no_grad()
    def calibrate(self, learner: LearnerView, batches: Iterable[Any]) -> None:
        """Count, on the feature grid of the step's data, the background pixels the old model predicts as each
        class (``pred_counts``), then set the per-iteration replay counts and the background ratio
        (``trainer/trainer_voc.py:362-378, 502-527`` of the release)."""
        n_old = learner.num_old_classes
        criterion = learner.criterion
        assert isinstance(criterion, STARLoss)
        if n_old == 0:
            return
        if int(criterion.consolidated_for) < n_old:
            raise RuntimeError(
                "STAR has no prototypes of the old classes: the previous step was not consolidated (end it with "
                "learner.end_step(data=loader))"
            )
        threshold = float(self.config.options["pseudo_threshold"])
        pred = torch.zeros(n_old, dtype=torch.int64)
        num_batches = 0
        for batch in batches:
            images, labels = batch[0], batch[1]
            teacher_out = learner.teacher_forward(images)
            assert teacher_out is not None
            logits = upcast(teacher_out["logits"])
            labels = labels.to(logits.device)
            predicted = sigmoid_predictions(resize_to(logits, labels.shape[-2:]), threshold=threshold)
            grid = teacher_out["h"].shape[-2:]
            small_pred, small_labels = sample_labels(predicted, grid), sample_labels(labels, grid)
            pred += torch.bincount(small_pred[small_labels == 0].cpu(), minlength=n_old)[:n_old]
            num_batches += 1
        if num_batches == 0:
            raise ValueError("calibrate needs at least one batch of the step's training data")
        step = learner.step
        n_new = len(self.scenario.classes_at(step))
        prev = criterion.counts[:n_old].cpu().double()
        overlapped = self.scenario.mode == "overlapped"
        if overlapped:
            replay = (prev[1:] - pred[1:].double()) / num_batches
            prev_bg = float(prev[0]) * (1 - _FUTURE_SHARE * n_new)
            ratio = prev_bg / float(pred[0]) - _OVERLAP_DISCOUNT if pred[0] > 0 else 0.0
        else:
            replay = prev[1:] / num_batches
            prev_bg = float(prev[0])
            ratio = prev_bg / float(pred[0]) if pred[0] > 0 else 0.0
        criterion.pred_counts.zero_()
        criterion.pred_counts[:n_old] = pred.to(criterion.pred_counts.device)
        criterion.replay_counts.zero_()
        criterion.replay_counts[1:n_old] = replay.trunc().clamp_min(0).long().to(criterion.replay_counts.device)
        criterion.background_ratio.fill_(max(ratio, 0.0))
        criterion.calibrated_for.fill_(n_old)

    # ------------------------------------------------------------------ consolidation (after training)
    def needs_consolidation(self, learner: LearnerView) -> bool:
        criterion = learner.criterion
        assert isinstance(criterion, STARLoss)
        return int(criterion.consolidated_for) != self.scenario.num_classes_at(learner.step)

    @torch.no_grad()
    def consolidate(self, learner: LearnerView, batches: Iterable[Any]) -> None:
        """Prototypes, spreads, norm statistics and pixel counts of the step's classes, from the trained model
        in evaluation mode on the step's data; then the background count of the scenario so far
        (``base/base_trainer.py:139-278``, ``trainer/trainer_voc.py:380-388`` of the release)."""
        criterion = learner.criterion
        assert isinstance(criterion, STARLoss)
        model = learner.model
        n_old = learner.num_old_classes
        k = self.scenario.num_classes_at(learner.step)
        if n_old > 0 and int(criterion.calibrated_for) != n_old:
            raise RuntimeError(
                "STAR was not calibrated for this step: pass the step's training batches to "
                "learner.begin_step(step, data=loader) (or call learner.calibrate(batches) after begin_step)"
            )
        modes = [(m, m.training) for m in model.modules()]
        stats: FeatureStatistics | None = None
        try:
            model.eval()
            for batch in batches:
                images, labels = batch[0], batch[1]
                teacher_out = learner.teacher_forward(images) if model.fusion is not None else None
                out = self.forward(model, Batch(images, labels, teacher_out, n_old))
                part = class_feature_statistics(out["h"], labels.to(out["h"].device), k)
                stats = part if stats is None else stats + part
        finally:
            for m, training in modes:
                m.training = training
        if stats is None:
            raise ValueError("consolidate needs at least one batch of the step's training data")
        proto, noise, mean, std = prototypes_from_statistics(stats)
        first = max(n_old, 1)
        new = slice(first, k)
        criterion.prototypes[new] = proto[new].to(criterion.prototypes)
        criterion.noise[new] = noise[new].to(criterion.noise)
        criterion.norm_mean[new] = mean[new].to(criterion.norm_mean)
        criterion.norm_std[new] = std[new].to(criterion.norm_std)
        counts = criterion.counts
        counts[new] = stats.pixels[new].round().long().to(counts.device)
        if n_old == 0:
            counts[0] = int(stats.pixels[0])
        else:
            n_new = k - n_old
            prev_bg = float(counts[0])
            pred = criterion.pred_counts[:n_old]
            if self.scenario.mode == "overlapped":
                counts[0] = int(float(pred[0]) * _OVERLAP_DISCOUNT + prev_bg * (1 - _FUTURE_SHARE * n_new))
            else:
                counts[0] = int(float(pred[0]) + prev_bg)
                counts[1:n_old] += pred[1:]
        criterion.consolidated_for.fill_(k)

    # ------------------------------------------------------------------ training
    def forward(self, model: IncrementalSegmenter, batch: Batch) -> dict[str, Any]:
        """``forward_features`` (:meth:`Method.forward`: with the teacher's ``z`` when the model has a fusion
        module) plus ``"classifier"``, the model's classifier, which classifies the replayed features."""
        out = super().forward(model, batch)
        out["classifier"] = model.classifier
        return out

    def loss(self, criterion: nn.Module, out: Mapping[str, Any], batch: Batch) -> LossOutput:
        assert isinstance(criterion, STARLoss)
        opts = self.config.options
        n_old, labels, teacher_out = batch.num_old_classes, batch.labels, batch.teacher_out
        logits = check_logits(out["logits"], "logits", min_classes=2)
        num_classes = logits.shape[1]
        check_labels(labels, num_classes, ignore_index=IGNORE_INDEX, batch_shape=(logits.shape[0],))
        pos_weight = float(opts["pos_weight"])
        if n_old == 0:
            bce = float(opts["bce_factor"]) * star_classification_loss(
                logits, labels, num_old_classes=0, pos_weight=pos_weight
            )
            return LossOutput(bce, {"bce": bce.detach(), "total": bce.detach()})
        if teacher_out is None or "logits" not in teacher_out or "h" not in teacher_out:
            raise ValueError("star needs teacher_out from IncrementalLearner.teacher_forward (its 'logits' and 'h')")
        if int(criterion.calibrated_for) != n_old:
            raise RuntimeError(
                "STAR's replay counts are not calibrated for this step: pass the step's training batches to "
                "learner.begin_step(step, data=loader) (or call learner.calibrate(batches) after begin_step)"
            )
        h, h_old = out["h"], teacher_out["h"]
        classifier: IncrementalClassifier = out["classifier"]
        old_logits = upcast(teacher_out["logits"])
        predicted = sigmoid_predictions(
            resize_to(old_logits, labels.shape[-2:]), threshold=float(opts["pseudo_threshold"])
        )
        background = labels == 0
        cells = h.shape[0] * h.shape[-2] * h.shape[-1]

        replay_logits, replay_weight = None, 0.0
        if opts["replay"]:
            total = int(criterion.replay_counts.sum())
            if total > 0:
                feats, _ = replay_features(
                    criterion.prototypes[:n_old],
                    criterion.noise[:n_old],
                    criterion.norm_mean[:n_old],
                    criterion.norm_std[:n_old],
                    criterion.replay_counts[:n_old],
                    total=total,
                )
                replay_logits = _head_logits(classifier, feats)
                replay_weight = total / cells
        background_logits, background_weight = None, h.new_zeros((), dtype=torch.float32)
        if opts["background_reweight"]:
            region = sample_labels(background & (predicted == 0), h.shape[-2:])
            small = logits if logits.shape[-2:] == h.shape[-2:] else _head_logits(classifier, h)
            background_logits = small.permute(0, 2, 3, 1)[region]
            background_weight = upcast(criterion.background_ratio) * region.sum() / cells
        bce = float(opts["bce_factor"]) * star_classification_loss(
            logits,
            labels,
            num_old_classes=n_old,
            replay_logits=replay_logits,
            background_logits=background_logits,
            replay_weight=replay_weight,
            background_weight=background_weight,
            pos_weight=pos_weight,
        )
        ocfm = float(opts["ocfm_factor"]) * ocfm_loss(h, h_old, background & (predicted > 0))
        sad = float(opts["sad_factor"]) * sad_loss(
            h,
            labels,
            criterion.prototypes[1:n_old],
            num_old_classes=n_old,
            num_classes=num_classes,
            valid=criterion.counts[1:n_old] > 0,
        )
        total_loss = bce + ocfm + sad
        terms = {"bce": bce.detach(), "ocfm": ocfm.detach(), "sad": sad.detach(), "total": total_loss.detach()}
        stats = {"replay_weight": h.new_tensor(float(replay_weight)), "background_weight": background_weight.detach()}
        return LossOutput(total_loss, terms, stats)

    # ------------------------------------------------------------------ inference
    def predict_logits(
        self,
        model: IncrementalSegmenter,
        images: Tensor,
        *,
        teacher_forward: Callable[[Tensor], Mapping[str, Any] | None],
        strategy: str | None = None,
    ) -> Tensor:
        """The class logits with a constant 0 as background logit: their argmax is the release's prediction
        (``trainer/trainer_voc.py:231-238``): the most likely class where its sigmoid exceeds 1/2, else
        background (a tie at 0 goes to the background)."""
        logits = super().predict_logits(model, images, teacher_forward=teacher_forward, strategy=strategy)
        return torch.cat([torch.zeros_like(logits[:, :1]), logits[:, 1:]], dim=1)

    def divergence_hints(self) -> dict[str, str]:
        return {"ocfm": f"lower ocfm_factor (now {self.config.options['ocfm_factor']:g}) or the learning rate"}


# The release: random init of new classes, dropout off and batch norm frozen (--freeze_bn) at steps > 0.
register_preset(MethodConfig(name="star", family="star", init="random", bn="frozen", dropout="frozen"))
