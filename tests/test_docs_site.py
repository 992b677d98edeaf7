"""The documentation site's build tools: the self-containment check and the MathML hook.

``docs/check_site.py`` (run by CI after ``mkdocs build``) must pass on a self-contained site and fail on a
page that loads a CDN script or a web font, shows raw TeX, or has a broken image or link. The tests build tiny
HTML sites by hand; no ``mkdocs build`` runs here. ``docs/_ext/mathml.py`` needs ``latex2mathml`` (the
``docs`` extra); its tests are skipped without it, as are those of ``docs/figures/make_figures.py``
(matplotlib), which run it on tiny made-up outputs of the demo and the benchmarks.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import sys
from pathlib import Path
from types import ModuleType
from xml.etree import ElementTree

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(relative: str) -> ModuleType:
    path = ROOT / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


check_site = _load("docs/check_site.py")
mathml = _load("docs/_ext/mathml.py")

_GOOD_INDEX = """<!doctype html><html><head>
<link rel="stylesheet" href="assets/main.css"><script src="assets/app.js"></script>
<link rel="canonical" href="https://example.org/incseg/">
</head><body>
<h1 id="incseg">incseg</h1>
<p>An equation <span class="arithmatex"><math display="inline"><mi>x</mi></math></span> and
<a href="concepts/">concepts</a>, <a href="concepts/#eq-1">eq. 1</a>, <a href="#incseg">top</a>,
<a href="https://github.com/">elsewhere</a>, <a href="mailto:a@b.c">mail</a>.</p>
<img src="assets/figures/demo.png" alt="demo"><img src="data:image/png;base64,AAAA" alt="inline">
<pre><code>re.compile(r"\\(x\\)")  # TeX-like text in code is code</code></pre>
<p>A literal backslash: C:\\Users\\me</p>
</body></html>
"""
_GOOD_CONCEPTS = """<!doctype html><html><head><link rel="stylesheet" href="../assets/main.css"></head>
<body><h2 id="eq-1">Eq. 1</h2><a href="../">home</a><img src="../assets/figures/demo.png" alt=""></body></html>
"""


def _site(root: Path, **pages: str) -> Path:
    """A tiny built site: ``index.html``, ``concepts/index.html`` and their assets, with pages replaced."""
    files = {
        "index.html": _GOOD_INDEX,
        "concepts/index.html": _GOOD_CONCEPTS,
        "assets/main.css": "body { background: url(../assets/figures/demo.png); }",
        "assets/app.js": "",
        "assets/figures/demo.png": "not really a PNG",
    }
    files.update({name.replace("__", "/").replace("_html", ".html"): text for name, text in pages.items()})
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


def test_check_site_passes_a_self_contained_site(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    site = _site(tmp_path)
    assert check_site.check_site(site) == []
    assert check_site.main([str(site)]) == 0
    assert "self-contained" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("snippet", "expected"),
    [
        ('<script src="https://unpkg.com/mathjax@3/es5/tex-mml-chtml.js"></script>', "<script> loads https://unpkg"),
        ('<script src="//cdn.jsdelivr.net/x.js"></script>', "<script> loads //cdn.jsdelivr.net"),
        ('<link rel="stylesheet" href="https://fonts.googleapis.com/css?family=Roboto">', "<link> loads https://fonts"),
        ('<link rel="preconnect" href="https://fonts.gstatic.com">', "<link> loads https://fonts.gstatic.com"),
        ('<img src="https://example.org/logo.png" alt="">', "<img> loads https://example.org"),
        (
            '<img srcset="assets/figures/demo.png 1x, https://example.org/big.png 2x" alt="">',
            "<img> loads https://example.org",
        ),
        ("<p>At step \\(\\ell = 0, 1, \\dots\\) the model</p>", "raw TeX"),
        ('<div class="arithmatex">\\[ \\mathcal{S}_\\ell \\]</div>', "raw TeX"),
        # A display equation Markdown never handed to the typesetter (no blank line before its \[): the brackets
        # lost their backslash and the underscores became italics, the commands remain.
        ("<p>poolings\n[\n\\Phi^{w}(\\mathbf{f}<em c_h>{s,i,j})</em>[c,h,w],</p>", "raw TeX"),
        ("<p>the weight \\lambda<em>{AD}</em> of</p>", "raw TeX"),
        ('<img src="assets/figures/missing.png" alt="">', "<img> loads assets/figures/missing.png, which is not"),
        ('<script src="assets/missing.js"></script>', "<script> loads assets/missing.js, which is not"),
        ('<a href="results/">results</a>', "link results/ points at a missing page"),
        ('<a href="concepts/#eq-2">eq. 2</a>', "missing anchor #eq-2"),
        ('<a href="#nowhere">here</a>', "missing anchor #nowhere"),
    ],
)
def test_check_site_fails_on_what_needs_the_network_or_is_broken(tmp_path: Path, snippet: str, expected: str) -> None:
    page = _GOOD_INDEX.replace("</body>", snippet + "</body>")
    problems = check_site.check_site(_site(tmp_path, index_html=page))
    assert len(problems) == 1, problems
    assert problems[0].startswith("index.html: ") and expected in problems[0], problems


def test_check_site_checks_stylesheets_and_every_page(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = _GOOD_CONCEPTS.replace("</body>", "<p>\\[ x \\]</p></body>")
    site = _site(tmp_path, concepts__index_html=bad)
    (site / "assets/main.css").write_text("@font-face { src: url('https://fonts.gstatic.com/roboto.woff2'); }")
    problems = check_site.check_site(site)
    assert len(problems) == 2, problems
    assert problems[0].startswith("concepts/index.html: raw TeX")
    assert problems[1].startswith("assets/main.css: url(https://fonts.gstatic.com")
    assert check_site.main([str(site)]) == 1
    assert "not self-contained" in capsys.readouterr().err


def test_check_site_needs_a_built_site(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="build the site first"):
        check_site.check_site(tmp_path)


def test_mkdocs_config_loads_nothing_from_outside() -> None:
    """The site's configuration: MathML at build time, no CDN script, no web font."""
    config = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    assert "docs/_ext/mathml.py" in config
    assert re.search(r"^\s+font: false", config, re.M)
    assert not re.search(r"^\s*-\s*['\"]?(https?:)?//", config, re.M), "extra_javascript/extra_css from a URL"


