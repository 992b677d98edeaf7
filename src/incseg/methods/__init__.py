"""Incremental methods as plugins: the method contract and one file per method family.

This package owns the contract between the learner and the methods; :mod:`incseg.learner` only consumes it.

- :class:`MethodConfig` and :data:`METHODS`: a method's settings and the named presets
  (``IncrementalLearner(model, scenario, name)``); :func:`register_preset` adds one.
- :class:`Method`: the hooks a method implements (what it needs from the teacher, ``on_begin_step``, the loss
  as named terms of a :class:`Batch`, ``on_end_step``, its test-time prediction); :func:`register_method`
  makes a family known.
- Families: :class:`CAFMethod` (``ft``, ``lwf``, ``mib``, ``caf``, ``caf-release``, the paper's ablations),
  :class:`PLOPMethod` (``plop``), :class:`DKDMethod` (``dkd``), :class:`STARMethod` (``star``).
- :class:`Component`: a part that composes with any family (``MethodConfig.components``):
  ``caf-fusion`` (:class:`FusionComponent`), ``attentive-distillation`` (:class:`AttentiveDistillationComponent`),
  ``replay`` (:class:`ReplayComponent`, over a :class:`ReplayMemory`), ``ewf`` (:class:`WeightFusionComponent`);
  :func:`register_component` makes yours known, :func:`build_method` builds the plugin of a configuration.
"""

from __future__ import annotations

from incseg.methods.base import Batch, LearnerView, Method
from incseg.methods.components import (
    AttentiveDistillationComponent,
    Component,
    ComposedMethod,
    FusionComponent,
    WeightFusionComponent,
    build_method,
    fuse_weights,
)
from incseg.methods.config import METHODS, MethodConfig
from incseg.methods.registry import (
    get_component,
    get_family,
    register_component,
    register_method,
    register_preset,
    unregister_preset,
)

# The built-in families register themselves and their presets on import.
from incseg.methods.caf import CAFMethod  # isort: skip
from incseg.methods.plop import PLOPMethod  # isort: skip
from incseg.methods.dkd import DKDMethod  # isort: skip
from incseg.methods.star import STARMethod  # isort: skip
from incseg.methods.replay import ReplayComponent, ReplayMemory  # isort: skip
from incseg.methods import compositions  # isort: skip  # noqa: F401  (presets of compositions)

__all__ = [
    "METHODS",
    "AttentiveDistillationComponent",
    "Batch",
    "CAFMethod",
    "Component",
    "ComposedMethod",
    "DKDMethod",
    "FusionComponent",
    "LearnerView",
    "Method",
    "MethodConfig",
    "PLOPMethod",
    "ReplayComponent",
    "ReplayMemory",
    "STARMethod",
    "WeightFusionComponent",
    "build_method",
    "fuse_weights",
    "get_component",
    "get_family",
    "register_component",
    "register_method",
    "register_preset",
    "unregister_preset",
]
