"""grain pipelines: an infinite, shuffled, checkpointable stream of global batches; each process keeps its rows.

Every process builds the same global batch order (seeded shuffle, repeat, batch of the global size) and keeps rows
[p * B/P, (p+1) * B/P): the global batch is then the same for any process count, which makes runs on 1 process and
on P processes identical for the same seed.
"""

from __future__ import annotations

import grain

from mmdiff_jax.data.sources import ArraySource
from mmdiff_jax.errors import UserError


class _ProcessRows(grain.transforms.Map):
    def __init__(self, process_index: int, process_count: int):
        self.process_index, self.process_count = process_index, process_count

    def map(self, batch):
        def rows(x):
            n = x.shape[0] // self.process_count
            return x[self.process_index * n: (self.process_index + 1) * n]
        return {k: rows(v) for k, v in batch.items()}


def train_iterator(source: ArraySource, global_batch_size: int, seed: int, process_index: int = 0,
                   process_count: int = 1) -> grain.DatasetIterator:
    """Infinite iterator of this process's share of each global batch; `get_state()`/`set_state()` resume it."""
    if global_batch_size % process_count:
        raise UserError(f"data.global_batch_size={global_batch_size} is not divisible by the {process_count} processes.")
    if len(source) < global_batch_size:
        raise UserError(f"data.global_batch_size={global_batch_size} exceeds the {len(source)} training examples.")
    ds = (
        grain.MapDataset.source(source)
        .seed(seed)
        .shuffle()
        .repeat(None)
        .batch(global_batch_size, drop_remainder=True)
        .map(_ProcessRows(process_index, process_count))
    )
    return iter(ds.to_iter_dataset())
