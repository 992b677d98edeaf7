"""The progress bar: counts, rate, and the time left of the whole step."""

from __future__ import annotations

import io

from incseg._progress import Progress


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
