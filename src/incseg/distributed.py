"""Thin helpers over :mod:`torch.distributed` for code that must also run in a single process.

incseg never launches processes itself: start multi-GPU (or multi-process CPU) runs with ``torchrun``, which
sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and ``MASTER_ADDR``/``MASTER_PORT``; :func:`init_from_env` then
creates the default process group (NCCL on CUDA, gloo otherwise).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

__all__ = [
    "barrier",
    "cleanup",
    "get_rank",
    "get_world_size",
    "init_from_env",
    "is_distributed",
    "is_main_process",
]


def is_distributed() -> bool:
    """Whether a default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """Rank of this process (0 when not distributed)."""
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    """Number of processes (1 when not distributed)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """Whether this process does the I/O and logging (rank 0)."""
    return get_rank() == 0


def barrier() -> None:
    """Synchronise all processes; a no-op when not distributed."""
    if is_distributed():
        dist.barrier()


def _check_device(device: str | torch.device) -> torch.device:
    """``device`` as a :class:`torch.device` that incseg can train on (CPU or an available CUDA device)."""
    try:
        want = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"unknown device {str(device)!r}: use cpu, cuda or cuda:N") from None
    if want.type == "cpu":
        if want.index not in (None, 0):
            raise ValueError(f"device {str(device)!r}: the CPU is one device without an index; use cpu")
        return want
    if want.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} was requested but CUDA is not available on this machine")
        count = torch.cuda.device_count()
        if want.index is not None and not 0 <= want.index < count:
            raise ValueError(f"device {str(device)!r} does not exist: this machine has {count} CUDA device(s)")
        return want
    if want.type == "meta":
        raise ValueError(
            f"device {str(device)!r} holds no data (shapes only) and cannot train or evaluate; use cpu or cuda"
        )
    raise ValueError(f"device {str(device)!r} is not supported: incseg trains on cpu or cuda[:N] only")


def init_from_env(device: str | torch.device | None = None) -> torch.device:
    """Initialise the default process group from ``torchrun``'s environment, if present.

    Args:
        device: requested device (``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``None`` for CUDA when available).
            Under ``torchrun`` with CUDA, each process takes ``cuda:LOCAL_RANK``; in a single process
            ``"cuda:N"`` selects device ``N``.

    Returns:
        The device this process should use.

    Raises:
        ValueError: an unknown device name, a device this machine lacks (CUDA not available, ``cuda:N`` beyond
            the devices present) or one incseg cannot train on (``meta``, ``mps``, ``xpu``, ``cpu:N``): never a
            silent fallback to the CPU.
    """
    want = _check_device(device) if device is not None else None
    use_cuda = torch.cuda.is_available() if want is None else want.type == "cuda"
    multi = "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1
    if multi and not is_distributed():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    elif use_cuda and want is not None and want.index is not None and not is_distributed():
        torch.cuda.set_device(want.index)
    if use_cuda:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def cleanup() -> None:
    """Destroy the default process group if this process created one."""
    if is_distributed():
        dist.destroy_process_group()
