"""The progress bar: counts, rate, and the time left of the whole step."""

from __future__ import annotations

import io

import pytest

from incseg._progress import Eta, Progress


def test_line_has_rate_and_step_time_left() -> None:
    stream = io.StringIO()
    items = list(Progress(range(3), desc="step 0 epoch 1/2", stream=stream, remaining_after=3, min_interval=0.0))
    assert items == [0, 1, 2]
    last = stream.getvalue().strip().splitlines()[-1]
    assert last.startswith("step 0 epoch 1/2 [") and " 3/3 " in last
    assert "it/s" in last and last.endswith("left")


def test_disabled_bar_prints_nothing() -> None:
    stream = io.StringIO()
    assert list(Progress([1, 2], stream=stream, enabled=False)) == [1, 2]
    assert stream.getvalue() == ""


def test_eta_is_the_runs_pace_times_the_iterations_left(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter([10.0, 14.0])  # start, then 4 s later
    monkeypatch.setattr("incseg._progress.time.monotonic", lambda: next(clock))
    eta = Eta(10)
    assert eta.left() is None and eta.text() == ""
    eta.start()
    eta.advance(2)
    assert eta.left() == pytest.approx(4.0 / 2 * 8)  # 2 s per iteration, 8 left
    eta.skip(4)  # a resumed run does not repeat 4 of them
    assert eta.total == 6


def test_every_progress_line_ends_with_the_runs_time_left() -> None:
    stream = io.StringIO()
    eta = Eta(5)
    list(Progress(range(2), desc="a", stream=stream, min_interval=0.0, eta=eta))
    list(Progress(range(3), desc="b", stream=stream, min_interval=0.0, eta=eta))
    lines = stream.getvalue().strip().splitlines()
    assert eta.done == 5 and len(lines) == 5
    assert all(", run " in line and line.endswith(" left") for line in lines)
    assert lines[-1].endswith("run 0:00 left")
