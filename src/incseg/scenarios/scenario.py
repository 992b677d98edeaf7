"""The :class:`Scenario`: which dataset classes are learnt at which step, and what that means for the data.

A scenario fixes the *incremental index space* (docs/architecture.md): index ``0`` is the background, then the
classes of step 0 in scenario order, then those of step 1, and so on. Its label maps translate dataset ids into
that space once, in the dataset; its image filters implement the disjoint and overlapped protocols of the
paper (Sec. IV-A, following MiB [9] and PLOP [18]).
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal, get_args

import torch
from torch import Tensor

__all__ = ["IGNORE_INDEX", "Mode", "Scenario"]

IGNORE_INDEX = 255
"""Label value of ignored (void) pixels, in dataset ids and in incremental indices alike."""

Mode = Literal["disjoint", "overlapped"]
_MODES: tuple[str, ...] = get_args(Mode)
_DICT_KEYS = ("groups", "num_classes", "class_names", "mode", "name")


def _as_int(value: object, what: str) -> int:
    """Return ``value`` as a Python int, refusing bools, floats and strings."""
    if isinstance(value, bool):
        raise TypeError(f"{what} must be an integer, got bool {value!r}")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{what} must be an integer, got {type(value).__name__} {value!r}") from None


class Scenario:
    """A class-incremental segmentation scenario: the classes learnt at each step (paper Sec. III, S_l, U_l).

    ``groups[t]`` lists the dataset class ids that are new at step ``t`` (``U_t`` in the paper); the background
    ``0`` is implicit: it belongs to step 0 and is never listed. Classes of the dataset that no group lists are
    never learnt: they behave like future classes at every step (background in training labels, ignored in
    test labels, excluded from disjoint training images).

    Incremental indices (the only label space downstream code sees): ``0`` is the background, then the classes
    of ``groups[0]`` in the given order, then those of ``groups[1]``, and so on. At step ``t`` the model has
    ``num_classes_at(t)`` outputs, the first ``num_old_classes(t)`` of which are the old ones.

    Image selection (``mode``), as in MiB's ``filter_images``:

    * ``"overlapped"``: a training image of step ``t`` is kept when it has at least one pixel of a new class
      (it may contain old and future classes, the latter labelled background).
    * ``"disjoint"``: additionally, no pixel of a future (or never learnt) class; old classes are allowed.
    * test (both modes): a validation image is kept when it has at least one pixel of a seen non-background
      class; images showing only background (or only future classes) are left out, as in MiB.

    Equality and hashing compare ``groups``, ``num_classes``, ``class_names`` and ``mode``; ``name`` is a
    display label only.

    Args:
        groups: one sequence of dataset class ids per step; non-empty, pairwise disjoint, ids in
            ``[1, num_classes)``.
        num_classes: number of dataset ids, background included (at most 255, as 255 marks void pixels).
            Defaults to the largest listed id + 1.
        class_names: one name per dataset id (``num_classes`` names, background first). Defaults to
            ``"background", "class1", "class2", ...``.
        mode: ``"disjoint"`` or ``"overlapped"`` (image selection of training steps, see above).
        name: a display name, e.g. ``"voc-15-5"``.

    Raises:
        ValueError: no steps, an empty step, a class listed twice, background ``0`` listed, an id out of
            range, a wrong number of class names, or an unknown mode.
        TypeError: ids that are not integers, names that are not strings.

    Example:
        >>> s = Scenario([[1, 2], [3]], num_classes=4)
        >>> s.num_steps, s.seen_at(1), s.num_old_classes(1)
        (2, (0, 1, 2, 3), 3)
        >>> s.train_label_map(1)[:4].tolist(), s.test_label_map(0)[:4].tolist()
        ([0, 0, 0, 3], [0, 1, 2, 255])
        >>> s.keep_train_image(1, {0, 2, 3}), s.keep_train_image(0, {1, 3})
        (True, False)
    """

    def __init__(
        self,
        groups: Sequence[Iterable[int]],
        *,
        num_classes: int | None = None,
        class_names: Sequence[str] | None = None,
        mode: Mode | str = "disjoint",
        name: str = "custom",
    ) -> None:
        if isinstance(groups, (str, bytes)) or not isinstance(groups, Iterable):
            raise TypeError(f"groups must be a sequence of class-id sequences, got {type(groups).__name__}")
        parsed: list[tuple[int, ...]] = []
        owner: dict[int, int] = {}
        for t, group in enumerate(groups):
            if isinstance(group, (str, bytes)) or not isinstance(group, Iterable):
                raise TypeError(f"groups[{t}] must be a sequence of class ids, got {type(group).__name__}")
            ids = tuple(_as_int(c, f"class id in groups[{t}]") for c in group)
            if not ids:
                raise ValueError(f"groups[{t}] is empty: every step must learn at least one class")
            for c in ids:
                if c == 0:
                    raise ValueError(f"groups[{t}] lists the background 0, which is implicit (learnt at step 0)")
                if c < 0 or c >= IGNORE_INDEX:
                    raise ValueError(f"class id {c} in groups[{t}] is out of range [1, {IGNORE_INDEX})")
                if c in owner:
                    where = f"groups[{owner[c]}]" + (" twice" if owner[c] == t else f" and groups[{t}]")
                    raise ValueError(f"class {c} is listed in {where}: steps must not overlap")
                owner[c] = t
            parsed.append(ids)
        if not parsed:
            raise ValueError("groups is empty: a scenario needs at least one step")

        largest = max(owner)
        if num_classes is None:
            num_classes = largest + 1
        num_classes = _as_int(num_classes, "num_classes")
        if not 2 <= num_classes <= IGNORE_INDEX:
            raise ValueError(f"num_classes must be in [2, {IGNORE_INDEX}] (background included), got {num_classes}")
        if largest >= num_classes:
            raise ValueError(
                f"class id {largest} is out of range for num_classes={num_classes} (ids 1..{num_classes - 1})"
            )

        if class_names is None:
            names = ("background", *(f"class{i}" for i in range(1, num_classes)))
        else:
            if isinstance(class_names, str) or not isinstance(class_names, Iterable):
                raise TypeError(f"class_names must be a sequence of strings, got {type(class_names).__name__}")
            names = tuple(class_names)
            if len(names) != num_classes:
                raise ValueError(
                    f"class_names must have num_classes={num_classes} entries (background first), got {len(names)}"
                )
            for i, n in enumerate(names):
                if not isinstance(n, str):
                    raise TypeError(f"class_names[{i}] must be a string, got {type(n).__name__}")
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        if not isinstance(name, str):
            raise TypeError(f"name must be a string, got {type(name).__name__}")

        self._groups = tuple(parsed)
        self._num_classes = num_classes
        self._class_names = names
        self._mode: Mode = mode  # type: ignore[assignment]
        self.name = name
        # Dataset ids in incremental order, and the number of seen classes after each step.
        self._order = (0, *(c for g in parsed for c in g))
        self._index = {c: i for i, c in enumerate(self._order)}
        seen_len = []
        total = 1
        for g in parsed:
            total += len(g)
            seen_len.append(total)
        self._seen_len = tuple(seen_len)
        self._new_sets = tuple(frozenset(g) for g in parsed)
        self._seen_sets = tuple(frozenset(self._order[:n]) for n in seen_len)

    # ------------------------------------------------------------------ structure
    @property
    def groups(self) -> tuple[tuple[int, ...], ...]:
        """Dataset ids new at each step, background not listed."""
        return self._groups

    @property
    def num_steps(self) -> int:
        """Number of learning steps."""
        return len(self._groups)

    @property
    def num_classes(self) -> int:
        """Number of dataset ids, background included."""
        return self._num_classes

    @property
    def class_names(self) -> tuple[str, ...]:
        """Names of the dataset ids (``class_names[id]``)."""
        return self._class_names

    @property
    def mode(self) -> Mode:
        """Image selection protocol of training steps: ``"disjoint"`` or ``"overlapped"``."""
        return self._mode

    @property
    def classes_per_step(self) -> tuple[int, ...]:
        """Number of outputs added at each step (step 0 counts the background), as ``IncrementalClassifier`` takes."""
        return tuple(len(self.classes_at(t)) for t in range(self.num_steps))

    def _step(self, t: int) -> int:
        t = _as_int(t, "step")
        if not 0 <= t < self.num_steps:
            raise ValueError(
                f"step {t} is out of range for a scenario with {self.num_steps} steps (0..{self.num_steps - 1})"
            )
        return t

    def classes_at(self, t: int) -> tuple[int, ...]:
        """Dataset ids new at step ``t`` (``U_t``); step 0 starts with the background ``0``.

        Raises:
            ValueError: ``t`` is not in ``[0, num_steps)``.
        """
        t = self._step(t)
        return (0, *self._groups[0]) if t == 0 else self._groups[t]

    def seen_at(self, t: int) -> tuple[int, ...]:
        """Dataset ids known after step ``t`` (``S_t``), in incremental-index order (position = index).

        Raises:
            ValueError: ``t`` is not in ``[0, num_steps)``.
        """
        return self._order[: self._seen_len[self._step(t)]]

    def num_old_classes(self, t: int) -> int:
        """``|S_{t-1}|``: number of outputs of the previous step's model (0 at step 0), background included."""
        t = self._step(t)
        return 0 if t == 0 else self._seen_len[t - 1]

    def num_classes_at(self, t: int) -> int:
        """``K_t = |S_t|``: number of outputs of the model at step ``t``, background included."""
        return self._seen_len[self._step(t)]

    def class_names_at(self, t: int) -> tuple[str, ...]:
        """Names of the ``K_t`` classes of step ``t`` in incremental-index order."""
        return tuple(self._class_names[c] for c in self.seen_at(t))

    def index_of(self, class_id: int) -> int:
        """Incremental index of dataset id ``class_id``.

        Raises:
            ValueError: ``class_id`` is not learnt at any step of the scenario.
        """
        class_id = _as_int(class_id, "class_id")
        if class_id not in self._index:
            raise ValueError(f"class id {class_id} is not learnt in this scenario")
        return self._index[class_id]

    # ------------------------------------------------------------------ label maps
    def train_label_map(self, t: int, *, void_as_background: bool = False) -> Tensor:
        """Lookup table from dataset id to training target at step ``t``: ``target = table[mask]``.

        Classes new at ``t`` map to their incremental index; background, old and future classes map to ``0``
        (old classes are not annotated at step ``t``, paper Sec. III-C). Void ``255`` stays ``255`` (ignored)
        unless ``void_as_background`` (MiB's behaviour), which maps it to ``0``. Ids that are not classes of
        the dataset (``num_classes..254``) map to ``255``.

        Args:
            t: the step.
            void_as_background: map void pixels to the background instead of ignoring them.

        Shape:
            Output: ``(256,)`` int64.

        Raises:
            ValueError: ``t`` is not in ``[0, num_steps)``.
        """
        t = self._step(t)
        table = torch.full((IGNORE_INDEX + 1,), IGNORE_INDEX, dtype=torch.int64)
        table[: self._num_classes] = 0
        for c in self.classes_at(t):
            table[c] = self._index[c]
        if void_as_background:
            table[IGNORE_INDEX] = 0
        return table

    def test_label_map(self, t: int) -> Tensor:
        """Lookup table from dataset id to evaluation target at step ``t``: ``target = table[mask]``.

        Seen classes map to their incremental index; future (and never learnt) classes and void map to
        ``255``, so they count neither as right nor as wrong.

        Shape:
            Output: ``(256,)`` int64.

        Raises:
            ValueError: ``t`` is not in ``[0, num_steps)``.
        """
        table = torch.full((IGNORE_INDEX + 1,), IGNORE_INDEX, dtype=torch.int64)
        seen = self.seen_at(t)
        table[list(seen)] = torch.arange(len(seen), dtype=torch.int64)
        return table

    # ------------------------------------------------------------------ image selection
    def keep_train_image(self, t: int, present: Iterable[int]) -> bool:
        """Whether a training image with the dataset ids ``present`` belongs to step ``t``.

        Overlapped: at least one new class. Disjoint: also nothing but background, old and new classes
        (void ``255`` is allowed).

        Args:
            t: the step.
            present: dataset ids that occur in the image's label mask (void may be included or not).

        Raises:
            ValueError: ``t`` is not in ``[0, num_steps)``.
        """
        t = self._step(t)
        present = frozenset(present)
        if present.isdisjoint(self._new_sets[t]):
            return False
        return self._mode == "overlapped" or present - {IGNORE_INDEX} <= self._seen_sets[t]

    def keep_test_image(self, t: int, present: Iterable[int]) -> bool:
        """Whether a validation image with the dataset ids ``present`` is evaluated at step ``t``.

        Kept when at least one seen non-background class occurs; background-only images are left out.

        Raises:
            ValueError: ``t`` is not in ``[0, num_steps)``.
        """
        t = self._step(t)
        return any(c != 0 and c in self._seen_sets[t] for c in present)

    # ------------------------------------------------------------------ derived scenarios and I/O
    def joint(self) -> Scenario:
        """The one-step scenario learning every class at once (the joint / offline upper bound).

        The class order is kept, so incremental indices of the joint model equal those of the last step.
        """
        return Scenario(
            [self._order[1:]],
            num_classes=self._num_classes,
            class_names=self._class_names,
            mode=self._mode,
            name=f"{self.name}-joint",
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain-python description (lists, ints, strings) for checkpoints and JSON; see :meth:`from_dict`."""
        return {
            "groups": [list(g) for g in self._groups],
            "num_classes": self._num_classes,
            "class_names": list(self._class_names),
            "mode": self._mode,
            "name": self.name,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Scenario:
        """Rebuild a scenario from :meth:`to_dict` output.

        Raises:
            ValueError: ``data`` is not a mapping with the keys of :meth:`to_dict`, or describes an invalid
                scenario.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"scenario data must be a mapping with keys {_DICT_KEYS}, got {type(data).__name__}")
        missing = [k for k in _DICT_KEYS if k not in data]
        if missing:
            raise ValueError(f"scenario data is missing keys {missing} (expected {_DICT_KEYS})")
        try:
            return cls(
                data["groups"],
                num_classes=data["num_classes"],
                class_names=data["class_names"],
                mode=data["mode"],
                name=data["name"],
            )
        except TypeError as err:
            raise ValueError(f"invalid scenario data: {err}") from err

    def _key(self) -> tuple[object, ...]:
        return (self._groups, self._num_classes, self._class_names, self._mode)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Scenario):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        sizes = "-".join(str(len(g)) for g in self._groups)
        return (
            f"Scenario(name={self.name!r}, mode={self._mode!r}, num_classes={self._num_classes}, "
            f"steps={self.num_steps}, sizes={sizes})"
        )
