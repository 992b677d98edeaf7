"""PNG grids: size, validity, and the colour legend that names the classes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from incseg.visualize import colorize, legend, save_grid


def test_legend_colours_are_the_mask_colours() -> None:
    entries = legend(["background", "cat", "dog"])
    assert [name for name, _ in entries] == ["background", "cat", "dog"]
    mask = colorize(torch.tensor([[0, 1, 2]]))
    assert [tuple(int(v) for v in mask[0, i]) for i in range(3)] == [colour for _, colour in entries]


def test_grid_with_legend_is_a_valid_png_of_the_expected_size(tmp_path: Path) -> None:
    tile = np.zeros((8, 10, 3), dtype=np.uint8)
    rows = [{"image": tile, "truth": tile}] * 2
    plain = save_grid(tmp_path / "plain.png", rows, scale=2)
    named = save_grid(tmp_path / "named.png", rows, scale=2, legend=legend([f"class{i}" for i in range(5)]))
    with Image.open(plain) as a, Image.open(named) as b:
        a.verify()
        b.verify()
    with Image.open(plain) as a, Image.open(named) as b:
        width = 2 * (20 + 4) + 4
        assert a.size == (width, 14 + 2 * (16 + 4) + 4)
        assert b.size[0] == width and b.size[1] == a.size[1] + 5 * 14 + 4  # one legend line per class here