# ---------------------------------------------------------------- MathML hook (needs the docs extra)


def _latex2mathml() -> None:
    pytest.importorskip("latex2mathml", reason="the docs extra (latex2mathml) is not installed")


def test_render_math_inline_and_display_with_tag() -> None:
    _latex2mathml()
    page = (
        '<p>At step <span class="arithmatex">\\(\\ell &lt; 2\\)</span>:</p>\n'
        '<div class="arithmatex">\\[\n\\mathcal{S}_\\ell = \\mathcal{S}_{\\ell-1} \\cup \\mathcal{U}_\\ell\n'
        "\\tag{3}\n\\]</div>"
    )
    html, errors = mathml.render_math(page)
    assert errors == []
    assert "\\" not in html and "arithmatex" in html
    assert html.count("<math") == 2
    assert '<math xmlns="http://www.w3.org/1998/Math/MathML" display="inline">' in html
    assert 'display="block"' in html and html.endswith('<span class="eq-tag">(3)</span></div>')
    assert "&#x0003C;" in html  # the escaped "<" of the source is a MathML operator, not markup


@pytest.mark.parametrize(
    "tex",
    [
        r"\big\lVert \mathrm{AD}(\bar{\mathbf{z}}^\ell) \big\rVert_F^2",  # sized delimiter commands
        r"\hat{\phi}[s] = \begin{cases} a & s \neq \mathbf{B} \\ b & s = \mathbf{B} \end{cases}",
        r"\gamma = \frac{\sum_{s} q[s]}{q[0]}, \quad \operatorname{softmax}(x)",
        r"\tilde\phi,\ \lceil x \rceil,\ \lvert y \rvert,\ \{ignore\_index\}",
    ],
)
def test_tex_to_mathml_typesets_the_constructs_of_the_docs(tex: str) -> None:
    _latex2mathml()
    markup, label = mathml.tex_to_mathml(tex, display=True)
    assert label is None and markup.startswith("<math") and "\\" not in markup


@pytest.mark.parametrize("tex", [r"\begin{aligned} a &= b \\ c &= d \end{aligned}", r"\operatorname*{arg\,max}_x f"])
def test_untypeset_equations_stay_tex_and_are_reported(tex: str) -> None:
    _latex2mathml()
    with pytest.raises(mathml.MathError, match="untypeset"):
        mathml.tex_to_mathml(tex, display=True)
    page = f'<div class="arithmatex">\\[{tex}\\]</div>'
    html, errors = mathml.render_math(page, where="concepts.md")
    assert html == page  # left as TeX, so that docs/check_site.py finds it too
    assert len(errors) == 1 and errors[0].startswith("concepts.md: ")


