"""The command line: a shortened demo runs end to end and fine-tuning forgets more than CAF."""

from __future__ import annotations

import errno
import importlib.util
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from incseg._catalog import METHOD_DESCRIPTIONS
from incseg.cli import _slow_run_warnings, build_parser, main, resolve_train_args
from incseg.learner import DivergenceError


@pytest.mark.slow
def test_quick_demo_orders_ft_below_caf_on_old_classes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["demo", "--quick", "--methods", "ft,caf", "--out", str(tmp_path), "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "Final mIoU" in printed
    results = json.loads((tmp_path / "results.json").read_text())["final"]
    ft, caf = results["ft"]["groups"], results["caf"]["groups"]
    assert ft["old"] < caf["old"], (ft, caf)  # fine-tuning forgets the old classes, CAF keeps them
    assert results["caf"]["num_old_classes"] == 16  # old = the classes of step 0
    assert set(json.loads((tmp_path / "results.json").read_text())["final_per_step"]) == {"ft", "caf"}
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
    assert [entry["result"]["num_old_classes"] for entry in history["steps"]] == [16, 16]  # old = step 0's
    assert history["steps"][1]["per_step"]["num_old_classes"] == 16
    assert (tmp_path / "checkpoints" / "step1.pt").exists()
    assert "mIoU all" in capsys.readouterr().out
    metrics = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [(json.loads(m)["step"], json.loads(m)["iteration"]) for m in metrics] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    if importlib.util.find_spec("matplotlib") is not None:  # plotted at the end when matplotlib is there
        assert {p.name for p in (tmp_path / "plots").iterdir()} == {"loss.png", "miou.png", "iou_heatmap.png"}
    # Running again resumes from the finished checkpoints: nothing is retrained, the history is the same.
    assert main(args) == 0
    assert json.loads((tmp_path / "history.json").read_text()) == history


def test_help_shows_defaults_tasks_and_methods(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["train", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "(default: 0)" in text  # --seed
    assert "synthetic small" in text and "synthetic 15-5" in text  # per-dataset defaults
    assert "100-50, 100-10, 50-50" in text
    for name, description in METHOD_DESCRIPTIONS.items():
        assert f"{name}  " in text and description in text


def test_help_runs_without_torch() -> None:
    code = "import sys\nfrom incseg.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
    code += "assert 'torch' not in sys.modules\n"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "tasks per dataset" in done.stdout


def test_synthetic_needs_no_other_flag() -> None:
    args = resolve_train_args(build_parser().parse_args(["train", "--dataset", "synthetic"]))
    assert (args.task, args.model, args.method) == ("15-5", "small", "caf")
    assert (args.epochs, args.epochs_next, args.batch_size, args.lr, args.lr_next) == (30, 15, 16, 0.05, 0.01)
    assert _slow_run_warnings(args, "cpu") == []


def test_voc_keeps_the_paper_settings_and_epochs_applies_to_every_step() -> None:
    args = resolve_train_args(build_parser().parse_args(["train", "--dataset", "voc", "--epochs", "3"]))
    assert (args.model, args.batch_size, args.lr, args.lr_next, args.crop_size) == (
        "deeplabv3_resnet101",
        24,
        0.01,
        0.001,
        512,
    )
    assert (args.epochs, args.epochs_next) == (3, 3)


def test_hours_long_runs_are_announced() -> None:
    args = resolve_train_args(build_parser().parse_args(["train", "--dataset", "voc"]))
    lines = _slow_run_warnings(args, "cpu")
    assert len(lines) == 2 and all("\n" not in line for line in lines)
    assert "CPU" in lines[0] and "--backbone-weights" in lines[1]
    args.backbone_weights = Path("r101.pth")
    assert _slow_run_warnings(args, "cuda") == []


def test_missing_dataset_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train"]) == 2
    assert "--dataset is required" in capsys.readouterr().err


def test_demo_device_help_matches_its_default() -> None:
    demo = build_parser()._subparsers._group_actions[0].choices["demo"]  # type: ignore[union-attr]
    device = next(a for a in demo._actions if a.dest == "device")
    assert "default: cpu" in (device.help or "")


def test_ctrl_c_prints_one_line_and_exits_130(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import incseg.cli as cli

    def interrupted(_args: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "run_train", interrupted)
    assert main(["train", "--dataset", "synthetic"]) == 130
    err = capsys.readouterr().err.strip()
    assert err == "incseg train: interrupted; resume with the same command"


def test_divergence_is_a_one_line_error(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from incseg import cli

    def diverged(_args: object) -> int:
        raise DivergenceError("loss term 'ad' exploded at step 1 on rank 1")

    monkeypatch.setattr(cli, "run_train", diverged)
    assert main(["train", "--dataset", "synthetic"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("incseg train: error: ") and "exploded" in err and "Traceback" not in err


def test_config_json_is_written_once_and_a_changed_resume_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [
        "train", "--dataset", "synthetic", "--task", "15-5", "--model", "small", "--method", "ft", "--epochs", "1",
        "--max-iters-per-epoch", "1", "--batch-size", "2", "--device", "cpu", "--out", str(tmp_path), "--no-progress",
    ]  # fmt: skip
    assert main(args) == 0
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["args"]["epochs"] == 1 and config["args"]["seed"] == 0 and config["args"]["out"] == str(tmp_path)
    assert isinstance(config["train"]["lr"], float)
    capsys.readouterr()
    assert main([*args, "--seed", "7", "--lr", "0.5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("incseg train: error:") and "-> 0.5" in err and "seed: 0 -> 7" in err
    assert main([*args, "--seed", "7", "--allow-config-change"]) == 0
    again = json.loads((tmp_path / "config.json").read_text())
    assert again["args"]["seed"] == 0 and again["resumed_with_changes"] == [{"seed": [0, 7]}]


@pytest.mark.parametrize(
    ("device", "match"),
    [
        ("foo", "unknown device 'foo'"),
        ("meta", "holds no data"),
        ("cpu:3", "without an index"),
        ("mps", "not supported"),
        ("xpu", "not supported"),
        ("cuda:99", "CUDA"),
    ],
)
def test_a_device_incseg_cannot_use_is_a_one_line_error_not_a_silent_cpu_run(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, device: str, match: str
) -> None:
    args = ["train", "--dataset", "synthetic", "--device", device, "--out", str(tmp_path / "run")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("incseg train: error: ") and match in err and "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing trained


def test_non_finite_loss_is_a_one_line_error(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from incseg import cli
    from incseg.learner.guard import NonFiniteLossError

    def diverged(_args: object) -> int:
        raise NonFiniteLossError("non-finite loss at step 1, epoch 0, batch 3 on rank 1: loss=nan")

    monkeypatch.setattr(cli, "run_train", diverged)
    assert main(["train", "--dataset", "synthetic"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("incseg train: error: non-finite loss") and "rank 1" in err


def test_an_os_error_is_a_one_line_error(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from incseg import cli

    def full(_args: object) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cli, "run_train", full)
    assert main(["train", "--dataset", "synthetic"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("incseg train: error: ") and "No space left" in err and "Traceback" not in err


def test_ade20k_defaults_to_the_overlapped_filter_and_voc_to_disjoint() -> None:
    parse = build_parser().parse_args
    assert resolve_train_args(parse(["train", "--dataset", "ade20k"])).mode == "overlapped"
    assert resolve_train_args(parse(["train", "--dataset", "voc"])).mode == "disjoint"
    assert resolve_train_args(parse(["train", "--dataset", "synthetic"])).mode == "disjoint"
    assert resolve_train_args(parse(["train", "--dataset", "ade20k", "--mode", "disjoint"])).mode == "disjoint"


def test_cache_check_flag() -> None:
    parse = build_parser().parse_args
    assert parse(["train", "--dataset", "voc"]).cache_check == "stat"
    assert parse(["train", "--dataset", "voc", "--cache-check", "content"]).cache_check == "content"


# ----------------------------------------------------------------------------- issue 23: the second red team

_QUICK = [
    "train", "--dataset", "synthetic", "--method", "ft", "--epochs", "1", "--max-iters-per-epoch", "1",
    "--batch-size", "2", "--device", "cpu", "--no-progress",
]  # fmt: skip


@pytest.fixture
def few_images(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fewer synthetic images than the command's 1200/300 (speed)."""
    from incseg import cli

    monkeypatch.setitem(cli._SYNTHETIC_IMAGES, "train", 48)
    monkeypatch.setitem(cli._SYNTHETIC_IMAGES, "val", 8)


def _one_line_error(capsys: pytest.CaptureFixture[str], command: str = "train") -> str:
    err = capsys.readouterr().err
    assert err.startswith(f"incseg {command}: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_b2_a_checkpoint_copied_into_a_run_with_another_crop_size_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], few_images: None
) -> None:
    assert main([*_QUICK, "--crop-size", "48", "--out", str(tmp_path / "a")]) == 0
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    shutil.copy(tmp_path / "a" / "checkpoints" / "last.pt", tmp_path / "b" / "checkpoints" / "last.pt")
    capsys.readouterr()
    assert main([*_QUICK, "--crop-size", "64", "--out", str(tmp_path / "b")]) == 2
    assert "extra.crop_size: 48 -> 64" in _one_line_error(capsys)


def test_b5_a_failed_run_leaves_no_config_json_that_blocks_the_corrected_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], few_images: None
) -> None:
    out = ["--out", str(tmp_path)]
    assert main([*_QUICK, *out, "--batch-size", "1000", "--crop-size", "48"]) == 2
    assert "fewer than one batch of 1000" in _one_line_error(capsys)  # b5: no run of 0 iterations
    assert main([*_QUICK, *out, "--crop-size", "48"]) == 0
    assert json.loads((tmp_path / "config.json").read_text())["args"]["batch_size"] == 2


def test_c3_a_full_disk_during_a_save_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, few_images: None
) -> None:
    import torch

    real_save = torch.save

    class ShortWrites(io.RawIOBase):  # a disk with 100 bytes left: short writes, then ENOSPC
        room = 100

        def writable(self) -> bool:
            return True

        def write(self, data: Any) -> int:
            n = min(len(data), self.room)
            self.room -= n
            if n == 0 and len(data):
                raise OSError(errno.ENOSPC, "No space left on device")
            return n

    monkeypatch.setattr(torch, "save", lambda obj, f, **kw: real_save(obj, ShortWrites(), **kw))
    assert main([*_QUICK, "--crop-size", "48", "--out", str(tmp_path)]) == 2
    err = _one_line_error(capsys)
    assert "cannot write checkpoint" in err and "No space left on device" in err and "inline_container" not in err


@pytest.mark.parametrize(
    ("flags", "match"),
    [
        (["--lr", "nan"], "argument --lr: must be a finite number > 0, got nan"),
        (["--lr-next", "inf"], "argument --lr-next: must be a finite number > 0, got inf"),
        (["--lambda-ad", "-1"], "argument --lambda-ad: must be a finite number >= 0"),
        (["--workers", "-1"], "argument --workers: must be >= 0, got -1"),
    ],
)
def test_settings_that_cannot_train_are_refused_naming_the_option(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], match: str
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["train", "--dataset", "synthetic", "--out", str(tmp_path), *flags])
    assert info.value.code == 2 and match in capsys.readouterr().err
    assert not (tmp_path / "config.json").exists()  # validated before anything is written


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="needs matplotlib")
@pytest.mark.parametrize(("text", "match"), [("[1, 2]", "holds a JSON list, not an object"), ("{", "not valid JSON")])
def test_c4_a_history_json_that_is_no_history_names_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, match: str
) -> None:
    (tmp_path / "history.json").write_text(text)
    assert main(["plot", str(tmp_path)]) == 2
    err = _one_line_error(capsys, "plot")
    assert match in err and str(tmp_path / "history.json") in err


@pytest.mark.parametrize(("text", "match"), [("[]", "holds a JSON list, not an object"), ("{]", "not valid JSON")])
def test_c5_a_config_json_that_is_no_object_names_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, match: str
) -> None:
    from incseg.learner import IncrementalLearner
    from incseg.models import small_segmenter
    from incseg.scenarios import get_scenario

    scenario = get_scenario("synthetic", "15-5")
    learner = IncrementalLearner(small_segmenter(scenario.num_classes_at(0), width=8), scenario, "ft")
    learner.begin_step(0)
    (tmp_path / "checkpoints").mkdir()
    learner.save(tmp_path / "checkpoints" / "last.pt")
    (tmp_path / "config.json").write_text(text)
    assert main(["eval", str(tmp_path), "--no-progress"]) == 2
    err = _one_line_error(capsys, "eval")
    assert match in err and str(tmp_path / "config.json") in err
    assert main([*_QUICK, "--out", str(tmp_path)]) == 2
    err = _one_line_error(capsys)
    assert match in err and str(tmp_path / "config.json") in err


class _BadMask:
    """A dataset whose item 1 fails as a VOC mask of another size than its image does."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> int:
        if i == 1:
            raise ValueError("image a.jpg has size (4, 4) but its label a.png has size (5, 5)")
        return i


def test_c6_an_error_in_a_dataloader_worker_is_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from torch.utils.data import DataLoader

    from incseg import cli

    def run(_args: object) -> int:
        for _ in DataLoader(_BadMask(), batch_size=2, num_workers=1):  # type: ignore[arg-type]
            pass
        return 0

    monkeypatch.setattr(cli, "run_train", run)
    assert main(["train", "--dataset", "synthetic"]) == 2
    err = _one_line_error(capsys)
    assert err.rstrip().endswith("its label a.png has size (5, 5) (in DataLoader worker 0)"), err


def test_demo_prints_one_time_estimate_for_all_its_phases(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    import incseg._progress

    made: list[incseg._progress.Eta] = []

    class Recorded(incseg._progress.Eta):
        def __init__(self, total: int) -> None:
            super().__init__(total)
            made.append(self)

    monkeypatch.setattr(incseg._progress, "Eta", Recorded)
    threads = torch.get_num_threads()
    tiny = ["--epochs", "1", "--epochs-next", "1", "--train-images", "96", "--val-images", "16", "--width", "8"]
    assert main(["demo", *tiny, "--methods", "ft,mib,joint", "--out", str(tmp_path), "--threads", "1"]) == 0
    assert torch.get_num_threads() == threads  # the caller's setting is restored
    assert len(made) == 1  # step 0, each method's step 1 and joint training share one estimate
    assert made[0].done == made[0].total > 0
    lines = [line for line in capsys.readouterr().err.splitlines() if " epoch " in line]
    assert len(lines) == 4 and all(", run " in line for line in lines)
    assert "run 0:00 left" in lines[-1]
