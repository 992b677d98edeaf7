"""Pictures of results: colour-coded masks, prediction grids and CAF attention maps (PNG via Pillow)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

__all__ = ["attention_heatmap", "colorize", "palette", "save_grid"]


def palette(num_colors: int = 256) -> np.ndarray:
    """The Pascal-VOC colour map (bit-interleaved), shape ``(num_colors, 3)`` uint8; index 255 is white."""
    pal = np.zeros((num_colors, 3), dtype=np.uint8)
    for i in range(num_colors):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[i] = (r, g, b)
    if num_colors > 255:
        pal[255] = (255, 255, 255)
    return pal


_PALETTE = palette()


def colorize(mask: Tensor) -> np.ndarray:
    """Colour-code a mask ``(H, W)`` of class indices (255 = ignored, white) into ``(H, W, 3)`` uint8."""
    if mask.ndim != 2:
        raise ValueError(f"mask must have shape (H, W), got {tuple(mask.shape)}")
    return _PALETTE[mask.detach().cpu().clamp(0, 255).to(torch.int64).numpy()]


def attention_heatmap(attention: Tensor, size: tuple[int, int]) -> np.ndarray:
    """Turn a spatial map ``(h, w)`` into an ``(H, W, 3)`` uint8 heat map (min-max scaled, blue to red)."""
    if attention.ndim != 2:
        raise ValueError(f"attention must have shape (h, w), got {tuple(attention.shape)}")
    a = attention.detach().float().cpu()
    a = torch.nn.functional.interpolate(a[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
    a = (a - a.min()) / (a.max() - a.min()).clamp_min(1e-12)
    a_np = a.numpy()
    rgb = np.stack([a_np, 1.0 - np.abs(2.0 * a_np - 1.0), 1.0 - a_np], axis=-1)
    return (255 * rgb).astype(np.uint8)


def denormalize(image: Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Undo the normalisation of an image ``(3, H, W)`` and return ``(H, W, 3)`` uint8."""
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    x = (image.detach().float().cpu() * s + m).clamp(0, 1)
    return (255 * x.permute(1, 2, 0).numpy()).astype(np.uint8)


def save_grid(path: str | Path, rows: Sequence[Mapping[str, np.ndarray]], *, scale: int = 2) -> Path:
    """Save a grid of pictures: one row per sample, one titled column per key of the row mappings.

    Args:
        path: the PNG to write (parent folders are created).
        rows: each row maps a column title to an ``(H, W, 3)`` uint8 picture; all rows share the keys.
        scale: integer up-scaling (nearest) so small pictures stay readable.

    Returns:
        The path written.
    """
    if not rows:
        raise ValueError("rows must not be empty")
    titles = list(rows[0].keys())
    h, w = next(iter(rows[0].values())).shape[:2]
    ch, cw, pad, head = h * scale, w * scale, 4, 14
    canvas = Image.new("RGB", (len(titles) * (cw + pad) + pad, head + len(rows) * (ch + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for j, title in enumerate(titles):
        draw.text((pad + j * (cw + pad), 2), title[: max(4, cw // 6)], fill=(0, 0, 0))
    for i, row in enumerate(rows):
        for j, title in enumerate(titles):
            tile = Image.fromarray(row[title]).resize((cw, ch), Image.Resampling.NEAREST)
            canvas.paste(tile, (pad + j * (cw + pad), head + pad + i * (ch + pad)))
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    return out
