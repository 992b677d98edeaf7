"""Checkpoint files: atomic writing, safe reading (``weights_only``) and the format's schema checks."""

from __future__ import annotations

import copy
import errno
import hashlib
import math
import os
import re
import secrets
import shutil
import stat
import time
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from incseg._checks import NonFiniteError
from incseg._safe_files import CheckpointError, load_file
from incseg._version import __version__
from incseg.learner._devices import rng_preserved
from incseg.learner._freeze import freeze
from incseg.learner.guard import check_finite_tensors
from incseg.methods import MethodConfig
from incseg.models import IncrementalSegmenter
from incseg.scenarios import Scenario

if TYPE_CHECKING:
    from incseg.learner.learner import IncrementalLearner

__all__ = [
    "CHECKSUM_KEY",
    "FORMAT_VERSION",
    "OLD_FORMAT_VERSION",
    "SCHEMA",
    "CheckpointError",
    "atomic_save",
    "check_learner_state",
    "check_optimizer_state",
    "check_plain",
    "content_checksum",
    "learner_state",
    "levels_record",
    "load_file",
    "load_into",
    "load_learner_state",
    "method_from",
    "read_checkpoint",
    "remove_stale_temporaries",
    "save_learner",
    "scenario_from",
]

FORMAT_VERSION = 2
"""Version of the checkpoint layout written by :meth:`~incseg.learner.IncrementalLearner.save`: a file of this
version must hold a valid :data:`CHECKSUM_KEY` entry."""

OLD_FORMAT_VERSION = 1
"""The layout of incseg 0.1 (``format_version`` 1), still read: its checksum is optional (files written before
checksums existed have none) and it may hold only the keys of that layout, so a damaged key name is refused."""

CHECKSUM_KEY = "checksum"
"""Key of the content checksum in a saved checkpoint (see :func:`content_checksum`); required from format 2."""

_PLAIN_SCALARS = (str, int, float, bool, type(None))
_PLAIN_TENSORS = (Tensor, nn.Parameter)
_PLAIN_DICTS = (dict, OrderedDict)
_TEMP_SUFFIX = ".tmp"


def check_plain(obj: object, name: str) -> None:
    """Check that ``obj`` holds only tensors and plain python data: what every checkpoint may hold.

    Allowed, as exact types (subclasses such as ``numpy.float64``, ``IntEnum`` members or ``str`` subclasses
    are refused: ``torch.load(weights_only=True)`` could not read them back): ``str``, ``int``, ``float``,
    ``bool``, ``None``, ``torch.Tensor`` (and ``nn.Parameter``), and ``dict`` / ``OrderedDict`` (``str`` or
    ``int`` keys), ``list`` and ``tuple`` of those, nested. :meth:`~incseg.learner.IncrementalLearner.save`
    and :meth:`~incseg.learner.IncrementalLearner.load` apply the same check, so a file that ``save`` writes
    always loads, and ``load`` accepts nothing that ``save`` would refuse.

    Args:
        obj: the object to check.
        name: its name in error messages.

    Raises:
        TypeError: something else was found; the message gives its path inside ``obj``.

    Example:
        >>> check_plain({"epoch": 3, "rng": torch.get_rng_state()}, "extra")
        >>> import numpy as np
        >>> check_plain({"miou": np.float64(0.5)}, "extra")
        Traceback (most recent call last):
        ...
        TypeError: extra['miou'] is a float64 (a subclass of float), which a checkpoint cannot hold: ...
    """
    kind = type(obj)
    if kind in _PLAIN_SCALARS or kind in _PLAIN_TENSORS:
        return
    if kind in _PLAIN_DICTS:
        for key, value in obj.items():  # type: ignore[attr-defined]
            if type(key) not in (str, int):
                raise TypeError(f"{name} has a key {key!r} of type {type(key).__name__}; use str or int keys")
            check_plain(value, f"{name}[{key!r}]")
        return
    if kind in (list, tuple):
        for i, value in enumerate(obj):  # type: ignore[arg-type]
            check_plain(value, f"{name}[{i}]")
        return
    plain = next((t for t in (*_PLAIN_SCALARS, Tensor, dict, list, tuple) if isinstance(obj, t)), None)
    subclass = f" (a subclass of {plain.__name__})" if plain is not None else ""
    raise TypeError(
        f"{name} is a {kind.__name__}{subclass}, which a checkpoint cannot hold: convert it to a plain value "
        "(float(x), int(x), str(x), dict(x)); allowed are tensors, str, int, float, bool, None, and dicts/lists/"
        "tuples of those"
    )


