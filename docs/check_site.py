"""Check that a built documentation site is self-contained: it reads the same with and without network.

    mkdocs build --strict --site-dir site && python docs/check_site.py site

For every HTML page of the site:

- no ``<script src>``, ``<link href>``, ``<img src>`` or other loaded resource points outside the site
  (a CDN script or web font would be fetched when the page is read, and is missing offline);
- no raw TeX is left in the rendered text, code exempt: neither the ``\\(`` / ``\\[`` of an equation that was
  not typeset nor a TeX command (``\\frac``, ``\\mathbf``, ``\\sum``, a Greek letter...) of one that Markdown
  never handed to the typesetter (``\\[`` without a blank line before it reaches the page as ``[`` with its
  underscores turned into italics);
- every ``<img>``, ``<script>``, ``<link>`` and internal ``<a href>`` resolves to a file of the site, and an
  internal link's ``#anchor`` to an ``id`` of the target page.

Stylesheets are checked for ``url(...)`` outside the site as well. Links to other sites (``<a href="https://...">``)
are allowed: following them needs the network, reading the page does not. Prints one line per problem and exits
with status 1 when there is any. Standard library only.
"""

from __future__ import annotations

import argparse
import re
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

# Attributes that make the browser load something when the page is read.
_LOADED = {
    "script": ("src",),
    "link": ("href",),
    "img": ("src", "srcset"),
    "source": ("src", "srcset"),
    "video": ("src", "poster"),
    "audio": ("src",),
    "iframe": ("src",),
    "embed": ("src",),
    "object": ("data",),
    "track": ("src",),
}
# Elements whose text is not prose: TeX-like text there is code, not an untypeset equation.
_NOT_PROSE = {"code", "pre", "script", "style", "math", "textarea", "kbd", "samp"}
_VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
# The delimiters of an untypeset equation, or a TeX command that prose never contains (a literal backslash, as in
# C:\\Users, is not one: the command must be followed by a non-letter).
_TEX_COMMANDS = (
    "frac dfrac tfrac sqrt sum prod int lim min max log exp argmax argmin operatorname text mathbf mathcal "
    "mathrm mathbb mathit mathsf boldsymbol left right big Big bigg Bigg bigl bigr Bigl Bigr lVert rVert lvert "
    "rvert Vert vert lfloor rfloor lceil rceil langle rangle qquad quad cdot cdots ldots dots times div pm mp "
    "partial nabla infty in notin cup cap setminus subset subseteq le leq ge geq ne neq approx equiv sim propto "
    "to mapsto rightarrow leftarrow Rightarrow hat tilde bar vec dot overline underline begin end tag ell "
    "alpha beta gamma delta epsilon varepsilon zeta eta theta vartheta iota kappa lambda mu nu xi pi rho sigma "
    "tau upsilon phi varphi chi psi omega Gamma Delta Theta Lambda Xi Pi Sigma Upsilon Phi Psi Omega"
).split()
_RAW_TEX = re.compile(r"\\[(\[]|\\(?:" + "|".join(_TEX_COMMANDS) + r")(?![A-Za-z])")
_CSS_URL = re.compile(r"url\(\s*['\"]?(?P<url>[^'\")]+)['\"]?\s*\)")


