"""Draw every generated picture of the documentation from the JSON the demo and the benchmarks write.

    python docs/figures/make_figures.py --demo incseg-demo-s0 incseg-demo-s1 incseg-demo-s2

Nothing here is typed in by hand: each figure reads a run's output, so the pictures and the numbers of
docs/results.md come from the same runs. Inputs (a missing input skips its figures with a message and leaves
the committed files as they are):

- ``--demo`` (default ``incseg-demo``), one or more folders ``incseg demo`` wrote (one per seed:
  ``incseg demo --seed S --out incseg-demo-sS``): the first one's ``results.json`` and ``predictions.npz`` give
  ``demo-predictions.png`` (final predictions of every method side by side, with a colour legend of the class
  names); all of them give ``demo-miou.svg`` (old / new / all mIoU per method, the mean over the runs with their
  range) and ``demo-table.md`` (the table of docs/results.md: mean ± standard deviation and every run);
- ``--results`` (default ``benchmarks/results``): ``ablation_synthetic.json`` gives ``ablation.svg``,
  ``strategies.svg`` and ``lambda-ad.svg``; ``robustness*.json`` give ``robustness.svg``; ``bench_step.json``
  and ``bench_losses.json`` give ``speed.svg``.

Outputs go to ``--out`` (default ``docs/assets/figures``), each with a ``<stem>.md`` snippet that shows it: the
pages include the snippets, so a figure appears on its page as soon as it is drawn. Needs matplotlib
(``pip install -e ".[docs]"``) and incseg (for the colour palette). The output is deterministic: the same inputs
give byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Patch

ROOT = Path(__file__).resolve().parents[2]
METHOD_LABELS = {"ft": "fine-tuning", "lwf": "LwF", "mib": "MiB", "caf": "CAF", "joint": "joint (upper bound)"}
GROUPS = ("old", "new", "all")
GROUP_COLOURS = {"old": "#4c72b0", "new": "#dd8452", "all": "#55a868"}
STRATEGY_COLOURS = {"skip": "#4c72b0", "zero_pad": "#c44e52", "concat": "#8172b3", "-": "#4c72b0"}

plt.rcParams.update(
    {
        "svg.fonttype": "none",  # text stays text: small files, the page's font
        "svg.hashsalt": "incseg",  # deterministic ids
        "font.size": 9,
        "axes.spines.top": False,
        "axes.spines.right": False,
        "axes.grid": True,
        "axes.grid.axis": "y",
        "grid.alpha": 0.3,
        "figure.dpi": 100,
    }
)


def _save(fig: plt.Figure, path: Path, alt: str) -> Path:
    """Write the figure, and next to it ``<stem>.md``: the Markdown that shows it, which the pages include with
    ``--8<-- "docs/assets/figures/<stem>.md"`` (a figure not drawn yet has no snippet and shows nothing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata: dict[str, Any] = {"Date": None} if path.suffix == ".svg" else {"Software": None}
    fig.savefig(path, bbox_inches="tight", metadata=metadata, dpi=150 if path.suffix == ".png" else None)
    plt.close(fig)
    path.with_suffix(".md").write_text(f"![{alt}](assets/figures/{path.name}){{ .figure }}\n", encoding="utf-8")
    print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return path


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _method_label(method: str) -> str:
    return METHOD_LABELS.get(method, method)


# ------------------------------------------------------------------------------------------------ demo


def demo_predictions(demo: Path, out: Path, *, samples: int = 4) -> Path:
    """The final predictions of every method on a few test images, with a colour legend of the classes."""
    from incseg.visualize import palette

    results = _read_json(demo / "results.json")
    arrays = np.load(demo / "predictions.npz", allow_pickle=False)
    names = [str(n) for n in arrays["class_names"]]
    methods = [m for m in results["final"] if f"pred_{m}" in arrays.files]
    num_old = next(iter(results["final"].values()))["num_old_classes"]
    colours = palette(256)
    columns = [("image", "image", arrays["image"]), ("truth", "ground truth", arrays["truth"])]
    columns += [(m, _method_label(m), arrays[f"pred_{m}"]) for m in methods]
    n = min(samples, len(arrays["image"]))
    fig, axes = plt.subplots(n, len(columns), figsize=(1.25 * len(columns), 1.25 * n + 0.9), squeeze=False)
    for j, (_, title, values) in enumerate(columns):
        axes[0, j].set_title(title, fontsize=8)
        for i in range(n):
            ax = axes[i, j]
            picture = values[i] if values.ndim == 4 else colours[values[i]]
            ax.imshow(picture, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.grid(False)
            for spine in ax.spines.values():
                spine.set_visible(False)
    shown = sorted({int(c) for _, _, v in columns[1:] for c in np.unique(v[:n]) if c < len(names)})
    handles = [
        Patch(facecolor=colours[c] / 255, edgecolor="#999999", label=names[c] + (" (new)" if c >= num_old else ""))
        for c in shown
    ]
    fig.legend(handles=handles, loc="lower center", ncol=min(5, len(handles)), fontsize=7, frameon=False)
    fig.subplots_adjust(wspace=0.04, hspace=0.04, bottom=0.06 + 0.035 * math.ceil(len(handles) / 5))
    return _save(
        fig,
        out / "demo-predictions.png",
        "Final predictions of each method on test images of the demo, next to the image and its ground truth, "
        "with a colour legend of the classes",
    )


def _grouped_bars(ax: plt.Axes, labels: Sequence[str], values: dict[str, Sequence[float]], colours: dict[str, str]):
    width = 0.8 / len(values)
    x = np.arange(len(labels))
    for k, (group, ys) in enumerate(values.items()):
        bars = ax.bar(x + (k - (len(values) - 1) / 2) * width, ys, width, label=group, color=colours.get(group))
        ax.bar_label(bars, fmt="%.1f", fontsize=6, padding=1)
    ax.set_xticks(x, labels)
    return ax


def _demo_runs(demos: Sequence[Path]) -> tuple[str, list[str], dict[str, dict[str, list[float]]]]:
    """``(scenario name, methods, {method: {group: [mIoU % of each run]}})`` of demo folders (same methods)."""
    runs = [_read_json(d / "results.json") for d in demos]
    methods = list(runs[0]["final"])
    for demo, run in zip(demos, runs):
        if list(run["final"]) != methods or run["scenario"] != runs[0]["scenario"]:
            raise ValueError(f"{demo}: another scenario or other methods than {demos[0]}")
    groups = (*GROUPS, "all_bg")
    values = {m: {g: [100 * (r["final"][m]["groups"][g] or 0.0) for r in runs] for g in groups} for m in methods}
    return runs[0]["scenario"]["name"], methods, values


def demo_miou(demos: Sequence[Path], out: Path) -> Path:
    """Bar chart of the demo's final old / new / all mIoU (%, without background) per method: the mean over the
    runs (one per seed) and, with several runs, their range."""
    name, methods, runs = _demo_runs(demos)
    values = {g: [statistics.fmean(runs[m][g]) for m in methods] for g in GROUPS}
    fig, ax = plt.subplots(figsize=(5.2, 2.5))
    _grouped_bars(ax, [_method_label(m) for m in methods], values, GROUP_COLOURS)
    if len(demos) > 1:
        width = 0.8 / len(GROUPS)
        for k, g in enumerate(GROUPS):
            x = np.arange(len(methods)) + (k - (len(GROUPS) - 1) / 2) * width
            mean = np.array(values[g])
            low = mean - np.array([min(runs[m][g]) for m in methods])
            high = np.array([max(runs[m][g]) for m in methods]) - mean
            ax.errorbar(x, mean, yerr=[low, high], fmt="none", ecolor="#333333", elinewidth=0.8, capsize=2)
    top = max(max(max(runs[m][g]) for m in methods) for g in GROUPS)
    ax.set_ylabel("mIoU (%)")
    ax.set_ylim(0, top * 1.2 + 1)
    ax.legend(title=None, ncol=3, frameon=False, loc="upper left", fontsize=8)
    spread = f"mean of {len(demos)} seeds, bars: their range" if len(demos) > 1 else "one run"
    ax.set_title(f"incseg demo: {name}, after the last step ({spread})", fontsize=9)
    return _save(
        fig,
        out / "demo-miou.svg",
        "Bar chart of the final old, new and all-class mIoU of each method"
        + (f", mean over {len(demos)} seeds with their range" if len(demos) > 1 else ""),
    )


def demo_table(demos: Sequence[Path], out: Path) -> Path:
    """``demo-table.md``: the final mIoU per method as mean ± standard deviation over the runs, and every run."""
    _, methods, runs = _demo_runs(demos)
    groups = (*GROUPS, "all_bg")
    heads = {"old": "old", "new": "new", "all": "all", "all_bg": "all incl. background"}

    def cell(values: list[float]) -> str:
        if len(values) == 1:
            return f"{values[0]:.1f}"
        return f"{statistics.fmean(values):.1f} ± {statistics.stdev(values):.1f}"

    lines = ["| method | " + " | ".join(heads[g] for g in groups) + " | all, each run |", "|---" + "|---:" * 5 + "|"]
    for m in methods:
        each = ", ".join(f"{v:.1f}" for v in runs[m]["all"])
        lines.append(f"| {_method_label(m)} | " + " | ".join(cell(runs[m][g]) for g in groups) + f" | {each} |")
    path = out / "demo-table.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return path


# ------------------------------------------------------------------------------------------------ ablations


def _ablation_rows(results: Path) -> list[dict[str, Any]]:
    """Rows of ablation_synthetic.json for the most common setting (task, mode, epochs), averaged over seeds."""
    rows = _read_json(results / "ablation_synthetic.json")["rows"]
    settings = defaultdict(list)
    for row in rows:
        settings[(row["task"], row["mode"], row["epochs_next"])].append(row)
    chosen = max(settings.values(), key=len)
    by_run: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in chosen:
        by_run[(row["run"], row["strategy"])].append(row)
    merged = []
    for (_, strategy), group in by_run.items():
        first = group[0]
        merged.append(
            {
                **{k: first[k] for k in ("task", "mode", "run", "method", "overrides")},
                "strategy": strategy,
                "seeds": sorted(r["seed"] for r in group),
                **{g: statistics.fmean(r[g] for r in group) for g in GROUPS},
            }
        )
    return merged


def _setting(rows: Sequence[dict[str, Any]]) -> str:
    seeds = sorted({s for r in rows for s in r["seeds"]})
    seed_text = f"seed {seeds[0]}" if len(seeds) == 1 else f"mean of seeds {', '.join(map(str, seeds))}"
    return f"synthetic {rows[0]['task']} {rows[0]['mode']}, {seed_text}"


def ablation(results: Path, out: Path) -> list[Path]:
    """Ablation bars (default strategy), test strategies and the λ_AD sweep from ablation_synthetic.json."""
    rows = _ablation_rows(results)
    written = []
    main = [r for r in rows if r["strategy"] in ("skip", "-")]
    fig, ax = plt.subplots(figsize=(6.4, 0.42 * len(main) + 0.9))
    y = np.arange(len(main))
    height = 0.8 / len(GROUPS)
    for k, g in enumerate(GROUPS):
        bars = ax.barh(y + (k - 1) * height, [r[g] for r in main], height, label=g, color=GROUP_COLOURS[g])
        ax.bar_label(bars, fmt="%.1f", fontsize=6, padding=1)
    ax.set_yticks(y, [r["run"] for r in main])
    ax.invert_yaxis()
    ax.grid(axis="x", alpha=0.3)
    ax.grid(axis="y", visible=False)
    ax.set_xlabel("mIoU (%) after the last step, test strategy skip")
    ax.legend(frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    ax.set_title(f"Ablations ({_setting(main)})", fontsize=9)
    written.append(_save(fig, out / "ablation.svg", "Bar chart of old, new and all-class mIoU per ablation run"))

    fused = sorted({r["run"] for r in rows if r["strategy"] == "concat"}, key=[r["run"] for r in rows].index)
    if fused:
        strategies = ("skip", "zero_pad", "concat")
        table = {(r["run"], r["strategy"]): r["all"] for r in rows}
        values = {s: [table.get((run, s), float("nan")) for run in fused] for s in strategies}
        fig, ax = plt.subplots(figsize=(6.4, 2.5))
        _grouped_bars(ax, fused, values, STRATEGY_COLOURS)
        ax.set_ylabel("mIoU all classes (%)")
        ax.tick_params(axis="x", labelsize=7)
        ax.legend(title="test strategy", ncol=3, frameon=False, loc="upper left", fontsize=8, title_fontsize=8)
        ax.set_ylim(0, max(v for vs in values.values() for v in vs if not math.isnan(v)) * 1.25 + 1)
        ax.set_title(f"CAF test strategies ({_setting(rows)})", fontsize=9)
        written.append(_save(fig, out / "strategies.svg", "All-class mIoU of each CAF run per test strategy"))

    sweep = [r for r in rows if r["method"] == "caf" and set(r["overrides"]) == {"lambda_ad"}]
    lambdas = sorted({r["overrides"]["lambda_ad"] for r in sweep})
    if len(lambdas) >= 2:
        fig, ax = plt.subplots(figsize=(5.2, 2.6))
        for strategy, style in (("skip", "-"), ("concat", "--")):
            points = {r["overrides"]["lambda_ad"]: r for r in sweep if r["strategy"] == strategy}
            xs = [x for x in lambdas if x in points]
            for g in GROUPS:
                ax.plot(
                    xs,
                    [points[x][g] for x in xs],
                    style,
                    marker="o",
                    markersize=3,
                    color=GROUP_COLOURS[g],
                    label=f"{g}, {strategy}",
                )
        ax.set_xscale("log")
        ax.set_xticks(lambdas, [f"{x:g}" for x in lambdas])
        ax.minorticks_off()
        ax.set_xlabel("λ_AD (weight of the attentive distillation)")
        ax.set_ylabel("mIoU (%)")
        ax.grid(axis="x", alpha=0.3)
        ax.legend(ncol=1, frameon=False, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        ax.set_title(f"λ_AD sweep of CAF ({_setting(sweep)})", fontsize=9)
        written.append(_save(fig, out / "lambda-ad.svg", "Old, new and all-class mIoU of CAF against the weight of AD"))
    return written


# ------------------------------------------------------------------------------------------------ robustness


def _robustness_files(results: Path, pattern: str = "robustness*.json") -> list[Path]:
    """The matrix files of ``benchmarks/robustness.py`` (one per network or run: ``robustness*.json``), or of
    ``benchmarks/plain_check.py`` with ``pattern="plain-check*.json"``."""
    return sorted(results.glob(pattern))


def robustness(
    results: Path, out: Path, *, pattern: str = "robustness*.json", name: str = "robustness.svg", key: str = "all"
) -> Path:
    """Matrix of final mIoU (``key``: ``"all"``, ``"new"`` or ``"old"`` classes): methods x (network, task), mean
    over seeds; diverged runs marked."""
    rows: list[dict[str, Any]] = []
    for path in _robustness_files(results, pattern):
        data = _read_json(path)
        rows += data["rows"] if isinstance(data, dict) else data
    methods = list(dict.fromkeys(r["method"] for r in rows))
    columns = list(dict.fromkeys((r["network"], r["task"]) for r in rows))
    cells: dict[tuple[str, tuple[str, str]], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        cells[(r["method"], (r["network"], r["task"]))].append(r)
    grid = np.full((len(methods), len(columns)), np.nan)
    fig, ax = plt.subplots(figsize=(1.3 * len(columns) + 1.6, 0.45 * len(methods) + 1.2))
    for i, m in enumerate(methods):
        for j, c in enumerate(columns):
            runs = cells.get((m, c), [])
            values = [r[key] for r in runs if r.get(key) is not None]
            if not values:
                continue
            grid[i, j] = statistics.fmean(values)
            spread = f" ±{statistics.stdev(values):.1f}" if len(values) > 1 else ""
            diverged = sum(bool(r.get("diverged")) for r in runs)
            text = f"{grid[i, j]:.1f}{spread}" + (f"\n{diverged}/{len(runs)} diverged" if diverged else "")
            ax.text(j, i, text, ha="center", va="center", fontsize=7)
    image = ax.imshow(grid, cmap="RdYlGn", vmin=0, aspect="auto", vmax=max(1.0, float(np.nanmax(grid))), alpha=0.55)
    ax.set_xticks(range(len(columns)), [f"{n}\n{t}" for n, t in columns], fontsize=7)
    ax.set_yticks(range(len(methods)), [_method_label(m) for m in methods], fontsize=8)
    ax.grid(False)
    fig.colorbar(image, ax=ax, label=f"mIoU {key} classes (%)", shrink=0.8)
    seeds = sorted({r["seed"] for r in rows})
    ax.set_title(f"{key} classes: mean over seeds {', '.join(map(str, seeds))}", fontsize=9)
    return _save(fig, out / name, f"mIoU of the {key} classes per method, network and task, mean over seeds")


_AD_MATRIX_SAME = {"caf:ad_balance_every=1": "caf"}
_AD_MATRIX_LABELS = {
    "caf": "CAF (balance on the weights)",
    "caf:ad_balance_on=features": "CAF, balance on the features (0.2)",
    "caf:ad=None": "CAF module only (no AD)",
}


def ad_matrix(results: Path, out: Path, *, key: str) -> Path:
    """Issue 20's matrix against MiB: per method (rows) and cell (network, task, mode; columns), the new-class
    mIoU over MiB's (``key="new"``, target >= 0.9) or the old-class mIoU minus MiB's (``key="old"``, target
    >= -1), from the runs of the same seed; mean over seeds (``plain-check-matrix*.json``, unperturbed runs)."""
    rows = [r for p in _robustness_files(results, "plain-check-matrix*.json") for r in _read_json(p)]
    # the default balance on the weights, refreshed every iteration on some networks: one row
    rows = [dict(r, method=_AD_MATRIX_SAME.get(r["method"], r["method"])) for r in rows if "perturb" not in r]
    mib = {(r["network"], r["task"], r["mode"], r["seed"]): r for r in rows if r["method"] == "mib"}
    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] != "mib"))
    columns = list(dict.fromkeys((r["network"], r["task"], r["mode"]) for r in rows))
    values: dict[tuple[str, tuple[str, str, str]], list[float]] = defaultdict(list)
    for r in rows:
        ref = mib.get((r["network"], r["task"], r["mode"], r["seed"]))
        if r["method"] == "mib" or ref is None:
            continue
        if key == "new":
            if ref["new"] > 0:
                values[(r["method"], (r["network"], r["task"], r["mode"]))].append(r["new"] / ref["new"])
        else:
            values[(r["method"], (r["network"], r["task"], r["mode"]))].append(r[key] - ref[key])
    target, span = (0.9, 0.5) if key == "new" else (-1.0, 8.0)
    grid = np.full((len(methods), len(columns)), np.nan)
    fig, ax = plt.subplots(figsize=(0.62 * len(columns) + 2.4, 0.45 * len(methods) + 1.6))
    for i, m in enumerate(methods):
        for j, c in enumerate(columns):
            found = values.get((m, c))
            if not found:
                continue
            grid[i, j] = statistics.fmean(found)
            text = f"{grid[i, j]:.2f}" if key == "new" else f"{grid[i, j]:+.1f}"
            ax.text(j, i, text, ha="center", va="center", fontsize=6)
    ax.imshow(grid, cmap="RdYlGn", vmin=target - span, vmax=target + span, aspect="auto", alpha=0.6)
    labels = [f"{n}\n{t}{' ov.' if mode == 'overlapped' else ''}" for n, t, mode in columns]
    ax.set_xticks(range(len(columns)), labels, fontsize=6, rotation=90)
    ax.set_yticks(range(len(methods)), [_AD_MATRIX_LABELS.get(m, _method_label(m)) for m in methods], fontsize=7)
    ax.grid(False)
    what = "new-class mIoU / MiB's (target >= 0.9)" if key == "new" else "old-class mIoU - MiB's (target >= -1)"
    seeds = sorted({r["seed"] for r in rows})
    ax.set_title(f"{what}, mean over seeds {', '.join(map(str, seeds))}; green: meets the target", fontsize=8)
    return _save(fig, out / f"ad-matrix-{key}.svg", f"{what} per method and cell of the issue-20 matrix")


# ------------------------------------------------------------------------------------------------ speed


def speed(results: Path, out: Path) -> Path | None:
    """Ratios of the speed benchmarks: CAF step and skip inference vs the bare network; losses vs naive."""
    step_path, loss_path = results / "bench_step.json", results / "bench_losses.json"
    panels: list[Callable[[plt.Axes], None]] = []
    if step_path.is_file():
        steps = _read_json(step_path)["rows"]

        def draw_step(ax: plt.Axes) -> None:
            labels = [
                f"{r['model']}, {r['device']}\n{r['batch']} x {r['size']}²"
                + (f", {r['amp']}" if r["amp"] != "none" else "")
                + (f", inner {r['caf_inner']}" if r.get("caf_inner") else "")
                + (f"\nAD balance on the {r['ad_balance_on']}" if r.get("ad_balance_on") else "")
                for r in steps
            ]
            values = {
                "(a) CAF step / lower bound": [r["step_ratio"] for r in steps],
                "(d) skip inference / bare net": [r["skip_ratio"] for r in steps],
            }
            _grouped_bars(ax, labels, values, {})
            for target, colour in ((1.15, "C0"), (1.05, "C1")):
                ax.axhline(target, color=colour, linestyle=":", linewidth=1)
            ax.axhline(1.0, color="black", linewidth=0.8)
            ax.set_ylabel("time ratio (dotted: targets)")
            ax.tick_params(axis="x", labelsize=6)
            ax.set_ylim(0, max(max(v) for v in values.values()) * 1.35)
            ax.legend(frameon=False, fontsize=7, loc="upper center", ncol=2)
            ax.set_title("Training step and inference", fontsize=9)

        panels.append(draw_step)
    if loss_path.is_file():
        losses = _read_json(loss_path)["rows"]
        setting = losses[-1]
        losses = [
            r
            for r in losses
            if (r["device"], r["size"], r["old"]) == (setting["device"], setting["size"], setting["old"])
        ]

        def draw_losses(ax: plt.Axes) -> None:
            labels = [r["loss"].replace("_loss", "").replace(" (seg + kd + ad)", "").replace("_", " ") for r in losses]
            values = {
                "time": [r["time_ratio"] for r in losses],
                "memory kept for backward": [r["memory_ratio"] for r in losses],
            }
            _grouped_bars(ax, labels, values, {})
            ax.axhline(1.0, color="black", linewidth=0.8)
            ax.set_ylabel("incseg / naive reference")
            ax.tick_params(axis="x", labelsize=6, rotation=20)
            ax.set_ylim(0, max(max(v) for v in values.values()) * 1.35)
            ax.legend(frameon=False, fontsize=7, loc="upper center", ncol=2)
            b, k, h, w = setting["size"]
            ax.set_title(f"Losses, {setting['device']}, B={b} K={k} {h}x{w}", fontsize=9)

        panels.append(draw_losses)
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 2.8), squeeze=False)
    for draw, ax in zip(panels, axes[0]):
        draw(ax)
    fig.tight_layout()
    return _save(fig, out / "speed.svg", "Time and memory ratios of the speed benchmarks")


