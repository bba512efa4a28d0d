"""`data.source = "folder"`: the ImageFolder layout, decoded with Pillow example by example.

    ROOT/train/<class name>/<file>            images (png, jpg, jpeg, webp, bmp; class folders may nest)
    ROOT/test/<class name>/<file>
    ROOT/train_masks/<class name>/<stem>.png  optional: single-channel masks whose pixel values are class ids
    ROOT/train_vectors.npz                    optional: `names` (paths relative to ROOT/train), `vectors` [N, D]

Class ids follow the sorted class-folder names. Each image is converted to RGB (or grey with `channels=1`), halved
with a box filter while its short side is at least twice `image_size`, resized with Pillow's antialiased bicubic
filter so that its short side is `image_size`, and centre-cropped to `image_size` x `image_size` (the ADM recipe).
A mask is resized with nearest neighbour from its original size to the image's pre-crop size in one step (the same
geometry: centre-aligned scalings compose) and cropped with the same box. Vectors are standardized per dimension with
the train split's statistics. Examples come in storage form (`base.decode`): image uint8 [S, S, C], label int32 [],
mask uint8 [S, S], vector float32 [D].

Every file is checked once before training (`check`): in parallel threads (Pillow decodes without the GIL), with a
progress bar, the result cached in `cache_dir` under a key of the listing (paths, sizes, modification times), so a
resume does not repeat it. Any problem stops the run with one line naming the file.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import os
from typing import Sequence

import numpy as np
from PIL import Image

from mmdiff_jax.data.sources.base import DataError, pass_marker, remember_pass
from mmdiff_jax.data.standardize import Standardizer
from mmdiff_jax.progress import Progress

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MASK_MODES = ("L", "P", "I;16", "I")  # single-channel modes whose pixel values are class ids


@dataclasses.dataclass(frozen=True)
class Listing:
    """A split's files: `paths` relative to ROOT/<split>, sorted by class then path; `labels` [N] int32."""

    root: str
    split: str
    class_names: tuple[str, ...]
    paths: tuple[str, ...]
    labels: np.ndarray
    has_masks: bool

    @property
    def image_dir(self) -> str:
        return os.path.join(self.root, self.split)

    @property
    def mask_dir(self) -> str:
        return os.path.join(self.root, f"{self.split}_masks")

    def image_path(self, i: int) -> str:
        return os.path.join(self.image_dir, self.paths[i])

    def mask_path(self, i: int) -> str:
        return os.path.join(self.mask_dir, os.path.splitext(self.paths[i])[0] + ".png")

    @property
    def vectors_path(self) -> str:
        return os.path.join(self.root, f"{self.split}_vectors.npz")


