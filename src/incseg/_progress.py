"""A dependency-free progress bar for long loops (rank 0 only, quiet when disabled)."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TextIO, TypeVar

T = TypeVar("T")

__all__ = ["Eta", "Progress"]


class Eta:
    """The time left of a whole run made of several loops (steps, methods): one estimate for all of them.

    The run's loops report each training iteration (:meth:`advance`); the estimate is the run's own pace so far
    (wall time per iteration since the first one, everything in between included: evaluations, checkpoints)
    times the iterations left. Iterations a resumed run does not repeat are taken off with :meth:`skip`.

    Args:
        total: training iterations of the whole run.

    Example:
        >>> eta = Eta(100)
        >>> eta.left() is None  # no pace yet
        True
        >>> eta.skip(40)
        >>> eta.total
        60
    """

    def __init__(self, total: int) -> None:
        self.total = max(0, int(total))
        self.done = 0
        self._start: float | None = None

    def start(self) -> None:
        """Start the clock (the first :meth:`advance` does it if not called)."""
        if self._start is None:
            self._start = time.monotonic()

    def advance(self, n: int = 1) -> None:
        """``n`` more iterations are done."""
        self.start()
        self.done += n

    def skip(self, n: int) -> None:
        """``n`` iterations of the plan will not run (done before a resume)."""
        self.total = max(self.done, self.total - n)

    def left(self) -> float | None:
        """Estimated seconds left, or ``None`` before the first iteration."""
        if self._start is None or self.done == 0:
            return None
        elapsed = time.monotonic() - self._start
        return elapsed / self.done * max(0, self.total - self.done)

    def text(self) -> str:
        """``"run 3:10 left"`` (or ``""`` without an estimate yet)."""
        left = self.left()
        return "" if left is None else f"run {_fmt(left)} left"


class Progress:
    """Wraps an iterable and prints ``desc [=====>    ] 12/40 0:05<0:12 2.4it/s step 1:10 left run 4:30 left``.

    On a terminal the line is redrawn in place; otherwise (logs, CI) a line is printed at most every
    ``min_interval`` seconds and at the end, so log files stay short.

    Args:
        iterable: what to iterate over.
        total: number of items (defaults to ``len(iterable)``).
        desc: label printed first.
        enabled: print nothing when False (e.g. ranks other than 0).
        stream: where to print (default ``sys.stderr``).
        min_interval: seconds between two printed lines when not on a terminal.
        remaining_after: items that follow this loop in the same larger task (e.g. the step's later epochs);
            when given, the line ends with the estimated time left for the whole task.
        eta: the :class:`Eta` of the whole run: every item advances it and the line ends with its estimate.
    """

    def __init__(
        self,
        iterable: Iterable[T],
        *,
        total: int | None = None,
        desc: str = "",
        enabled: bool = True,
        stream: TextIO | None = None,
        min_interval: float = 10.0,
        remaining_after: int | None = None,
        eta: Eta | None = None,
    ) -> None:
        self.iterable = iterable
        self.total = total if total is not None else len(iterable)  # type: ignore[arg-type]
        self.desc = desc
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.min_interval = min_interval
        self.remaining_after = remaining_after
        self.eta = eta
        self.postfix = ""
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def set_postfix(self, text: str) -> None:
        """Text shown after the counters (e.g. the running loss)."""
        self.postfix = text

    def __iter__(self) -> Iterator[T]:  # type: ignore[type-var]
        if self.eta is not None:
            self.eta.start()
        start = last = time.monotonic()
        n = 0
        for item in self.iterable:
            yield item  # type: ignore[misc]
            n += 1
            if self.eta is not None:
                self.eta.advance()
            now = time.monotonic()
            if self.enabled and (self._tty or now - last >= self.min_interval or n == self.total):
                self._print(n, now - start, final=n == self.total)
                last = now

    def _print(self, n: int, elapsed: float, *, final: bool) -> None:
        width = 24
        frac = n / self.total if self.total else 1.0
        filled = int(width * frac)
        bar = "=" * filled + (">" if filled < width else "") + " " * max(0, width - filled - 1)
        per_item = elapsed / n if n else 0.0
        rate = f"{n / elapsed:.1f}it/s" if elapsed > 0 else "-it/s"
        line = f"{self.desc} [{bar}] {n}/{self.total} {_fmt(elapsed)}<{_fmt(per_item * (self.total - n))} {rate}"
        if self.remaining_after is not None:
            line += f" step {_fmt(per_item * (self.total - n + self.remaining_after))} left"
        if self.eta is not None and self.eta.text():
            line += f", {self.eta.text()}"
        line = f"{line} {self.postfix}".rstrip()
        end = "\n" if final or not self._tty else ""
        self.stream.write(("\r" if self._tty else "") + line + end)
        self.stream.flush()


def _fmt(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m}:{s:02d}"
