"""The example scripts run (shortened) and fail clearly where they need files that are not there."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True, timeout=600, check=False
    )


@pytest.mark.parametrize(
    ("script", "args", "expect"),
    [
        ("drop_in_losses.py", (), "iteration 2: seg="),
        ("torchvision_adapter.py", ("--size", "48"), "prediction shape: (2, 21, 48, 48)"),
        ("quickstart.py", ("--epochs", "1", "--images", "80"), "after step 1: old="),
    ],
)
def test_example_runs(script: str, args: tuple[str, ...], expect: str) -> None:
    proc = _run(script, *args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert expect in proc.stdout


def test_voc_example_explains_missing_dataset(tmp_path: Path) -> None:
    proc = _run("voc_15_5.py", "--root", str(tmp_path / "missing"))
    assert proc.returncode != 0
    assert "JPEGImages" in proc.stderr and "nothing is downloaded" in proc.stderr
