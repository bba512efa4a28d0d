"""Metrics in an evaluator's feature space: Fréchet distance and improved precision/recall (Kynkäänniemi et al.
2019, k-NN manifolds). Inputs are feature matrices [N, D] (float64 numpy)."""

from __future__ import annotations

import numpy as np
import scipy.linalg


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^{1/2})."""
    a, b = np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = np.real(scipy.linalg.sqrtm(cov_a @ cov_b))
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a + cov_b - 2.0 * covmean))


def _pairwise_sq(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.maximum(np.sum(a**2, 1)[:, None] + np.sum(b**2, 1)[None, :] - 2.0 * a @ b.T, 0.0)


def _knn_radii(feats: np.ndarray, k: int) -> np.ndarray:
    d = _pairwise_sq(feats, feats)
    return np.sort(d, axis=1)[:, k]  # index 0 is the point itself


def _coverage(query: np.ndarray, support: np.ndarray, radii: np.ndarray) -> float:
    """Fraction of query points inside at least one support point's k-NN ball."""
    return float(np.mean(np.any(_pairwise_sq(query, support) <= radii[None, :], axis=1)))


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Improved precision (fake inside the real manifold) and recall (real inside the fake manifold)."""
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    precision = _coverage(fake, real, _knn_radii(real, k))
    recall = _coverage(real, fake, _knn_radii(fake, k))
    return precision, recall
