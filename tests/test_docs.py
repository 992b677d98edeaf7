"""Every Python code block of README.md and docs/**/*.md runs against the real API.

The blocks of one page run in order in one namespace (later blocks use what earlier ones defined), with a
fresh temporary directory as the working directory. A block whose first line is ``# doctest: skip`` is not
run (for code that needs dataset files, GPUs or ``torchrun``); bash and other blocks are never run.
"""

from __future__ import annotations

import re
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


def _page_id(path: Path) -> str:
    return str(path.relative_to(ROOT))


PAGES = [p for p in _pages() if python_blocks(p.read_text(encoding="utf-8"))]


def test_pages_with_code_are_found() -> None:
    names = {_page_id(p) for p in PAGES}
    assert "docs/getting-started.md" in names, names


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_page_code_runs(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": f"docs_{page.stem.replace('-', '_')}"}
    ran, expected = 0, 0
    for line, code in python_blocks(page.read_text(encoding="utf-8")):
        # Pad with blank lines so that tracebacks point at the line of the page.
        compiled = compile("\n" * (line - 1) + code, str(page), "exec")  # skipped blocks must parse too
        if code.lstrip().startswith(SKIP_MARK):
            continue
        expected += 1
        exec(compiled, namespace)  # the documentation's own code, run as a reader would run it
        ran += 1
    if expected == 0:
        pytest.skip(f"every Python block of {_page_id(page)} is marked '{SKIP_MARK}'")
    assert ran == expected
