"""Shapes that follow the data. For the file sources (folder, imagenet64, array_record) the config leaves them unset
and `resolve` fills them in from the data before anything is built:

  latent_shape                          (S, S, C) of the images
  modalities.<image or pixels>.shape    the latent shape
  modalities.<mask>.shape               the latent's grid (S, S)
  modalities.<label>.num_classes        the number of classes (class folders, ImageNet's 1000)
  modalities.<vector>.shape             (D,) of the data's vectors
  model.channels                        model.width x ADM's channel multipliers for S, when model.width > 0

A value the config does give must agree with the data; a disagreement is an error naming the field.
"""

from __future__ import annotations

import dataclasses
import os

from mmdiff_jax.data.sources import array_record, folder, imagenet64
from mmdiff_jax.data.sources.base import npz_array_shape
from mmdiff_jax.errors import UserError

# Channel multipliers per level by image side (guided-diffusion's defaults from 32 up; 8, 16 and 28 for small data):
# the U-Net goes down to 4x4 (7x7 at 28), and to 8x8 from 64 up.
CHANNEL_MULTS = {8: (1, 2), 16: (1, 2, 2), 28: (1, 2), 32: (1, 2, 2, 2), 64: (1, 2, 3, 4), 128: (1, 1, 2, 3, 4),
                 256: (1, 1, 2, 2, 4, 4)}


@dataclasses.dataclass(frozen=True)
class DataShapes:
    image_shape: tuple[int, int, int]
    num_classes: int | None
    vector_dim: int | None


def describe(config) -> DataShapes | None:
    """What a file source's data looks like, read cheaply (a listing, headers, info.json); None for the embedded
    sources, whose configs state their shapes."""
    name, kwargs = config.data.source, dict(config.data.source_kwargs)
    if name == "folder":
        size, channels = int(config.data.image_size), int(config.data.channels)
        if size < 1:
            raise UserError("data.image_size: the folder source needs the side of the square images to train on, "
                            "e.g. --config.data.image_size=32.")
        listing = folder.list_split(kwargs.get("root", "") or _missing("data.source_kwargs.root"), "train")
        vector_dim = None
        if os.path.exists(listing.vectors_path):
            shape, _ = npz_array_shape(listing.vectors_path, "vectors")
            vector_dim = int(shape[-1])
        return DataShapes((size, size, channels), len(listing.class_names), vector_dim)
    if name == "imagenet64":
        files = imagenet64.split_files(kwargs.get("root", "") or _missing("data.source_kwargs.root"), "train")
        side = imagenet64.image_side(files[0])
        return DataShapes((side, side, 3), imagenet64.NUM_CLASSES, None)
    if name == "array_record":
        info = array_record.read_info(kwargs.get("path", "") or _missing("data.source_kwargs.path"))
        fields = {f["key"]: tuple(f["shape"]) for f in info["fields"]}
        if "image" not in fields:
            raise UserError(f"{kwargs['path']}: the shards hold no images (fields {sorted(fields)}).")
        size = int(config.data.image_size)
        if size and tuple(fields["image"][:2]) != (size, size):
            raise UserError(f"data.image_size={size}: the shards in {kwargs['path']} hold {fields['image'][0]}x"
                            f"{fields['image'][1]} images; set it to 0 (or theirs), or prepare them at {size}.")
        names = info.get("class_names")
        return DataShapes(tuple(fields["image"]), len(names) if names else info.get("num_classes"),
                          fields["vector"][0] if "vector" in fields else None)
    return None


def _missing(field: str):
    raise UserError(f"{field}: not set; give it on the command line (--config.{field}=PATH).")


def _agree(field: str, given, from_data):
    """The data's value where the config leaves the field unset (None, 0, ()); an error where they differ."""
    if given in (None, 0, ()) or (isinstance(given, (tuple, list)) and not len(given)):
        return from_data
    same = tuple(given) == tuple(from_data) if isinstance(given, (tuple, list)) else given == from_data
    if not same:
        raise UserError(f"{field}={given!r} disagrees with the data ({from_data!r}); leave it unset so it follows the "
                        "data.")
    return from_data


def channels_for(width: int, side: int) -> tuple[int, ...]:
    """model.width x the channel multipliers for images of this side."""
    mults = CHANNEL_MULTS.get(side) or CHANNEL_MULTS[min(CHANNEL_MULTS, key=lambda s: abs(s - side))]
    return tuple(width * m for m in mults)


def resolve(config):
    """A copy of `config` with the shapes that follow the data filled in (see the module docstring); embedded
    sources only get `model.channels` from `model.width`."""
    resolved = config.copy_and_resolve_references()
    data = describe(resolved)
    if data is not None:
        latent = tuple(int(x) for x in data.image_shape)
        resolved.latent_shape = _agree("latent_shape", resolved.get("latent_shape"), latent)
        for name, m in resolved.modalities.items():
            kind = m.get("kind")
            if kind in ("image", "pixels"):
                m["shape"] = _agree(f"modalities.{name}.shape", m.get("shape"), latent)
            elif kind == "mask":
                m["shape"] = _agree(f"modalities.{name}.shape", m.get("shape"), latent[:2])
                if not m.get("num_classes"):
                    raise UserError(f"modalities.{name}.num_classes: give the number of mask classes (every mask "
                                    f"value lies in 0..K-1): --config.modalities.{name}.num_classes=K.")
            elif kind == "label" and data.num_classes:
                m["num_classes"] = _agree(f"modalities.{name}.num_classes", m.get("num_classes"), data.num_classes)
            elif kind == "vector" and data.vector_dim:
                m["shape"] = _agree(f"modalities.{name}.shape", m.get("shape"), (data.vector_dim,))
    width = int(resolved.model.get("width", 0) or 0)
    if width > 0:
        latent = resolved.latent_shape
        if not latent or latent[0] != latent[1]:
            raise UserError(f"model.width={width} picks the U-Net's levels for square images; the latent is {latent}. "
                            "Set model.channels instead (and model.width=0).")
        resolved.model.channels = channels_for(width, int(latent[0]))
    return resolved
