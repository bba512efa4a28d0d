"""Per-dimension standardization of vectors with the training split's statistics."""

from __future__ import annotations

import dataclasses

import numpy as np

STD_FLOOR = 1e-3  # a constant feature (e.g. a ReLU that never fires) stays 0 after standardization


@dataclasses.dataclass
class Standardizer:
    mean: np.ndarray  # [D]
    std: np.ndarray  # [D]

    @classmethod
    def fit(cls, train_vectors: np.ndarray) -> "Standardizer":
        return cls(train_vectors.mean(0), np.maximum(train_vectors.std(0), STD_FLOOR))

    def __call__(self, vectors: np.ndarray) -> np.ndarray:
        return ((vectors - self.mean) / self.std).astype(np.float32)
