"""PNG sample grids with optional captions (Pillow)."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw


def save_grid(path: str, images: np.ndarray, captions: Sequence[str] | None = None, scale: int = 4,
              columns: int = 10) -> None:
    """images [N, H, W, C] in [-1, 1] -> a grid PNG; each cell gets its caption underneath if given (cut to the
    cell's width). Cells are at most 128 pixels high (large images get a smaller `scale`)."""
    images = np.clip((np.asarray(images) + 1.0) * 127.5, 0, 255).astype(np.uint8)
    n, h, w, c = images.shape
    scale = max(1, min(scale, 128 // max(h, 1)))
    rows = math.ceil(n / columns)
    cap_h = 12 if captions is not None else 0
    cell_w, cell_h = w * scale + 4, h * scale + 4 + cap_h
    background = 40 if c == 1 else (40, 40, 40)
    canvas = Image.new("L" if c == 1 else "RGB", (columns * cell_w, rows * cell_h), color=background)
    draw = ImageDraw.Draw(canvas)
    for i in range(n):
        tile = images[i, ..., 0] if c == 1 else images[i]
        img = Image.fromarray(tile).resize((w * scale, h * scale), Image.NEAREST)
        x, y = (i % columns) * cell_w + 2, (i // columns) * cell_h + 2
        canvas.paste(img, (x, y))
        if captions is not None:
            text = captions[i][:max(1, (cell_w - 4) // 6)]  # the default font is 6 pixels wide
            draw.text((x + 2, y + h * scale + 1), text, fill=255 if c == 1 else (255, 255, 255))
    canvas.save(path)
