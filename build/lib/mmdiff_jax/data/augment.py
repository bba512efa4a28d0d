"""Random augmentations, as grain random maps on storage-form examples (seeded per example and epoch, so the same in
every process and after a resume)."""

from __future__ import annotations

import numpy as np

SPATIAL_KEYS = ("image", "mask")  # flipped together


class RandomFlip:
    """Mirror an example left-right with probability 1/2: the image and its mask together ([H, W, ...] arrays)."""

    def __call__(self, element: dict, rng: np.random.Generator) -> dict:
        if rng.random() < 0.5:
            return element
        return {k: (v[:, ::-1].copy() if k in SPATIAL_KEYS else v) for k, v in element.items()}
