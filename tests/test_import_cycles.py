"""No cycle between the packages of ``src/incseg``: every ``import`` (module level, inside functions and under
``TYPE_CHECKING`` alike) read from the source files, grouped by top-level unit (a subpackage such as
``incseg.learner`` or a module such as ``incseg.cli``)."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "incseg"


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "incseg"


def _is_module(path: Path) -> bool:
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def package_edges(root: Path = SRC) -> dict[str, set[str]]:
    """``unit -> units it imports``, from the ``import`` statements of every file under ``root``."""
    edges: dict[str, set[str]] = defaultdict(set)
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        module = ".".join(parts[:-1] if is_package else parts)
        package = module if is_package else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    targets = [".".join([*base, *([node.module] if node.module else [])])]
                else:
                    targets = [node.module or ""]
                # ``from incseg import distributed`` imports the module incseg.distributed
                targets = [
                    f"{targets[0]}.{alias.name}"
                    if _is_module(root.parent / Path(*targets[0].split(".")) / alias.name)
                    else targets[0]
                    for alias in node.names
                ]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            for target in targets:
                if (target == "incseg" or target.startswith("incseg.")) and _unit(target) != _unit(module):
                    edges[_unit(module)].add(_unit(target))
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one unit (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in edges.get(node, ()):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in list(edges):
        if node not in index:
            visit(node)
    return found


def test_the_analysis_finds_cycles() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_package_level_cycle() -> None:
    edges = package_edges()
    assert "methods" in edges["learner"] and "scenarios" in edges["data"]  # the analysis sees the imports
    assert cycles(edges) == []


def test_learner_names_no_caf_module() -> None:
    """The learner consumes the method contract: CAF's classes are the CAF family's business."""
    for path in sorted((SRC / "learner").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        imported = {
            alias.name
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom | ast.Import)
            for alias in node.names
        }
        modules = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        assert not {"ContinualAttentiveFusion", "CAFLoss", "CAFMethod"} & imported, path.name
        assert not {"incseg.methods.caf", "incseg.nn.caf", "incseg.losses.caf"} & modules, path.name
