"""grain pipelines: an infinite, shuffled, checkpointable stream of global batches; each process reads only its rows.

Every process defines the same global order (seeded shuffle, then repeat) cut into global batches of B examples.
A process that holds block b of P equal blocks of the batch (`parallel.batch_rows`) reads only the examples of rows
[b * B/P, (b+1) * B/P) of each global batch: the stream is cut into local batches of B/P and the process takes
every P-th, starting at b (a lazy slice of a grain MapDataset: the other rows are never read). The global batch is
thus the same for any process count, so runs on 1 and on P processes are identical for the same seed, and the
iterator state (the global batch index) restores under any process count.

Examples travel in storage form (uint8 images from file sources); each batch is decoded to the model's form in this
process (`sources.decode`). With `workers > 0`, grain worker processes read, augment and batch (`mp_prefetch`); the
iterator state then also records the workers' positions, so a resume must use the same `data.workers`.
"""

from __future__ import annotations

from typing import Callable, Sequence

import grain
import numpy as np

from mmdiff_jax.data.sources.base import IMAGE_KEYS, decode
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

    def get_state(self) -> dict:
        return self.iterator.get_state()

    def set_state(self, state: dict) -> None:
        try:
            self.iterator.set_state(state)
        except (KeyError, ValueError, TypeError, IndexError) as e:
            raise UserError(f"the checkpoint's data position does not fit this input pipeline ({type(e).__name__}: "
                            f"{e}); resume with the data.workers the run was started with.") from None


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
    ds = grain.MapDataset.source(source).seed(seed).shuffle().repeat(None)
    maps = [] if random_map is None else [random_map] if callable(random_map) else list(random_map)
    for m in maps:
        ds = ds.random_map(m)
    ds = ds.batch(local, drop_remainder=True)[block_index::block_count]
    it = ds.to_iter_dataset()
    if workers > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain's workers read an absl flag; a library caller may not parse flags
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.multiprocessing.MultiprocessingOptions(
            num_workers=workers, per_worker_buffer_size=worker_buffer))
    return DecodedIterator(iter(it), image_keys)
