"""Random-access data sources, each a deterministic function of its seed: {modality name: array} per example.

`digits`: scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes, grey levels 0..16), scaled to
[-1, 1] as x / 8 - 1 (so the 17 levels sit on a grid of spacing 1/8), split once by a seeded stratified permutation
into train and held-out test.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from mmdiff_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class ArraySource:
    """A random-access source over aligned arrays: example i = {key: arrays[key][i]}."""

    arrays: dict[str, np.ndarray]
    bin_width: float | None = None  # grid spacing of the image data, if discrete

    def __post_init__(self):
        lengths = {k: len(v) for k, v in self.arrays.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"data source arrays differ in length: {lengths}.")

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {k: v[index] for k, v in self.arrays.items()}


def digits(split: str, test_fraction: float = 0.2, seed: int = 0) -> ArraySource:
    """{'image': float32 [8, 8, 1] in [-1, 1], 'label': int32} for split 'train' or 'test'."""
    from sklearn.datasets import load_digits  # ships the data; imported lazily (slow import)

    data = load_digits()
    images = (data.images.astype(np.float32) / 8.0 - 1.0)[..., None]
    labels = data.target.astype(np.int32)
    rng = np.random.default_rng(seed)
    test_idx = []
    for k in range(10):  # stratified: the same fraction of every class
        idx = np.flatnonzero(labels == k)
        test_idx.extend(rng.permutation(idx)[: int(round(test_fraction * len(idx)))])
    is_test = np.zeros(len(labels), bool)
    is_test[test_idx] = True
    keep = is_test if split == "test" else ~is_test
    return ArraySource({"image": images[keep], "label": labels[keep]}, bin_width=1.0 / 8.0)


SOURCES: dict[str, Callable[..., ArraySource]] = {"digits": digits}


def get_source(name: str, split: str, **kwargs) -> ArraySource:
    if name not in SOURCES:
        raise UserError(f"data.source: unknown dataset {name!r}; the embedded datasets are {sorted(SOURCES)}.")
    if split not in ("train", "test"):
        raise UserError(f"split must be 'train' or 'test', got {split!r}.")
    return SOURCES[name](split, **kwargs)
