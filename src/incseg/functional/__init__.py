"""Pure tensor functions of CAF: background aggregation (eq. 10, 15), γ (eq. 11), attention maps and losses;
PLOP's Local POD and entropy pseudo-labels; DKD's sigmoid losses and decomposed logits.

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

__all__ = [
    "attentive_distillation_loss",
    "auxiliary_bce_loss",
    "balanced_kd_loss",
    "collapse_new_classes",
    "decompose_logits",
    "entropy_pseudo_labels",
    "gamma_balance",
    "kd_loss",
    "local_pod",
    "local_pod_distance",
    "multilabel_bce_loss",
    "new_background_log_probs",
    "normalized_entropy",
    "old_background_log_probs",
    "pixel_weights",
    "sigmoid_kd_loss",
    "spatial_attention",
    "threshold_background",
    "unbiased_cross_entropy",
    "unbiased_kd_loss",
]
