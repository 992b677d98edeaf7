"""``incseg train --tensorboard``: event files with the loss terms, lr and mIoU; a clear error without tensorboard."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from incseg import cli
from incseg.cli import main

_TRAIN = [
    "train", "--dataset", "synthetic", "--method", "caf", "--epochs", "1", "--max-iters-per-epoch", "2",
    "--batch-size", "4", "--crop-size", "48", "--device", "cpu", "--no-progress",
]  # fmt: skip


def test_tensorboard_event_files_hold_the_run_scalars(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setitem(cli._SYNTHETIC_IMAGES, "train", 24)
    monkeypatch.setitem(cli._SYNTHETIC_IMAGES, "val", 8)
    assert main([*_TRAIN, "--out", str(tmp_path), "--tensorboard"]) == 0
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/step0/lr", "train/step0/loss", "train/step1/ad", "train/step1/kd", "eval/mIoU_all"} <= tags
    assert "eval/hIoU" in tags and "eval/mIoU_new" in tags  # defined at step 1 only
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for step in (0, 1):
        lr = [(e.step, e.value) for e in events.Scalars(f"train/step{step}/lr")]
        expected = [(r["iteration"], r["lr"]) for r in records if r["step"] == step]
        assert [s for s, _ in lr] == [s for s, _ in expected]
        assert [v for _, v in lr] == pytest.approx([v for _, v in expected], rel=1e-6)  # stored as float32
    history = json.loads((tmp_path / "history.json").read_text())["steps"]
    miou = [(e.step, e.value) for e in events.Scalars("eval/mIoU_all")]
    assert [s for s, _ in miou] == [0, 1]
    assert [v for _, v in miou] == pytest.approx([100 * h["result"]["groups"]["all"] for h in history], rel=1e-6)
    assert [e.step for e in events.Scalars("eval/mIoU_new")] == [1]


def test_tensorboard_without_the_package_is_a_one_line_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(cli, "_has_tensorboard", lambda: False)
    assert main([*_TRAIN, "--out", str(tmp_path), "--tensorboard"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("incseg train: error: --tensorboard needs") and "incseg[tensorboard]" in err
    assert not (tmp_path / "config.json").exists()  # refused before anything is written
