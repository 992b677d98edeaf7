"""``incseg train --config FILE``: every option from TOML, the command line wins, bad files are one-line errors."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from incseg import cli
from incseg.cli import main, parse_args, resolve_train_args

CONFIGS = Path(__file__).resolve().parents[1] / "examples" / "configs"


def _train_args(*argv: str) -> object:
    return resolve_train_args(parse_args(["train", *argv]))


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("voc-15-5.toml", ("voc", "15-5", "disjoint", "deeplabv3_resnet101", 30, 30, 24, 0.01, 0.001, 512)),
        ("voc-15-1.toml", ("voc", "15-1", "disjoint", "deeplabv3_resnet101", 30, 30, 24, 0.01, 0.001, 512)),
        ("voc-19-1.toml", ("voc", "19-1", "disjoint", "deeplabv3_resnet101", 30, 30, 24, 0.01, 0.001, 512)),
        ("ade-100-50.toml", ("ade20k", "100-50", "overlapped", "deeplabv3_resnet101", 60, 60, 24, 0.01, 0.01, 512)),
        ("synthetic.toml", ("synthetic", "15-5", "disjoint", "small", 30, 15, 16, 0.05, 0.01, 64)),
    ],
)
def test_shipped_configs_parse_to_the_paper_settings(name: str, expected: tuple[object, ...]) -> None:
    args = _train_args("--config", str(CONFIGS / name))
    keys = ("dataset", "task", "mode", "model", "epochs", "epochs_next", "batch_size", "lr", "lr_next", "crop_size")
    assert tuple(getattr(args, k) for k in keys) == expected
    assert args.method == "caf" and args.output_stride == 16 and args.seed == 0
    if args.dataset != "synthetic":  # the commands of docs/reproduce.md: torchrun on 4 GPUs
        assert (args.sync_bn, args.amp, args.workers) == (True, "bf16", 6)


def test_shipped_synthetic_config_equals_the_dataset_defaults() -> None:
    from_file = vars(_train_args("--config", str(CONFIGS / "synthetic.toml")))
    from_defaults = vars(_train_args("--dataset", "synthetic", "--device", "cpu"))
    assert {k: v for k, v in from_file.items() if k != "config"} == {
        k: v for k, v in from_defaults.items() if k != "config"
    }


def test_every_option_can_come_from_the_file_and_flags_override_it(tmp_path: Path) -> None:
    config = tmp_path / "run.toml"
    config.write_text(
        'dataset = "synthetic"\ntask = "15-1"\nepochs = 3\nlr_next = 0.002\nsync-bn = true\n'
        'no_progress = true\nroot = "some/where"\nlambda-ad = 5\nmax-iters-per-epoch = 2\n'
    )
    args = _train_args("--config", str(config), "--epochs", "1", "--task", "10-1")
    assert (args.epochs, args.task) == (1, "10-1")  # the command line wins
    assert (args.lr_next, args.sync_bn, args.no_progress, args.root) == (0.002, True, True, Path("some/where"))
    assert _train_args("--config", str(config), "--no-sync-bn").sync_bn is False  # a switch of the file, turned off
    assert (args.lambda_ad, args.max_iters_per_epoch, args.epochs_next) == (5.0, 2, 1)
    assert args.lr == 0.05  # not in the file: the dataset's value


def test_each_option_of_train_is_accepted_in_the_file(tmp_path: Path) -> None:
    import argparse

    lines, expected = [], {}
    for action in cli._subparser(cli.build_parser(), "train")._actions:
        if not action.option_strings or action.dest in ("help", "config"):
            continue
        key = action.option_strings[0 if isinstance(action, argparse.BooleanOptionalAction) else -1].lstrip("-")
        if isinstance(action, (argparse._StoreTrueAction, argparse.BooleanOptionalAction)):
            lines.append(f"{key} = true")
            expected[action.dest] = True
        elif action.choices is not None:
            value = list(action.choices)[-1]
            lines.append(f'{key} = "{value}"')
            expected[action.dest] = value
        elif action.type in (float,):
            lines.append(f"{key} = 0.25")
            expected[action.dest] = 0.25
        elif action.type is Path:
            lines.append(f'{key} = "a/b"')
            expected[action.dest] = Path("a/b")
        elif action.type is None:
            lines.append(f'{key} = "text"')
            expected[action.dest] = "text"
        else:  # int-like
            lines.append(f"{key} = 2")
            expected[action.dest] = 2
    config = tmp_path / "all.toml"
    config.write_text("\n".join(lines) + "\n")
    args = vars(parse_args(["train", "--config", str(config)]))
    assert {k: args[k] for k in expected} == expected
    assert len(expected) > 25


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('dataset = "synthetic"\nepoch = 3\n', "unknown setting 'epoch'"),
        ("epochs = 0\n", "argument --epochs: must be >= 1"),
        ('model = "resnet50"\n', "invalid choice: 'resnet50'"),
        ('sync-bn = "yes"\n', "sync-bn is a flag and takes true or false"),
        ("lr = [0.1, 0.01]\n", "lr takes one value"),
        ("config = 'other.toml'\n", "unknown setting 'config'"),
        ("epochs = \n", "is not valid TOML"),
    ],
)
def test_bad_files_are_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, message: str
) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(text)
    assert main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"incseg train: error: config file {config}") and err.count("\n") == 1, err
    assert message in err


def test_missing_file_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--config", str(tmp_path / "none.toml")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.fixture
def few_images() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(cli._SYNTHETIC_IMAGES, "train", 24)
        patch.setitem(cli._SYNTHETIC_IMAGES, "val", 8)
        yield


def test_the_file_is_copied_into_the_run_folder(tmp_path: Path, few_images: None) -> None:
    config = tmp_path / "tiny.toml"
    out = tmp_path / "run"
    text = (
        'dataset = "synthetic"\nmethod = "ft"\nepochs = 1\nmax-iters-per-epoch = 1\nbatch-size = 4\n'
        f'crop-size = 48\ndevice = "cpu"\nno-progress = true\nout = "{out}"\n'
    )
    config.write_text(text)
    assert main(["train", "--config", str(config), "--seed", "3"]) == 0
    assert (out / "config.toml").read_text() == text
    saved = json.loads((out / "config.json").read_text())["args"]
    assert (saved["seed"], saved["epochs"], saved["config"]) == (3, 1, str(config))
    # The same settings from another copy of the file resume the finished run (the file's path is no setting).
    other = tmp_path / "copy.toml"
    other.write_text(text)
    assert main(["train", "--config", str(other), "--seed", "3"]) == 0
    assert (out / "config.toml").read_text() == text
