"""Data sources, one module each, named by `data.source`:

  embedded (no files to bring): digits, digits_masks, shapes, mnist_5k, fashion_mnist  -> sources/embedded.py
  folder         an ImageFolder root of image files (+ masks, vectors)                  -> sources/folder.py
  imagenet64     the downsampled-ImageNet npz files                                     -> sources/imagenet64.py
  array_record   shards written by `python -m mmdiff_jax.data.prepare`                  -> sources/array_record.py

Every source is random access (`len`, `[i]` -> {key: array} in storage form, `select`); `base.decode` gives the
model's form. `load(config, split, workdir)` builds the one a config names; `for_eval` holds (at most
`eval.max_data_examples` of) a split in memory for the metrics.
"""

from __future__ import annotations

import os
from typing import Callable

from mmdiff_jax.data.sources import array_record, embedded, folder, imagenet64
from mmdiff_jax.data.sources.base import ArraySource, decode, materialize
from mmdiff_jax.errors import UserError

SOURCES: dict[str, Callable] = {
    "digits": embedded.digits, "digits_masks": embedded.digits_masks, "shapes": embedded.shapes,
    "mnist_5k": embedded.mnist_5k, "fashion_mnist": embedded.fashion_mnist,
    "folder": folder.folder, "imagenet64": imagenet64.imagenet64, "array_record": array_record.array_record}
FILE_SOURCES = ("folder", "imagenet64", "array_record")  # shapes and classes come from the data

__all__ = ["ArraySource", "SOURCES", "FILE_SOURCES", "decode", "materialize", "get_source", "load", "for_eval"]


def get_source(name: str, split: str, **kwargs):
    if name not in SOURCES:
        raise UserError(f"data.source: unknown dataset {name!r}; the sources are {sorted(SOURCES)}.")
    if split not in ("train", "test"):
        raise UserError(f"split must be 'train' or 'test', got {split!r}.")
    return SOURCES[name](split, **kwargs)


def mask_classes(config) -> int | None:
    """num_classes of the config's mask modality (the bound a folder's mask values are checked against)."""
    for m in config.modalities.values():
        if dict(m).get("kind") == "mask" and dict(m).get("num_classes"):
            return int(dict(m)["num_classes"])
    return None


def source_kwargs(config, workdir: str | None = None) -> dict:
    """`data.source_kwargs` plus what the file sources take from the rest of `config.data` (and the workdir, where
    their file checks are cached)."""
    kwargs = dict(config.data.source_kwargs)
    cache_dir = os.path.join(workdir, "data_check") if workdir else None
    name = config.data.source
    if name == "folder":
        kwargs.update(image_size=int(config.data.image_size), channels=int(config.data.channels),
                      mask_classes=mask_classes(config), cache_dir=cache_dir)
    elif name == "imagenet64":
        kwargs.update(image_size=int(config.data.image_size))
    elif name == "array_record":
        kwargs.update(cache_dir=cache_dir)
    return kwargs


def load(config, split: str, workdir: str | None = None):
    """The split named by `config.data` (storage form)."""
    return get_source(config.data.source, split, **source_kwargs(config, workdir))


def for_eval(config, split: str, workdir: str | None = None) -> ArraySource:
    """The split in memory and in model form: all of it, or a seeded spread of `eval.max_data_examples` examples for
    the file sources."""
    limit = int(config.eval.get("max_data_examples", 0)) if config.data.source in FILE_SOURCES else 0
    return materialize(load(config, split, workdir), limit)