def test_every_equation_of_the_docs_typesets() -> None:
    """Each page through the site's Markdown extensions (mkdocs.yml), then the hook: no TeX left in the text.

    A display equation without a blank line before its ``\\[`` never reaches the typesetter: Markdown prints it
    as text with its underscores turned into italics, and ``check_site.raw_tex`` finds its TeX commands.
    """
    _latex2mathml()
    markdown = pytest.importorskip("markdown")
    yaml = pytest.importorskip("yaml")
    pytest.importorskip("pymdownx")
    extensions: list[str] = []
    configs: dict[str, dict[str, object]] = {}
    for item in yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))["markdown_extensions"]:
        name, config = next(iter(item.items())) if isinstance(item, dict) else (item, {})
        extensions.append(name)
        configs[name] = dict(config)
    configs.setdefault("pymdownx.snippets", {})["base_path"] = [str(ROOT)]
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    count = 0
    for page in pages:
        html = markdown.markdown(page.read_text(encoding="utf-8"), extensions=extensions, extension_configs=configs)
        rendered, errors = mathml.render_math(html, where=page.name)
        assert errors == []
        assert check_site.raw_tex(rendered) == [], f"{page.relative_to(ROOT)}: TeX left in the text"
        count += rendered.count("<math")
    assert count > 100


# ---------------------------------------------------------------- figures (need matplotlib, the docs extra)


def _fake_outputs(root: Path) -> tuple[Path, Path]:
    """A tiny demo folder and benchmark results with the fields the demo and the benchmarks write."""
    rng = np.random.default_rng(0)
    demo, results = root / "demo", root / "results"
    demo.mkdir()
    results.mkdir()
    methods = ["ft", "mib", "caf", "joint"]
    final = {
        m: {"num_old_classes": 3, "groups": {"old": 0.1 * i, "new": 0.2, "all": 0.15, "all_bg": 0.3}}
        for i, m in enumerate(methods)
    }
    (demo / "results.json").write_text(json.dumps({"scenario": {"name": "synthetic-2-2"}, "final": final}))
    truth = rng.integers(0, 5, (6, 16, 16)).astype(np.uint8)
    truth[:, 0] = 255
    preds = {f"pred_{m}": rng.integers(0, 5, (6, 16, 16)).astype(np.uint8) for m in methods}
    image = rng.integers(0, 256, (6, 16, 16, 3)).astype(np.uint8)
    names = np.array(["background", "red-disc", "blue-square", "pink-ring", "yellow-star"])
    np.savez_compressed(demo / "predictions.npz", image=image, truth=truth, class_names=names, **preds)
    ablation = []
    for run, method, overrides, fused in [
        ("mib", "mib", {}, False),
        ("caf:lambda_ad=1", "caf", {"lambda_ad": 1.0}, True),
        ("caf:lambda_ad=10", "caf", {"lambda_ad": 10.0}, True),
    ]:
        for strategy in ("skip", "zero_pad", "concat") if fused else ("-",):
            row = {"task": "15-5", "mode": "disjoint", "seed": 0, "epochs_next": 15, "run": run, "method": method}
            ablation.append(
                {**row, "overrides": overrides, "strategy": strategy, "old": 50.0, "new": 20.0, "all": 43.0}
            )
    robustness = [
        {
            "network": n,
            "method": m,
            "task": "15-5",
            "seed": s,
            "old": 50.0,
            "new": 20.0,
            "all": 40.0 + s,
            "diverged": s == 1 and m == "caf",
            "skip_all": 40.0,
            "concat_all": 41.0,
        }
        for n in ("small", "deeplabv3")
        for m in ("mib", "caf")
        for s in (0, 1)
    ]
    step = [
        {
            "device": "cpu",
            "model": "small",
            "batch": 8,
            "size": 128,
            "amp": "none",
            "caf_inner": None,
            "step_ratio": 1.9,
            "skip_ratio": 1.3,
        }
    ]
    losses = [
        {"device": "cpu", "size": [4, 21, 128, 128], "old": 16, "loss": name, "time_ratio": 0.9, "memory_ratio": 0.5}
        for name in ("unbiased_cross_entropy", "CAFLoss (seg + kd + ad)")
    ]
    for name, rows in [
        ("ablation_synthetic", ablation),
        ("robustness", robustness),
        ("bench_step", step),
        ("bench_losses", losses),
    ]:
        (results / f"{name}.json").write_text(json.dumps({"rows": rows}))
    return demo, results


