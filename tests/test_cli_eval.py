"""``incseg eval``: a finished run's final numbers come back exactly; errors are one line."""

from __future__ import annotations

import importlib.util
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from incseg import cli
from incseg._cli_eval import find_checkpoint
from incseg.cli import main

_TRAIN = [
    "train", "--dataset", "synthetic", "--method", "caf", "--epochs", "1", "--max-iters-per-epoch", "2",
    "--batch-size", "4", "--crop-size", "48", "--device", "cpu", "--no-progress",
]  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def _few_images() -> Iterator[None]:
    """Fewer synthetic images than the command's 1200/300, in training and evaluation alike (speed)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(cli._SYNTHETIC_IMAGES, "train", 48)
        patch.setitem(cli._SYNTHETIC_IMAGES, "val", 40)
        yield


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, _few_images: None) -> Path:
    out = tmp_path_factory.mktemp("run")
    assert main([*_TRAIN, "--out", str(out)]) == 0
    return out


def _final(run: Path) -> dict[str, object]:
    return json.loads((run / "history.json").read_text())["steps"][-1]["result"]


def test_eval_of_a_run_folder_reproduces_its_final_numbers_exactly(
    run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    assert main(["eval", str(run_dir), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((run_dir / "eval" / "eval.json").read_text())
    assert report["result"] == _final(run_dir)  # confusion matrix, per-class IoU, groups: all identical
    assert (report["step"], report["scenario"], report["strategy"]) == (1, "synthetic-15-5", "skip")
    assert report["per_step"]["num_old_classes"] == 16 and "confusion" not in report["per_step"]
    rows = report["per_class"]
    assert [r["group"] for r in rows] == ["bg"] + ["old"] * 15 + ["new"] * 5 and rows[20]["class"] == "white-hexagon"
    iou = report["result"]["iou"]
    assert [r["iou_pct"] for r in rows] == [None if v is None else round(100 * v, 4) for v in iou]
    assert "hIoU" in printed and "white-hexagon" in printed and "old = classes 1-15" in printed
    all_pct = f"all {100 * report['result']['groups']['all']:.2f}"
    assert all_pct in printed
    if importlib.util.find_spec("matplotlib") is not None:
        from PIL import Image

        with Image.open(run_dir / "eval" / "confusion.png") as image:
            assert image.format == "PNG" and image.size == (612, 612)  # max(5, 1.5 + 0.22 * 21) in at 100 dpi


def test_eval_of_a_synthetic_run_scores_as_the_demo_evaluates(run_dir: Path) -> None:
    """The demo's evaluation path, built by hand: the 48 px test images as they are (no upscaling to 512)."""
    import torch

    from incseg.data import IncrementalSegmentation, SyntheticScenes, TestTransform
    from incseg.engine import evaluate
    from incseg.learner import IncrementalLearner
    from incseg.models import small_segmenter

    learner = IncrementalLearner.from_checkpoint(run_dir / "checkpoints" / "last.pt", small_segmenter(16))
    test_set = IncrementalSegmentation(
        SyntheticScenes("val", num_images=40, size=48, seed=0),
        learner.scenario,
        learner.step,
        train=False,
        transform=TestTransform(size=None),
    )
    assert tuple(test_set[0][0].shape) == (3, 48, 48)
    expected = evaluate(learner, test_set, device=torch.device("cpu"), num_old_classes=16).to_dict()
    assert main(["eval", str(run_dir), "--no-progress"]) == 0
    assert json.loads((run_dir / "eval" / "eval.json").read_text())["result"] == expected


def test_eval_of_a_checkpoint_file_finds_its_run_settings(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint = run_dir / "checkpoints" / "step1.pt"
    assert find_checkpoint(checkpoint) == (checkpoint, run_dir)
    assert find_checkpoint(run_dir) == (run_dir / "checkpoints" / "last.pt", run_dir)
    assert main(["eval", str(checkpoint), "--out", str(tmp_path), "--batch-size", "7", "--no-progress"]) == 0
    assert json.loads((tmp_path / "eval.json").read_text())["result"] == _final(run_dir)  # batch size: no effect


def test_a_bare_checkpoint_needs_the_dataset_flags(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bare = tmp_path / "model.pt"
    shutil.copy(run_dir / "checkpoints" / "last.pt", bare)
    assert main(["eval", str(bare), "--no-progress"]) == 2
    assert "--dataset is required" in capsys.readouterr().err
    # The network is recognised from the weights; the synthetic images need the run's size.
    assert main(["eval", str(bare), "--dataset", "synthetic", "--crop-size", "48", "--no-progress"]) == 0
    assert json.loads((tmp_path / "eval.json").read_text())["result"] == _final(run_dir)


def test_strategy_is_applied_and_named_in_the_files(run_dir: Path, tmp_path: Path) -> None:
    args = ["eval", str(run_dir), "--strategy", "zero_pad", "--out", str(tmp_path), "--no-progress"]
    assert main(args) == 0
    report = json.loads((tmp_path / "eval-zero_pad.json").read_text())
    assert report["strategy"] == "zero_pad" and report["result"]["num_classes"] == 21
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "confusion-zero_pad.png").stat().st_size > 1000


def test_errors_are_one_line(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def error_of(args: list[str]) -> str:
        assert main(["eval", *args, "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("incseg eval: error: ") and err.count("\n") == 1, err
        return err

    assert "does not exist" in error_of([str(tmp_path / "missing")])
    assert "holds no checkpoint" in error_of([str(tmp_path)])
    err = error_of([str(run_dir), "--dataset", "voc", "--root", str(tmp_path)])
    assert "synthetic-15-5" in err and "--dataset voc" in err
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert "not a torch.save file" in error_of([str(tmp_path / "junk.pt"), "--dataset", "synthetic"])
