"""Device mesh and shardings: jax.jit with NamedSharding over a Mesh (axis 'data'), batches sharded on 'data',
state replicated. The same code runs on 1 CPU, N fake CPU devices, GPUs and TPU pods."""

from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np

from mmdiff_jax.errors import UserError
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P


def make_mesh(data_parallel: int = -1) -> Mesh:
    """A 1-D mesh ('data',) over `data_parallel` devices (-1 = all), with Auto axis types."""
    n = jax.device_count() if data_parallel in (-1, None) else int(data_parallel)
    if n < 1 or n > jax.device_count():
        raise UserError(f"mesh.data={data_parallel}: must be -1 or between 1 and the {jax.device_count()} devices.")
    return jax.make_mesh((n,), ("data",), axis_types=(AxisType.Auto,), devices=jax.devices()[:n])


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P("data"))


def to_global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's rows -> global arrays sharded on 'data'."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}


def replicate(tree: Any, mesh: Mesh) -> Any:
    return jax.device_put(tree, replicated(mesh))


def is_main_process() -> bool:
    return jax.process_index() == 0


set_mesh = jax.set_mesh  # context manager: `with parallel.set_mesh(mesh): ...`
