"""Checkpoint files: atomic writing, safe reading (``weights_only``) and the format's schema checks."""

from __future__ import annotations

import os
import pickle
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["FORMAT_VERSION", "CheckpointError", "atomic_save", "check_plain", "read_checkpoint"]

FORMAT_VERSION = 1
"""Version of the checkpoint layout written by :meth:`~incseg.learner.IncrementalLearner.save`."""

_PLAIN_SCALARS = (str, int, float, bool, type(None))


class CheckpointError(ValueError):
    """A checkpoint cannot be loaded: unreadable, not plain data, wrong format, or not for this learner.

    Example:
        >>> issubclass(CheckpointError, ValueError)
        True
    """


def check_plain(obj: object, name: str) -> None:
    """Check that ``obj`` holds only tensors and plain python data (what ``weights_only`` loading accepts).

    Allowed: ``str``, ``int``, ``float``, ``bool``, ``None``, ``torch.Tensor``, and ``dict`` (string or int
    keys), ``list`` and ``tuple`` of those, nested.

    Args:
        obj: the object to check.
        name: its name in error messages.

    Raises:
        TypeError: something else was found; the message gives its path inside ``obj``.

    Example:
        >>> check_plain({"epoch": 3, "rng": torch.get_rng_state()}, "extra")
    """
    if isinstance(obj, (Tensor, *_PLAIN_SCALARS)):
        return
    if isinstance(obj, Mapping):
        if not isinstance(obj, dict):
            raise TypeError(f"{name} must be a plain dict, got {type(obj).__name__}")
        for key, value in obj.items():
            if isinstance(key, bool) or not isinstance(key, (str, int)):
                raise TypeError(f"{name} has a key {key!r} of type {type(key).__name__}; use str or int keys")
            check_plain(value, f"{name}[{key!r}]")
        return
    if isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            check_plain(value, f"{name}[{i}]")
        return
    raise TypeError(
        f"{name} is a {type(obj).__name__}, which a weights_only checkpoint cannot hold; "
        "use tensors, str, int, float, bool, None, and dicts/lists/tuples of those"
    )


def atomic_save(obj: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write ``obj`` with ``torch.save`` atomically: a temporary file in the same folder, fsync, rename.

    Either the complete new file is at ``path`` afterwards or (on any error, including interruption) the
    previous file, if any, is untouched and no temporary file is left behind.

    Args:
        obj: the (plain) object to save.
        path: destination; its folder must exist.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        FileNotFoundError: the destination folder does not exist.
        Exception: whatever ``torch.save`` or the file system raised (after cleaning up).
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise FileNotFoundError(f"cannot save checkpoint {path}: folder {folder} does not exist")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(folder)
    return path


def _fsync_dir(folder: Path) -> None:
    """Make the rename durable (POSIX); best effort where directories cannot be opened."""
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def read_checkpoint(path: str | os.PathLike[str], *, map_location: Any = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``torch.load(weights_only=True)`` and check its format version.

    Args:
        path: the checkpoint file.
        map_location: passed to ``torch.load``.

    Returns:
        The checkpoint dictionary.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        PermissionError: the file cannot be read.
        CheckpointError: ``path`` is a directory or not a regular file; the file is truncated or corrupt, holds
            python code or objects (refused as unsafe by ``weights_only``), is not a dictionary or has another
            ``format_version`` (an int).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a directory, not a checkpoint file (e.g. <out>/last.pt)")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a regular file (a device or pipe such as /dev/null)")
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except PermissionError as exc:
        raise PermissionError(
            f"cannot read checkpoint {path}: permission denied (check the file's owner and mode)"
        ) from exc
    except pickle.UnpicklingError as exc:
        reason = _unpickler_reason(exc)
        if reason.startswith("global "):
            raise CheckpointError(
                f"checkpoint {path} holds python code or objects ({reason}), which an incseg checkpoint never "
                "holds; it was refused as unsafe and nothing in it was run. Do not load this file unless you "
                "know where it comes from; incseg checkpoints hold only tensors and plain python data"
            ) from exc
        raise CheckpointError(f"checkpoint {path} is corrupt (unreadable pickle data: {reason})") from exc
    except Exception as exc:
        raise CheckpointError(
            f"checkpoint {path} is corrupt or truncated ({type(exc).__name__}: {_first_line(exc)})"
        ) from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"checkpoint {path} must hold a dict, got {type(data).__name__}")
    version = data.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:  # 1.0 and True equal 1 but are not a version
        raise CheckpointError(
            f"checkpoint {path} has format_version {version!r}; this version of incseg reads {FORMAT_VERSION}"
        )
    return data


def _unpickler_reason(exc: BaseException) -> str:
    """What torch's weights-only unpickler refused (``"global posix.system"``), without its advice to load the
    file unsafely; for other errors the message with every sentence that mentions ``weights_only`` removed."""
    text = " ".join(str(exc).split())
    found = re.search(r"GLOBAL\s+([\w.]+)", text)
    if found:
        return f"global {found.group(1)}"
    sentences = re.split(r"(?<=[.!?])\s+", text)
    kept = [x for x in sentences if "weights_only" not in x and "weights only" not in x.lower()]
    return " ".join(kept)[:300]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
