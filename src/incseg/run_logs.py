"""Run logs of the training loop: one JSON line per iteration (:class:`MetricsLog`) and TensorBoard scalars
(:class:`TensorBoardLog`); give either as ``train_scenario(..., on_iteration=log)``. Both are re-exported by
:mod:`incseg.engine`."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from incseg.metrics import IoUResult

__all__ = ["MetricsLog", "TensorBoardLog"]


class MetricsLog:
    """Appends one JSON line per training iteration to a file (``metrics.jsonl`` of ``incseg train``).

    Every line is flushed at once, so the curve survives a crash. A resumed run repeats the iterations after
    its last checkpoint: the first record written drops every line of the file at or after its
    ``(step, iteration)``, so the file never holds an iteration twice.

    Args:
        path: the file (created with its folder; an existing one is continued).

    Example:
        >>> import json, tempfile
        >>> path = tempfile.mkdtemp() + "/metrics.jsonl"
        >>> log = MetricsLog(path)
        >>> log({"step": 0, "epoch": 0, "iteration": 0, "lr": 0.01, "loss": 2.5})
        >>> log.close()
        >>> [json.loads(line)["loss"] for line in open(path)]
        [2.5]
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._file: Any = None

    def __call__(self, record: dict[str, Any]) -> None:
        if self._file is None:
            self._open_at((int(record["step"]), int(record["iteration"])))
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def _open_at(self, key: tuple[int, int]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept: list[str] = []
        if self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    old = json.loads(line)
                    if (int(old["step"]), int(old["iteration"])) < key:
                        kept.append(line)
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut by a crash
        self._file = open(self.path, "w", encoding="utf-8")  # kept open across iterations
        self._file.write("".join(line + "\n" for line in kept))

    def close(self) -> None:
        """Close the file (a later record reopens it)."""
        if self._file is not None:
            self._file.close()
            self._file = None


class TensorBoardLog:
    """TensorBoard scalars of a run (``incseg train --tensorboard``): loss terms and learning rate per iteration,
    mIoU per step.

    Call it with every iteration's record (``train_scenario(..., on_iteration=log)``, like :class:`MetricsLog`) and
    give :meth:`step_end` as ``on_step_end``. Tags: ``train/step{t}/<name>`` over the iterations of step ``t``
    for ``lr``, ``loss`` and every loss term (the iteration counts from 0 in every step, as in ``metrics.jsonl``);
    ``eval/mIoU_old``, ``eval/mIoU_new``, ``eval/mIoU_all``, ``eval/mIoU_old_bg``, ``eval/mIoU_all_bg`` and
    ``eval/hIoU`` (in %, old = the classes of step 0) over the steps. Undefined values (``new`` at step 0) are
    left out. A resumed run writes a new event file in the same folder; TensorBoard reads them together.

    Needs the ``tensorboard`` package (``pip install 'incseg[tensorboard]'``), imported when the log is created.

    Args:
        log_dir: the folder of the event files (created).

    Raises:
        ImportError: ``tensorboard`` is not installed (the message says which extra installs it).

    Example:
        >>> # log = TensorBoardLog("runs/demo/tensorboard")
        >>> # train_scenario(learner, datasets, config, device=device, on_iteration=log, on_step_end=log.step_end)
        >>> # log.close()
    """

    def __init__(self, log_dir: str | Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise ImportError("TensorBoard logging needs tensorboard: pip install 'incseg[tensorboard]'") from err
        self.log_dir = Path(log_dir)
        self.writer = SummaryWriter(log_dir=str(self.log_dir))

    def __call__(self, record: dict[str, Any]) -> None:
        step, iteration = int(record["step"]), int(record["iteration"])
        for key, value in record.items():
            if key not in ("step", "epoch", "iteration"):
                self.writer.add_scalar(f"train/step{step}/{key}", float(value), iteration)

    def step_end(self, step: int, result: IoUResult) -> None:
        """Write the mIoU of the step's evaluation and flush."""
        values = {f"mIoU_{k}": v for k, v in result.groups.items()}
        values["hIoU"] = result.hmean
        for key, value in values.items():
            if not math.isnan(value):
                self.writer.add_scalar(f"eval/{key}", 100 * value, step)
        self.writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        self.writer.close()
