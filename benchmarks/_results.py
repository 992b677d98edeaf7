"""Where the benchmarks keep their numbers: ``benchmarks/results/<name>.json``, one row per configuration.

``docs/figures/make_figures.py`` draws the pictures of the documentation from these files, so that pictures and
numbers come from the same runs. A new run replaces the rows of the same configuration (the ``key`` fields) and
keeps the others: running a benchmark with several settings accumulates one row per setting.
"""

from __future__ import annotations

import json
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def save_rows(name: str, rows: Sequence[Mapping[str, Any]], *, key: Sequence[str]) -> Path:
    """Merge ``rows`` into ``benchmarks/results/<name>.json`` (rows with the same ``key`` values are replaced).

    Args:
        name: the benchmark (file stem), e.g. ``"bench_step"``.
        rows: JSON-safe mappings; each has every field of ``key``.
        key: the fields that identify a configuration (e.g. device, model, input size).

    Returns:
        The path written.
    """
    path = RESULTS / f"{name}.json"
    old = json.loads(path.read_text())["rows"] if path.is_file() else []
    new = [{**row, "torch": torch.__version__, "machine": platform.machine()} for row in rows]

    def ident(row: Mapping[str, Any]) -> str:
        return json.dumps([row.get(k) for k in key])  # values may be lists (sizes)

    ids = {ident(row) for row in new}
    kept = [row for row in old if ident(row) not in ids]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"benchmark": name, "key": list(key), "rows": kept + new}, indent=1) + "\n")
    print(f"wrote {path}")
    return path
