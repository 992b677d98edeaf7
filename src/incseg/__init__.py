"""incseg: class-incremental semantic segmentation for PyTorch.

Implements *Continual Attentive Fusion for Incremental Learning in Semantic Segmentation* (Yang et al., IEEE
TMM 2022) as reusable parts: CAF blocks (:mod:`incseg.nn`), losses (:mod:`incseg.losses`,
:mod:`incseg.functional`), methods as plugins (:mod:`incseg.methods`: CAF and its baselines, PLOP, replay),
scenarios (:mod:`incseg.scenarios`), datasets (:mod:`incseg.data`), metrics
(:mod:`incseg.metrics`), reference networks (:mod:`incseg.models`), and the small
:class:`~incseg.learner.IncrementalLearner` API that ties them to any encoder-refiner-classifier network.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from incseg._version import __version__

if TYPE_CHECKING:
    from incseg import data, functional, losses, methods, metrics, models, nn, scenarios
    from incseg._checks import InputTypeError, NonFiniteError, set_validate_values
    from incseg.learner import CheckpointError, IncrementalLearner, MethodConfig
    from incseg.scenarios import Scenario, get_scenario

# Loaded on first use (PEP 562), so ``import incseg.cli`` and ``incseg --help`` do not import torch.
_SUBMODULES = ("data", "functional", "losses", "methods", "metrics", "models", "nn", "scenarios")
_ATTRIBUTES = {
    "CheckpointError": "incseg.learner.checkpoint",
    "InputTypeError": "incseg._checks",
    "NonFiniteError": "incseg._checks",
    "IncrementalLearner": "incseg.learner",
    "MethodConfig": "incseg.learner",
    "Scenario": "incseg.scenarios",
    "get_scenario": "incseg.scenarios",
    "set_validate_values": "incseg._checks",
}


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"incseg.{name}")
    if name in _ATTRIBUTES:
        value = getattr(importlib.import_module(_ATTRIBUTES[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'incseg' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = [
    "CheckpointError",
    "IncrementalLearner",
    "InputTypeError",
    "MethodConfig",
    "NonFiniteError",
    "Scenario",
    "__version__",
    "data",
    "functional",
    "get_scenario",
    "losses",
    "methods",
    "metrics",
    "models",
    "nn",
    "scenarios",
    "set_validate_values",
]
