"""Incremental learning without a trainer: step lifecycle, frozen teacher, training module, checkpoints.

- :class:`IncrementalLearner`: ``begin_step`` / ``training_step`` / ``param_groups`` / ``end_step`` /
  ``predict`` / ``save`` / ``load`` around an :class:`~incseg.models.IncrementalSegmenter`.
- :class:`MethodConfig` and :data:`METHODS`: the methods (``ft``, ``lwf``, ``mib``, ``caf``, ``joint``, ablations,
  ``plop``); each is implemented by a plugin of :mod:`incseg.methods`.
- :class:`TrainingModule`: student + criterion, the module to wrap in ``DistributedDataParallel``.
- :class:`DivergenceGuard`, :class:`DivergenceError`: divergence is never silent.
- :func:`freeze`, :func:`unwrap_module`, :class:`CheckpointError`.
"""

from incseg.learner._freeze import freeze, is_frozen
from incseg.learner.checkpoint import FORMAT_VERSION, CheckpointError
from incseg.learner.config import METHODS, MethodConfig
from incseg.learner.guard import DivergenceError, DivergenceGuard, NonFiniteLossError
from incseg.learner.learner import IncrementalLearner, unwrap_module
from incseg.learner.module import TrainingModule

__all__ = [
    "FORMAT_VERSION",
    "METHODS",
    "CheckpointError",
    "DivergenceError",
    "DivergenceGuard",
    "IncrementalLearner",
    "MethodConfig",
    "NonFiniteLossError",
    "TrainingModule",
    "freeze",
    "is_frozen",
    "unwrap_module",
]
