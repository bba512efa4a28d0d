"""grain pipelines: an infinite, shuffled, checkpointable stream of global batches; each process reads only its rows.

Every process defines the same global order (seeded shuffle, then repeat) cut into global batches of B examples.
A process that holds block b of P equal blocks of the batch (`parallel.batch_rows`) reads only the examples of rows
[b * B/P, (b+1) * B/P) of each global batch: the stream is cut into local batches of B/P and the process takes
every P-th, starting at b (a lazy slice of a grain MapDataset: the other rows are never read). The global batch is
thus the same for any process count, so runs on 1 and on P processes are identical for the same seed, and the
iterator state (the global batch index) restores under any process count.
"""

from __future__ import annotations

from typing import Callable

import grain
import numpy as np

from mmdiff_jax.data.sources import ArraySource
from mmdiff_jax.errors import UserError


def train_iterator(source: ArraySource, global_batch_size: int, seed: int, block_index: int = 0,
                   block_count: int = 1, random_map: Callable[[dict, np.random.Generator], dict] | None = None
                   ) -> grain.DatasetIterator:
    """Infinite iterator of this process's block of each global batch; `get_state()`/`set_state()` resume it.

    `random_map(example, rng) -> example` (e.g. new random holes for a masked image) runs on every example of the
    repeated stream, with a generator seeded by `seed` and the example's position, so it differs between epochs
    and is the same in every process and after a resume."""
    if global_batch_size % block_count:
        raise UserError(f"data.global_batch_size={global_batch_size} is not divisible by the {block_count} "
                        "processes' shares of the batch.")
    if len(source) < global_batch_size:
        raise UserError(f"data.global_batch_size={global_batch_size} exceeds the {len(source)} training examples.")
    local = global_batch_size // block_count
    ds = grain.MapDataset.source(source).seed(seed).shuffle().repeat(None)
    if random_map is not None:
        ds = ds.random_map(random_map)
    ds = ds.batch(local, drop_remainder=True)[block_index::block_count]
    return iter(ds.to_iter_dataset())