def atomic_save(obj: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write ``obj`` with ``torch.save`` atomically: a temporary file in the same folder, fsync, rename.

    Either the complete new file is at ``path`` afterwards or (on any error, including interruption) the
    previous file, if any, is untouched and no temporary file is left behind. Temporary files that an earlier,
    killed save of ``path`` left behind (``.<name>.<random>.tmp``) are removed first. The file is created with
    the permissions of the process's umask (``0o666 & ~umask``), as ``open()`` would.

    ``path`` must be a new path or a regular file: a directory, a device (``/dev/null``), a pipe or a socket is
    refused before anything is written (renaming over it would replace the node with a file). A symbolic link is
    followed: its target is replaced and the link kept.

    Args:
        obj: the (plain) object to save.
        path: destination; its folder must exist.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        FileNotFoundError: the destination folder does not exist.
        ValueError: ``path`` exists and is not a regular file.
        OSError: the write failed, e.g. a full disk (``errno.ENOSPC``; the message names the file and the free
            space), after cleaning up.
        Exception: whatever else ``torch.save`` raised (after cleaning up).
    """
    path = Path(path)
    target = Path(os.path.realpath(path)) if path.is_symlink() else path
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise FileNotFoundError(f"cannot save checkpoint {path}: folder {folder} does not exist")
    try:
        mode = target.stat().st_mode
    except FileNotFoundError:
        mode = None
    if mode is not None and not stat.S_ISREG(mode):
        kind = "a directory" if stat.S_ISDIR(mode) else "a device, pipe or socket, not a regular file"
        raise ValueError(f"cannot save checkpoint {path}: it is {kind}; save to a new path or a regular file")
    remove_stale_temporaries(folder, target.name)
    fd, tmp_name = _create_temporary(folder, target.name)
    try:
        with os.fdopen(fd, "wb") as f:
            try:
                torch.save(obj, f)
                f.flush()
                os.fsync(f.fileno())
            except (OSError, RuntimeError) as exc:
                raise _write_error(exc, path, folder) from exc
        os.replace(tmp_name, target)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(folder)
    return path


def _write_error(exc: BaseException, path: Path, folder: Path) -> BaseException:
    """An ``OSError`` naming the file for a failed write; torch reports a short write (a full disk) as
    ``RuntimeError: [enforce fail at inline_container.cc] ... unexpected pos``, with the ``OSError`` as context."""
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__context__ or cause.__cause__
    if cause is None and "inline_container" not in str(exc) and "unexpected pos" not in str(exc):
        return exc  # not a write failure: re-raise as it is
    code = cause.errno if isinstance(cause, OSError) and cause.errno else errno.EIO
    try:
        free = f"; {shutil.disk_usage(folder).free / 1e6:.0f} MB free in {folder}"
    except OSError:
        free = ""
    reason = (cause.strerror or str(cause)) if isinstance(cause, OSError) else "the write stopped short"
    return OSError(
        code,
        f"cannot write checkpoint {path}: {reason}{free}; free some space (or choose another folder) and run "
        "again, the previous checkpoint is untouched",
    )


def _create_temporary(folder: Path, name: str) -> tuple[int, str]:
    """Open a new ``.<name>.<random>.tmp`` in ``folder`` for writing (mode ``0o666``, reduced by the umask)."""
    while True:
        tmp = folder / f".{name}.{secrets.token_hex(6)}{_TEMP_SUFFIX}"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), str(tmp)
        except FileExistsError:  # pragma: no cover - 48 random bits
            continue


def remove_stale_temporaries(
    folder: str | os.PathLike[str], name: str | None = None, *, min_age_s: float = 0.0
) -> list[Path]:
    """Delete the temporary files of interrupted :func:`atomic_save` calls (``.<name>.<random>.tmp``).

    A save killed between creating its temporary file and renaming it (``SIGKILL``, power loss) leaves a file
    the size of a checkpoint behind. :func:`atomic_save` calls this for its destination before writing, and
    :func:`~incseg.engine.train_scenario` for every checkpoint of its folder when it starts or resumes.

    Args:
        folder: the checkpoint folder.
        name: the checkpoint's file name (e.g. ``"last.pt"``); ``None``: the temporaries of every ``*.pt``.
        min_age_s: keep temporaries modified less than this many seconds ago (a save running in another process).

    Returns:
        The files removed.
    """
    folder = Path(folder)
    pattern = f".{name}.*{_TEMP_SUFFIX}" if name is not None else f".*.pt.*{_TEMP_SUFFIX}"
    removed: list[Path] = []
    now = time.time()
    try:
        candidates = list(folder.glob(pattern))
    except OSError:
        return removed
    for tmp in candidates:
        try:
            if not tmp.is_file() or now - tmp.stat().st_mtime < min_age_s:
                continue
            tmp.unlink()
        except OSError:
            continue  # gone already or not ours to delete: the save itself reports real problems
        removed.append(tmp)
    return removed


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


def content_checksum(obj: Any) -> str:
    """A SHA-256 digest of a checkpoint's content: every tensor's dtype, shape and bytes, and every plain value.

    :meth:`~incseg.learner.IncrementalLearner.save` stores it under :data:`CHECKSUM_KEY` and
    :func:`read_checkpoint` recomputes it, so a flipped bit in tensor data (a bad disk, a broken copy) is
    refused instead of loading silently. SHA-256 is hardware-accelerated on current CPUs: 0.24 s for the 240 MB
    of a DeepLabV3-ResNet101 on one core (measured), less than the 0.43 s ``atomic_save`` takes to write them;
    a sum per tensor would be cheaper but misses swapped or compensating changes.
    It detects damage, not forgery: whoever can edit the file can recompute the digest.

    Args:
        obj: the checkpoint dictionary, without its checksum entry.

    Returns:
        ``"sha256:<64 hex digits>"``.

    Example:
        >>> content_checksum({"w": torch.zeros(2)}) == content_checksum({"w": torch.zeros(2)})
        True
        >>> content_checksum({"w": torch.zeros(2)}) == content_checksum({"w": torch.zeros(2, dtype=torch.float64)})
        False
    """
    digest = hashlib.sha256()
    _feed(digest, obj)
    return "sha256:" + digest.hexdigest()


def _feed(digest: Any, obj: Any) -> None:
    if isinstance(obj, Tensor):
        t = obj.detach()
        if t.layout != torch.strided:
            t = t.to_dense()
        digest.update(f"T{t.dtype}{tuple(t.shape)}|".encode())
        if t.numel():
            data = t.cpu().contiguous().reshape(-1).view(torch.uint8)
            digest.update(data.numpy().data)
    elif isinstance(obj, Mapping):
        digest.update(f"D{len(obj)}|".encode())
        for key, value in obj.items():
            _feed(digest, key)
            _feed(digest, value)
    elif isinstance(obj, (list, tuple)):
        digest.update(f"{'L' if isinstance(obj, list) else 'U'}{len(obj)}|".encode())
        for value in obj:
            _feed(digest, value)
    else:  # plain scalars; repr round-trips floats exactly
        text = repr(obj)
        digest.update(f"{type(obj).__name__}{len(text)}:{text}|".encode())


def _verify_checksum(data: dict[str, Any], what: str) -> None:
    """Check and remove the recorded checksum. Required from :data:`FORMAT_VERSION` 2; a file of
    :data:`OLD_FORMAT_VERSION` without one (incseg 0.1) is accepted as it is."""
    if CHECKSUM_KEY not in data:
        if data.get("format_version") == OLD_FORMAT_VERSION:
            return
        raise CheckpointError(
            f"{what} has no {CHECKSUM_KEY!r} entry, which format_version {data.get('format_version')!r} requires: it "
            "is damaged (a changed bit in the entry's name) or was edited; use another copy or an earlier checkpoint"
        )
    recorded = data.pop(CHECKSUM_KEY)
    if type(recorded) is not str or not re.fullmatch(r"sha256:[0-9a-f]{64}", recorded):
        raise CheckpointError(
            f"{what} has a checksum entry {str(recorded)[:80]!r} that is not 'sha256:<64 hex digits>': it is "
            "damaged or was written by another program; use another copy or an earlier checkpoint"
        )
    actual = content_checksum(data)
    if actual != recorded:
        raise CheckpointError(
            f"{what} is damaged: its content does not match the checksum recorded when it was saved (a changed "
            "bit in its tensors or values: a faulty disk, an interrupted or broken copy); use another copy or an "
            f"earlier checkpoint (a file edited on purpose needs a new {CHECKSUM_KEY!r}: content_checksum(data))"
        )


def read_checkpoint(path: str | os.PathLike[str], *, map_location: Any = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``torch.load(weights_only=True)``, check its format version and its checksum.

    Args:
        path: the checkpoint file.
        map_location: passed to ``torch.load``.

    Returns:
        The checkpoint dictionary, without its checksum entry.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        PermissionError: the file cannot be read.
        CheckpointError: as :func:`load_file`; the file is not a dictionary, has another ``format_version`` (an
            int: :data:`FORMAT_VERSION` or :data:`OLD_FORMAT_VERSION`), has no checksum although its version
            requires one, or its content does not match its recorded checksum (damaged).

    A file of :data:`FORMAT_VERSION` must hold a :func:`content_checksum`, which is verified and removed from the
    returned dictionary. A file of :data:`OLD_FORMAT_VERSION` (incseg 0.1) is checked when it has one and
    loads unchecked otherwise; whether a file is old is read from its ``format_version`` only, never from a
    missing key.
    """
    data = load_file(path, "checkpoint", map_location=map_location)
    what = f"checkpoint {path}"
    if not isinstance(data, dict):
        raise CheckpointError(f"{what} must hold a dict, got {type(data).__name__}")
    version = data.get("format_version")
    if type(version) is not int or version not in (FORMAT_VERSION, OLD_FORMAT_VERSION):  # 1.0 and True are no int
        raise CheckpointError(
            f"{what} has format_version {version!r}; this version of incseg reads {FORMAT_VERSION} and "
            f"{OLD_FORMAT_VERSION} (incseg 0.1)"
        )
    _verify_checksum(data, what)
    return data


SCHEMA: dict[str, tuple[type, ...]] = {
    "scenario": (dict,),
    "method": (dict,),
    "step": (int,),
    "step_finished": (bool,),
    "classes_per_step": (list, tuple),
    "has_fusion": (bool,),
    "model": (dict,),
    "teacher": (dict, type(None)),
    "criterion": (dict,),
    "optimizer": (dict, type(None)),
    "extra": (dict,),
}
"""Required keys of a learner state and their types. Format 2 also requires ``caf_levels`` (``None`` or a dict);
``format_version``, ``incseg_version`` (a str) and, in a file, ``checksum`` complete the keys a state may hold."""

_OPTIONAL_V1 = ("incseg_version", "caf_levels")  # absent in the earliest files of incseg 0.1


def levels_record(model: IncrementalSegmenter) -> dict[str, list[str]] | None:
    """The multi-scale structure a checkpoint records: the encoder's levels and the CAF levels, as strings."""
    if model.levels is None or model.caf_levels is None:
        return None
    return {"levels": [str(level) for level in model.levels], "caf": [str(level) for level in model.caf_levels]}


def scenario_from(state: Mapping[str, Any]) -> Scenario:
    try:
        return Scenario.from_dict(state["scenario"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint scenario is invalid: {exc}") from exc


def method_from(state: Mapping[str, Any]) -> MethodConfig:
    try:
        return MethodConfig.from_dict(state["method"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint method configuration is invalid: {exc}") from exc


def load_into(module: nn.Module, weights: Mapping[str, Any], what: str) -> None:
    bad = [k for k, v in weights.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(f"checkpoint {what} weights must map names to tensors; bad entries {bad[:5]}")
    own = module.state_dict()
    cast = [f"{k} ({v.dtype} -> {own[k].dtype})" for k, v in weights.items() if k in own and v.dtype != own[k].dtype]
    if cast:  # load_state_dict would cast silently: float64/int/bool/complex values into float32 weights
        raise CheckpointError(
            f"checkpoint {what} weights have other dtypes than this learner's network in {len(cast)} tensors, e.g. "
            f"{', '.join(cast[:3])}: incseg does not cast weights silently; build the network in the checkpoint's "
            "dtype (model.to(dtype)) before loading, or convert the checkpoint's tensors yourself"
        )
    shaped = [
        f"{k} ({tuple(v.shape)} -> {tuple(own[k].shape)})"
        for k, v in weights.items()
        if k in own and v.shape != own[k].shape and not k.endswith("_extra_state")  # extra state: any size
    ]
    if shaped:  # load_state_dict would take a (1,) tensor for a 0-dim buffer (num_batches_tracked)
        raise CheckpointError(
            f"checkpoint {what} weights do not fit this learner's network (another architecture, width or method?): "
            f"size mismatch in {len(shaped)} tensors, e.g. {', '.join(shaped[:3])}"
        )
    try:
        module.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(
            f"checkpoint {what} weights do not fit this learner's network (another architecture, width or "
            f"method?): {' '.join(str(exc).split())[:1500]}"
        ) from exc


def check_learner_state(state: object, scenario: Scenario, config: MethodConfig) -> tuple[int, list[int]]:
    """The checks of a learner state that need no network: format version and keys (:data:`SCHEMA`, nothing
    else), plain values only (:func:`check_plain`), a checksum if the state still holds one, same scenario and
    method configuration, step in range, classifier sizes of the scenario.

    Returns:
        ``(step, classes_per_step)`` of the state.

    Raises:
        CheckpointError: the first check that fails, with what was found and what was expected.
    """
    if not isinstance(state, Mapping):
        raise CheckpointError(f"a learner state must be a dict, got {type(state).__name__}")
    version = state.get("format_version")
    if type(version) is not int or version not in (FORMAT_VERSION, OLD_FORMAT_VERSION):
        raise CheckpointError(
            f"checkpoint has format_version {version!r}; this incseg reads {FORMAT_VERSION} and {OLD_FORMAT_VERSION}"
        )
    if CHECKSUM_KEY in state:  # a state read without read_checkpoint (torch.load by hand)
        _verify_checksum(dict(state), "checkpoint")
    allowed = {"format_version", CHECKSUM_KEY, *SCHEMA, *_OPTIONAL_V1}
    unknown = sorted(str(k) for k in state if k not in allowed)
    if unknown:
        raise CheckpointError(
            f"checkpoint has unknown keys {unknown[:5]}: it is damaged (a changed bit in a key's name) or was not "
            "written by incseg; use another copy or an earlier checkpoint"
        )
    required = {**SCHEMA}
    if version == FORMAT_VERSION:
        required.update({"incseg_version": (str,), "caf_levels": (dict, type(None))})
    for key, types in required.items():
        if key not in state:
            raise CheckpointError(f"checkpoint is missing the key {key!r}")
        if not isinstance(state[key], types) or (isinstance(state[key], bool) and bool not in types):
            names = "/".join("None" if t is type(None) else t.__name__ for t in types)
            raise CheckpointError(f"checkpoint entry {key!r} must be {names}, got {type(state[key]).__name__}")
    try:
        check_plain(dict(state), "checkpoint")
    except TypeError as exc:
        raise CheckpointError(str(exc)) from exc
    saved_scenario = scenario_from(state)
    if saved_scenario != scenario:
        mine = scenario.to_dict()
        diff = {k: (v, mine.get(k)) for k, v in saved_scenario.to_dict().items() if mine.get(k) != v}
        raise CheckpointError(
            f"checkpoint was written for another scenario; differing fields (checkpoint, learner): {diff}; build the "
            "learner with the checkpoint's scenario (IncrementalLearner.from_checkpoint)"
        )
    saved_config = method_from(state)
    if saved_config != config:
        diff = {
            k: (v, getattr(config, k, None)) for k, v in saved_config.to_dict().items() if config.to_dict().get(k) != v
        }
        raise CheckpointError(
            f"checkpoint was written for another method configuration; differing fields (checkpoint, learner): {diff}"
        )
    if version == FORMAT_VERSION:  # this format holds exactly what to_dict() writes: no unknown or retyped fields
        for key, mine in (("scenario", saved_scenario.to_dict()), ("method", saved_config.to_dict())):
            odd = _retyped(state[key], mine)
            if odd:
                raise CheckpointError(
                    f"checkpoint entry {key!r} has fields that its writer never writes: {odd[:5]} (unknown, missing "
                    "or of another type): it was edited or not written by incseg"
                )
    step = state["step"]
    if not 0 <= step < scenario.num_steps:
        raise CheckpointError(f"checkpoint step {step} is outside [0, {scenario.num_steps})")
    cps = list(scenario.classes_per_step[: step + 1])
    if list(state["classes_per_step"]) != cps:
        raise CheckpointError(
            f"checkpoint classes_per_step {state['classes_per_step']} do not match the scenario at step {step} ({cps})"
        )
    return step, cps


def _retyped(saved: Mapping[str, Any], mine: Mapping[str, Any]) -> list[str]:
    """Keys of ``saved`` that differ from ``mine`` in presence, type or value (``1.0`` is not ``1``)."""
    keys = list(mine) + [k for k in saved if k not in mine]
    return [
        str(k)
        for k in keys
        if k not in saved or k not in mine or content_checksum(saved[k]) != content_checksum(mine[k])
    ]


def check_optimizer_state(optimizer: torch.optim.Optimizer, saved: object) -> None:
    """Check that ``saved`` is an optimizer state that ``optimizer`` restores exactly, before loading it.

    ``Optimizer.load_state_dict`` checks only the sizes of the parameter groups: it casts state tensors to the
    parameters' dtype silently and keeps state of any shape, which then fails in ``optimizer.step()`` (or,
    broadcast, trains wrongly). Checked here: the same parameter groups (sizes, parameter indices, setting
    names, and settings of the same kind: numbers finite), state only for those parameters, and every state
    tensor (momentum buffers, moments; ``step`` counters excepted) of its parameter's shape and dtype, finite.

    Args:
        optimizer: the optimizer to restore, built from the learner's ``param_groups()``.
        saved: the checkpoint's optimizer state (``optimizer.state_dict()`` when it was saved).

    Raises:
        CheckpointError: the first mismatch, naming the group or parameter and what was expected.
    """
    if not isinstance(saved, dict) or set(saved) != {"state", "param_groups"}:
        keys = sorted(map(str, saved)) if isinstance(saved, dict) else type(saved).__name__
        raise CheckpointError(f"checkpoint optimizer state must be a dict of 'state' and 'param_groups', got {keys}")
    groups, state = saved["param_groups"], saved["state"]
    own = optimizer.state_dict()["param_groups"]
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups) or not isinstance(state, dict):
        raise CheckpointError("checkpoint optimizer state is malformed (need a list of dicts and a dict of state)")
    saved_sizes = [len(g["params"]) if isinstance(g.get("params"), list) else None for g in groups]
    sizes = [len(g["params"]) for g in own]
    if saved_sizes != sizes:
        raise CheckpointError(
            f"the optimizer has parameter groups of sizes {sizes}, the checkpoint {saved_sizes}: build it from "
            "learner.param_groups() after loading the structure"
        )
    params: dict[int, Tensor] = {}
    for i, (group, mine, live) in enumerate(zip(groups, own, optimizer.param_groups)):
        scheduler_keys = {"initial_lr"}  # set by an LR scheduler, which may be built after the optimizer
        same_params = [type(i) for i in group["params"]] == [int] * len(mine["params"]) and group["params"] == mine[
            "params"
        ]
        if not same_params or set(group) - scheduler_keys != set(mine) - scheduler_keys:
            raise CheckpointError(
                f"checkpoint optimizer group {i} has parameter indices or settings {sorted(map(str, group))} that "
                f"this optimizer ({type(optimizer).__name__}, settings {sorted(mine)}) does not have"
            )
        for key, value in group.items():
            if key != "params" and not _same_kind(value, mine.get(key, group["lr"] if key in scheduler_keys else None)):
                raise CheckpointError(
                    f"checkpoint optimizer group {i} has {key}={value!r:.80}, which a {type(optimizer).__name__} "
                    f"cannot hold (this optimizer has {mine[key]!r:.80})"
                )
        params.update(zip(mine["params"], live["params"]))
    for index, entry in state.items():
        if index not in params or not isinstance(entry, dict):
            raise CheckpointError(f"checkpoint optimizer state has an entry {index!r} for no parameter of its groups")
        param = params[index]
        for key, value in entry.items():
            if not isinstance(value, Tensor):
                if value is not None and type(value) not in (int, float):
                    raise CheckpointError(
                        f"checkpoint optimizer state {key!r} of parameter {index} is a {type(value).__name__}, which "
                        "no optimizer state holds (tensors, numbers or None): the file was edited"
                    )
                continue
            if key == "step":
                continue
            if value.shape != param.shape or value.dtype != param.dtype:
                raise CheckpointError(
                    f"checkpoint optimizer state {key!r} of parameter {index} has shape {tuple(value.shape)} and dtype "
                    f"{value.dtype}, the parameter {tuple(param.shape)} and {param.dtype}: the file is damaged or "
                    "belongs to another network"
                )
            if value.is_floating_point() and value.numel() and not bool(torch.isfinite(value).all()):
                raise CheckpointError(
                    f"checkpoint optimizer state {key!r} of parameter {index} holds NaN/Inf: the run had diverged"
                )


def _same_kind(value: object, reference: object) -> bool:
    """Whether an optimizer setting could have been written by the optimizer whose setting is ``reference``."""
    if isinstance(reference, bool) or reference is None or isinstance(reference, str):
        return type(value) is type(reference) or (reference is None and value is None)
    if isinstance(reference, (int, float)) or (isinstance(reference, Tensor) and reference.numel() == 1):
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        number = number or (isinstance(value, Tensor) and value.numel() == 1 and value.is_floating_point())
        return number and math.isfinite(float(value))  # type: ignore[arg-type]
    if isinstance(reference, (list, tuple)):
        return (
            type(value) is type(reference)
            and len(value) == len(reference)  # type: ignore[arg-type]
            and all(_same_kind(v, r) for v, r in zip(value, reference))  # type: ignore[call-overload]
        )
    return type(value) is type(reference)


# ---------------------------------------------------------------------------- the learner's state
def learner_state(
    learner: IncrementalLearner,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """What :meth:`IncrementalLearner.state_dict <incseg.learner.IncrementalLearner.state_dict>` returns.

    Keys: ``format_version``, ``incseg_version``, ``scenario`` (``Scenario.to_dict()``), ``method``
    (``MethodConfig.to_dict()``), ``step``, ``step_finished``, ``classes_per_step``, ``has_fusion``, ``caf_levels``
    (the encoder's levels and those the fusion sees, ``None`` for a single-tensor encoder), ``model``, ``teacher``
    (or ``None``), ``criterion`` (state dicts), ``optimizer`` (its state dict or ``None``) and ``extra``.
    """
    if learner._step < 0:
        raise RuntimeError("nothing to save before begin_step(0)")
    extra = {} if extra is None else extra
    if not isinstance(extra, dict):
        raise TypeError(f"extra must be a dict, got {type(extra).__name__}")
    check_plain(extra, "extra")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    model = learner.model
    state = {
        "format_version": FORMAT_VERSION,
        "incseg_version": __version__,
        "scenario": learner._scenario.to_dict(),
        "method": learner._config.to_dict(),
        "step": learner._step,
        "step_finished": learner._step_finished,
        "classes_per_step": model.classifier.classes_per_step,
        "has_fusion": model.fusion is not None,
        "caf_levels": levels_record(model),
        "model": model.state_dict(),
        "teacher": None if learner._teacher is None else learner._teacher.state_dict(),
        "criterion": learner.criterion.state_dict(),
        "optimizer": None if optimizer is None else optimizer.state_dict(),
        "extra": dict(extra),
    }
    check_plain(state, "the learner state")  # load() accepts exactly what this writes
    return state


def save_learner(
    learner: IncrementalLearner,
    path: str | os.PathLike[str],
    *,
    optimizer: torch.optim.Optimizer | None = None,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """What :meth:`IncrementalLearner.save <incseg.learner.IncrementalLearner.save>` does."""
    state = learner_state(learner, optimizer=optimizer, extra=extra)
    for what in ("model", "teacher", "criterion"):
        if state[what] is not None:
            check_finite_tensors(state[what], f"the {what} to save")
    state[CHECKSUM_KEY] = content_checksum(state)
    atomic_save(state, path)


def load_learner_state(
    learner: IncrementalLearner, state: Mapping[str, Any], *, optimizer: torch.optim.Optimizer | None = None
) -> dict[str, Any]:
    """What :meth:`IncrementalLearner.load_state_dict <incseg.learner.IncrementalLearner.load_state_dict>` does:
    validate ``state`` and build the saved structure on copies, then commit (nothing fails after the first
    change)."""
    step, cps = check_learner_state(state, learner._scenario, learner._config)
    config = learner._config
    has_fusion = learner._method.has_fusion(step)
    if state["has_fusion"] != has_fusion:
        raise CheckpointError(
            f"checkpoint has_fusion={state['has_fusion']} but method {config.name!r} at step {step} has {has_fusion}"
        )
    saved_levels = state.get("caf_levels")  # absent in checkpoints of incseg 0.1: single-tensor encoders
    if saved_levels != levels_record(learner.model):
        raise CheckpointError(
            f"checkpoint was written for a network with encoder levels {saved_levels} but this model has "
            f"{levels_record(learner.model)} (None: an encoder returning one tensor); build the model with the "
            "same encoder and caf_levels as when the checkpoint was saved"
        )
    if (state["teacher"] is None) != (step == 0):
        raise CheckpointError(f"checkpoint at step {step} must {'not ' if step == 0 else ''}hold teacher weights")
    extra = state["extra"]
    for what in ("model", "teacher", "criterion"):
        if isinstance(state[what], dict):
            try:
                check_finite_tensors(state[what], f"checkpoint {what}")
            except NonFiniteError as exc:
                raise CheckpointError(str(exc)) from exc

    # Build and fill copies: any mismatch surfaces here, before the learner changes.
    with rng_preserved(learner.model):
        student = _build_structure(learner, cps, has_fusion)
        load_into(student, state["model"], "model")
        teacher = None
        if state["teacher"] is not None:
            teacher = _build_structure(learner, cps[:step], learner._method.has_fusion(step - 1))
            load_into(teacher, state["teacher"], "teacher")
        criterion = copy.deepcopy(learner.criterion)
        load_into(criterion, state["criterion"], "criterion")

    model = learner.model
    replace_classifier = model.classifier.classes_per_step != cps
    replace_fusion = (model.fusion is not None) != has_fusion
    if optimizer is not None:
        _check_optimizer(learner, optimizer, state["optimizer"], replace_classifier or replace_fusion, step)
        previous = copy.deepcopy(optimizer.state_dict())
        try:
            optimizer.load_state_dict(state["optimizer"])
        except Exception as exc:
            optimizer.load_state_dict(previous)
            raise CheckpointError(f"the optimizer state of the checkpoint does not fit the optimizer: {exc}") from exc

    # Commit: nothing below can fail (same structures, validated weights).
    if replace_classifier:
        model.classifier = student.classifier
    if replace_fusion:
        model.fusion = student.fusion
    model.load_state_dict(state["model"])
    learner._method.prepare_model(model, teacher=False)
    if teacher is not None:
        freeze(teacher)
        learner._method.prepare_model(teacher, teacher=True)
    learner._teacher = teacher
    learner.criterion.load_state_dict(state["criterion"])
    learner._step = step
    learner._step_finished = state["step_finished"]
    learner._module.num_old_classes = learner._scenario.num_old_classes(step)
    learner._module.train(learner._module.training)
    learner.criterion.requires_grad_(step > 0)
    return dict(extra)


def _build_structure(
    learner: IncrementalLearner, classes_per_step: list[int], has_fusion: bool
) -> IncrementalSegmenter:
    """A copy of the model with the classifier heads ``classes_per_step`` and a fusion iff ``has_fusion``."""
    model = copy.deepcopy(learner.model)
    current = model.classifier.classes_per_step
    if current != classes_per_step:
        if len(current) < len(classes_per_step) and classes_per_step[: len(current)] == current:
            for n in classes_per_step[len(current) :]:
                model.classifier.add_classes(n, init="random")
        else:
            model.classifier = model.classifier.with_steps(classes_per_step)
    if has_fusion and model.fusion is None:
        model.fusion = learner._new_fusion(model)
    elif not has_fusion:
        model.fusion = None
    return model


def _check_optimizer(
    learner: IncrementalLearner, optimizer: torch.optim.Optimizer, saved: Any, structure_changes: bool, step: int
) -> None:
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if saved is None:
        raise CheckpointError("checkpoint holds no optimizer state (it was saved without optimizer=)")
    if structure_changes:
        raise CheckpointError(
            f"the checkpoint is at step {step} with another network structure than the learner's current one, "
            "so the optimizer cannot have been built for it: load without optimizer first (or use "
            "IncrementalLearner.from_checkpoint), build the optimizer from learner.param_groups(), then "
            "load(path, optimizer=optimizer)"
        )
    own = {id(p) for p in learner._module.parameters()}
    if any(id(p) not in own for group in optimizer.param_groups for p in group["params"]):
        raise CheckpointError(
            "the optimizer holds parameters that are not this learner's; build it from param_groups()"
        )
    check_optimizer_state(optimizer, saved)
