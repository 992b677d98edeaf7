"""docs/reproduce.md: every command of the page runs, with its config file, on fake VOC and ADE20K folders.

The page's ``torchrun ... -m incseg train --config examples/configs/<run>.toml --root /data/...`` lines are run
as they are written, in one process on the CPU, with the paper's scale turned down by flags appended after them
(the small network, 16 px images, one iteration per epoch, no synchronised batch norm, float32). The configs'
paper settings themselves are checked in ``tests/test_cli_config.py``.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import pytest

from incseg import cli

sys.path.insert(0, str(Path(__file__).parent / "data"))
from _fake_datasets import make_ade, make_voc

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "reproduce.md"
# One training image per VOC class (so that every step of every task has images in both protocols), a few
# validation images with classes of several steps.
# Two training images of every class of 15-1's single-class steps: a step needs at least one batch (of 2).
VOC_TRAIN = {f"2007_{c:06d}": [c] for c in range(1, 21)} | {
    "2007_000100": [2, 16],
    "2007_000101": [20, 1],
    "2007_000102": [17, 3],
    "2007_000103": [18],
    "2007_000104": [19, 5],
}
VOC_VAL = {"2008_000001": [1, 16], "2008_000002": [17, 18], "2008_000003": [19, 20], "2008_000004": [15]}
# What a CPU needs instead of 4 GPUs and hours; everything else comes from the page and the config file.
SMALL = [
    "--device", "cpu", "--no-sync-bn", "--amp", "none", "--workers", "0", "--model", "small", "--crop-size", "16",
    "--batch-size", "2", "--epochs", "1", "--max-iters-per-epoch", "1", "--no-progress",
]  # fmt: skip


def page_commands() -> list[list[str]]:
    """The ``incseg train`` arguments of every ``torchrun`` line in the page's bash blocks."""
    text = PAGE.read_text(encoding="utf-8")
    commands = []
    for block in text.split("```bash")[1:]:
        for line in block.split("```")[0].replace("\\\n", " ").splitlines():
            words = shlex.split(line)
            if words[:1] == ["torchrun"]:
                assert words[words.index("-m") + 1] == "incseg", line
                commands.append(words[words.index("-m") + 2 :])
    return commands


COMMANDS = page_commands()


def test_the_page_runs_every_config_of_the_paper() -> None:
    configs = {Path(c[c.index("--config") + 1]).name for c in COMMANDS}
    shipped = {p.name for p in (ROOT / "examples" / "configs").glob("*.toml")} - {"synthetic.toml"}
    assert configs == shipped
    modes = {(Path(c[c.index("--config") + 1]).stem, "--mode" in c) for c in COMMANDS}
    assert {m for m in modes if m[0].startswith("voc")} == {
        (f"voc-{t}", o) for t in ("15-5", "15-1", "19-1") for o in (False, True)
    }


@pytest.fixture(scope="module")
def fake_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    make_voc(root / "voc", aug=True, train=VOC_TRAIN, val=VOC_VAL, aug_extra={})
    make_ade(root / "ade")
    return {"/data/voc": root / "voc", "/data/ade": root / "ade"}


@pytest.mark.parametrize(
    "command",
    COMMANDS,
    ids=[" ".join([Path(c[c.index("--config") + 1]).stem, *c[c.index("--root") + 2 :]]) for c in COMMANDS],
)
def test_page_command_runs_on_fake_data(
    command: list[str], fake_data: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)  # the page runs from the repository: examples/configs/... is relative to it
    argv = [str(fake_data.get(word, word)) for word in command]
    assert argv != command, "the command names no dataset root of the page"
    out = tmp_path / "run"
    assert cli.main([*argv, *SMALL, "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())["args"]
    history = json.loads((out / "history.json").read_text())
    steps = {"15-5": 2, "19-1": 2, "15-1": 6, "100-50": 2}[config["task"]]
    assert [s["step"] for s in history["steps"]] == list(range(steps))
    overlapped = "--mode" in command or config["dataset"] == "ade20k"  # ADE20K's config: overlapped, as PLOP
    assert (config["method"], config["mode"]) == ("caf", "overlapped" if overlapped else "disjoint")
