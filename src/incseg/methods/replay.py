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
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.utils.data import ConcatDataset, Dataset

from incseg._checks import check_int
from incseg.data import IncrementalSegmentation, image_class_sets
from incseg.methods.components import Component, register_component

__all__ = ["ReplayComponent", "ReplayMemory", "ReplayState"]


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
            ``None``: the training set's own ``cache_dir``, else the label files are scanned at every
            :meth:`update`).

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
        cache_dir = self.cache_dir if self.cache_dir is not None else dataset.cache_dir  # the dataset's, if any
        sets = image_class_sets(dataset.source, cache_dir)
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


class ReplayState(nn.Module):
    """The criterion module of the ``replay`` component: holds its :class:`ReplayMemory`, saved in the module's
    ``state_dict`` as an int64 tensor ``[budget, seed, source_0, step_0, source_1, step_1, ...]`` (extra state),
    so checkpoints keep the memory."""

    def __init__(self, memory: ReplayMemory) -> None:
        super().__init__()
        self.memory = memory

    def get_extra_state(self) -> Tensor:
        state = self.memory.state_dict()
        flat = [state["budget"], state["seed"], *(v for pair in state["entries"] for v in pair)]
        return torch.tensor(flat, dtype=torch.int64)

    def set_extra_state(self, state: Any) -> None:
        if not isinstance(state, Tensor) or state.dim() != 1 or state.numel() < 2 or state.numel() % 2:
            raise ValueError(f"a replay memory state must be an int64 tensor of even length >= 2, got {state!r:.100}")
        values = [int(v) for v in state.tolist()]
        entries = [values[i : i + 2] for i in range(2, len(values), 2)]
        self.memory.load_state_dict({"budget": values[0], "seed": values[1], "entries": entries})


@register_component
class ReplayComponent(Component):
    """Class-balanced replay of ``memory_size`` training images (the "-M" variants: SSUL-M, DKD-M), on any family.

    A data hook: :meth:`train_set` adds the memory's images to the training set of every step > 0, and
    :meth:`observe_train_set` re-selects the memory among its images and the step's once the step is trained
    (:class:`ReplayMemory`). :func:`~incseg.engine.train_scenario` calls both; in a loop of your own call
    ``learner.method.train_set(step, dataset)`` before building the step's loader and
    ``learner.method.observe_train_set(step, dataset)`` after ``end_step``. The memory is saved in checkpoints
    (in the criterion's state).

    Options: ``memory_size`` (100: the images kept), ``memory_seed`` (0: seed of the choice).
    """

    name = "replay"
    options: ClassVar[Mapping[str, Any]] = {"memory_size": 100, "memory_seed": 0}

    def __init__(self, config: Any, model: Any, scenario: Any) -> None:
        super().__init__(config, model, scenario)
        opts = config.options
        self.memory = ReplayMemory(int(opts["memory_size"]), seed=int(opts["memory_seed"]))
        self._state = ReplayState(self.memory)

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        out = super().check_options(options)
        for key in ("memory_size", "memory_seed"):
            check_int(out[key], key, minimum=0)
        return out

    @classmethod
    def uses_teacher(cls, config: Any) -> bool:
        return False

    def build_criterion(self, model: Any) -> nn.Module:
        return self._state

    def train_set(self, step: int, dataset: Any) -> Any:
        if step == 0 or len(self.memory) == 0:
            return dataset
        if not isinstance(dataset, IncrementalSegmentation):
            raise TypeError(f"replay needs IncrementalSegmentation training sets, got {dataset!r}")
        return ConcatDataset([dataset, self.memory.dataset(dataset)])

    def extra_train_images(self, step: int) -> int:
        return self.memory.budget if step > 0 else 0

    def observe_train_set(self, step: int, dataset: Any) -> None:
        if not isinstance(dataset, IncrementalSegmentation):
            raise TypeError(f"replay needs IncrementalSegmentation training sets, got {dataset!r}")
        self.memory.update(dataset)
