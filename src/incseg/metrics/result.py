"""Result of a mean-IoU evaluation: per-class IoU and the old / new / all means of incremental segmentation.

Groups of classes in the incremental index space (``0`` background, then old classes, then new ones), with
``n_old = num_old_classes`` counting the background. The field's convention (and the default of
:func:`incseg.engine.evaluate`) is ``n_old = Scenario.num_classes_at(0)``: *old* are the classes of step 0 and
*new* every class learnt later, at every step. The per-step split ``n_old = Scenario.num_old_classes(t)``
(old = classes learnt before step ``t``, new = those of step ``t``) is :meth:`IoUResult.regroup` away:

========== ============================== =====================================================
key        classes                        used by
========== ============================== =====================================================
``old``    ``1 .. n_old-1``               CAF tables ("1-15"), background excluded
``new``    ``max(n_old, 1) .. K-1``       every table ("16-20"); never contains the background
``all``    ``1 .. K-1``                   CAF tables ("all"), background excluded
``old_bg`` ``0 .. n_old-1``               MiB / PLOP tables ("0-15"), background included
``all_bg`` ``0 .. K-1``                   MiB / PLOP tables ("all"), background included
========== ============================== =====================================================

A group mean averages the IoU of the group's classes that are not NaN (a class is NaN when it is *absent*,
see ``absent``); it is NaN when the group is empty (e.g. ``old`` at step 0) or every class in it is absent.
With ``num_old_classes=None`` there is no old/new split: ``old``, ``new``, ``old_bg`` and ``hmean`` are NaN.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from incseg._checks import check_num_old_classes
from incseg.metrics._common import check_absent, check_class_names

__all__ = ["IoUResult"]


def _nanmean(values: Tensor) -> float:
    """Mean of the non-NaN entries of a float64 vector; NaN when there are none."""
    keep = values[~torch.isnan(values)]
    return float(keep.mean()) if keep.numel() > 0 else math.nan


def _to_json_float(x: float) -> float | None:
    """``float`` for JSON: NaN becomes ``None`` (JSON has no NaN)."""
    return None if math.isnan(x) else float(x)


def group_indices(num_classes: int, num_old_classes: int | None) -> dict[str, range]:
    """Class indices of each group (see the module docstring); empty ranges where undefined."""
    k = num_classes
    if num_old_classes is None:
        old_bg = old = new = range(0)
    else:
        old_bg, old, new = range(num_old_classes), range(1, num_old_classes), range(max(num_old_classes, 1), k)
    return {"old": old, "new": new, "all": range(1, k), "old_bg": old_bg, "all_bg": range(k)}


def harmonic_mean(a: float, b: float) -> float:
    """``2ab / (a + b)``; 0 when ``a + b == 0``; NaN when either is NaN."""
    if math.isnan(a) or math.isnan(b):
        return math.nan
    return 0.0 if a + b == 0 else 2.0 * a * b / (a + b)


@dataclass(frozen=True, eq=False)
class IoUResult:
    r"""Per-class IoU and grouped means computed from a dataset-level confusion matrix.

    ``IoU_c = TP_c / (TP_c + FP_c + FN_c)`` with ``TP_c = C[c, c]``, ``FN_c = sum_p C[c, p] - TP_c`` and
    ``FP_c = sum_t C[t, c] - TP_c`` (rows of ``C`` = target, columns = prediction). Build it with
    :meth:`from_confusion` (what :meth:`incseg.metrics.MeanIoU.compute` does); the fields are then consistent.

    Args:
        confusion: the ``(K, K)`` int64 confusion matrix (CPU).
        iou: per-class IoU in ``[0, 1]``, float64; NaN for absent classes.
        accuracy: per-class pixel accuracy (recall) ``TP_c / (TP_c + FN_c)``, float64; NaN when the class
            has no target pixel.
        num_old_classes: ``n_old`` of the step (background included), or ``None`` (no old/new split).
        groups: group means keyed by :attr:`GROUP_NAMES` (see the module docstring), NaN where undefined.
        hmean: harmonic mean of ``groups["old"]`` and ``groups["new"]`` (background excluded).
        pixel_accuracy: ``trace(C) / sum(C)`` (NaN for an empty matrix).
        mean_accuracy: mean of the non-NaN per-class accuracies, background included.
        class_names: optional names of the ``K`` classes.
        absent: when a class is absent, i.e. its IoU is NaN and it is left out of every mean: ``"union"``
            (default) when it has no pixel in the target *and* none in the prediction (``TP+FP+FN = 0``);
            ``"target"`` when it has no target pixel (``TP+FN = 0``), as in MiB / PLOP's evaluation, which
            also drops classes that are predicted but absent from the ground truth.

    Shape:
        - confusion: :math:`(K, K)`.
        - iou, accuracy: :math:`(K,)`.

    Example:
        >>> conf = torch.tensor([[5, 1, 0], [1, 3, 0], [0, 0, 2]])
        >>> r = IoUResult.from_confusion(conf, num_old_classes=2)
        >>> [round(v, 4) for v in r.iou.tolist()]
        [0.7143, 0.6, 1.0]
        >>> r.groups["old"], r.groups["new"], r.groups["all"]
        (0.6, 1.0, 0.8)
        >>> round(r.hmean, 4)
        0.75
    """

    GROUP_NAMES: ClassVar[tuple[str, ...]] = ("old", "new", "all", "old_bg", "all_bg")

    confusion: Tensor
    iou: Tensor
    accuracy: Tensor
    num_old_classes: int | None
    groups: dict[str, float]
    hmean: float
    pixel_accuracy: float
    mean_accuracy: float
    class_names: tuple[str, ...] | None = None
    absent: Literal["union", "target"] = field(default="union")

    @classmethod
    def from_confusion(
        cls,
        confusion: Tensor,
        *,
        num_old_classes: int | None = None,
        class_names: tuple[str, ...] | list[str] | None = None,
        absent: Literal["union", "target"] = "union",
    ) -> IoUResult:
        """Compute every field from a ``(K, K)`` confusion matrix (rows target, columns prediction).

        Args:
            confusion: non-negative integer counts, e.g. from :func:`incseg.metrics.confusion_matrix`.
            num_old_classes: ``n_old`` (background included) in ``[0, K]``, or ``None``.
            class_names: optional ``K`` unique names.
            absent: ``"union"`` or ``"target"`` (see the class docstring).

        Returns:
            The result; tensors are float64 / int64 on CPU.

        Raises:
            TypeError: ``confusion`` is not an integer tensor.
            ValueError: ``confusion`` is not square 2-D or has negative entries; bad ``num_old_classes``,
                ``class_names`` or ``absent``.
        """
        if not isinstance(confusion, Tensor):
            raise TypeError(f"confusion must be a torch.Tensor of shape (K, K), got {type(confusion).__name__}")
        if confusion.is_floating_point() or confusion.is_complex() or confusion.dtype == torch.bool:
            raise TypeError(f"confusion must be an integer tensor, got dtype {confusion.dtype}")
        if confusion.ndim != 2 or confusion.shape[0] != confusion.shape[1] or confusion.shape[0] < 1:
            raise ValueError(f"confusion must have shape (K, K) with K >= 1, got {tuple(confusion.shape)}")
        conf = confusion.detach().to(device="cpu", dtype=torch.int64).clone()
        if bool((conf < 0).any()):
            raise ValueError("confusion must not contain negative counts")
        k = conf.shape[0]
        n_old = check_num_old_classes(num_old_classes, k, allow_none=True)
        names = check_class_names(class_names, k)
        absent = check_absent(absent)

        tp = conf.diagonal().double()
        gt = conf.sum(dim=1).double()
        pred = conf.sum(dim=0).double()
        union = gt + pred - tp
        nan = torch.full_like(tp, math.nan)
        is_absent = union == 0 if absent == "union" else gt == 0
        iou = torch.where(is_absent, nan, tp / union.clamp_min(1))
        accuracy = torch.where(gt == 0, nan, tp / gt.clamp_min(1))
        groups = {name: _nanmean(iou[list(idx)]) for name, idx in group_indices(k, n_old).items()}
        total = float(gt.sum())
        return cls(
            confusion=conf,
            iou=iou,
            accuracy=accuracy,
            num_old_classes=n_old,
            groups=groups,
            hmean=harmonic_mean(groups["old"], groups["new"]),
            pixel_accuracy=float(tp.sum()) / total if total > 0 else math.nan,
            mean_accuracy=_nanmean(accuracy),
            class_names=names,
            absent=absent,
        )

    def regroup(self, num_old_classes: int | None) -> IoUResult:
        """The same result with another old/new split (recomputed from the confusion matrix).

        Args:
            num_old_classes: the new ``n_old`` (background included) in ``[0, K]``, or ``None``.

        Returns:
            A new :class:`IoUResult`; per-class values are unchanged, the groups and ``hmean`` follow the split.

        Example:
            >>> conf = torch.tensor([[5, 1, 0, 0], [1, 3, 0, 0], [0, 0, 2, 0], [0, 0, 1, 1]])
            >>> r = IoUResult.from_confusion(conf, num_old_classes=2)  # old = step 0 ({1}), new = {2, 3}
            >>> r.groups["new"], r.regroup(3).groups["new"]  # per-step split of step 2: new = {3}
            (0.5833333333333333, 0.5)
        """
        return IoUResult.from_confusion(
            self.confusion, num_old_classes=num_old_classes, class_names=self.class_names, absent=self.absent
        )

    @property
    def num_classes(self) -> int:
        """Number of classes ``K`` (background included)."""
        return int(self.iou.shape[0])

    def class_name(self, index: int) -> str:
        """Name of class ``index``: from ``class_names``, else the index as a string."""
        return self.class_names[index] if self.class_names is not None else str(index)

    def per_class(self) -> dict[str, float]:
        """Per-class IoU keyed by class name (or index as a string), NaN for absent classes."""
        return {self.class_name(c): float(v) for c, v in enumerate(self.iou.tolist())}

    def to_dict(self, *, include_confusion: bool = True) -> dict[str, Any]:
        """Plain Python, JSON-safe copy: floats, ints, strings, lists; NaN becomes ``None``.

        Args:
            include_confusion: also store the confusion matrix (nested lists of ints), which
                :meth:`from_dict` needs.

        Returns:
            A dict with keys ``num_classes``, ``num_old_classes``, ``absent``, ``class_names``, ``iou``,
            ``accuracy``, ``groups``, ``hmean``, ``pixel_accuracy``, ``mean_accuracy`` (and ``confusion``).
        """
        out: dict[str, Any] = {
            "num_classes": self.num_classes,
            "num_old_classes": self.num_old_classes,
            "absent": self.absent,
            "class_names": list(self.class_names) if self.class_names is not None else None,
            "iou": [_to_json_float(v) for v in self.iou.tolist()],
            "accuracy": [_to_json_float(v) for v in self.accuracy.tolist()],
            "groups": {k: _to_json_float(v) for k, v in self.groups.items()},
            "hmean": _to_json_float(self.hmean),
            "pixel_accuracy": _to_json_float(self.pixel_accuracy),
            "mean_accuracy": _to_json_float(self.mean_accuracy),
        }
        if include_confusion:
            out["confusion"] = self.confusion.tolist()
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> IoUResult:
        """Rebuild a result from :meth:`to_dict` output (recomputed from its ``confusion``, hence exact).

        Raises:
            ValueError: ``data`` has no ``confusion`` entry (``to_dict(include_confusion=False)``).
        """
        if not isinstance(data, Mapping):
            raise TypeError(f"data must be a mapping, got {type(data).__name__}")
        if "confusion" not in data:
            raise ValueError("data has no 'confusion' entry: save it with to_dict(include_confusion=True)")
        return cls.from_confusion(
            torch.tensor(data["confusion"], dtype=torch.int64),
            num_old_classes=data.get("num_old_classes"),
            class_names=data.get("class_names"),
            absent=data.get("absent", "union"),
        )

    def __repr__(self) -> str:
        groups = ", ".join(f"{k}={v:.4f}" for k, v in self.groups.items())
        return (
            f"IoUResult(num_classes={self.num_classes}, num_old_classes={self.num_old_classes}, {groups}, "
            f"hmean={self.hmean:.4f}, pixel_accuracy={self.pixel_accuracy:.4f})"
        )
