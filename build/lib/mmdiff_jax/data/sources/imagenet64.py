"""`data.source = "imagenet64"`: the downsampled ImageNet of Chrabaszcz et al. (2017) in its npz form.

    ROOT/train_data_batch_1.npz ... train_data_batch_10.npz    train split
    ROOT/val_data.npz                                          test split

Each file holds `data` uint8 [N, 3 * S * S] (channel-major: all red, then green, then blue; S = 64 for ImageNet64x64,
32 and 16 for the smaller variants) and `labels` 1..1000; read with `allow_pickle=False` (the optional `mean` array is
ignored). Examples come in storage form: image uint8 [S, S, 3], label int32 0..999.

The source holds the split in memory as uint8 (ImageNet64's train split is 15.7 GB): for training at that scale write
ArrayRecord shards with `python -m mmdiff_jax.data.prepare --source imagenet64` and use `data.source =
"array_record"`, which reads them lazily.
"""

from __future__ import annotations

import glob
import os
import re
import zipfile

import numpy as np

from mmdiff_jax.data.sources.base import ArraySource, DataError, npz_array_shape

NUM_CLASSES = 1000


def split_files(root: str, split: str) -> list[str]:
    """The split's npz files, train batches in numeric order."""
    if split == "train":
        files = glob.glob(os.path.join(root, "train_data_batch_*.npz"))
        files.sort(key=lambda p: int(re.findall(r"(\d+)\.npz$", p)[0]) if re.findall(r"(\d+)\.npz$", p) else 0)
    else:
        files = [p for p in [os.path.join(root, "val_data.npz")] if os.path.exists(p)]
    if not files:
        want = "train_data_batch_*.npz" if split == "train" else "val_data.npz"
        raise DataError(f"data.source_kwargs.root={root!r}: no {want}; point it at the folder holding the "
                        "downsampled-ImageNet npz files (train_data_batch_1..10.npz and val_data.npz).")
    return files


def image_side(path: str) -> int:
    """S of a file's [N, 3 * S * S] `data`."""
    shape, dtype = npz_array_shape(path, "data")
    side = int(round((shape[1] / 3) ** 0.5)) if len(shape) == 2 else 0
    if dtype != np.uint8 or len(shape) != 2 or 3 * side * side != shape[1]:
        raise DataError(f"{path}: `data` is {dtype} {shape}; downsampled ImageNet stores uint8 [N, 3 * S * S].")
    return side


def read_file(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, S, S, 3], labels int32 [N] in 0..999) of one npz file."""
    side = image_side(path)
    try:
        with np.load(path, allow_pickle=False) as f:
            data, labels = f["data"], np.asarray(f["labels"])
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise DataError(f"{path}: unreadable without pickle ({e}); download or copy it again.") from None
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: `labels` is {labels.dtype} {labels.shape}; expected integers [{len(data)}].")
    if labels.size and (labels.min() < 1 or labels.max() > NUM_CLASSES):
        raise DataError(f"{path}: labels in [{labels.min()}, {labels.max()}]; downsampled ImageNet numbers its "
                        f"classes 1..{NUM_CLASSES}.")
    images = data.reshape(len(data), 3, side, side).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), (labels - 1).astype(np.int32)


def imagenet64(split: str, root: str = "", image_size: int = 0) -> ArraySource:
    """The split of ROOT's npz files (see the module docstring). `image_size`: 0, or the files' side S."""
    if not root:
        raise DataError("data.source='imagenet64' needs data.source_kwargs.root: the folder of the npz files.")
    files = split_files(root, split)
    sides = {p: image_side(p) for p in files}
    if image_size and any(s != image_size for s in sides.values()):
        bad = next(p for p, s in sides.items() if s != image_size)
        raise DataError(f"{bad}: {sides[bad]}x{sides[bad]} images, but data.image_size={image_size}; use the npz "
                        "files of that size or set data.image_size to theirs.")
    parts = [read_file(p) for p in files]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return ArraySource({"image": images, "label": labels}, bin_width=2.0 / 255.0)