# ------------------------------------------------------------------------------------------------ main


def make_figures(demos: Sequence[Path], results: Path, out: Path) -> list[Path]:
    """Draw every figure whose inputs exist; report the others as skipped. Returns the files written."""
    written: list[Path] = []
    missing = [d for d in demos if not ((d / "results.json").is_file() and (d / "predictions.npz").is_file())]
    if not missing:
        written += [demo_predictions(demos[0], out), demo_miou(demos, out), demo_table(demos, out)]
    else:
        print(f"skipped the demo figures: no {missing[0]}/results.json and predictions.npz (run incseg demo)")
    if (results / "ablation_synthetic.json").is_file():
        written += ablation(results, out)
    else:
        print(
            f"skipped the ablation figures: no {results}/ablation_synthetic.json (run benchmarks/ablation_synthetic.py)"
        )
    if _robustness_files(results):
        written.append(robustness(results, out))
    else:
        print(f"skipped the robustness figure: no {results}/robustness*.json (run benchmarks/robustness.py)")
    matrix = "plain-check-matrix*.json"  # issue 20's matrix (not the perturbed or variant runs): new and old classes
    if _robustness_files(results, matrix):
        for key in ("new", "old"):
            written.append(ad_matrix(results, out, key=key))
    figure = speed(results, out)
    if figure is None:
        print(f"skipped the speed figure: no {results}/bench_step.json or bench_losses.json")
    else:
        written.append(figure)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--demo",
        type=Path,
        nargs="+",
        default=[Path("incseg-demo")],
        help="output folders of incseg demo, one per seed (the first one's predictions are drawn)",
    )
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results", help="benchmark JSON folder")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "assets" / "figures", help="where to write")
    args = parser.parse_args(argv)
    written = make_figures(args.demo, args.results, args.out)
    print(f"{len(written)} figure(s) written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
