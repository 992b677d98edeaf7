"""Pictures of results: colour-coded masks, prediction grids and CAF attention maps (PNG via Pillow)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

__all__ = ["attention_heatmap", "colorize", "legend", "palette", "save_grid"]


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


def legend(class_names: Sequence[str]) -> list[tuple[str, tuple[int, int, int]]]:
    """``(name, colour)`` of each class index as :func:`colorize` paints it, for :func:`save_grid`'s legend."""
    return [(name, tuple(int(v) for v in _PALETTE[i])) for i, name in enumerate(class_names)]  # type: ignore[misc]


def save_grid(
    path: str | Path,
    rows: Sequence[Mapping[str, np.ndarray]],
    *,
    scale: int = 2,
    legend: Sequence[tuple[str, tuple[int, int, int]]] = (),
) -> Path:
    """Save a grid of pictures: one row per sample, one titled column per key of the row mappings.

    Args:
        path: the PNG to write (parent folders are created).
        rows: each row maps a column title to an ``(H, W, 3)`` uint8 picture; all rows share the keys.
        scale: integer up-scaling (nearest) so small pictures stay readable.
        legend: ``(label, RGB colour)`` pairs drawn as swatches under the grid (e.g. :func:`legend` of the
            class names, so the colour-coded masks can be read).

    Returns:
        The path written.
    """
    if not rows:
        raise ValueError("rows must not be empty")
    titles = list(rows[0].keys())
    h, w = next(iter(rows[0].values())).shape[:2]
    ch, cw, pad, head = h * scale, w * scale, 4, 14
    width = len(titles) * (cw + pad) + pad
    entry_w, entry_h = 130, 14
    per_line = max(1, (width - pad) // entry_w)
    legend_h = (len(legend) + per_line - 1) // per_line * entry_h + (pad if legend else 0)
    grid_h = head + len(rows) * (ch + pad) + pad
    canvas = Image.new("RGB", (width, grid_h + legend_h), "white")
    draw = ImageDraw.Draw(canvas)
    for k, (label, colour) in enumerate(legend):
        x, y = pad + (k % per_line) * entry_w, grid_h + (k // per_line) * entry_h
        draw.rectangle((x, y + 1, x + 10, y + 11), fill=colour, outline=(0, 0, 0))
        draw.text((x + 14, y), label[:20], fill=(0, 0, 0))
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
