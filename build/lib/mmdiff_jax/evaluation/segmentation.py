"""Segmentation metrics over a whole set of masks: the confusion matrix and mean intersection-over-union."""

from __future__ import annotations

import numpy as np


def confusion_matrix(pred: np.ndarray, target: np.ndarray, num_classes: int) -> np.ndarray:
    """Pixel counts [K, K]: row = target class, column = predicted class. pred, target: int [N, H, W]."""
    if pred.shape != target.shape:
        raise ValueError(f"pred {pred.shape} and target {target.shape} masks differ in shape.")
    idx = target.astype(np.int64).ravel() * num_classes + pred.astype(np.int64).ravel()
    return np.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def mean_iou(pred: np.ndarray, target: np.ndarray, num_classes: int) -> float:
    """IoU of every class accumulated over the whole set, averaged over the classes that occur in `target` or
    `pred` (a class absent from both is not counted)."""
    cm = confusion_matrix(pred, target, num_classes).astype(np.float64)
    intersection = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - intersection
    present = union > 0
    return float(np.mean(intersection[present] / union[present]))


def pixel_accuracy(pred: np.ndarray, target: np.ndarray) -> float:
    return float(np.mean(pred == target))
