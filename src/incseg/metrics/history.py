"""Results of every incremental step: per-class IoU over time, forgetting, a text table, CSV and JSON export."""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from incseg.metrics._common import check_class_names
from incseg.metrics.result import IoUResult

__all__ = ["StepHistory"]

_FORMAT = "incseg.StepHistory"
_VERSION = 1
_GROUP_LABELS = {
    "old": "mIoU old",
    "new": "mIoU new",
    "all": "mIoU all",
    "old_bg": "mIoU old+bg",
    "all_bg": "mIoU all+bg",
}


@dataclass(frozen=True)
class _Entry:
    step: int
    result: IoUResult
    new_classes: tuple[int, ...]


def _json_float(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


class StepHistory:
    r"""Evaluation results of the successive steps of an incremental run, and the forgetting they show.

    Each :meth:`add` records the :class:`IoUResult` of one step (classes in the incremental index space, so
    class ``c`` keeps its index as ``K`` grows) and which classes that step learned. The *forgetting* of a
    class ``c`` learned at step ``s_c``, measured at a later step ``t``, is the drop from its best IoU over
    the recorded steps ``s_c <= j < t`` (Chaudhry et al.'s definition, PROTOCOL "Metrics"):

    .. math:: F_t(c) = \max_{s_c \le j < t} \mathrm{IoU}_j(c) - \mathrm{IoU}_t(c)

    NaN IoUs (absent classes) are skipped in the maximum; ``F_t(c)`` is NaN when no earlier value or the
    current one is missing. Forgetting is signed: a class that improved has ``F < 0``. The *mean forgetting*
    at ``t`` averages the non-NaN ``F_t(c)`` over the old classes (learned before ``t``), background
    excluded by default like the ``old`` group.

    Old/new groups: each result keeps the split it was computed with (``IoUResult.num_old_classes``; with
    :func:`incseg.engine.evaluate` the field's convention, old = classes of step 0). The history also reports
    the *per-step* split of every step (old = classes learnt before it, new = those it learnt, computed from
    the confusion matrix with :meth:`IoUResult.regroup`): rows ``mIoU old (before t)`` / ``mIoU new (step t)``
    of :meth:`table`, ``per_step`` of :meth:`to_dict` and the ``*_step`` columns of :meth:`to_csv`.

    Args:
        class_names: optional unique names indexed by class (at least as many as the largest ``K`` added);
            by default the names carried by the results are used, else the indices.

    Raises:
        TypeError: ``class_names`` is not a sequence of ``str``.
        ValueError: duplicate ``class_names``.

    Example:
        >>> import torch
        >>> from incseg.metrics import IoUResult
        >>> history = StepHistory(class_names=["bg", "cat", "dog"])
        >>> history.add(0, IoUResult.from_confusion(torch.tensor([[8, 2], [0, 10]]), num_old_classes=0))
        >>> history.add(1, IoUResult.from_confusion(torch.tensor([[8, 1, 1], [2, 6, 2], [0, 0, 5]]), num_old_classes=2))
        >>> history.learned_at
        {0: 0, 1: 0, 2: 1}
        >>> {c: round(f, 3) for c, f in history.forgetting().items()}
        {0: 0.133, 1: 0.288}
        >>> round(history.mean_forgetting(), 3)
        0.288
    """

    def __init__(self, class_names: Sequence[str] | None = None) -> None:
        self._class_names = check_class_names(class_names, None)
        self._entries: list[_Entry] = []
        self._learned_at: dict[int, int] = {}

    # ------------------------------------------------------------------ recording

    def add(self, step: int, result: IoUResult, *, new_classes: Iterable[int] | None = None) -> None:
        """Record the result of ``step`` and the classes it learned.

        Args:
            step: step index, larger than every step already recorded.
            result: the evaluation of the model after ``step`` (from :meth:`MeanIoU.compute`).
            new_classes: incremental indices learned at ``step``; by default every class of ``result`` not
                learned at an earlier step (``range(K_prev, K)`` in the index space, background at step 0).
                Classes never declared learned are shown but get no forgetting.

        Raises:
            TypeError: ``step`` is not an int, ``result`` not an :class:`IoUResult`.
            ValueError: ``step`` not after the last step; ``result`` has fewer classes than already learned or
                than the class names; ``new_classes`` out of ``[0, K)``, repeated, or learned before.
        """
        if isinstance(step, bool) or not isinstance(step, int):
            raise TypeError(f"step must be an int, got {type(step).__name__}")
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if self._entries and step <= self._entries[-1].step:
            raise ValueError(f"step must be larger than the last recorded step {self._entries[-1].step}, got {step}")
        if not isinstance(result, IoUResult):
            raise TypeError(f"result must be an IoUResult, got {type(result).__name__}")
        k = result.num_classes
        if self._learned_at and k <= max(self._learned_at):
            raise ValueError(
                f"result has {k} classes but class {max(self._learned_at)} was learned before: "
                "the index space only grows"
            )
        if self._class_names is not None and len(self._class_names) < k:
            raise ValueError(f"result has {k} classes but the history has only {len(self._class_names)} class_names")
        if new_classes is None:
            learned = tuple(c for c in range(k) if c not in self._learned_at)
        else:
            learned = tuple(new_classes)
            for c in learned:
                if isinstance(c, bool) or not isinstance(c, int):
                    raise TypeError(f"new_classes must contain ints, got {type(c).__name__}")
                if not 0 <= c < k:
                    raise ValueError(f"new_classes must be in [0, {k}) for this result, got {c}")
                if c in self._learned_at:
                    raise ValueError(f"class {c} in new_classes was already learned at step {self._learned_at[c]}")
            if len(set(learned)) != len(learned):
                raise ValueError(f"new_classes must not repeat a class, got {list(learned)}")
        self._entries.append(_Entry(step, result, tuple(sorted(learned))))
        for c in learned:
            self._learned_at[c] = step

    # ------------------------------------------------------------------ access

    @property
    def steps(self) -> tuple[int, ...]:
        """Recorded steps, in order."""
        return tuple(e.step for e in self._entries)

    @property
    def learned_at(self) -> dict[int, int]:
        """Step that learned each class, by class index."""
        return dict(sorted(self._learned_at.items()))

    @property
    def num_classes(self) -> int:
        """Largest ``K`` recorded (0 when empty)."""
        return max((e.result.num_classes for e in self._entries), default=0)

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[tuple[int, IoUResult]]:
        return ((e.step, e.result) for e in self._entries)

    def __contains__(self, step: object) -> bool:
        return any(e.step == step for e in self._entries)

    def _entry(self, step: int | None) -> _Entry:
        if not self._entries:
            raise ValueError("the history is empty")
        if step is None:
            return self._entries[-1]
        for e in self._entries:
            if e.step == step:
                return e
        raise KeyError(f"step {step} is not recorded (steps: {list(self.steps)})")

    def per_step(self, step: int | None = None) -> IoUResult:
        """The result of ``step`` (default: the last) with the per-step split: old = classes learnt before.

        Returns:
            ``self[step].regroup(n)`` with ``n`` the number of classes learnt at earlier recorded steps.
        """
        entry = self._entry(step)
        n_old = sum(1 for s in self._learned_at.values() if s < entry.step)
        return entry.result.regroup(min(n_old, entry.result.num_classes))

    def __getitem__(self, step: int) -> IoUResult:
        """The result recorded for ``step`` (``KeyError`` if absent)."""
        return self._entry(step).result

    def new_classes(self, step: int) -> tuple[int, ...]:
        """Classes learned at ``step``."""
        return self._entry(step).new_classes

    def class_name(self, index: int) -> str:
        """Name of class ``index``: history names, else the latest result's names, else the index."""
        if self._class_names is not None and index < len(self._class_names):
            return self._class_names[index]
        for e in reversed(self._entries):
            if e.result.class_names is not None and index < len(e.result.class_names):
                return e.result.class_names[index]
        return str(index)

    # ------------------------------------------------------------------ forgetting

    def forgetting(self, step: int | None = None) -> dict[int, float]:
        """Forgetting ``F_t(c)`` of every class learned before ``step`` (default: the last step).

        Returns:
            ``{class index: max earlier IoU - IoU at step}`` (IoU in ``[0, 1]``, signed, NaN when undefined);
            empty at the first step.

        Raises:
            ValueError: empty history. KeyError: ``step`` not recorded.
        """
        entry = self._entry(step)
        earlier = [e for e in self._entries if e.step < entry.step]
        out: dict[int, float] = {}
        for c, s in sorted(self._learned_at.items()):
            if s >= entry.step:
                continue
            past = [float(e.result.iou[c]) for e in earlier if e.step >= s]
            past = [v for v in past if not math.isnan(v)]
            now = float(entry.result.iou[c])
            out[c] = max(past) - now if past and not math.isnan(now) else math.nan
        return out

    def mean_forgetting(self, step: int | None = None, *, include_background: bool = False) -> float:
        """Mean of the non-NaN :meth:`forgetting` values at ``step`` over the old classes (NaN if none).

        Args:
            step: the step (default: the last one).
            include_background: also average the background's forgetting (class 0).
        """
        values = [v for c, v in self.forgetting(step).items() if (include_background or c != 0) and not math.isnan(v)]
        return sum(values) / len(values) if values else math.nan

    # ------------------------------------------------------------------ export

    def table(self, *, percent: bool = True, digits: int = 1) -> str:
        """Fixed-width text table: one row per class and per summary, one column per step.

        Class rows give the IoU at each step and, last, the forgetting at the final step (``-``: class not
        in that step's result / not forgettable yet, ``n/a``: NaN). Summary rows give the group means,
        ``hmean``, pixel accuracy and the mean forgetting of each step.

        Args:
            percent: show values multiplied by 100 (IoU points, as in the papers' tables).
            digits: decimals shown.

        Returns:
            The table as one string (lines joined by ``\\n``); an empty history gives a header only.
        """
        scale = 100.0 if percent else 1.0

        def fmt(v: float | None) -> str:
            if v is None:
                return "-"
            return "n/a" if math.isnan(v) else f"{v * scale:.{digits}f}"

        k_max = self.num_classes
        last_forgetting = self.forgetting() if self._entries else {}
        header = ["#", "class", *(f"step {e.step}" for e in self._entries), "forgetting"]
        rows: list[list[str]] = []
        for c in range(k_max):
            ious = [fmt(float(e.result.iou[c])) if c < e.result.num_classes else "-" for e in self._entries]
            rows.append([str(c), self.class_name(c), *ious, fmt(last_forgetting.get(c))])
        summary: list[list[str]] = []
        for key, label in _GROUP_LABELS.items():
            summary.append(["", label, *(fmt(e.result.groups[key]) for e in self._entries), ""])
        per_step = [self.per_step(e.step) for e in self._entries]
        summary.append(["", "mIoU old (before t)", *(fmt(r.groups["old"]) for r in per_step), ""])
        summary.append(["", "mIoU new (step t)", *(fmt(r.groups["new"]) for r in per_step), ""])
        summary.append(["", "hmean old/new", *(fmt(e.result.hmean) for e in self._entries), ""])
        summary.append(["", "pixel accuracy", *(fmt(e.result.pixel_accuracy) for e in self._entries), ""])
        summary.append(["", "mean forgetting", *(fmt(self.mean_forgetting(e.step)) for e in self._entries), ""])

        all_rows = [header, *rows, *summary]
        widths = [max(len(r[i]) for r in all_rows) for i in range(len(header))]

        def line(r: list[str]) -> str:
            cells = [r[0].rjust(widths[0]), r[1].ljust(widths[1])] + [x.rjust(w) for x, w in zip(r[2:], widths[2:])]
            return "  ".join(cells).rstrip()

        rule = "-" * (sum(widths) + 2 * (len(widths) - 1))
        return "\n".join([line(header), rule, *(line(r) for r in rows), rule, *(line(r) for r in summary)])

    def _step_dict(self, entry: _Entry) -> dict[str, Any]:
        forgetting = self.forgetting(entry.step)
        per_step = self.per_step(entry.step)
        return {
            "step": entry.step,
            "new_classes": list(entry.new_classes),
            "result": entry.result.to_dict(),
            "per_step": {
                "num_old_classes": per_step.num_old_classes,
                **{k: _json_float(per_step.groups[k]) for k in ("old", "new", "old_bg")},
                "hmean": _json_float(per_step.hmean),
            },
            "forgetting": [
                _json_float(forgetting[c]) if c in forgetting else None for c in range(entry.result.num_classes)
            ],
            "mean_forgetting": _json_float(self.mean_forgetting(entry.step)),
        }

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-safe copy (NaN as ``None``), loadable by :meth:`from_dict`.

        Returns:
            ``{"format", "version", "class_names", "steps": [{"step", "new_classes", "result", "per_step",
            "forgetting", "mean_forgetting"}, ...]}``; ``result`` is :meth:`IoUResult.to_dict` (with the
            confusion matrix and its ``num_old_classes``); ``per_step`` holds ``num_old_classes``, ``old``,
            ``new``, ``old_bg`` and ``hmean`` of the per-step split (see :meth:`per_step`), recomputed, not read,
            by :meth:`from_dict`; ``forgetting`` lists ``F_t(c)`` by class index (``None`` when undefined) and
            is recomputed, not read, by :meth:`from_dict`.
        """
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "class_names": list(self._class_names) if self._class_names is not None else None,
            "steps": [self._step_dict(e) for e in self._entries],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StepHistory:
        """Rebuild a history from :meth:`to_dict` output.

        Raises:
            ValueError: not a ``StepHistory`` dict, unknown version, or an invalid step entry.
        """
        if not isinstance(data, Mapping) or data.get("format") != _FORMAT:
            raise ValueError(f"data is not a {_FORMAT} dict (missing or wrong 'format' entry)")
        if data.get("version") != _VERSION:
            raise ValueError(f"unsupported {_FORMAT} version {data.get('version')!r}, expected {_VERSION}")
        history = cls(class_names=data.get("class_names"))
        for entry in data.get("steps", []):
            history.add(
                int(entry["step"]), IoUResult.from_dict(entry["result"]), new_classes=list(entry["new_classes"])
            )
        return history

    def to_json(self, path: str | os.PathLike[str], *, indent: int | None = 2) -> None:
        """Write :meth:`to_dict` as standard JSON (no NaN tokens) to ``path``."""
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=indent, allow_nan=False)
            f.write("\n")

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> StepHistory:
        """Read a history written by :meth:`to_json`."""
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    def csv_header(self) -> list[str]:
        """Column names of :meth:`to_csv`."""
        names = [self.class_name(c) for c in range(self.num_classes)]
        return [
            "step",
            "new_classes",
            *IoUResult.GROUP_NAMES,
            "hmean",
            "old_step",
            "new_step",
            "hmean_step",
            "pixel_accuracy",
            "mean_accuracy",
            "mean_forgetting",
            *(f"iou/{n}" for n in names),
            *(f"forgetting/{n}" for n in names),
        ]

    def to_csv(self, path: str | os.PathLike[str]) -> None:
        """Write one row per step: group means (``old_step``, ``new_step``, ``hmean_step``: the per-step split of
        :meth:`per_step`), accuracies, mean forgetting, then per-class IoU and forgetting.

        Values are fractions in ``[0, 1]`` written with full precision (``repr``); ``nan`` for NaN, an empty
        cell where a class is not in that step's result (IoU) or has no forgetting yet. ``new_classes`` is a
        space-separated list of indices. See :meth:`csv_header` for the columns.
        """

        def cell(v: float | None) -> str:
            return "" if v is None else repr(float(v))

        k_max = self.num_classes
        with open(path, "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(self.csv_header())
            for e in self._entries:
                r = e.result
                forgetting = self.forgetting(e.step)
                per_step = self.per_step(e.step)
                writer.writerow(
                    [
                        str(e.step),
                        " ".join(str(c) for c in e.new_classes),
                        *(cell(r.groups[g]) for g in IoUResult.GROUP_NAMES),
                        cell(r.hmean),
                        cell(per_step.groups["old"]),
                        cell(per_step.groups["new"]),
                        cell(per_step.hmean),
                        cell(r.pixel_accuracy),
                        cell(r.mean_accuracy),
                        cell(self.mean_forgetting(e.step)),
                        *(cell(float(r.iou[c])) if c < r.num_classes else "" for c in range(k_max)),
                        *(cell(forgetting.get(c)) for c in range(k_max)),
                    ]
                )

    def __repr__(self) -> str:
        return f"StepHistory(steps={list(self.steps)}, num_classes={self.num_classes})"
