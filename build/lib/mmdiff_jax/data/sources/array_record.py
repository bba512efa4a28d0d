"""`data.source = "array_record"`: ArrayRecord shards written by `python -m mmdiff_jax.data.prepare`, read through
grain's random-access ArrayRecordDataSource (global shuffle over every shard; each process reads only its rows).

    DIR/info.json                                  counts, fields, class names, a SHA-256 and size per shard
    DIR/{train,test}-NNNNN-of-MMMMM.array_record   one record per example: its fields' raw bytes, concatenated

A record is the example in storage form (`base.decode`), fixed-size: for each field of `info.json["fields"]` in
order, `dtype` [shape] in C order. Parsing is `np.frombuffer` and slicing; nothing is decoded.

Before use every shard is verified (present, of its recorded size and record count, and its SHA-256); a pass is
remembered in `cache_dir` under the shards' sizes and modification times, so a resume does not hash again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Sequence

import numpy as np

from mmdiff_jax.data.sources.base import DataError, pass_marker, remember_pass

INFO = "info.json"
FORMAT = "mmdiff_jax.array_record.v1"


@dataclasses.dataclass(frozen=True)
class Field:
    key: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(np.dtype(self.dtype).itemsize * np.prod(self.shape, dtype=np.int64))


@dataclasses.dataclass(frozen=True)
class Layout:
    """The fixed byte layout of one record."""

    fields: tuple[Field, ...]

    @classmethod
    def of_example(cls, example: dict[str, np.ndarray]) -> "Layout":
        return cls(tuple(Field(k, np.asarray(v).dtype.str, tuple(np.shape(v))) for k, v in example.items()))

    @classmethod
    def from_json(cls, fields: list) -> "Layout":
        return cls(tuple(Field(f["key"], f["dtype"], tuple(f["shape"])) for f in fields))

    def to_json(self) -> list:
        return [{"key": f.key, "dtype": f.dtype, "shape": list(f.shape)} for f in self.fields]

    @property
    def nbytes(self) -> int:
        return sum(f.nbytes for f in self.fields)

    def encode(self, example: dict[str, np.ndarray]) -> bytes:
        parts = []
        for f in self.fields:
            value = np.asarray(example[f.key], dtype=np.dtype(f.dtype))
            if value.shape != f.shape:
                raise ValueError(f"field {f.key!r}: shape {value.shape}, the layout says {f.shape}.")
            parts.append(value.tobytes())
        return b"".join(parts)

    def decode(self, record: bytes, keys: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """One record -> {key: array} (views into the record's bytes) of the keys asked for (default all)."""
        buffer, offset, out = np.frombuffer(record, np.uint8), 0, {}
        for f in self.fields:
            if keys is None or f.key in keys:
                out[f.key] = buffer[offset:offset + f.nbytes].view(np.dtype(f.dtype)).reshape(f.shape)
            offset += f.nbytes
        return out


def shard_name(split: str, index: int, count: int) -> str:
    return f"{split}-{index:05d}-of-{count:05d}.array_record"


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def read_info(path: str) -> dict:
    """DIR/info.json, checked for the fields this reader needs."""
    info_path = os.path.join(path, INFO)
    if not os.path.isdir(path):
        raise DataError(f"data.source_kwargs.path={path!r}: not a folder; write one with "
                        "python -m mmdiff_jax.data.prepare --out DIR.")
    try:
        with open(info_path) as f:
            info = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"{info_path}: missing or unreadable ({e}); it is written by python -m "
                        "mmdiff_jax.data.prepare, rerun it.") from None
    if info.get("format") != FORMAT or "splits" not in info or "fields" not in info:
        raise DataError(f"{info_path}: not an info file of {FORMAT}; rerun python -m mmdiff_jax.data.prepare.")
    return info


def _verify_key(path: str, shards: list) -> str:
    h = hashlib.sha256(os.path.abspath(path).encode())
    for s in shards:
        try:
            st = os.stat(os.path.join(path, s["file"]))
            h.update(f"{s['file']}|{s['sha256']}|{st.st_size}|{st.st_mtime_ns};".encode())
        except OSError:
            h.update(f"{s['file']}|missing;".encode())
    return h.hexdigest()[:24]


