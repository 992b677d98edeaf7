"""Figures of a run folder (``incseg plot RUN_DIR``): loss curves, mIoU per step, per-class IoU over steps.

Needs matplotlib (``pip install incseg[plot]``), imported when a figure is drawn. The inputs are the files
``incseg train`` writes: ``metrics.jsonl`` (one line per iteration) and ``history.json`` (results per step).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from incseg.metrics import IoUResult

__all__ = ["plot_confusion", "plot_run"]

_GROUPS = (("old", "old classes"), ("new", "new classes"), ("all", "all classes"))


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError("plots need matplotlib: pip install 'incseg[plot]'") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_run(run_dir: str | Path, *, out_dir: str | Path | None = None, dpi: int = 100) -> list[Path]:
    """Write the PNG figures of a run folder and return their paths.

    - ``loss.png``: every loss term and the learning rate over the iterations, step boundaries marked
      (from ``metrics.jsonl``);
    - ``miou.png``: mIoU of the old, new and all classes (background excluded, in %) after each step;
    - ``iou_heatmap.png``: the IoU of every class after every step (forgetting at a glance).

    Args:
        run_dir: the folder ``incseg train`` wrote (``--out``).
        out_dir: where the PNGs go (default: ``run_dir/plots``).
        dpi: resolution.

    Returns:
        The files written (a figure whose input file is missing is skipped).

    Raises:
        ImportError: matplotlib is not installed.
        FileNotFoundError: ``run_dir`` holds neither ``metrics.jsonl`` nor ``history.json``.
        ValueError: ``history.json`` is not valid JSON or not the history of a run (the message names the file).
    """
    run = Path(run_dir)
    metrics, history = run / "metrics.jsonl", run / "history.json"
    if not metrics.exists() and not history.exists():
        raise FileNotFoundError(f"{run} holds no metrics.jsonl or history.json: is it a folder of 'incseg train'?")
    plt = _pyplot()
    out = Path(out_dir) if out_dir is not None else run / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if metrics.exists():
        records = []
        for line in metrics.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue  # a line cut by a crash
        if records:
            written.append(_loss_figure(plt, records, out / "loss.png", dpi))
    if history.exists():
        from incseg._checks import load_json_object

        data = load_json_object(history, "the results per step of incseg train")
        if not isinstance(data.get("steps", []), list) or not all(isinstance(e, dict) for e in data.get("steps", [])):
            raise ValueError(f"{history} holds 'steps' that are not a list of results: repair or delete it")
        if data.get("steps"):
            written.append(_miou_figure(plt, data, out / "miou.png", dpi))
            written.append(_heatmap_figure(plt, data, out / "iou_heatmap.png", dpi))
    return written


def _loss_figure(plt: Any, records: list[dict[str, Any]], path: Path, dpi: int) -> Path:
    x = list(range(len(records)))
    terms = [k for k in records[-1] if k not in ("step", "epoch", "iteration", "lr", "loss")]
    fig, (ax, ax_lr) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=(3, 1))
    for name in terms or ["loss"]:
        ax.plot(x, [r.get(name, math.nan) for r in records], label=name, linewidth=1)
    ax_lr.plot(x, [r["lr"] for r in records], color="black", linewidth=1)
    for i in range(1, len(records)):
        if records[i]["step"] != records[i - 1]["step"]:
            for a in (ax, ax_lr):
                a.axvline(i, color="gray", linestyle="--", linewidth=0.8)
            ax.text(i, 1.0, f" step {records[i]['step']}", transform=ax.get_xaxis_transform(), va="top")
    ax.set_ylabel("loss (weighted terms)")
    ax.legend(loc="upper right")
    ax.grid(alpha=0.3)
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("iteration (all steps)")
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def _miou_figure(plt: Any, data: dict[str, Any], path: Path, dpi: int) -> Path:
    steps = [e["step"] for e in data["steps"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in _GROUPS:
        values = [e["result"]["groups"].get(key) for e in data["steps"]]
        ax.plot(steps, [math.nan if v is None else 100 * v for v in values], marker="o", label=label)
    ax.set_xticks(steps)
    ax.set_xlabel("step")
    ax.set_ylabel("mIoU (%), background excluded")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def _heatmap_figure(plt: Any, data: dict[str, Any], path: Path, dpi: int) -> Path:
    import numpy as np

    steps = [e["step"] for e in data["steps"]]
    k = max(len(e["result"]["iou"]) for e in data["steps"])
    grid = np.full((k, len(steps)), np.nan)
    for j, e in enumerate(data["steps"]):
        for c, v in enumerate(e["result"]["iou"]):
            grid[c, j] = np.nan if v is None else 100 * v
    names = data.get("class_names") or [str(c) for c in range(k)]
    fig, ax = plt.subplots(figsize=(2 + 0.8 * len(steps), 1 + 0.25 * k))
    image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=100, interpolation="nearest")
    ax.set_xticks(range(len(steps)), [f"step {s}" for s in steps])
    ax.set_yticks(range(k), [names[c] if c < len(names) else str(c) for c in range(k)], fontsize=7)
    fig.colorbar(image, ax=ax, label="IoU (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def plot_confusion(result: IoUResult, path: str | Path, *, dpi: int = 100) -> Path:
    """Write the confusion matrix of ``result`` as a PNG (what ``incseg eval`` draws).

    Rows are the true classes, columns the predicted ones; each row is normalised by its number of pixels (in %,
    so the diagonal is the per-class accuracy), on a logarithmic colour scale so that small confusions show. Rows of
    classes without pixels are blank. The figure grows with the number of classes ``K``: ``max(5, 1.5 + 0.22 K)``
    inches square.

    Args:
        result: an :class:`~incseg.metrics.IoUResult` (its confusion matrix and class names).
        path: the PNG file (its folder is created).
        dpi: resolution.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ImportError: matplotlib is not installed.
    """
    import numpy as np

    plt = _pyplot()
    from matplotlib.colors import LogNorm

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    conf = result.confusion.numpy().astype(np.float64)
    totals = conf.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(totals > 0, 100 * conf / np.maximum(totals, 1), np.nan)
    share[share == 0] = np.nan  # log scale: empty cells stay blank
    k = result.num_classes
    names = [result.class_name(c) for c in range(k)]
    side = max(5.0, 1.5 + 0.22 * k)
    fig, ax = plt.subplots(figsize=(side, side))
    image = ax.imshow(share, cmap="viridis", norm=LogNorm(vmin=0.01, vmax=100), interpolation="nearest")
    font = 7 if k <= 40 else 4
    ax.set_xticks(range(k), names, rotation=90, fontsize=font)
    ax.set_yticks(range(k), names, fontsize=font)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title("confusion matrix (% of each true class's pixels)")
    fig.colorbar(image, ax=ax, label="% of the row", shrink=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
