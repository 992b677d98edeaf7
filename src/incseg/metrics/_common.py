"""Private helpers of :mod:`incseg.metrics`: argument checks, logits to class map, pair counting."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from incseg._checks import check_labels, check_logits, check_same_shape


def check_ignore_index(ignore_index: object) -> int | None:
    """Check that ``ignore_index`` is an ``int`` or ``None`` and return it."""
    if ignore_index is not None and (isinstance(ignore_index, bool) or not isinstance(ignore_index, int)):
        raise TypeError(f"ignore_index must be an int or None, got {type(ignore_index).__name__}")
    return ignore_index


def class_map(preds: object, target: Tensor, num_classes: int) -> Tensor:
    """Turn ``preds`` (class map or logits) into an int64 class map shaped like ``target`` (which is checked).

    Integer ``preds`` of shape ``(B, H, W)`` must equal ``target``'s shape; floating ``preds`` of shape
    ``(B, K, h, w)`` are logits: upsampled bilinearly (``align_corners=False``) to ``target``'s size when
    ``(h, w)`` differs, then reduced with ``argmax`` over the classes.
    """
    if not isinstance(preds, Tensor):
        raise TypeError(
            f"preds must be a torch.Tensor (class map (B, H, W) or logits (B, K, h, w)), got {type(preds).__name__}"
        )
    if preds.is_floating_point():
        logits = check_logits(preds, "preds")
        if logits.shape[1] != num_classes:
            raise ValueError(
                f"preds (logits) must have num_classes={num_classes} channels, got shape {tuple(logits.shape)}"
            )
        if target.ndim != 3 or target.shape[0] != logits.shape[0]:
            raise ValueError(
                f"target must have shape (B, H, W) with B={logits.shape[0]} like preds (logits) "
                f"{tuple(logits.shape)}, got {tuple(target.shape)}"
            )
        if logits.shape[-2:] != target.shape[-2:]:
            if logits.dtype in (torch.float16, torch.bfloat16):
                logits = logits.float()
            logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
        return logits.argmax(dim=1)
    if preds.ndim == 4:
        raise TypeError(f"preds of shape {tuple(preds.shape)} look like logits but have dtype {preds.dtype}, not float")
    labels = check_labels(preds, num_classes, ignore_index=None, name="preds")
    check_same_shape(labels, target, "preds", "target")
    return labels.long()


def histogram(values: Tensor, size: int) -> Tensor:
    """Counts of each value of a 1-D int64 tensor with values in ``[0, size)``, without host sync.

    ``torch.bincount`` on CPU; elsewhere ``scatter_add_`` into ``size`` bins (CUDA's ``bincount`` reads the
    maximum on the host to size its output, a fixed size does not).
    """
    if values.device.type == "cpu":
        return torch.bincount(values, minlength=size)
    return scatter_histogram(values, size)


def scatter_histogram(values: Tensor, size: int) -> Tensor:
    """``histogram`` through ``scatter_add_`` (the accelerator path; also runs on CPU, for tests)."""
    counts = torch.zeros(size, dtype=torch.int64, device=values.device)
    return counts.scatter_add_(0, values, torch.ones_like(values))


def count_pairs(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int | None) -> Tensor:
    """``(K, K)`` counts of the ``(target, pred)`` pairs of two int64 maps of equal shape (no value checks)."""
    k = num_classes
    valid = (target >= 0) & (target < k) & (pred >= 0) & (pred < k)
    if ignore_index is not None and 0 <= ignore_index < k:
        valid &= target != ignore_index
    dump = k * k  # extra bin for dropped pixels: no boolean indexing, hence no host sync
    flat = torch.where(valid, target * k + pred, torch.full_like(target, dump)).reshape(-1)
    counts = histogram(flat, dump + 1)
    return counts[:dump].reshape(k, k)


def check_class_names(class_names: object, num_classes: int | None) -> tuple[str, ...] | None:
    """Check ``class_names``: ``None`` or unique strings, ``num_classes`` of them when given."""
    if class_names is None:
        return None
    if isinstance(class_names, str) or not isinstance(class_names, Sequence):
        raise TypeError(f"class_names must be a sequence of str or None, got {type(class_names).__name__}")
    names = tuple(class_names)
    if not all(isinstance(n, str) for n in names):
        raise TypeError("class_names must contain only str")
    if num_classes is not None and len(names) != num_classes:
        raise ValueError(f"class_names must have num_classes={num_classes} entries, got {len(names)}")
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"class_names must be unique, got duplicates {dup}")
    return names


def check_absent(absent: object) -> Literal["union", "target"]:
    """Check the absent-class rule: ``"union"`` or ``"target"``."""
    if absent == "union":
        return "union"
    if absent == "target":
        return "target"
    raise ValueError(f"absent must be 'union' or 'target', got {absent!r}")