class _Page(HTMLParser):
    """What one page loads, links to, defines (ids) and shows as text outside code."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.loads: list[tuple[str, str]] = []  # (tag, url)
        self.links: list[str] = []
        self.ids: set[str] = set()
        self.raw_tex: list[str] = []
        self._stack: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {k: v for k, v in attrs if v is not None}
        for key in ("id", "name") if tag == "a" else ("id",):
            if key in values:
                self.ids.add(values[key])
        for attr in _LOADED.get(tag, ()):
            if attr not in values:
                continue
            if tag == "link" and not _loads(values.get("rel", "")):
                continue
            urls = (
                [u.strip().split()[0] for u in values[attr].split(",") if u.strip()]
                if attr == "srcset"
                else [values[attr]]
            )
            self.loads.extend((tag, u) for u in urls)
        if tag == "a" and "href" in values:
            self.links.append(values["href"])
        if tag not in _VOID:
            self._stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)
        if tag not in _VOID and self._stack and self._stack[-1] == tag:
            self._stack.pop()

    def handle_endtag(self, tag: str) -> None:
        if tag in self._stack:  # tolerate unclosed elements: pop up to the matching one
            while self._stack.pop() != tag:
                pass

    def handle_data(self, data: str) -> None:
        if _NOT_PROSE.intersection(self._stack):
            return
        match = _RAW_TEX.search(data)  # one snippet per run of text
        if match is not None:
            self.raw_tex.append(data[max(0, match.start() - 20) : match.end() + 40].strip())


def _parse(html: str) -> _Page:
    parser = _Page()
    parser.feed(html)
    parser.close()
    return parser


def raw_tex(html: str) -> list[str]:
    """The raw TeX in the text of one HTML page, outside code: a snippet per run of text that holds some.

    Example:
        >>> raw_tex(r'<p>[ \\Phi^{w}(\\mathbf{f}<em>{s,i,j})</em> C:\\Users</p><code>\\frac</code>')
        ['[ \\\\Phi^{w}(\\\\mathbf{f}']
    """
    return _parse(html).raw_tex


def _loads(rel: str) -> bool:
    """Whether a ``<link rel=...>`` makes the browser fetch its ``href`` (stylesheets, icons, preloads...)."""
    kinds = set(rel.lower().split())
    return bool(kinds & {"stylesheet", "icon", "preload", "prefetch", "modulepreload", "preconnect", "manifest"})


def _external(url: str) -> bool:
    parts = urlsplit(url)
    return bool(parts.scheme and parts.scheme not in ("data",)) or url.startswith("//")


def _target(site: Path, page: Path, url: str) -> tuple[Path, str]:
    """The file of the site an internal URL points at, and its fragment."""
    parts = urlsplit(url)
    path = unquote(parts.path)
    base = site if path.startswith("/") else page.parent
    target = (base / path.lstrip("/")).resolve() if path else page
    if target.is_dir() or path.endswith("/"):
        target = target / "index.html"
    return target, unquote(parts.fragment)


def check_site(site: str | Path) -> list[str]:
    """Check a built site; returns one message per problem (empty when the site is self-contained).

    Args:
        site: the folder written by ``mkdocs build``.

    Returns:
        The problems, each prefixed with the page (relative to ``site``) where it is.

    Raises:
        FileNotFoundError: ``site`` is not a folder with at least one HTML page.
    """
    site = Path(site).resolve()
    pages = sorted(site.rglob("*.html"))
    if not pages:
        raise FileNotFoundError(f"no HTML page under {site}: build the site first (mkdocs build --site-dir ...)")
    parsed = {page: _parse(page.read_text(encoding="utf-8")) for page in pages}
    problems: list[str] = []
    for page, parser in parsed.items():
        name = page.relative_to(site).as_posix()
        for tag, url in parser.loads:
            if _external(url):
                problems.append(f"{name}: <{tag}> loads {url} from outside the site (missing offline)")
            elif not url.startswith("data:"):
                target, _ = _target(site, page, url)
                if not target.is_file():
                    problems.append(f"{name}: <{tag}> loads {url}, which is not in the site")
        for text in parser.raw_tex:
            problems.append(
                f"{name}: raw TeX in the text (an equation not typeset; a display equation needs a blank line "
                f"before its \\[): {text!r}"
            )
        for url in parser.links:
            if _external(url) or url.startswith(("mailto:", "tel:", "javascript:", "data:")):
                continue
            target, fragment = _target(site, page, url)
            if not target.is_file():
                problems.append(f"{name}: link {url} points at a missing page")
            elif fragment and target.suffix == ".html":
                ids = parsed[target].ids if target in parsed else set()
                if fragment not in ids:
                    problems.append(f"{name}: link {url} points at a missing anchor #{fragment}")
    for sheet in sorted(site.rglob("*.css")):
        for match in _CSS_URL.finditer(sheet.read_text(encoding="utf-8", errors="replace")):
            if _external(match.group("url")):
                problems.append(f"{sheet.relative_to(site).as_posix()}: url({match.group('url')}) is outside the site")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("site", type=Path, help="the folder written by mkdocs build")
    args = parser.parse_args(argv)
    problems = check_site(args.site)
    for problem in problems:
        print(problem)
    pages = len(list(args.site.rglob("*.html")))
    if problems:
        print(
            f"{len(problems)} problem(s) in {pages} pages of {args.site}: the site is not self-contained",
            file=sys.stderr,
        )
        return 1
    print(f"{args.site}: {pages} pages, self-contained (no external resource, no raw TeX, every link resolves)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
