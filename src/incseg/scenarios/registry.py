"""Standard tasks of the class-incremental segmentation literature, by dataset and name (paper Sec. IV-A)."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from incseg._catalog import DATASET_TASKS
from incseg.scenarios._names import ADE20K_CLASS_NAMES, SYNTHETIC_CLASS_NAMES, VOC_CLASS_NAMES
from incseg.scenarios.scenario import Mode, Scenario, _as_int

__all__ = ["default_mode", "get_scenario", "list_datasets", "list_tasks"]


@dataclass(frozen=True)
class _Dataset:
    names: Callable[[], tuple[str, ...]]
    tasks: tuple[str, ...]
    mode: Mode  # the image filter of the literature for this dataset (see default_mode)

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.names()


_DATASETS: dict[str, _Dataset] = {
    "voc": _Dataset(lambda: VOC_CLASS_NAMES, DATASET_TASKS["voc"], "disjoint"),
    "ade20k": _Dataset(lambda: ADE20K_CLASS_NAMES, DATASET_TASKS["ade20k"], "overlapped"),
    "synthetic": _Dataset(lambda: SYNTHETIC_CLASS_NAMES, DATASET_TASKS["synthetic"], "disjoint"),
}
_DATASET_ALIASES = {"pascal": "voc", "pascal-voc": "voc", "voc2012": "voc", "ade": "ade20k"}
_TASK_ALIASES = {"joint": "offline", "15-5s": "15-1"}
_TASK_RE = re.compile(r"^(\d+)-(\d+)$")


def _dataset(dataset: str) -> tuple[str, _Dataset]:
    if not isinstance(dataset, str):
        raise TypeError(f"dataset must be a string, got {type(dataset).__name__}")
    key = dataset.strip().lower()
    key = _DATASET_ALIASES.get(key, key)
    if key not in _DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; known datasets: {sorted(_DATASETS)}")
    return key, _DATASETS[key]


def list_datasets() -> tuple[str, ...]:
    """Names of the datasets :func:`get_scenario` knows: ``("ade20k", "synthetic", "voc")``."""
    return tuple(sorted(_DATASETS))


def default_mode(dataset: str) -> Mode:
    """The image filter :func:`get_scenario` uses for ``dataset`` when no ``mode`` is given.

    ``"disjoint"`` for Pascal VOC (MiB's default setting, reported first by every paper) and the synthetic
    benchmark; ``"overlapped"`` for ADE20K, where the literature has no disjoint setting: PLOP runs every ADE20K
    task with ``--overlap`` (keep each image with a pixel of a new class) and MiB documents its disjoint
    setting for Pascal VOC only (its ADE20K splits come from fixed per-step image lists). See the protocol page.

    Args:
        dataset: ``"voc"``, ``"ade20k"`` or ``"synthetic"`` (case-insensitive, aliases accepted).

    Raises:
        ValueError: unknown dataset.

    Example:
        >>> default_mode("voc"), default_mode("ade20k")
        ('disjoint', 'overlapped')
    """
    return _dataset(dataset)[1].mode


def list_tasks(dataset: str) -> tuple[str, ...]:
    """The standard tasks of ``dataset`` (any other ``"A-B"`` split of its classes is accepted as well).

    Args:
        dataset: ``"voc"``, ``"ade20k"`` or ``"synthetic"`` (case-insensitive).

    Returns:
        Task names, e.g. ``("19-1", "15-5", "15-1", "10-1", "5-3", "offline")`` for VOC.

    Raises:
        ValueError: unknown dataset (the message lists the known ones).

    Example:
        >>> list_tasks("ade20k")
        ('100-50', '100-10', '50-50', 'offline')
    """
    return _dataset(dataset)[1].tasks


def _class_order(class_order: Sequence[int] | None, num_classes: int) -> tuple[int, ...]:
    expected = tuple(range(1, num_classes))
    if class_order is None:
        return expected
    if isinstance(class_order, (str, bytes)):
        raise TypeError(f"class_order must be a sequence of class ids, got {type(class_order).__name__}")
    order = tuple(_as_int(c, "class id in class_order") for c in class_order)
    if order[:1] == (0,):
        order = order[1:]  # MiB-style orders list the background first
    if sorted(order) != list(expected):
        raise ValueError(
            f"class_order must be a permutation of the class ids 1..{num_classes - 1} (optionally preceded by 0), "
            f"got {len(order)} ids: {list(order)[:10]}{'...' if len(order) > 10 else ''}"
        )
    return order


def get_scenario(
    dataset: str,
    task: str,
    *,
    mode: Mode | str | None = None,
    class_order: Sequence[int] | None = None,
    class_names: Sequence[str] | None = None,
) -> Scenario:
    """A standard incremental task, e.g. VOC ``"15-5"`` or ADE20K ``"100-50"`` (paper Sec. IV-A, Tables I-II).

    A task ``"A-B"`` learns the first ``A`` classes (in class order) at step 0, then ``B`` classes per step
    until all are learnt; ``A + k B`` must equal the number of non-background classes. ``"offline"`` (alias
    ``"joint"``) learns every class in one step; ``"15-5s"`` is an alias of ``"15-1"``. Datasets: ``"voc"``
    (21 ids), ``"ade20k"`` (151 ids, 0 = unlabelled is the background), ``"synthetic"`` (21 ids, the names
    of :class:`~incseg.data.SyntheticScenes`).

    Args:
        dataset: ``"voc"``, ``"ade20k"`` or ``"synthetic"`` (case-insensitive).
        task: ``"A-B"`` or ``"offline"``; :func:`list_tasks` gives the standard ones.
        mode: ``"disjoint"`` or ``"overlapped"``; ``None``: the dataset's :func:`default_mode` (disjoint for
            VOC and synthetic, overlapped for ADE20K, as PLOP).
        class_order: a permutation of the ids ``1..N-1`` (optionally with a leading ``0``): the ids are
            grouped in this order instead of ``1, 2, ...``.
        class_names: ``N`` names overriding the dataset's (background first).

    Returns:
        The :class:`Scenario`, named ``"{dataset}-{task}"``.

    Raises:
        ValueError: unknown dataset or task (the message lists the known ones), a task that does not split
            the classes evenly, a class order that is not a permutation, or an unknown mode.

    Example:
        >>> s = get_scenario("voc", "15-1", mode="overlapped")
        >>> s.num_steps, s.classes_at(1), s.num_classes_at(5)
        (6, (16,), 21)
    """
    key, spec = _dataset(dataset)
    names = spec.class_names
    num_classes = len(names)
    order = _class_order(class_order, num_classes)
    if not isinstance(task, str):
        raise TypeError(f"task must be a string, got {type(task).__name__}")
    name = task.strip().lower()
    name = _TASK_ALIASES.get(name, name)
    known = f"standard tasks for {key!r}: {list(spec.tasks)}, or any 'A-B' with A + k*B = {num_classes - 1}"
    if name == "offline":
        groups = [order]
    else:
        match = _TASK_RE.match(name)
        if match is None:
            raise ValueError(f"unknown task {task!r}; {known}")
        first, step = int(match.group(1)), int(match.group(2))
        n = len(order)
        if not (0 < first < n and step > 0 and (n - first) % step == 0):
            raise ValueError(f"task {task!r} does not split the {n} classes of {key!r} into steps; {known}")
        groups = [order[:first], *(order[i : i + step] for i in range(first, n, step))]
    return Scenario(
        groups,
        num_classes=num_classes,
        class_names=names if class_names is None else class_names,
        mode=spec.mode if mode is None else mode,
        name=f"{key}-{name}",
    )
