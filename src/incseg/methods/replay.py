"""Replay: a class-balanced exemplar memory of a fixed number of images, mixed into the later steps.

The "-M" variants of recent methods (SSUL-M, DKD-M, STAR-M) keep a few training images of the classes already
learnt and add them to the training set of every later step. :class:`ReplayMemory` does this for any method:
the memory holds *indices* of images of the dataset's source (never tensors), so checkpoints stay small, plain
and loadable with ``weights_only=True``.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch.utils.data import ConcatDataset, Dataset

from incseg._checks import check_int
from incseg.data import IncrementalSegmentation, image_class_sets

__all__ = ["ReplayMemory"]


class ReplayMemory:
    """A class-balanced memory of at most ``budget`` training images, chosen per class.

    After each step :meth:`update` re-selects the memory among the images it holds and the step's training
    images: every foreground class learnt so far gets ``budget // num_classes`` slots (the first classes one
    more when it does not divide; slots a class cannot fill go to the others), filled with random images
    (seeded by ``seed`` and the step) whose labels at the step they were trained at contain that class. An
    image fills one slot.

    **Labels of memory images.** A memory image keeps the labels it had at the step it was stored at: that
    step's classes keep their (incremental) index, every other pixel is background, void stays ignored. So at a
    later step its old-class pixels are labelled with their old classes, not background: the segmentation loss
    sees true old-class labels there (for the unbiased losses an old-class label is just a label, and PLOP
    pseudo-labels only background pixels). Pixels of classes of other steps stay background, as they were
    annotated.

    Args:
        budget: the number of images kept (e.g. 100 on VOC in SSUL-M).
        seed: seed of the random choice.
        cache_dir: where the per-image class sets are cached (see :func:`~incseg.data.image_class_sets`;
            ``None``: the label files are scanned at every :meth:`update`).

    Example:
        >>> memory = ReplayMemory(10)
        >>> memory.state_dict()
        {'budget': 10, 'seed': 0, 'entries': []}
    """

    def __init__(self, budget: int, *, seed: int = 0, cache_dir: str | os.PathLike[str] | None = None) -> None:
        self.budget = check_int(budget, "budget", minimum=0)
        self.seed = check_int(seed, "seed", minimum=0)
        self.cache_dir = cache_dir
        self.entries: list[tuple[int, int]] = []
        """``(source index, step)`` of every image held, in selection order."""

    def __len__(self) -> int:
        return len(self.entries)

    def __repr__(self) -> str:
        return f"ReplayMemory(budget={self.budget}, images={len(self.entries)})"

    def update(self, dataset: IncrementalSegmentation) -> None:
        """Re-select the memory after training the step of ``dataset`` (its training set, memory excluded).

        Args:
            dataset: the step's :class:`~incseg.data.IncrementalSegmentation` training set.

        Raises:
            TypeError: ``dataset`` is not an ``IncrementalSegmentation`` training set.
        """
        if not isinstance(dataset, IncrementalSegmentation) or not dataset.train:
            raise TypeError(
                f"ReplayMemory.update needs the step's IncrementalSegmentation training set, got {dataset!r}"
            )
        scenario, step = dataset.scenario, dataset.step
        sets = image_class_sets(dataset.source, self.cache_dir)
        candidates = [(src, s) for src, s in self.entries if s < step]
        candidates += [(int(src), step) for src in dataset.indices]
        classes = [c for c in scenario.seen_at(step) if c != 0]
        if not classes or self.budget == 0:
            self.entries = []
            return
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        pools: dict[int, list[tuple[int, int]]] = {}
        for c in classes:
            pool = [(src, s) for src, s in candidates if c in scenario.classes_at(s) and c in sets[src]]
            order = torch.randperm(len(pool), generator=g).tolist()
            pools[c] = [pool[i] for i in order]
        base, extra = divmod(self.budget, len(classes))
        quota = {c: base + (1 if i < extra else 0) for i, c in enumerate(classes)}
        chosen: list[tuple[int, int]] = []
        taken: set[int] = set()
        cursor = dict.fromkeys(classes, 0)

        def take(c: int) -> bool:
            pool = pools[c]
            while cursor[c] < len(pool):
                src, s = pool[cursor[c]]
                cursor[c] += 1
                if src not in taken:
                    taken.add(src)
                    chosen.append((src, s))
                    return True
            return False

        for c in classes:
            for _ in range(quota[c]):
                if not take(c):
                    break
        while len(chosen) < self.budget:  # slots left by classes with too few images: round-robin over the rest
            if not any([take(c) for c in classes if len(chosen) < self.budget]):
                break
        self.entries = chosen

    def dataset(self, like: IncrementalSegmentation) -> Dataset[tuple[Any, Any]]:
        """The memory images as a dataset for the step of ``like`` (its source, transform and void policy),
        each labelled as at the step it was stored at (see the class description).

        Raises:
            TypeError: ``like`` is not an ``IncrementalSegmentation``.
            ValueError: the memory is empty.
        """
        if not isinstance(like, IncrementalSegmentation):
            raise TypeError(f"like must be an IncrementalSegmentation, got {type(like).__name__}")
        if not self.entries:
            raise ValueError("the memory is empty: nothing to replay")
        void_as_background = bool(like.label_map[255] == 0)
        views = []
        for step in sorted({s for _, s in self.entries}):
            view = copy.copy(like)
            view.indices = tuple(src for src, s in self.entries if s == step)
            view.label_map = like.scenario.train_label_map(step, void_as_background=void_as_background)
            view.step = step
            views.append(view)
        return ConcatDataset(views)

    def state_dict(self) -> dict[str, Any]:
        """Plain data (ints only) for checkpoints."""
        return {"budget": self.budget, "seed": self.seed, "entries": [[src, s] for src, s in self.entries]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output.

        Raises:
            ValueError: malformed state (the memory is left unchanged), or another budget.
        """
        if not isinstance(state, Mapping) or not isinstance(state.get("entries"), list):
            raise ValueError(f"a replay memory state must be a dict with 'entries', got {state!r:.200}")
        entries = []
        for item in state["entries"]:
            if (
                not isinstance(item, (list, tuple))
                or len(item) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in item)
            ):
                raise ValueError(f"replay memory entries must be [source index, step] pairs of ints, got {item!r}")
            entries.append((int(item[0]), int(item[1])))
        if state.get("budget") != self.budget or len(entries) > self.budget:
            raise ValueError(
                f"the saved memory has budget {state.get('budget')!r} and {len(entries)} images, this one {self.budget}"
            )
        self.entries = entries
