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


def init_from_env(device: str | torch.device | None = None) -> torch.device:
    """Initialise the default process group from ``torchrun``'s environment, if present.

    Args:
        device: requested device (``"cuda"``, ``"cpu"`` or ``None`` for CUDA when available). Under ``torchrun``
            with CUDA, each process takes ``cuda:LOCAL_RANK``.

    Returns:
        The device this process should use.

    Raises:
        ValueError: CUDA was requested but is not available.
    """
    want = torch.device(device) if device is not None else None
    use_cuda = torch.cuda.is_available() if want is None else want.type == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but CUDA is not available on this machine")
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1 and not is_distributed():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    if use_cuda:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def cleanup() -> None:
    """Destroy the default process group if this process created one."""
    if is_distributed():
        dist.destroy_process_group()
