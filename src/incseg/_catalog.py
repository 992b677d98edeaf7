"""Names the command line lists without importing torch: the datasets' standard tasks, the methods' summaries.

This module imports nothing from incseg or torch, so ``incseg --help`` stays fast. The scenario registry
(:mod:`incseg.scenarios.registry`) reads its task lists from here and :mod:`incseg.learner.config` re-exports
:data:`METHOD_DESCRIPTIONS`; a test checks that every preset of :data:`~incseg.learner.METHODS` has a line.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

__all__ = ["DATASET_TASKS", "METHOD_DESCRIPTIONS"]

_VOC_TASKS = ("19-1", "15-5", "15-1", "10-1", "5-3", "offline")

DATASET_TASKS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "voc": _VOC_TASKS,
        "ade20k": ("100-50", "100-10", "50-50", "offline"),
        "synthetic": _VOC_TASKS,
    }
)
"""Standard tasks of each dataset (any other ``"A-B"`` split of its classes is accepted as well)."""

METHOD_DESCRIPTIONS: Mapping[str, str] = MappingProxyType(
    {
        "ft": "fine-tuning: plain cross-entropy on the current classes only (the lower bound)",
        "joint": "all classes in one step (the upper bound; same losses as ft)",
        "lwf": "fine-tuning + plain knowledge distillation of the old model's outputs (Li & Hoiem)",
        "mib": "unbiased cross-entropy + unbiased distillation + MiB init of new classes (Cermelli et al.)",
        "caf": "CAF (eq. 1-8, 13) with MiB's KD, gradient-balanced AD, no student dropout, fusion dropout",
        "caf-paper": "CAF exactly as eq. 1-13, balanced KD, fixed weights (lambda_AD=1000): diverges on most networks",
        "caf-release": "the authors' public code: MiB + plain MSE feature distillation x1000, no CAF module",
        "baseline": "unbiased cross-entropy with MiB init, no distillation (Table III's baseline)",
        "baseline+kd": "baseline + unbiased knowledge distillation (= mib)",
        "baseline+bkd": "baseline + balanced knowledge distillation (eq. 11-12)",
        "baseline+ad": "baseline + attentive feature distillation (eq. 5-8)",
        "baseline+ad+bkd": "baseline + attentive distillation + balanced KD (no CAF module)",
        "baseline+caf": "baseline + the continual attentive fusion module (eq. 1-4)",
        "baseline+caf+bkd": "baseline + CAF module + balanced KD",
        "baseline+caf+ad": "baseline + CAF module + attentive distillation",
        "baseline+fd": "baseline + plain feature distillation (Table VI)",
        "baseline+ad_sp": "baseline + attentive distillation with the spatial attention only (Table VI)",
        "baseline+ad_ch": "baseline + attentive distillation with the channel attention only (Table VI)",
        "plop": "PLOP (Douillard et al., CVPR 2021): Local POD + entropy pseudo-labels, POD's embeddings normalised",
        "plop-release": "PLOP as the authors' code: unnormalised POD embeddings (collapses on some networks)",
        "dkd": "DKD: sigmoid classifiers + decomposed knowledge distillation (Baek et al., NeurIPS 2022)",
        "star": "STAR: sigmoid classifier, old-class prototype replay, OCFM and SAD (Chen et al., NeurIPS 2023)",
        "mib+ewf": "MiB + endpoints weight fusion of old and new weights after each step (Xiao et al., CVPR 2023)",
        "mib-m": "MiB + class-balanced replay of 100 training images (memory_size)",
        "plop+ewf": "PLOP + endpoints weight fusion after each step",
        "plop-m": "PLOP + class-balanced replay of 100 training images (memory_size)",
        "plop+caf": "PLOP + CAF's fusion module and attentive distillation (the caf recipe's settings)",
        "dkd+caf": "DKD + CAF's fusion module and attentive distillation (the caf recipe's settings)",
        "dkd-m": "DKD-M: DKD + class-balanced replay of 100 training images (memory_size)",
    }
)
"""One line per named method of :data:`incseg.learner.METHODS`, shown by ``incseg --help``."""
