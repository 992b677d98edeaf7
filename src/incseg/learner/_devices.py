"""Devices and dtypes of the learner's modules, and the global RNG kept across structure rebuilds."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

__all__ = ["device_of", "images_for", "rng_preserved"]


def device_of(module: nn.Module) -> tuple[torch.device, torch.dtype] | None:
    for p in module.parameters():
        return p.device, p.dtype
    return None


def images_for(model: nn.Module, images: Tensor, *others: nn.Module) -> Tensor:
    """``images`` in the model's floating dtype (half images for a float32 model, say), after clear checks of
    the meta device and of a device mismatch; ``others`` (criterion, teacher) are moved to the model's dtype
    when the model was converted after the learner was built (``model.double()``)."""
    if isinstance(images, Tensor) and images.is_meta:
        raise ValueError(
            "images are on the meta device: they have shapes but no data, so nothing can be computed from them; "
            "pass real tensors"
        )
    found = device_of(model)
    if found is None or not isinstance(images, Tensor):
        return images
    device, dtype = found
    if device.type == "meta":
        raise ValueError(
            "the model's weights are on the meta device (shapes only, no data): materialise them first, e.g. "
            "model.to_empty(device='cpu') then load_state_dict(...), or build the model on a real device"
        )
    if images.device != device:
        raise ValueError(
            f"images are on {images.device} but the model is on {device}: move them with images.to({str(device)!r})"
        )
    if dtype.is_floating_point:
        for other in others:
            found_other = device_of(other)
            if found_other is not None and found_other[1] != dtype and found_other[1].is_floating_point:
                other.to(dtype=dtype)
        if images.is_floating_point() and images.dtype != dtype:
            images = images.to(dtype)
    return images


@contextlib.contextmanager
def rng_preserved(module: nn.Module) -> Iterator[None]:
    """Leave the global RNG (CPU and the module's CUDA device) as it was: rebuilding a structure to load
    weights into must not change what random numbers training draws next."""
    found = device_of(module)
    devices = []
    if found is not None and found[0].type == "cuda":
        devices = [found[0].index if found[0].index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        yield
