"""The one safe reader of incseg's ``.pt`` inputs (checkpoints, backbone weights) and its error.

It sits outside the packages so that :mod:`incseg.models` (backbone weights) and :mod:`incseg.learner`
(checkpoints) share it without importing each other.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["CheckpointError", "load_file"]


class CheckpointError(ValueError):
    """A checkpoint cannot be loaded: unreadable, not plain data, wrong format, or not for this learner.

    Example:
        >>> issubclass(CheckpointError, ValueError)
        True
    """


def load_file(path: str | os.PathLike[str], what: str, *, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with one-line errors that name ``what`` and the file.

    The one reader of incseg's ``.pt`` inputs (checkpoints, ``backbone_weights``): it never runs code from the
    file and never suggests loading it with ``weights_only=False``.

    Args:
        path: the file.
        what: its name in messages (``"checkpoint"``, ``"backbone_weights"``).
        map_location: passed to ``torch.load``.

    Returns:
        What the file holds.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        PermissionError: the file cannot be read.
        CheckpointError: ``path`` is a directory or not a regular file; the file is empty, truncated or corrupt,
            is a plain pickle (not written by ``torch.save``), or holds python code or objects (refused as unsafe).
    """
    path = Path(path)
    name = f"{what} {path}"
    if not path.exists():
        raise FileNotFoundError(f"{name} does not exist")
    if path.is_dir():
        raise CheckpointError(f"{name} is a directory, not a file (e.g. <out>/checkpoints/last.pt)")
    if not path.is_file():
        raise CheckpointError(f"{name} is not a regular file (a device or pipe such as /dev/null)")
    try:
        if path.stat().st_size == 0:
            raise CheckpointError(f"{name} is empty (0 bytes): an interrupted copy or save; use another copy")
        with warnings.catch_warnings():  # e.g. about the pickle protocol of a plain pickle: the error says it
            warnings.simplefilter("ignore")
            return torch.load(path, map_location=map_location, weights_only=True)
    except CheckpointError:
        raise
    except PermissionError as exc:
        raise PermissionError(f"cannot read {name}: permission denied (check the file's owner and mode)") from exc
    except pickle.UnpicklingError as exc:
        reason = _unpickler_reason(exc)
        if reason.startswith("global "):
            raise CheckpointError(
                f"{name} holds python code or objects ({reason}), which an incseg file never holds; it was "
                "refused as unsafe and nothing in it was run: load it only if you know where it comes from"
            ) from exc
        if not zipfile.is_zipfile(path):
            raise CheckpointError(
                f"{name} is not a torch.save file (no zip archive: a plain pickle, another format, or damaged; "
                f"{reason}); nothing in it was run: write tensors with torch.save(state_dict, path)"
            ) from exc
        raise CheckpointError(f"{name} is corrupt (unreadable pickle data: {reason})") from exc
    except Exception as exc:
        raise CheckpointError(
            f"{name} is corrupt or truncated ({type(exc).__name__}: {_first_line(exc)}); use another copy"
        ) from exc


def _unpickler_reason(exc: BaseException) -> str:
    """What torch's weights-only unpickler refused (``"global posix.system"``, ``"Unsupported operand 149"``),
    without torch's advice to load the file unsafely (every sentence about ``weights_only`` or trust)."""
    text = " ".join(str(exc).split())
    found = re.search(r"GLOBAL\s+([\w.]+)", text)
    if found:
        return f"global {found.group(1)}"
    detail = re.search(r"WeightsUnpickler error:\s*(.*?)\s*(?:Check the documentation|$)", text)
    if detail and detail.group(1):
        return detail.group(1)[:300]
    sentences = re.split(r"(?<=[.!?])\s+", text)
    unsafe = ("weights_only", "weights only", "trusted source", "arbitrary code", "file an issue")
    kept = [x for x in sentences if not any(u in x.lower() for u in unsafe)]
    return " ".join(kept)[:300] or "unsupported content"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