def list_split(root: str, split: str) -> Listing:
    """The files of ROOT/<split>, without opening any; raises DataError for a missing split, an empty class folder or
    no images."""
    split_dir = os.path.join(root, split)
    if not os.path.isdir(split_dir):
        raise DataError(f"data.source_kwargs.root={root!r}: {split_dir} is not a folder; the layout is "
                        f"ROOT/{split}/<class name>/<image file>.")
    class_names = tuple(sorted(d for d in os.listdir(split_dir)
                               if os.path.isdir(os.path.join(split_dir, d)) and not d.startswith(".")))
    if not class_names:
        raise DataError(f"{split_dir}: no class folders; put the images in {split_dir}/<class name>/.")
    paths, labels = [], []
    for label, name in enumerate(class_names):
        found = []
        for dirpath, dirnames, filenames in os.walk(os.path.join(split_dir, name)):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            found += [os.path.relpath(os.path.join(dirpath, f), split_dir) for f in filenames
                      if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")]
        if not found:
            raise DataError(f"{os.path.join(split_dir, name)}: empty class folder (no {'/'.join(IMAGE_EXTENSIONS)} "
                            "files); remove it or add images.")
        paths += sorted(found)
        labels += [label] * len(found)
    has_masks = os.path.isdir(os.path.join(root, f"{split}_masks"))
    return Listing(root, split, class_names, tuple(paths), np.asarray(labels, np.int32), has_masks)


def target_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) before the centre crop: box halvings while the short side is >= 2 * size, then the scale that
    makes the short side `size`."""
    while min(width, height) >= 2 * size:
        width, height = width // 2, height // 2
    scale = size / min(width, height)
    return max(size, round(width * scale)), max(size, round(height * scale))


def crop_box(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """The centre crop (left, top, right, bottom) of a width x height image to size x size."""
    left, top = (width - size) // 2, (height - size) // 2
    return left, top, left + size, top + size


def resize_image(img: Image.Image, size: int) -> Image.Image:
    """Box halvings, antialiased bicubic to the short side `size`, centre crop; see the module docstring."""
    while min(img.size) >= 2 * size:
        img = img.resize((img.size[0] // 2, img.size[1] // 2), Image.BOX)
    new = target_size(*img.size, size)
    if new != img.size:
        img = img.resize(new, Image.BICUBIC)
    return img.crop(crop_box(*new, size))


def resize_mask(mask: Image.Image, size: int) -> Image.Image:
    """The mask on its image's geometry: one nearest-neighbour resize to the image's pre-crop size, same crop."""
    new = target_size(*mask.size, size)
    if new != mask.size:
        mask = mask.resize(new, Image.NEAREST)
    return mask.crop(crop_box(*new, size))


def load_image(path: str, size: int, channels: int) -> np.ndarray:
    """uint8 [size, size, channels]."""
    with Image.open(path) as img:
        img = img.convert("L" if channels == 1 else "RGB")
    pixels = np.asarray(resize_image(img, size), np.uint8)
    return pixels[..., None] if channels == 1 else pixels


def load_mask(path: str, size: int) -> np.ndarray:
    """uint8 [size, size] class ids."""
    with Image.open(path) as mask:
        mask.load()
        return np.asarray(resize_mask(mask, size)).astype(np.uint8)


def load_vectors(listing: Listing) -> np.ndarray | None:
    """ROOT/<split>_vectors.npz reordered to the listing's order: float64 [N, D]; None when there is no file."""
    path = listing.vectors_path
    if not os.path.exists(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in ("names", "vectors") if k not in f.files]
            if missing:
                raise DataError(f"{path}: lacks array(s) {missing} (it has {f.files}); it needs `names` (paths "
                                f"relative to {listing.image_dir}) and `vectors` [N, D].")
            names, vectors = f["names"], f["vectors"]
    except (ValueError, OSError) as e:  # object arrays (pickle) or not an npz
        raise DataError(f"{path}: not a readable .npz of plain arrays ({e}); save `names` as a string array and "
                        "`vectors` as floats with np.savez.") from None
    if vectors.ndim != 2 or len(vectors) != len(names) or not np.issubdtype(vectors.dtype, np.number):
        raise DataError(f"{path}: `vectors` must be numbers [N, D] with one row per name; got {vectors.dtype} "
                        f"{vectors.shape} for {len(names)} names.")
    index = {str(n).replace("\\", "/"): i for i, n in enumerate(names.tolist())}
    if len(index) != len(names):
        raise DataError(f"{path}: `names` holds duplicates; give each image once.")
    wanted = [p.replace(os.sep, "/") for p in listing.paths]
    absent = [p for p in wanted if p not in index]
    if absent:
        raise DataError(f"{path}: no vector for image {absent[0]!r} ({len(absent)} missing); `names` must list "
                        f"every image of {listing.image_dir} by its path relative to that folder.")
    if len(index) != len(wanted):
        extra = sorted(set(index) - set(wanted))
        raise DataError(f"{path}: names {extra[:1]} have no image in {listing.image_dir} ({len(extra)} extra); "
                        "remove them or add the images.")
    rows = vectors[[index[p] for p in wanted]].astype(np.float64)
    if not np.all(np.isfinite(rows)):
        raise DataError(f"{path}: `vectors` holds non-finite values.")
    return rows


def _check_one(listing: Listing, i: int, mask_classes: int | None) -> str | None:
    """The problem with example i, or None."""
    path = listing.image_path(i)
    try:
        with Image.open(path) as img:
            img.load()
            size = img.size
    except Exception as e:  # noqa: BLE001 - any decoder failure is a bad file
        return f"{path}: unreadable or corrupt image ({type(e).__name__}: {e}); fix or delete the file."
    if not listing.has_masks:
        return None
    mask_path = listing.mask_path(i)
    if not os.path.exists(mask_path):
        return f"{mask_path}: missing mask for {path}; every image needs a mask once {listing.mask_dir} exists."
    try:
        with Image.open(mask_path) as mask:
            mask.load()
            mode, mask_size, values = mask.mode, mask.size, np.asarray(mask)
    except Exception as e:  # noqa: BLE001
        return f"{mask_path}: unreadable or corrupt mask ({type(e).__name__}: {e}); fix or delete the file."
    if mode not in MASK_MODES:
        return f"{mask_path}: mask mode {mode}; masks must be single-channel PNGs ({', '.join(MASK_MODES)})."
    if mask_size != size:
        return (f"{mask_path}: mask size {mask_size[0]}x{mask_size[1]} differs from its image's "
                f"{size[0]}x{size[1]} ({path}); masks must match their images pixel for pixel.")
    top = int(values.max()) if values.size else 0
    limit = 256 if mask_classes is None else min(mask_classes, 256)
    if top >= limit or (values.size and int(values.min()) < 0):
        return (f"{mask_path}: mask value {top} is outside the classes 0..{limit - 1} (the mask modality's "
                "num_classes); fix the mask or raise num_classes.")
    return None


