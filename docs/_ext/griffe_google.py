"""Griffe extension used by the API reference (see ``mkdocs.yml``): Sphinx-flavoured Google docstrings to Markdown.

The docstrings of incseg follow the Google style with reStructuredText roles, which griffe and Markdown do not
read as such. Before griffe parses a docstring, this extension rewrites its text:

- ``Example:`` (singular) sections become ``Examples:``, so their doctests render as code blocks;
- ``a, b, c: description`` entries of ``Args:`` sections are split into one entry per parameter;
- reStructuredText simple tables (``=====  =====`` borders) become Markdown tables, ``.. math::`` a display
  equation and a paragraph ending in ``::`` (literal block) ends in ``:``;
- roles such as ``:class:`~incseg.models.IncrementalSegmenter``` or ``:meth:`begin_step``` become links to the
  API reference (resolved in the scope of the documented object; a target that is not documented stays plain
  code, never a broken link), and ``:math:`...``` becomes inline math.

Only the text griffe parses changes; the docstrings in the source stay as they are.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_SECTION = re.compile(r"^(?P<indent>\s*)(?P<title>[A-Z][\w ]*):\s*$")
_SHARED = re.compile(r"^(?P<indent>\s+)(?P<names>\*{0,2}\w+(?:,\s*\*{0,2}\w+)+):(?P<desc>\s.*)?$")
_ROLE = re.compile(r":(?P<role>class|meth|func|attr|data|mod|obj|exc):`(?P<text>[^`]+)`")
_MATH = re.compile(r":math:`(?P<tex>[^`]+)`")
_EXPLICIT = re.compile(r"^(?P<title>.*?)\s*<(?P<target>[^<>]+)>$")
_BORDER = re.compile(r"^\s*=+( +=+)+\s*$")
_MATH_DIRECTIVE = re.compile(r"^(?P<indent>\s*)\.\. math::\s*(?P<tex>.+)$")


def _columns(border: str) -> list[tuple[int, int]]:
    return [(m.start(), m.end()) for m in re.finditer(r"=+", border)]


def _cells(line: str, columns: list[tuple[int, int]]) -> list[str]:
    """Split a table row at the column starts (the last column runs to the end of the line)."""
    starts = [start for start, _ in columns] + [len(line) + 1]
    return [line[starts[k] : starts[k + 1]].strip().replace("|", "\\|") for k in range(len(columns))]


def _tables(text: str) -> str:
    """Convert reStructuredText simple tables (header row between the first two borders) to Markdown."""
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        if not _BORDER.match(lines[i]) or i + 2 >= len(lines) or not _BORDER.match(lines[i + 2]):
            out.append(lines[i])
            i += 1
            continue
        columns = _columns(lines[i])
        indent = lines[i][: len(lines[i]) - len(lines[i].lstrip())]
        header = _cells(lines[i + 1], columns)
        rows: list[list[str]] = []
        j = i + 3
        while j < len(lines) and not _BORDER.match(lines[j]):
            if lines[j].strip():
                rows.append(_cells(lines[j], columns))
            j += 1
        table = [header, ["---"] * len(columns), *rows]
        if out and out[-1].strip():
            out.append("")
        out.extend(f"{indent}| " + " | ".join(row) + " |" for row in table)
        out.append("")
        i = j + 1
    return "\n".join(out)


def _directives(text: str) -> str:
    out = []
    for line in text.splitlines():
        math = _MATH_DIRECTIVE.match(line)
        if math is not None:
            line = f"{math.group('indent')}$$ {math.group('tex').strip()} $$"
        elif line.rstrip().endswith("::") and not line.rstrip().endswith(":::"):
            line = line.rstrip()[:-1]
        out.append(line)
    return "\n".join(out)


def _sections(text: str) -> str:
    out: list[str] = []
    args_indent: int | None = None
    for line in text.splitlines():
        section = _SECTION.match(line)
        indent = len(line) - len(line.lstrip())
        if line.strip() and args_indent is not None and indent <= args_indent:
            args_indent = None
        if section is not None:
            title = section.group("title")
            if title == "Example":
                line = f"{section.group('indent')}Examples:"
            elif title in ("Args", "Arguments", "Parameters"):
                args_indent = len(section.group("indent"))
                out.append(line)
                continue
        shared = _SHARED.match(line) if args_indent is not None else None
        if shared is not None:
            desc = shared.group("desc") or ""
            out.extend(f"{shared.group('indent')}{name.strip()}:{desc}" for name in shared.group("names").split(","))
            continue
        out.append(line)
    return "\n".join(out)


def _identifier(obj: griffe.Object, target: str) -> str:
    """Full dotted path of ``target`` as seen from ``obj`` (``target`` itself when it cannot be resolved)."""
    if target.startswith("incseg."):
        return target
    head, _, rest = target.partition(".")
    try:
        resolved = obj.resolve(head)
    except (griffe.NameResolutionError, KeyError, AttributeError):
        return target
    return f"{resolved}.{rest}" if rest else resolved


def _roles(obj: griffe.Object, text: str) -> str:
    def link(match: re.Match[str]) -> str:
        body = match.group("text").strip()
        explicit = _EXPLICIT.match(body)
        if explicit is not None:
            title, target = explicit.group("title"), explicit.group("target")
        else:
            target = body.lstrip("~")
            title = target.rsplit(".", 1)[-1] if body.startswith("~") else target
        identifier = _identifier(obj, target.lstrip("~"))
        return f'<autoref identifier="{identifier}" optional><code>{title}</code></autoref>'

    text = _ROLE.sub(link, text)
    return _MATH.sub(lambda m: rf"\({m.group('tex')}\)", text)


def rewrite(obj: griffe.Object, text: str) -> str:
    """Return the Markdown-friendly version of the docstring ``text`` of ``obj``."""
    return _roles(obj, _directives(_tables(_sections(text))))


class GoogleSpellings(griffe.Extension):
    """Apply :func:`rewrite` to every docstring once the object tree is loaded."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rewrite(obj, obj.docstring.value)
