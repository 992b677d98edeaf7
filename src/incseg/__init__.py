"""incseg: class-incremental semantic segmentation for PyTorch.

Implements *Continual Attentive Fusion for Incremental Learning in Semantic Segmentation* (Yang et al., IEEE
TMM 2022) as reusable parts: CAF blocks (:mod:`incseg.nn`), losses (:mod:`incseg.losses`,
:mod:`incseg.functional`), scenarios (:mod:`incseg.scenarios`), datasets (:mod:`incseg.data`), metrics
(:mod:`incseg.metrics`), reference networks (:mod:`incseg.models`), and the small
:class:`~incseg.learner.IncrementalLearner` API that ties them to any encoder-refiner-classifier network.
"""

from incseg import data, functional, losses, metrics, models, nn, scenarios
from incseg._checks import set_validate_values
from incseg._version import __version__
from incseg.learner import IncrementalLearner, MethodConfig
from incseg.scenarios import Scenario, get_scenario

__all__ = [
    "IncrementalLearner",
    "MethodConfig",
    "Scenario",
    "__version__",
    "data",
    "functional",
    "get_scenario",
    "losses",
    "metrics",
    "models",
    "nn",
    "scenarios",
    "set_validate_values",
]
