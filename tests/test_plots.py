"""Figures of a run folder: the PNGs exist, are valid, and have the size the figure asks for."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent / "engine"))
from _tiny import tiny_run

from incseg.cli import main
from incseg.engine import MetricsLog
from incseg.plots import plot_run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run")
    log = MetricsLog(out / "metrics.jsonl")
    _, history = tiny_run(out / "checkpoints", epochs=1, on_iteration=log)
    log.close()
    history.to_json(out / "history.json")
    return out


def _valid_png(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.verify()
    with Image.open(path) as image:
        return image.size


def test_plot_run_writes_three_valid_figures(run_dir: Path) -> None:
    written = plot_run(run_dir, dpi=50)
    assert [p.name for p in written] == ["loss.png", "miou.png", "iou_heatmap.png"]
    assert _valid_png(run_dir / "plots" / "loss.png") == (400, 300)  # 8 x 6 inches at 50 dpi
    assert _valid_png(run_dir / "plots" / "miou.png") == (300, 200)
    width, height = _valid_png(run_dir / "plots" / "iou_heatmap.png")
    classes = len(json.loads((run_dir / "history.json").read_text())["steps"][-1]["result"]["iou"])
    assert (width, height) == (int(50 * (2 + 0.8 * 2)), int(50 * (1 + 0.25 * classes)))


def test_plot_command(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plot", str(run_dir)]) == 0
    assert "loss.png" in capsys.readouterr().out


def test_plot_of_a_folder_without_results_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plot", str(tmp_path)]) == 2
    assert "metrics.jsonl" in capsys.readouterr().err


def test_plot_confusion_writes_a_square_png_that_grows_with_the_classes(tmp_path: Path) -> None:
    import torch

    from incseg.metrics import IoUResult
    from incseg.plots import plot_confusion

    small = IoUResult.from_confusion(torch.tensor([[5, 1, 0], [1, 3, 0], [0, 0, 0]]), class_names=["bg", "a", "b"])
    assert plot_confusion(small, tmp_path / "sub" / "small.png", dpi=50) == tmp_path / "sub" / "small.png"
    assert _valid_png(tmp_path / "sub" / "small.png") == (250, 250)  # at least 5 inches; class b has no pixel
    big = IoUResult.from_confusion(torch.eye(40, dtype=torch.int64) * 7 + 1)
    plot_confusion(big, tmp_path / "big.png", dpi=50)
    assert _valid_png(tmp_path / "big.png") == (int(50 * (1.5 + 0.22 * 40)),) * 2
