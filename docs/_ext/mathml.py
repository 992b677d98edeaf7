"""MkDocs hook (see ``hooks:`` in ``mkdocs.yml``): typeset the equations as MathML when the site is built.

``pymdownx.arithmatex`` (generic mode) leaves each equation as TeX in ``<span class="arithmatex">\\(...\\)</span>``
or ``<div class="arithmatex">\\[...\\]</div>``. This hook converts them with the pure-Python ``latex2mathml``
(the ``docs`` extra), so the built site shows typeset equations without JavaScript and without network: nothing
is fetched when a page is read. Browsers render MathML natively.

- ``\\tag{n}`` becomes an equation number at the right of a display equation (MathML has no tags).
- Delimiters after a size command that ``latex2mathml`` does not map (``\\big\\lVert``, ``\\Big\\rvert``, ...)
  are replaced by their Unicode characters first; plain TeX stays valid for any other renderer.
- An equation the converter cannot typeset (a command it does not know, which it would print as raw TeX) is
  left as TeX and reported as a warning naming the page, so ``mkdocs build --strict`` fails on it and
  ``docs/check_site.py`` finds the raw ``\\(`` / ``\\[``. Rewrite such an equation with supported commands.
"""

from __future__ import annotations

import html
import logging
import re
from typing import Any

log = logging.getLogger("mkdocs.hooks.mathml")

_ARITHMATEX = re.compile(r'<(?P<tag>span|div) class="arithmatex">(?P<tex>.*?)</(?P=tag)>', re.S)
_TAG = re.compile(r"\\tag\*?\{(?P<label>[^{}]*)\}")
_SIZED_DELIMITER = re.compile(
    r"(?P<size>\\[bB]igg?[lrm]?)\s*\\(?P<name>lVert|rVert|Vert|lvert|rvert|vert|\||langle|rangle)"
)
_DELIMITERS = {
    "lVert": "\u2016",
    "rVert": "\u2016",
    "Vert": "\u2016",
    "|": "\u2016",
    "lvert": "|",
    "rvert": "|",
    "vert": "|",
    "langle": "\u27e8",
    "rangle": "\u27e9",
}
# Signs that latex2mathml did not understand the TeX: raw commands in the text, an empty operator (what
# ``\operatorname*`` becomes), an alignment ``&`` outside a table (``aligned``), an explicit error element.
_UNRENDERED = re.compile(r">[^<]*\\[A-Za-z|][^<]*<|<mo\s*/>|<mo></mo>|<m[a-z]+>&</m[a-z]+>|<merror")


class MathError(ValueError):
    """An equation that latex2mathml cannot typeset."""


def _strip_delimiters(tex: str, display: bool) -> str:
    tex = tex.strip()
    opening, closing = (r"\[", r"\]") if display else (r"\(", r"\)")
    if tex.startswith(opening) and tex.endswith(closing):
        return tex[len(opening) : -len(closing)]
    if tex.startswith("$$") and tex.endswith("$$"):
        return tex[2:-2]
    if tex.startswith("$") and tex.endswith("$"):
        return tex[1:-1]
    return tex


def tex_to_mathml(tex: str, *, display: bool) -> tuple[str, str | None]:
    """Convert one equation (without its delimiters) to a ``<math>`` element.

    Args:
        tex: the TeX source, e.g. ``\\mathcal{L}_{AD} = \\lVert a - b \\rVert_F^2 \\tag{8}``.
        display: block (``\\[...\\]``) rather than inline (``\\(...\\)``) equation.

    Returns:
        The MathML markup and the label of its ``\\tag`` (``None`` when it has none).

    Raises:
        MathError: the converter left part of the TeX untypeset.
    """
    from latex2mathml.converter import convert

    label = None
    match = _TAG.search(tex)
    if match is not None:
        label = match.group("label").strip()
        tex = tex[: match.start()] + tex[match.end() :]
    tex = _SIZED_DELIMITER.sub(lambda m: m.group("size") + _DELIMITERS[m.group("name")], tex)
    try:
        mathml = convert(tex.strip(), display="block" if display else "inline")
    except Exception as error:  # the converter raises its own exception types on malformed TeX
        raise MathError(f"latex2mathml cannot parse {tex.strip()!r}: {error}") from error
    bad = _UNRENDERED.search(mathml)
    if bad is not None:
        raise MathError(f"latex2mathml leaves {bad.group(0)!r} untypeset in {tex.strip()!r}")
    return mathml, label


def render_math(page_html: str, *, where: str = "page") -> tuple[str, list[str]]:
    """Replace the arithmatex spans and divs of an HTML fragment with MathML.

    Args:
        page_html: HTML produced by Markdown with ``pymdownx.arithmatex`` (``generic: true``).
        where: name used in the error messages (the page).

    Returns:
        The new HTML and one message per equation that could not be converted (those stay as TeX).

    Example:
        >>> html, errors = render_math('<p><span class="arithmatex">\\\\(x^2\\\\)</span></p>')
        >>> "<msup>" in html, errors
        (True, [])
    """
    errors: list[str] = []

    def replace(match: re.Match[str]) -> str:
        display = match.group("tag") == "div"
        tex = _strip_delimiters(html.unescape(match.group("tex")), display)
        try:
            mathml, label = tex_to_mathml(tex, display=display)
        except MathError as error:
            errors.append(f"{where}: {error}")
            return match.group(0)
        if not display:
            return f'<span class="arithmatex">{mathml}</span>'
        number = "" if label is None else f'<span class="eq-tag">({html.escape(label)})</span>'
        return f'<div class="arithmatex">{mathml}{number}</div>'

    return _ARITHMATEX.sub(replace, page_html), errors


def on_page_content(html: str, page: Any, **_: Any) -> str:
    """MkDocs event: typeset the equations of a rendered page (API pages included)."""
    new_html, errors = render_math(html, where=page.file.src_uri)
    for message in errors:
        log.warning(message)
    return new_html
