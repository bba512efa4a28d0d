"""PNG sample grids with optional captions (Pillow)."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw


def save_grid(path: str, images: np.ndarray, captions: Sequence[str] | None = None, scale: int = 4,
              columns: int = 10) -> None:
    """images [N, H, W, C] in [-1, 1] -> a grid PNG; each cell gets its caption underneath if given."""
    images = np.clip((np.asarray(images) + 1.0) * 127.5, 0, 255).astype(np.uint8)
    n, h, w, c = images.shape
    rows = math.ceil(n / columns)
    cap_h = 12 if captions is not None else 0
    cell_w, cell_h = w * scale + 4, h * scale + 4 + cap_h
    canvas = Image.new("L" if c == 1 else "RGB", (columns * cell_w, rows * cell_h), color=40)
    draw = ImageDraw.Draw(canvas)
    for i in range(n):
        tile = images[i, ..., 0] if c == 1 else images[i]
        img = Image.fromarray(tile).resize((w * scale, h * scale), Image.NEAREST)
        x, y = (i % columns) * cell_w + 2, (i // columns) * cell_h + 2
        canvas.paste(img, (x, y))
        if captions is not None:
            draw.text((x + 2, y + h * scale + 1), captions[i], fill=255 if c == 1 else (255, 255, 255))
    canvas.save(path)
