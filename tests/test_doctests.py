"""The examples of the docstrings run: every module of ``src/incseg`` through :mod:`doctest`, one test per module
(``pytest --doctest-modules src/incseg`` runs the same examples)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import incseg

MODULES = sorted(m.name for m in pkgutil.walk_packages(incseg.__path__, "incseg.") if not m.name.endswith("__main__"))
OPTIONS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _examples(name: str) -> list[doctest.DocTest]:
    try:
        module = importlib.import_module(name)
    except ImportError as exc:  # an optional dependency (matplotlib, tensorboard, ...)
        pytest.skip(f"{name}: {exc}")
    return [t for t in doctest.DocTestFinder().find(module, name) if t.examples]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name: str) -> None:
    failures = []
    for test in _examples(name):
        report: list[str] = []
        result = doctest.DocTestRunner(optionflags=OPTIONS).run(test, out=report.append)
        if result.failed:
            failures.append("".join(report))
    assert not failures, "\n".join(failures)


def test_there_are_examples() -> None:
    count = sum(len(t.examples) for name in MODULES for t in _examples(name))
    assert count >= 200
