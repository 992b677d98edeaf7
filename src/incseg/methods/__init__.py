"""Incremental methods as plugins: one file per method family behind the :class:`Method` protocol.

- :class:`Method`: the hooks a method implements (what it needs from the teacher, ``on_begin_step``, the loss
  as named terms, ``on_end_step``); :func:`register_method` makes a family known.
- :func:`register_preset`: a named :class:`~incseg.learner.MethodConfig` (``IncrementalLearner(model,
  scenario, name)``); :data:`incseg.learner.METHODS` lists them.
- Families: :class:`CAFMethod` (``ft``, ``lwf``, ``mib``, ``caf``, ``caf-release``, the paper's ablations),
  :class:`PLOPMethod` (``plop``).
- :class:`ReplayMemory`: a class-balanced exemplar memory usable with any method.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from incseg.methods.base import Method
from incseg.methods.registry import get_family, register_method, register_preset, unregister_preset

if TYPE_CHECKING:
    from incseg.methods.caf import CAFMethod
    from incseg.methods.plop import PLOPMethod
    from incseg.methods.replay import ReplayMemory

# The families import incseg.learner (MethodConfig), which imports this package: load them on first use.
_LAZY = {
    "CAFMethod": "incseg.methods.caf",
    "PLOPMethod": "incseg.methods.plop",
    "ReplayMemory": "incseg.methods.replay",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'incseg.methods' has no attribute {name!r}")


__all__ = [
    "CAFMethod",
    "Method",
    "PLOPMethod",
    "ReplayMemory",
    "get_family",
    "register_method",
    "register_preset",
    "unregister_preset",
]
