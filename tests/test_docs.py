"""Every Python code block of README.md and docs/**/*.md runs on its own against the real API.

A reader copies one block, not a page: each block runs alone, in a fresh namespace and a fresh temporary
working directory, and may use only what it imports or defines itself. A block whose first line is
``# doctest: skip`` is not run (for code that needs dataset files, GPUs or ``torchrun``), but it must parse and
use no name it does not define either; bash and other blocks are never run.
"""

from __future__ import annotations

import builtins
import re
import symtable
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIP_MARK = "# doctest: skip"
_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^\n`]*)$")
_PYTHON = {"python", "py", "python3"}


def _pages() -> list[Path]:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    return [p for p in pages if p.is_file()]


def python_blocks(text: str) -> list[tuple[int, str]]:
    """The fenced Python blocks of a Markdown text as ``(first line number, code)``, in order.

    Fences may be indented (inside admonitions or lists); the code is dedented by the fence's indentation.
    The language is the first word of the info string (``python``, ``py`` or ``python3``; attributes such as
    ``title="..."`` may follow).
    """
    blocks: list[tuple[int, str]] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if match is None:
            i += 1
            continue
        indent, fence = match.group("indent"), match.group("fence")
        words = match.group("info").strip().split()
        language = words[0].lstrip(".{").rstrip("}").lower() if words else ""
        start = i + 1
        j = start
        while j < len(lines):
            close = lines[j].strip()
            if close.startswith(fence[0] * len(fence)) and not close.strip(fence[0]):
                break
            j += 1
        if language in _PYTHON:
            body = [line[len(indent) :] if line.startswith(indent) else line.lstrip() for line in lines[start:j]]
            blocks.append((start + 1, textwrap.dedent("\n".join(body))))
        i = j + 1
    return blocks


def test_python_blocks_parser() -> None:
    text = (
        "intro\n```python\nx = 1\n```\n```bash\nls\n```\n"
        '!!! note\n    ```py title="a.py"\n    y = x + 1\n    ```\n'
        "````python\n```\nnot a fence end\n````\n"
    )
    blocks = python_blocks(text)
    assert [code for _, code in blocks] == ["x = 1", "y = x + 1", "```\nnot a fence end"]
    assert [line for line, _ in blocks] == [3, 10, 13]


def undefined_names(code: str) -> list[str]:
    """The names a block uses without importing, defining or assigning them itself (builtins aside), sorted."""
    top = symtable.symtable(code, "<block>", "exec")
    defined = {s.get_name() for s in top.get_symbols() if s.is_assigned() or s.is_imported() or s.is_namespace()}
    used: set[str] = set()
    tables = [(top, True)]
    while tables:
        table, is_top = tables.pop()
        # Module level: every name read; inside functions, classes and comprehensions: the module's names.
        used.update(s.get_name() for s in table.get_symbols() if s.is_referenced() and (is_top or s.is_global()))
        tables.extend((child, False) for child in table.get_children())
    return sorted(used - defined - set(dir(builtins)))


def test_undefined_names() -> None:
    code = (
        "import torch\nfrom a import b as c\nx = [y for y in range(3)]\n"
        "class A:\n    z = q\n    def f(self):\n        return torch, c, w, self, A\n"
        "try:\n    pass\nexcept E as err:\n    print(err, result.groups)\n"
    )
    assert undefined_names(code) == ["E", "q", "result", "w"]


def _block_id(page: Path, line: int) -> str:
    return f"{page.relative_to(ROOT)}:{line}"


BLOCKS = [(page, line, code) for page in _pages() for line, code in python_blocks(page.read_text(encoding="utf-8"))]


def test_blocks_are_found() -> None:
    pages = {str(page.relative_to(ROOT)) for page, _, _ in BLOCKS}
    assert {"README.md", "docs/getting-started.md", "docs/concepts.md"} <= pages, pages


@pytest.mark.parametrize(("page", "line", "code"), BLOCKS, ids=[_block_id(p, n) for p, n, _ in BLOCKS])
def test_block_runs_alone(page: Path, line: int, code: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Pad with blank lines so that tracebacks point at the line of the page.
    compiled = compile("\n" * (line - 1) + code, str(page), "exec")  # skipped blocks must parse too
    missing = undefined_names(code)
    assert not missing, f"{_block_id(page, line)} uses {missing} without defining them: import or define them there"
    if code.lstrip().startswith(SKIP_MARK):
        pytest.skip(f"marked '{SKIP_MARK}'")
    monkeypatch.chdir(tmp_path)
    exec(compiled, {"__name__": f"docs_{page.stem.replace('-', '_')}_{line}"})  # as a reader would run it
