"""The command line: a shortened demo runs end to end and fine-tuning forgets more than CAF."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from incseg.cli import main


@pytest.mark.slow
def test_quick_demo_orders_ft_below_caf_on_old_classes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["demo", "--quick", "--methods", "ft,caf", "--out", str(tmp_path), "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "Final mIoU" in printed
    results = json.loads((tmp_path / "results.json").read_text())["final"]
    ft, caf = results["ft"]["groups"], results["caf"]["groups"]
    assert ft["old"] < caf["old"], (ft, caf)  # fine-tuning forgets the old classes, CAF keeps them
    assert (tmp_path / "results.csv").read_text().startswith("method,")
    assert (tmp_path / "predictions.png").stat().st_size > 1000
    arrays = np.load(tmp_path / "predictions.npz", allow_pickle=False)  # what docs/figures/make_figures.py reads
    assert sorted(arrays.files) == ["class_names", "image", "pred_caf", "pred_ft", "truth"]
    assert arrays["pred_caf"].shape == arrays["truth"].shape and arrays["image"].shape == (*arrays["truth"].shape, 3)
    assert arrays["class_names"].shape == (21,) and arrays["class_names"][0] == "background"  # of model indices
    # Determinism: a second run from scratch with the same seed gives identical results.
    other = tmp_path / "again"
    assert main(["demo", "--quick", "--methods", "ft,caf", "--out", str(other), "--no-progress"]) == 0
    again = json.loads((other / "results.json").read_text())["final"]
    assert again == results


def test_train_without_dataset_explains_the_layout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["train", "--dataset", "voc", "--root", str(tmp_path / "missing"), "--task", "15-5"])
    assert code == 2
    err = capsys.readouterr().err
    assert "JPEGImages" in err and "nothing is downloaded" in err


def test_unknown_task_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--dataset", "synthetic", "--task", "15-6", "--model", "small"]) == 2
    assert "15-6" in capsys.readouterr().err


def test_sync_bn_on_cpu_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["train", "--dataset", "synthetic", "--task", "15-5", "--model", "small", "--device", "cpu", "--sync-bn"]
    assert main(args) == 2
    assert "CUDA" in capsys.readouterr().err


def test_train_runs_every_step_and_writes_history(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = [
        "train", "--dataset", "synthetic", "--task", "15-5", "--mode", "overlapped", "--model", "small",
        "--method", "mib", "--epochs", "1", "--max-iters-per-epoch", "2", "--batch-size", "4", "--device", "cpu",
        "--out", str(tmp_path), "--no-progress",
    ]  # fmt: skip
    assert main(args) == 0
    history = json.loads((tmp_path / "history.json").read_text())
    assert [entry["step"] for entry in history["steps"]] == [0, 1]
    assert (tmp_path / "checkpoints" / "step1.pt").exists()
    assert "mIoU all" in capsys.readouterr().out
    # Running again resumes from the finished checkpoints: nothing is retrained, the history is the same.
    assert main(args) == 0
    assert json.loads((tmp_path / "history.json").read_text()) == history
