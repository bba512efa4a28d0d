"""Masked images for the masked-image task (SPEC §4): `count` black squares of side `square` on an image.

`config.data.masking` names the image to mask (`source`, a key of the data source) and the key the masked copy is
stored under (`into`, a modality of the model; empty = no masking). Squares are placed uniformly at random, wholly
inside the image, and may overlap. Training draws new squares for every example at every epoch (a seeded grain random
map: deterministic, and restored with the iterator state); evaluation uses fixed squares from a seed
(`held_out_holes`), at each of several counts (masking ratios).
"""

from __future__ import annotations

import dataclasses

import numpy as np

BLACK = -1.0  # the pixel value of a hole ([-1, 1] data)


@dataclasses.dataclass(frozen=True)
class MaskingSpec:
    """What `config.data.masking` says."""

    source: str  # the key of the full image in the data
    into: str  # the key of the masked copy (a modality of the model)
    square: int  # side of each square, pixels
    count: int  # squares per image in training


def spec_from_config(config) -> MaskingSpec | None:
    """The masking of a config, or None when `data.masking.into` is empty (no masked modality)."""
    m = config.data.get("masking")
    if m is None or not m.get("into"):
        return None
    return MaskingSpec(source=m.source, into=m.into, square=int(m.square), count=int(m.count))


def square_holes(rng: np.random.Generator, num: int, grid: tuple[int, int], square: int, count: int) -> np.ndarray:
    """bool [num, H, W]: True inside any of `count` random squares of side `square` per image."""
    height, width = grid
    tops = rng.integers(0, height - square + 1, size=(num, count, 1, 1))
    lefts = rng.integers(0, width - square + 1, size=(num, count, 1, 1))
    rows = np.arange(height).reshape(1, 1, height, 1)
    cols = np.arange(width).reshape(1, 1, 1, width)
    inside = (rows >= tops) & (rows < tops + square) & (cols >= lefts) & (cols < lefts + square)
    return inside.any(axis=1)


def apply_holes(images: np.ndarray, holes: np.ndarray) -> np.ndarray:
    """images [N, H, W, C] with the pixels of holes [N, H, W] set to black (-1, or 0 for uint8 storage-form
    images, which decode to -1)."""
    black = BLACK if np.issubdtype(images.dtype, np.floating) else 0
    return np.where(holes[..., None], np.asarray(black, images.dtype), images)


def held_out_holes(num: int, grid: tuple[int, int], square: int, count: int, seed: int = 0) -> np.ndarray:
    """The fixed evaluation holes for `count` squares: bool [num, H, W], the same for every model."""
    return square_holes(np.random.default_rng([seed, count]), num, grid, square, count)


def with_held_out_masked(config, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`arrays` plus, when the config masks an image, its masked copy with the fixed evaluation squares
    (`data.masking.count` of them): for metrics that need every modality of held-out examples (the ELBO)."""
    spec = spec_from_config(config)
    if spec is None:
        return arrays
    images = arrays[spec.source]
    holes = held_out_holes(len(images), images.shape[1:3], spec.square, spec.count)
    return {**arrays, spec.into: apply_holes(images, holes)}


class AddMaskedImage:
    """A grain random map: element[spec.into] = element[spec.source] with fresh random holes."""

    def __init__(self, spec: MaskingSpec):
        self.spec = spec

    def __call__(self, element: dict, rng: np.random.Generator) -> dict:
        image = element[self.spec.source]  # [H, W, C]
        holes = square_holes(rng, 1, image.shape[:2], self.spec.square, self.spec.count)
        return {**element, self.spec.into: apply_holes(image[None], holes)[0]}
