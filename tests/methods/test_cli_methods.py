"""``incseg train --method plop --memory N``: PLOP and replay through the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from incseg.cli import main
from incseg.learner.checkpoint import read_checkpoint


def test_train_plop_with_memory(tmp_path: Path) -> None:
    args = [
        "train", "--dataset", "synthetic", "--task", "15-5", "--mode", "overlapped", "--model", "small",
        "--method", "plop", "--memory", "8", "--epochs", "1", "--max-iters-per-epoch", "1", "--batch-size", "4",
        "--device", "cpu", "--out", str(tmp_path), "--no-progress",
    ]  # fmt: skip
    assert main(args) == 0
    history = json.loads((tmp_path / "history.json").read_text())
    assert [entry["step"] for entry in history["steps"]] == [0, 1]
    saved = read_checkpoint(tmp_path / "checkpoints" / "step1.pt")
    assert saved["method"]["family"] == "plop" and saved["method"]["components"] == ["replay"]
    memory = saved["criterion"]["components.replay._extra_state"]  # [budget, seed, (source, step) * 8]
    assert memory[:2].tolist() == [8, 0] and memory.numel() == 2 + 2 * 8
    assert int(saved["criterion"]["family.calibrated_for"]) == 16  # thresholds of step 1's 16 old classes
    terms = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert "pod" in terms[-1] and "pod" not in terms[0]


@pytest.mark.parametrize(
    ("method", "terms"),
    [
        ("star", {"bce", "ocfm"}),  # consolidation (prototypes) needs end_step(data=...): the engine passes it
        ("dkd+caf", {"mbce", "kd", "ad"}),  # a family with CAF's blocks
        ("plop+caf", {"seg", "pod", "ad"}),
    ],
)
def test_train_new_and_composed_methods(tmp_path: Path, method: str, terms: set[str]) -> None:
    args = [
        "train", "--dataset", "synthetic", "--task", "15-5", "--model", "small", "--method", method,
        "--epochs", "1", "--max-iters-per-epoch", "1", "--batch-size", "4", "--device", "cpu",
        "--out", str(tmp_path), "--no-progress",
    ]  # fmt: skip
    assert main(args) == 0
    saved = read_checkpoint(tmp_path / "checkpoints" / "step1.pt")
    assert saved["method"]["name"] == method
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert terms <= set(logged[-1]), sorted(logged[-1])
    assert ("caf" in method) == any(k.startswith("fusion.") or ".fusion." in k for k in saved["model"])
