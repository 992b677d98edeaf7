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


# Every example that takes --method runs with the default and with a method of another family (PLOP, which
# calibrates on the step's data before training); drop_in_losses.py uses a loss, not a method.
@pytest.mark.parametrize(
    ("script", "args", "expect"),
    [
        ("drop_in_losses.py", (), "iteration 2: seg="),
        ("torchvision_adapter.py", ("--size", "48"), "prediction shape: (2, 21, 48, 48)"),
        ("torchvision_adapter.py", ("--size", "48", "--method", "plop"), "one plop step: {'seg'"),
        ("quickstart.py", ("--epochs", "1", "--images", "80"), "after step 1: old="),
        ("quickstart.py", ("--epochs", "1", "--images", "80", "--method", "plop"), "pod="),
    ],
)
def test_example_runs(script: str, args: tuple[str, ...], expect: str) -> None:
    proc = _run(script, *args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert expect in proc.stdout


@pytest.mark.parametrize("method", ["caf", "plop"])
def test_voc_example_explains_missing_dataset(tmp_path: Path, method: str) -> None:
    proc = _run("voc_15_5.py", "--root", str(tmp_path / "missing"), "--method", method)
    assert proc.returncode != 0
    assert "JPEGImages" in proc.stderr and "nothing is downloaded" in proc.stderr


def test_every_example_is_run() -> None:
    run = {"drop_in_losses.py", "torchvision_adapter.py", "quickstart.py", "voc_15_5.py"}
    assert {p.name for p in EXAMPLES.glob("*.py")} == run
