"""What every data source is: random access to examples, {key: numpy array} each, in a *storage* form that
`decode` turns into the model's form.

Model form: images float32 [H, W, C] in [-1, 1], labels int32 [], masks int32 [H, W], vectors float32 [D].
Storage form: the same, except that the file-backed sources keep images and masks as uint8 (4x fewer bytes through
grain's worker processes and shared memory); `decode` works on one example or on a batch alike, so the pipeline
decodes whole batches in the main process.
"""

from __future__ import annotations

import dataclasses
import os
import zipfile
from typing import Protocol, Sequence

import numpy as np

from mmdiff_jax.errors import UserError

class DataError(UserError):
    """A file of the data is missing, unreadable or inconsistent; the message names it."""


def pass_marker(cache_dir: str | None, name: str) -> str | None:
    """The file that remembers a passed data check `name` in `cache_dir` (None: nothing is remembered)."""
    return os.path.join(cache_dir, f"{name}.ok") if cache_dir else None


def remember_pass(marker: str | None, text: str) -> None:
    """Write a pass marker atomically (a per-process temporary, then a rename: processes may race)."""
    if marker is None:
        return
    os.makedirs(os.path.dirname(marker), exist_ok=True)
    tmp = f"{marker}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(text + "\n")
    os.replace(tmp, marker)


IMAGE_KEYS = ("image",)  # storage-form uint8 keys decoded to [-1, 1]
MASK_KEYS = ("mask",)  # storage-form uint8 keys decoded to int32 class ids


# uint8 level -> float32, computed as the embedded uint8 datasets compute it (x / 127.5 - 1 in float32)
_UNIT_LEVELS = np.arange(256, dtype=np.uint8).astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def decode(example: dict[str, np.ndarray], image_keys: Sequence[str] = IMAGE_KEYS) -> dict[str, np.ndarray]:
    """Storage form -> model form, for one example or a batch: uint8 images (the keys `image_keys`, e.g. with a
    masked copy's) -> float32 x / 127.5 - 1 (the grid of spacing 2/255 on [-1, 1]), uint8 masks -> int32; everything
    else as it is."""
    out = {}
    for key, value in example.items():
        value = np.asarray(value)
        if value.dtype == np.uint8 and key in image_keys:
            value = _UNIT_LEVELS[value]  # a table look-up: 3x faster than converting and scaling
        elif value.dtype == np.uint8 and key in MASK_KEYS:
            value = value.astype(np.int32)
        out[key] = value
    return out


class Source(Protocol):
    """A random-access split of a dataset."""

    bin_width: float | None  # grid spacing of the decoded image data, if discrete
    class_names: Sequence[str] | None  # label id -> name, where the data names its classes

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, np.ndarray]: ...  # storage form

    @property
    def keys(self) -> tuple[str, ...]: ...  # what each example holds

    def select(self, names) -> "Source": ...  # only these keys


@dataclasses.dataclass(frozen=True)
class ArraySource:
    """A random-access source over aligned in-memory arrays: example i = {key: arrays[key][i]}."""

    arrays: dict[str, np.ndarray]
    bin_width: float | None = None  # grid spacing of the image data, if discrete
    class_names: tuple[str, ...] | None = None

    def __post_init__(self):
        lengths = {k: len(v) for k, v in self.arrays.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"data source arrays differ in length: {lengths}.")

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(self.arrays)

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {k: v[index] for k, v in self.arrays.items()}

    def select(self, names) -> "ArraySource":
        """Only the arrays named (those present; a missing one is reported by the batch check)."""
        return dataclasses.replace(self, arrays={k: v for k, v in self.arrays.items() if k in set(names)})

    def first(self, n: int) -> "ArraySource":
        """The first n examples (all of them when n >= len(self))."""
        return dataclasses.replace(self, arrays={k: v[:n] for k, v in self.arrays.items()})


def spread_indices(length: int, limit: int, seed: int = 0) -> np.ndarray:
    """At most `limit` of range(length): all of them when they fit, else a seeded random subset in increasing order
    (file-backed splits are sorted by class, so their first examples would be one class)."""
    if limit <= 0 or length <= limit:
        return np.arange(length)
    return np.sort(np.random.default_rng(seed).permutation(length)[:limit])


def materialize(source, limit: int = 0) -> ArraySource:
    """An in-memory ArraySource in model form of at most `limit` examples of any source (0: all)."""
    if isinstance(source, ArraySource) and (limit <= 0 or len(source) <= limit):
        return dataclasses.replace(source, arrays=decode(source.arrays))  # model-form arrays pass through as they are
    rows = [source[int(i)] for i in spread_indices(len(source), limit)]
    arrays = decode({k: np.stack([r[k] for r in rows]) for k in rows[0]})
    return ArraySource(arrays, bin_width=source.bin_width, class_names=source.class_names)


def npz_array_shape(path: str, name: str) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of array `name` of an npz, read from its header without loading it."""
    try:
        with zipfile.ZipFile(path) as z, z.open(f"{name}.npy") as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, _, dtype = read_header(f)
        return tuple(shape), np.dtype(dtype)
    except KeyError:
        raise DataError(f"{path}: no array {name!r}; the file lacks it.") from None
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise DataError(f"{path}: not a readable npz ({e}); download or copy it again.") from None
