"""Pure tensor functions of CAF: background aggregation (eq. 10, 15), γ (eq. 11), attention maps and losses;
PLOP's Local POD and entropy pseudo-labels; DKD's sigmoid losses and decomposed logits; STAR's prototype replay
and losses.

Every function takes logits or features and returns tensors; the :mod:`incseg.losses` modules are thin
``nn.Module`` twins of the loss functionals. The losses upcast half/bfloat16 inputs to float32, work in log
space, never synchronise with the host (label value checks aside, see :func:`incseg._checks.set_validate_values`),
expect finite logits and support first-order gradients.
"""

from __future__ import annotations

from incseg.functional.attention import attentive_distillation_loss, pixel_weights, spatial_attention
from incseg.functional.background import gamma_balance, new_background_log_probs, old_background_log_probs
from incseg.functional.cross_entropy import unbiased_cross_entropy
from incseg.functional.distillation import balanced_kd_loss, kd_loss, unbiased_kd_loss
from incseg.functional.dkd import (
    auxiliary_bce_loss,
    decompose_logits,
    multilabel_bce_loss,
    sigmoid_kd_loss,
    threshold_background,
)
from incseg.functional.pod import (
    collapse_new_classes,
    entropy_pseudo_labels,
    local_pod,
    local_pod_distance,
    normalized_entropy,
)
from incseg.functional.star import (
    class_feature_statistics,
    negative_bce,
    ocfm_loss,
    prototypes_from_statistics,
    replay_features,
    sad_loss,
    sample_labels,
    sigmoid_predictions,
    star_classification_loss,
)

__all__ = [
    "attentive_distillation_loss",
    "auxiliary_bce_loss",
    "balanced_kd_loss",
    "class_feature_statistics",
    "collapse_new_classes",
    "decompose_logits",
    "entropy_pseudo_labels",
    "gamma_balance",
    "kd_loss",
    "local_pod",
    "local_pod_distance",
    "multilabel_bce_loss",
    "negative_bce",
    "new_background_log_probs",
    "normalized_entropy",
    "ocfm_loss",
    "old_background_log_probs",
    "pixel_weights",
    "prototypes_from_statistics",
    "replay_features",
    "sad_loss",
    "sample_labels",
    "sigmoid_kd_loss",
    "sigmoid_predictions",
    "spatial_attention",
    "star_classification_loss",
    "threshold_background",
    "unbiased_cross_entropy",
    "unbiased_kd_loss",
]
