"""Loss modules of incseg: ``nn.Module`` twins of :mod:`incseg.functional` and the overall :class:`CAFLoss`."""

from __future__ import annotations

from incseg.losses.attentive import AttentiveDistillationLoss
from incseg.losses.caf import CAFLoss, LossOutput
from incseg.losses.cross_entropy import UnbiasedCrossEntropyLoss
from incseg.losses.distillation import BalancedKDLoss, KDLoss, UnbiasedKDLoss

__all__ = [
    "AttentiveDistillationLoss",
    "BalancedKDLoss",
    "CAFLoss",
    "KDLoss",
    "LossOutput",
    "UnbiasedCrossEntropyLoss",
    "UnbiasedKDLoss",
]
