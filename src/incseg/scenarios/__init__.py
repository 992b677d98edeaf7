"""Incremental scenarios: class groups per step, label maps into the incremental index space, image filters."""

from incseg.scenarios._names import ADE20K_CLASS_NAMES, SYNTHETIC_CLASS_NAMES, VOC_CLASS_NAMES
from incseg.scenarios.registry import default_mode, get_scenario, list_datasets, list_tasks
from incseg.scenarios.scenario import IGNORE_INDEX, Mode, Scenario

__all__ = [
    "ADE20K_CLASS_NAMES",
    "IGNORE_INDEX",
    "SYNTHETIC_CLASS_NAMES",
    "VOC_CLASS_NAMES",
    "Mode",
    "Scenario",
    "default_mode",
    "get_scenario",
    "list_datasets",
    "list_tasks",
]