def test_make_figures_draws_every_figure_from_the_json_outputs(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="the docs extra (matplotlib) is not installed")
    figures = _load("docs/figures/make_figures.py")
    demo, results = _fake_outputs(tmp_path)
    written = figures.make_figures([demo], results, tmp_path / "out")
    names = sorted(p.name for p in written)
    expected = ["ablation.svg", "demo-miou.svg", "demo-predictions.png", "demo-table.md", "lambda-ad.svg"]
    assert names == sorted([*expected, "robustness.svg", "speed.svg", "strategies.svg"])
    assert (tmp_path / "out/demo-predictions.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for path in (p for p in written if p.suffix != ".md"):  # the snippet a page includes to show the figure
        assert f"](assets/figures/{path.name})" in path.with_suffix(".md").read_text(encoding="utf-8")
    for path in written:
        if path.suffix == ".svg":
            text = path.read_text(encoding="utf-8")
            ElementTree.fromstring(text)  # well-formed
            assert not re.search(r'(href|src)="(https?:)?//', text), "an SVG that loads something from outside"
    svg = (tmp_path / "out/demo-predictions.png").read_bytes()
    again = figures.make_figures([demo], results, tmp_path / "again")
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in written], "figures are not deterministic"
    assert svg == (tmp_path / "again/demo-predictions.png").read_bytes()


def test_make_figures_skips_missing_inputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib", reason="the docs extra (matplotlib) is not installed")
    figures = _load("docs/figures/make_figures.py")
    demo, results = _fake_outputs(tmp_path)
    for name in ("robustness", "bench_step", "bench_losses", "ablation_synthetic"):
        (results / f"{name}.json").unlink()
    written = figures.make_figures([demo], results, tmp_path / "out")
    assert sorted(p.name for p in written) == ["demo-miou.svg", "demo-predictions.png", "demo-table.md"]
    printed = capsys.readouterr().out
    assert "skipped the robustness figure" in printed and "skipped the speed figure" in printed
    assert figures.make_figures([demo, tmp_path / "no-demo"], results, tmp_path / "none") == []
    assert "skipped the demo figures: no " + str(tmp_path / "no-demo") in capsys.readouterr().out


def test_demo_figures_of_several_seeds_show_the_mean_and_the_spread(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="the docs extra (matplotlib) is not installed")
    figures = _load("docs/figures/make_figures.py")
    demo, _ = _fake_outputs(tmp_path)
    other = tmp_path / "demo-s1"
    shutil.copytree(demo, other)
    results = json.loads((other / "results.json").read_text())
    results["final"]["caf"]["groups"]["all"] = 0.25  # 15.0 % in the first run, 25.0 % in the second
    (other / "results.json").write_text(json.dumps(results))
    figures.demo_miou([demo, other], tmp_path / "out")
    assert "mean over 2 seeds with their range" in (tmp_path / "out/demo-miou.md").read_text(encoding="utf-8")
    table = figures.demo_table([demo, other], tmp_path / "out").read_text(encoding="utf-8")
    caf = next(line for line in table.splitlines() if line.startswith("| CAF |"))
    assert "| 20.0 ± 7.1 |" in caf and caf.endswith("| 15.0, 25.0 |")
    results["scenario"]["name"] = "synthetic-15-1"
    (other / "results.json").write_text(json.dumps(results))
    with pytest.raises(ValueError, match="another scenario"):
        figures.demo_table([demo, other], tmp_path / "out")


def test_robustness_figure_reads_every_matrix_file(tmp_path: Path) -> None:
    """benchmarks/robustness.py writes one list of rows per run (robustness-<network>.json): all are drawn."""
    pytest.importorskip("matplotlib", reason="the docs extra (matplotlib) is not installed")
    figures = _load("docs/figures/make_figures.py")
    _, results = _fake_outputs(tmp_path)
    rows = json.loads((results / "robustness.json").read_text())["rows"]
    (results / "robustness.json").unlink()
    (results / "robustness-small.json").write_text(json.dumps([r for r in rows if r["network"] == "small"]))
    (results / "robustness-fpn.json").write_text(json.dumps([{**r, "network": "fpn"} for r in rows]))
    figure = figures.robustness(results, tmp_path / "out")
    text = figure.read_text(encoding="utf-8")
    ElementTree.fromstring(text)
    for network in ("small", "fpn"):
        assert network in text, f"no column of {network}"
    assert "deeplabv3" not in text  # robustness.json (removed) held the only deeplabv3 rows
