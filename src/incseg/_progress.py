"""A dependency-free progress bar for long loops (rank 0 only, quiet when disabled)."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TextIO, TypeVar

T = TypeVar("T")

__all__ = ["Progress"]


class Progress:
    """Wraps an iterable and prints ``desc [=====>    ] 12/40 0:05<0:12 2.4it/s step 1:10 left loss=0.53``.

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
    ) -> None:
        self.iterable = iterable
        self.total = total if total is not None else len(iterable)  # type: ignore[arg-type]
        self.desc = desc
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.min_interval = min_interval
        self.remaining_after = remaining_after
        self.postfix = ""
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def set_postfix(self, text: str) -> None:
        """Text shown after the counters (e.g. the running loss)."""
        self.postfix = text

    def __iter__(self) -> Iterator[T]:  # type: ignore[type-var]
        start = last = time.monotonic()
        n = 0
        for item in self.iterable:
            yield item  # type: ignore[misc]
            n += 1
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
        line = f"{line} {self.postfix}".rstrip()
        end = "\n" if final or not self._tty else ""
        self.stream.write(("\r" if self._tty else "") + line + end)
        self.stream.flush()


def _fmt(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m}:{s:02d}"
