"""Maintainer check, not run in CI: open the built site in headless Chromium with the network cut off.

    pip install playwright && playwright install chromium      # once (downloads a browser)
    mkdocs build --site-dir site && python docs/screenshot_site.py site --out site-shots

Every page is opened from ``file://`` with every non-``file:`` request aborted, as on a cluster node without
network. For each page it saves a full-page PNG in ``--out`` and reports the requests that were blocked, the
console errors, the number of typeset equations (``<math>`` elements) and images that failed to load. Exits
with status 1 when any page tried the network or shows a broken image. ``docs/check_site.py`` is the static
check CI runs; this script is for looking at the result.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("site", type=Path, help="the folder written by mkdocs build")
    parser.add_argument("--out", type=Path, default=Path("site-shots"), help="where to write the screenshots")
    parser.add_argument("--pages", nargs="*", help="pages relative to the site (default: every index.html)")
    args = parser.parse_args(argv)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        print("needs playwright: pip install playwright && playwright install chromium", file=sys.stderr)
        return 2
    site = args.site.resolve()
    pages = [site / p for p in args.pages] if args.pages else sorted(site.rglob("index.html"))
    args.out.mkdir(parents=True, exist_ok=True)
    failed = False
    with sync_playwright() as p:
        browser = p.chromium.launch()
        for page_path in pages:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            blocked: list[str] = []
            errors: list[str] = []

            def route(r, blocked=blocked):  # type: ignore[no-untyped-def]
                if r.request.url.startswith("file:"):
                    return r.continue_()
                blocked.append(r.request.url)
                return r.abort()

            page.route("**/*", route)
            page.on("console", lambda m, errors=errors: errors.append(m.text) if m.type == "error" else None)
            page.goto(page_path.as_uri(), wait_until="load")
            equations = page.locator("math").count()
            broken = page.evaluate("[...document.images].filter(i => !i.complete || !i.naturalWidth).map(i => i.src)")
            name = page_path.relative_to(site).parent.as_posix().replace("/", "-") or "home"
            page.screenshot(path=str(args.out / f"{name}.png"), full_page=True)
            print(f"{name}: {equations} equations, {len(blocked)} blocked requests, {len(broken)} broken images")
            for url in blocked + broken + errors:
                print(f"    {url}")
            failed |= bool(blocked or broken)
            page.close()
        browser.close()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
