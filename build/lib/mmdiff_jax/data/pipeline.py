"""grain pipelines: an infinite, shuffled, checkpointable stream of global batches; each process reads only its rows.

Every process defines the same global order (seeded shuffle, then repeat) cut into global batches of B examples.
A process that holds block b of P equal blocks of the batch (`parallel.batch_rows`) reads only the examples of rows
[b * B/P, (b+1) * B/P) of each global batch: the stream is cut into local batches of B/P and the process takes
every P-th, starting at b (a lazy slice of a grain MapDataset: the other rows are never read). The global batch is
thus the same for any process count, so runs on 1 and on P processes are identical for the same seed, and the
iterator state (the global batch index) restores under any process count.

File-backed sources (folder, array_record) take the same global order and the same cut into rows, computed per
batch instead of per example (`BatchReader`: a permutation per epoch), since grain's cost per element would exceed
the cost of reading an ArrayRecord example.

Examples travel in storage form (uint8 images from file sources); each batch is decoded to the model's form in this
process (`sources.decode`). With `workers > 0`, grain worker processes read, augment and batch (`mp_prefetch`); the
iterator state then also records the workers' positions, so a resume must use the same `data.workers`.
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

import grain
import numpy as np

from mmdiff_jax.data.sources.base import IMAGE_KEYS, ArraySource, decode
from mmdiff_jax.errors import UserError

RandomMap = Callable[[dict, np.random.Generator], dict]


class DecodedIterator:
    """A grain iterator of storage-form batches, yielding them decoded; `get_state`/`set_state` pass through."""

    def __init__(self, iterator: grain.DatasetIterator, image_keys: Sequence[str]):
        self.iterator, self.image_keys = iterator, tuple(image_keys)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return decode(next(self.iterator), self.image_keys)

    def close(self) -> None:
        """Stop grain's worker processes now (they would otherwise run until garbage collection)."""
        close = getattr(self.iterator, "close", None)
        if close is not None:
            close()

    def get_state(self) -> dict:
        return self.iterator.get_state()

    def set_state(self, state: dict) -> None:
        try:
            self.iterator.set_state(state)
        except (KeyError, ValueError, TypeError, IndexError) as e:
            raise UserError(f"the checkpoint's data position does not fit this input pipeline ({type(e).__name__}: "
                            f"{e}); resume with the data.workers the run was started with.") from None


class BatchReader:
    """Random access to this process's local batches of a file-backed source: local batch k holds the rows
    [b * B/P, (b+1) * B/P) of global batch k of the stream that concatenates epochs, epoch e being the examples in
    the order of a permutation seeded by (seed, e). Each random map gets a generator seeded by (seed, the example's
    position in that stream). Effectively infinite (2**40 batches)."""

    def __init__(self, source, global_batch_size: int, block_index: int, block_count: int, seed: int,
                 maps: Sequence[RandomMap] = ()):
        self.source, self.global_batch_size, self.seed, self.maps = source, global_batch_size, seed, tuple(maps)
        self.local = global_batch_size // block_count
        self.offset = block_index * self.local
        self._epochs: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return 1 << 40

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._epochs:
            if len(self._epochs) >= 2:
                self._epochs.pop(min(self._epochs))
            self._epochs[epoch] = np.random.default_rng([self.seed, epoch]).permutation(len(self.source))
        return self._epochs[epoch]

    def __getitem__(self, k: int) -> dict[str, np.ndarray]:
        n = len(self.source)
        start = int(k) * self.global_batch_size + self.offset
        positions = range(start, start + self.local)
        indices = [int(self._permutation(p // n)[p % n]) for p in positions]
        read_batch = getattr(self.source, "read_batch", None)
        if read_batch is not None and not self.maps:
            return read_batch(indices)
        examples = [self.source[i] for i in indices]
        for m in self.maps:
            examples = [m(e, np.random.default_rng([self.seed, p])) for e, p in zip(examples, positions)]
        return {key: np.stack([e[key] for e in examples]) for key in examples[0]}


def train_iterator(source, global_batch_size: int, seed: int, block_index: int = 0, block_count: int = 1,
                   random_map: RandomMap | Sequence[RandomMap] | None = None, workers: int = 0,
                   worker_buffer: int = 8, image_keys: Sequence[str] = IMAGE_KEYS) -> DecodedIterator:
    """Infinite iterator of this process's block of each global batch (decoded); `get_state()`/`set_state()` resume
    it.

    `random_map(example, rng) -> example` (e.g. a flip, new random holes for a masked image; a sequence of them runs
    in order) runs on every example of the repeated stream, with a generator seeded by `seed` and the example's
    position, so it differs between epochs and is the same in every process and after a resume. `image_keys`: the
    keys holding images (a masked copy's too), decoded from uint8 to [-1, 1]."""
    if global_batch_size % block_count:
        raise UserError(f"data.global_batch_size={global_batch_size} is not divisible by the {block_count} "
                        "processes' shares of the batch.")
    if len(source) < global_batch_size:
        raise UserError(f"data.global_batch_size={global_batch_size} exceeds the {len(source)} training examples.")
    local = global_batch_size // block_count
    maps = [] if random_map is None else [random_map] if callable(random_map) else list(random_map)
    if isinstance(source, ArraySource):  # in memory: grain shuffles, maps and batches example by example
        ds = grain.MapDataset.source(source).seed(seed).shuffle().repeat(None)
        for m in maps:
            ds = ds.random_map(m)
        it = ds.batch(local, drop_remainder=True)[block_index::block_count].to_iter_dataset()
    else:  # file-backed: whole local batches are grain's elements (its per-example cost would dominate)
        ds = grain.MapDataset.source(BatchReader(source, global_batch_size, block_index, block_count, seed, maps))
        # grain's default read-ahead (16 threads, 500 elements) suits small examples; for whole batches, each process
        # reads with as many threads as it has cores, `worker_buffer` batches ahead.
        it = ds.to_iter_dataset(grain.ReadOptions(num_threads=len(os.sched_getaffinity(0)),
                                                  prefetch_buffer_size=worker_buffer))
    if workers > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain's workers read an absl flag; a library caller may not parse flags
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.multiprocessing.MultiprocessingOptions(
            num_workers=workers, per_worker_buffer_size=worker_buffer))
    return DecodedIterator(iter(it), image_keys)
