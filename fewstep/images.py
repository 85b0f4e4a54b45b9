"""Image grids and PNG files, one look for every command that writes them (`fewstep sample`,
`fewstep eval`, training's sample files and `fewstep generate`): white 2-px gaps and border.

numpy and PIL only, no torch: `fewstep generate` (serving) writes with it too.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

GAP = 2


def grid_image(images: np.ndarray, cols: int | None = None) -> np.ndarray:
    """uint8 [B, H, W, C] -> one uint8 [rows*(H+2)+2, cols*(W+2)+2, C] image on white."""
    b, h, w, c = images.shape
    cols = cols or int(math.ceil(math.sqrt(b)))
    rows = int(math.ceil(b / cols))
    out = np.full((rows * (h + GAP) + GAP, cols * (w + GAP) + GAP, c), 255, np.uint8)
    for i in range(b):
        r, q = divmod(i, cols)
        top, left = GAP + r * (h + GAP), GAP + q * (w + GAP)
        out[top:top + h, left:left + w] = images[i]
    return out


def save_png(img: np.ndarray, path) -> None:
    """uint8 [H, W, C] (C = 1 or 3) -> a PNG file, written atomically (parent folders made)."""
    from PIL import Image
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(tmp)
    tmp.replace(path)
