"""The torch-free catalogue behind ``incseg --help`` agrees with the registries it summarises."""

from __future__ import annotations

import subprocess
import sys

import pytest

import incseg
from incseg._catalog import DATASET_TASKS, METHOD_DESCRIPTIONS
from incseg.learner import METHODS
from incseg.learner.config import METHOD_DESCRIPTIONS as REEXPORTED
from incseg.scenarios import list_datasets, list_tasks


def test_every_method_preset_has_one_description_line() -> None:
    assert list(METHOD_DESCRIPTIONS) == list(METHODS)
    assert REEXPORTED is METHOD_DESCRIPTIONS
    for name, text in METHOD_DESCRIPTIONS.items():
        assert text and "\n" not in text and len(text) <= 100, name


def test_task_lists_are_the_registry_s() -> None:
    assert sorted(DATASET_TASKS) == sorted(list_datasets())
    for dataset, tasks in DATASET_TASKS.items():
        assert list_tasks(dataset) == tasks


def test_importing_incseg_loads_torch_only_on_first_use() -> None:
    code = (
        "import sys, incseg, incseg._catalog, incseg.cli\n"
        "assert 'torch' not in sys.modules, 'eager torch import'\n"
        "from incseg import Scenario\n"
        "assert 'torch' in sys.modules and incseg.nn.__name__ == 'incseg.nn'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_lazy_package_exposes_its_public_names() -> None:
    for name in incseg.__all__:
        assert getattr(incseg, name) is not None, name
        assert name in dir(incseg)
    with pytest.raises(AttributeError, match="no_such_name"):
        incseg.no_such_name  # noqa: B018