def _cache_key(listing: Listing, mask_classes: int | None) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([os.path.abspath(listing.root), listing.split, mask_classes, listing.class_names]).encode())
    for i, p in enumerate(listing.paths):
        files = [listing.image_path(i)] + ([listing.mask_path(i)] if listing.has_masks else [])
        for f in files:
            try:
                st = os.stat(f)
                h.update(f"{p}|{st.st_size}|{st.st_mtime_ns};".encode())
            except OSError:
                h.update(f"{p}|missing;".encode())
    if os.path.exists(listing.vectors_path):
        st = os.stat(listing.vectors_path)
        h.update(f"vectors|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:24]


def check(listing: Listing, mask_classes: int | None = None, cache_dir: str | None = None,
          workers: int | None = None) -> None:
    """Open every image (and mask) of the split once; raise DataError naming the first bad file. A pass is
    remembered in `cache_dir` (nothing is cached when it is None). The vectors file is checked by `load_vectors`."""
    marker = pass_marker(cache_dir, f"folder_check_{listing.split}_{_cache_key(listing, mask_classes)}")
    if marker and os.path.exists(marker):
        return
    workers = workers or len(os.sched_getaffinity(0))
    progress = Progress(len(listing.paths), f"checking {listing.image_dir}")
    problems = []
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        chunk, n = 64, len(listing.paths)

        def run(start: int) -> list[str | None]:
            return [_check_one(listing, i, mask_classes) for i in range(start, min(start + chunk, n))]

        for result in pool.map(run, range(0, n, chunk)):
            problems += [p for p in result if p]
            progress.update(len(result))
    progress.close()
    if problems:
        more = f" ({len(problems) - 1} more problem(s) after this one)" if len(problems) > 1 else ""
        raise DataError(problems[0] + more)
    remember_pass(marker, f"{len(listing.paths)} files")


@dataclasses.dataclass(frozen=True)
class FolderSource:
    """Random access to a checked split; see the module docstring."""

    listing: Listing
    image_size: int
    channels: int
    vectors: np.ndarray | None  # float32 [N, D], standardized, or None
    keys: tuple[str, ...]
    bin_width: float = 2.0 / 255.0

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.listing.class_names

    def __len__(self) -> int:
        return len(self.listing.paths)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        i = int(index)
        out = {}
        if "image" in self.keys:
            out["image"] = load_image(self.listing.image_path(i), self.image_size, self.channels)
        if "label" in self.keys:
            out["label"] = np.asarray(self.listing.labels[i], np.int32)
        if "mask" in self.keys:
            out["mask"] = load_mask(self.listing.mask_path(i), self.image_size)
        if "vector" in self.keys:
            out["vector"] = self.vectors[i]
        return out

    def select(self, names: Sequence[str]) -> "FolderSource":
        return dataclasses.replace(self, keys=tuple(k for k in self.keys if k in set(names)))


def folder(split: str, root: str = "", image_size: int = 0, channels: int = 3, mask_classes: int | None = None,
           cache_dir: str | None = None) -> FolderSource:
    """The checked split of an ImageFolder root (see the module docstring)."""
    if not root:
        raise DataError("data.source='folder' needs data.source_kwargs.root: the folder that holds train/ and test/ "
                        "(--config.data.source_kwargs.root=PATH).")
    if not (isinstance(image_size, int) and image_size >= 1):
        raise DataError(f"data.image_size={image_size!r}: the folder source needs the side of the square images to "
                        "train on, e.g. --config.data.image_size=32.")
    if channels not in (1, 3):
        raise DataError(f"data.channels={channels!r}: use 3 (RGB) or 1 (grey).")
    listing = list_split(root, split)
    train_listing = listing if split == "train" else list_split(root, "train")
    if listing.class_names != train_listing.class_names:
        differ = sorted(set(listing.class_names) ^ set(train_listing.class_names))
        raise DataError(f"{listing.image_dir}: its class folders differ from {train_listing.image_dir}'s "
                        f"(first difference: {differ[0]!r}); both splits need the same class folders.")
    vectors = load_vectors(listing)  # its problems are reported before the (slower) check of every file
    check(listing, mask_classes, cache_dir)
    if vectors is not None:
        train_vectors = vectors if split == "train" else load_vectors(train_listing)
        if train_vectors is None or train_vectors.shape[1] != vectors.shape[1]:
            raise DataError(f"{listing.vectors_path}: standardizing it needs {root}/train_vectors.npz with the same "
                            f"dimension {vectors.shape[1]}.")
        vectors = Standardizer.fit(train_vectors)(vectors)
    keys = ("image", "label") + (("mask",) if listing.has_masks else ()) + (("vector",) if vectors is not None else ())
    return FolderSource(listing, image_size, channels, vectors, keys)
