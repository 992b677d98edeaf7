"""Loss modules of incseg: ``nn.Module`` twins of :mod:`incseg.functional`, the overall :class:`CAFLoss` and
:class:`DKDLoss`."""

from __future__ import annotations

from incseg.losses.attentive import AttentiveDistillationLoss
from incseg.losses.caf import CAFLoss, LossOutput
from incseg.losses.cross_entropy import UnbiasedCrossEntropyLoss
from incseg.losses.distillation import BalancedKDLoss, KDLoss, UnbiasedKDLoss
from incseg.losses.dkd import DKDLoss

__all__ = [
    "AttentiveDistillationLoss",
    "BalancedKDLoss",
    "CAFLoss",
    "DKDLoss",
    "KDLoss",
    "LossOutput",
    "UnbiasedCrossEntropyLoss",
    "UnbiasedKDLoss",
]
