"""Write a dataset as ArrayRecord shards for `data.source = "array_record"`.

    python -m mmdiff_jax.data.prepare --source folder --root ~/data/pets --out ~/data/pets32 --image_size 32
    python -m mmdiff_jax.data.prepare --source imagenet64 --root ~/data/imagenet64_npz --out ~/data/imagenet64_ar

Output: `OUT/{train,test}-NNNNN-of-MMMMM.array_record` (one record per example, its storage-form fields' raw bytes:
see `sources/array_record.py`) and `OUT/info.json` (counts, field shapes and dtypes, class names, the size and
SHA-256 of every shard). Examples keep the source's order; training shuffles globally. Shards are written by one
process per core. The run writes into a temporary folder beside OUT and renames it at the end:
a failed or interrupted run leaves nothing at OUT, and an existing OUT is never touched.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import multiprocessing
import os
import shutil
import sys
import time

from mmdiff_jax.data import sources
from mmdiff_jax.data.sources import array_record, imagenet64
from mmdiff_jax.data.sources.array_record import Layout
from mmdiff_jax.errors import UserError
from mmdiff_jax.progress import Progress

SHARD_BYTES = 64 << 20  # default shard size: about 64 MB of records

_SOURCE = {}  # split -> source, in each worker process (`_set_sources`)


def _set_sources(by_split: dict) -> None:
    _SOURCE.update(by_split)


def _write_shard(path: str, layout: Layout, examples) -> dict:
    """Write examples to one shard; its file name, count, size and SHA-256."""
    from array_record.python.array_record_module import ArrayRecordWriter

    writer = ArrayRecordWriter(path, "group_size:1")
    count = 0
    for example in examples:
        writer.write(layout.encode(example))
        count += 1
    writer.close()
    return {"file": os.path.basename(path), "count": count, "bytes": os.path.getsize(path),
            "sha256": array_record.file_sha256(path)}


def _source_task(split: str, start: int, stop: int, path: str, layout_json: list) -> list[dict]:
    """Examples [start, stop) of a forked-in source -> one shard."""
    source = _SOURCE[split]
    return [_write_shard(path, Layout.from_json(layout_json), (source[i] for i in range(start, stop)))]


def _npz_task(file: str, shard_paths: list[str], per_shard: int, layout_json: list) -> list[dict]:
    """One downsampled-ImageNet npz file -> its shards."""
    images, labels = imagenet64.read_file(file)
    layout = Layout.from_json(layout_json)
    out = []
    for k, path in enumerate(shard_paths):
        lo, hi = k * per_shard, min((k + 1) * per_shard, len(images))
        out.append(_write_shard(path, layout, ({"image": images[i], "label": labels[i]} for i in range(lo, hi))))
    return out


def _plan_source(split: str, source, tmp: str, per_shard: int | None):
    """(tasks, layout, count, class names) for a random-access source."""
    layout = Layout.of_example(source[0])
    per_shard = per_shard or max(1, SHARD_BYTES // max(layout.nbytes, 1))
    n = len(source)
    count = max(1, math.ceil(n / per_shard))
    tasks = [(_source_task, (split, k * per_shard, min((k + 1) * per_shard, n),
                             os.path.join(tmp, array_record.shard_name(split, k, count)), layout.to_json()),
              min((k + 1) * per_shard, n) - k * per_shard) for k in range(count)]
    return tasks, layout, n, source.class_names


def _plan_imagenet64(split: str, root: str, image_size: int, tmp: str, per_shard: int | None):
    """Tasks of one npz file each, the shards numbered across files (counts read from the headers)."""
    files = imagenet64.split_files(root, split)
    side = imagenet64.image_side(files[0])
    if image_size and image_size != side:
        raise UserError(f"--image_size={image_size}: {files[0]} holds {side}x{side} images; prepare keeps their size "
                        f"(leave --image_size out or give {side}).")
    counts = []
    for f in files:
        if imagenet64.image_side(f) != side:
            raise UserError(f"{f}: {imagenet64.image_side(f)}x{imagenet64.image_side(f)} images, but {files[0]} "
                            f"holds {side}x{side}; keep one size per folder.")
        counts.append(sources.base.npz_array_shape(f, "data")[0][0])
    import numpy as np

    layout = Layout.of_example({"image": np.zeros((side, side, 3), np.uint8), "label": np.zeros((), np.int32)})
    per_shard = per_shard or max(1, SHARD_BYTES // layout.nbytes)
    per_file = [max(1, math.ceil(c / per_shard)) for c in counts]
    total, first = sum(per_file), 0
    tasks = []
    for f, c, k in zip(files, counts, per_file):
        paths = [os.path.join(tmp, array_record.shard_name(split, first + j, total)) for j in range(k)]
        tasks.append((_npz_task, (f, paths, per_shard, layout.to_json()), c))
        first += k
    return tasks, layout, sum(counts), None


def prepare(source: str, root: str, out: str, image_size: int = 0, channels: int = 3, mask_classes: int | None = None,
            splits=("train", "test"), shard_size: int | None = None, workers: int | None = None) -> dict:
    """Write OUT (see the module docstring); returns its info."""
    out = os.path.abspath(out)
    if os.path.exists(out):
        raise UserError(f"--out {out}: already exists; prepare never overwrites. Remove it or choose another path.")
    if not os.path.isdir(os.path.dirname(out)):
        raise UserError(f"--out {out}: its parent folder does not exist; create it first.")
    workers = workers or len(os.sched_getaffinity(0))
    tmp = f"{out}.tmp-{os.getpid()}"
    os.makedirs(tmp)
    try:
        info = {"format": array_record.FORMAT, "source": source, "root": os.path.abspath(root),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "splits": {}}
        plans = {}
        for split in splits:
            if source == "imagenet64":
                plans[split] = _plan_imagenet64(split, root, image_size, tmp, shard_size)
                info["num_classes"] = imagenet64.NUM_CLASSES
                continue
            if source == "folder":
                kwargs = dict(root=root, image_size=image_size, channels=channels, mask_classes=mask_classes)
            elif source == "array_record":
                raise UserError("--source array_record: the data is already in shards.")
            else:
                kwargs = {"root": root} if root and source == "fashion_mnist" else {}
            _SOURCE[split] = sources.get_source(source, split, **kwargs)  # checks every file of a folder
            plans[split] = _plan_source(split, _SOURCE[split], tmp, shard_size)
        layouts = {plan[1] for plan in plans.values()}
        if len(layouts) != 1:
            raise UserError(f"{root}: the splits' examples differ in fields ({[lay.to_json() for lay in layouts]}); "
                            "give both splits the same masks and vectors.")
        info["fields"] = next(iter(layouts)).to_json()
        names = next((plan[3] for plan in plans.values() if plan[3]), None)
        info["class_names"] = list(names) if names else None
        info["bin_width"] = 2.0 / 255.0 if info["fields"][0]["dtype"] == "|u1" else None
        # fork is fastest; a caller that has started JAX's threads (a test, a notebook) gets spawn, which is safe
        context = multiprocessing.get_context("spawn" if "jax" in sys.modules else "fork")
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context, initializer=_set_sources,
                                                    initargs=(dict(_SOURCE),)) as pool:
            for split, (tasks, _, count, _) in plans.items():
                progress = Progress(count, f"writing {split} shards")
                futures = {pool.submit(fn, *args): n for fn, args, n in tasks}
                shards = []
                for future in concurrent.futures.as_completed(futures):
                    shards += future.result()
                    progress.update(futures[future])
                progress.close()
                shards.sort(key=lambda s: s["file"])
                if sum(s["count"] for s in shards) != count:
                    raise RuntimeError(f"{split}: wrote {sum(s['count'] for s in shards)} examples, expected {count}.")
                info["splits"][split] = {"count": count, "shards": shards}
        with open(os.path.join(tmp, array_record.INFO), "w") as f:
            json.dump(info, f, indent=1)
        os.rename(tmp, out)
    finally:
        _SOURCE.clear()
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmdiff_jax.data.prepare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", required=True, help="folder | imagenet64 | an embedded dataset name")
    parser.add_argument("--root", default="", help="the dataset's folder (folder, imagenet64)")
    parser.add_argument("--out", required=True, help="the directory to create (must not exist)")
    parser.add_argument("--image_size", type=int, default=0, help="folder: side of the square images")
    parser.add_argument("--channels", type=int, default=3, help="folder: 3 (RGB) or 1 (grey)")
    parser.add_argument("--mask_classes", type=int, default=None, help="folder: the mask's classes (checks values)")
    parser.add_argument("--splits", default="train,test", help="comma-separated splits to write")
    parser.add_argument("--shard_size", type=int, default=None, help="examples per shard (default: about 64 MB)")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: one per core)")
    args = parser.parse_args(argv)
    if args.source not in sources.SOURCES:
        print(f"error: --source {args.source!r}: choose one of {sorted(sources.SOURCES)}.", file=sys.stderr)
        return 2
    if args.source == "folder" and args.image_size < 1:
        print("error: --source folder needs --image_size (the side of the square images to store).", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        info = prepare(args.source, args.root, args.out, args.image_size, args.channels, args.mask_classes,
                       tuple(s for s in args.splits.split(",") if s), args.shard_size, args.workers)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: nothing was written at {args.out}.", file=sys.stderr)
        return 130
    counts = ", ".join(f"{s}: {v['count']} examples in {len(v['shards'])} shard(s)" for s, v in info["splits"].items())
    print(f"wrote {os.path.abspath(args.out)} ({counts}) in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