def verify(path: str, split: str, info: dict, cache_dir: str | None = None) -> None:
    """Every shard of the split present, of its recorded size and record count, with its recorded SHA-256; raise
    DataError naming the first that is not."""
    if split not in info["splits"]:
        raise DataError(f"{os.path.join(path, INFO)}: no split {split!r} (it has {sorted(info['splits'])}).")
    shards = info["splits"][split]["shards"]
    marker = pass_marker(cache_dir, f"array_record_check_{split}_{_verify_key(path, shards)}")
    if marker and os.path.exists(marker):
        return
    from array_record.python.array_record_module import ArrayRecordReader

    fix = "rerun python -m mmdiff_jax.data.prepare to write the directory again"
    for s in shards:
        shard = os.path.join(path, s["file"])
        if not os.path.exists(shard):
            raise DataError(f"{shard}: missing shard ({len(shards)} listed in {INFO}); {fix}.")
        size = os.path.getsize(shard)
        if size != s["bytes"]:
            raise DataError(f"{shard}: {size} bytes, {INFO} says {s['bytes']} (truncated or replaced); {fix}.")
        if file_sha256(shard) != s["sha256"]:
            raise DataError(f"{shard}: its SHA-256 differs from {INFO}'s (corrupt or from another run); {fix}.")
        try:
            reader = ArrayRecordReader(shard)
            count = reader.num_records()
            reader.close()
        except Exception as e:  # noqa: BLE001 - the reader's own failure means an unusable shard
            raise DataError(f"{shard}: not a readable ArrayRecord file ({e}); {fix}.") from None
        if count != s["count"]:
            raise DataError(f"{shard}: {count} records, {INFO} says {s['count']}; {fix}.")
    remember_pass(marker, f"{len(shards)} shards")


class ArrayRecordSource:
    """Random access to a verified split: example i -> {key: array} in storage form (see the module docstring)."""

    def __init__(self, path: str, split: str, info: dict, keys: Sequence[str] | None = None):
        self.path, self.split, self.info = path, split, info
        self.layout = Layout.from_json(info["fields"])
        self.keys = tuple(f.key for f in self.layout.fields if keys is None or f.key in keys)
        self.paths = [os.path.join(path, s["file"]) for s in info["splits"][split]["shards"]]
        self.length = int(info["splits"][split]["count"])
        self.bin_width = info.get("bin_width")
        names = info.get("class_names")
        self.class_names = tuple(names) if names else None
        self._reader = None

    def __getstate__(self):  # grain's worker processes get the paths and reopen the shards
        return {k: v for k, v in self.__dict__.items() if k != "_reader"} | {"_reader": None}

    def _records(self):
        if self._reader is None:
            import grain

            self._reader = grain.sources.ArrayRecordDataSource(self.paths)
        return self._reader

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return self.layout.decode(self._records()[int(index)], self.keys)

    def read_batch(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
        """Examples `indices` stacked: {key: [len(indices), *shape]}, parsed in one pass over their bytes."""
        records = self._records()
        rows = np.frombuffer(b"".join([records[int(i)] for i in indices]), np.uint8).reshape(len(indices), -1)
        out, offset = {}, 0
        for f in self.layout.fields:
            if f.key in self.keys:
                column = np.ascontiguousarray(rows[:, offset:offset + f.nbytes])
                out[f.key] = column.view(np.dtype(f.dtype)).reshape((len(indices),) + f.shape)
            offset += f.nbytes
        return out

    def select(self, names: Sequence[str]) -> "ArrayRecordSource":
        return ArrayRecordSource(self.path, self.split, self.info, [k for k in self.keys if k in set(names)])


def array_record(split: str, path: str = "", cache_dir: str | None = None) -> ArrayRecordSource:
    """The verified split of a prepared directory."""
    if not path:
        raise DataError("data.source='array_record' needs data.source_kwargs.path: a directory written by "
                        "python -m mmdiff_jax.data.prepare (--config.data.source_kwargs.path=DIR).")
    info = read_info(path)
    verify(path, split, info, cache_dir)
    return ArrayRecordSource(path, split, info)
