"""Processes, device mesh and shardings.

One program runs on 1 CPU, N fake CPU devices, a GPU box, a multi-node GPU cluster or a TPU pod:
- `initialize_distributed` starts JAX's own multi-host runtime (`jax.distributed`) when there are several
  processes, before anything touches a device;
- `make_mesh` builds a ('data', 'fsdp') mesh over every device of every process, with Auto axis types;
- batches are sharded over both axes; with fsdp > 1, parameters, EMA and optimizer moments are sharded over
  'fsdp' (each leaf along its largest dimension that 'fsdp' divides) and gathered by XLA where a layer needs them.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from mmdiff_jax.errors import UserError

BATCH_AXES = ("data", "fsdp")  # the batch dimension is split over both mesh axes


def _cluster_detected() -> str | None:
    """The multi-process launcher JAX can configure itself from, if any (None on a single machine)."""
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS"
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in os.environ:
        return "SLURM"
    if len([h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
        return "Cloud TPU pod"
    if int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return "Open MPI"
    return None


def initialize_distributed(mode: str = "auto", coordinator_address: str | None = None,
                           num_processes: int | None = None, process_id: int | None = None) -> bool:
    """Start `jax.distributed` if this is one process of several. Call before anything touches a device.

    Args:
      mode: 'auto' initializes when a coordinator is given (argument or JAX_COORDINATOR_ADDRESS) or a multi-process
        SLURM / Cloud TPU pod / Open MPI launch is detected; 'on' always initializes (JAX fills in what it can
        detect); 'off' never does.
      coordinator_address, num_processes, process_id: explicit values ('host:port', P, 0..P-1); None lets JAX
        take them from the environment (JAX_COORDINATOR_ADDRESS, SLURM_*, TPU metadata, OMPI_*).
    Returns:
      Whether the runtime was started.
    """
    if mode not in ("auto", "on", "off"):
        raise UserError(f"--distributed={mode!r}: use auto, on or off.")
    explicit = [v is not None for v in (coordinator_address, num_processes, process_id)]
    if any(explicit) and not all(explicit) and not os.environ.get("JAX_COORDINATOR_ADDRESS"):
        raise UserError("--coordinator_address, --num_processes and --process_id go together: give all three "
                        "(or none, to let JAX read them from SLURM / the TPU pod).")
    if num_processes is not None and not 0 <= (process_id or 0) < num_processes:
        raise UserError(f"--process_id={process_id} must be in [0, --num_processes={num_processes}).")
    detected = "arguments" if coordinator_address else _cluster_detected()
    if mode == "off" or (mode == "auto" and detected is None):
        return False
    # CPU collectives across processes use JAX's gloo implementation (no effect on GPU/TPU computations).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    logging.info("Starting jax.distributed (%s)", detected or "JAX auto-detection")
    try:
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id)
    except (ValueError, TypeError) as e:  # what JAX could not work out from the flags and the environment
        raise UserError(f"jax.distributed could not start ({detected or 'auto-detection'}): {e} Give "
                        "--coordinator_address, --num_processes and --process_id, or --distributed=off.") from None
    logging.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())
    return True


def make_mesh(data_parallel: int = -1, fsdp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ('data', 'fsdp') mesh over data_parallel * fsdp devices (data_parallel=-1: all devices / fsdp), taken from
    `devices` (default: every device of the default backend)."""
    devices = jax.devices() if devices is None else list(devices)
    n_dev = len(devices)
    if fsdp < 1 or n_dev % fsdp:
        raise UserError(f"mesh.fsdp={fsdp}: must be >= 1 and divide the {n_dev} devices.")
    data = n_dev // fsdp if data_parallel in (-1, None) else int(data_parallel)
    if data < 1 or data * fsdp > n_dev:
        raise UserError(f"mesh.data={data_parallel} x mesh.fsdp={fsdp}: needs between 1 and the {n_dev} devices; "
                        "use mesh.data=-1 for all of them.")
    if jax.process_count() > 1 and data * fsdp != n_dev:
        raise UserError(f"mesh.data x mesh.fsdp = {data * fsdp} but {jax.process_count()} processes hold {n_dev} "
                        "devices: a multi-process mesh must use every device (mesh.data=-1).")
    return jax.make_mesh((data, fsdp), BATCH_AXES, axis_types=(AxisType.Auto,) * 2, devices=devices[:data * fsdp])


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def fsdp_sharding(shape: tuple[int, ...], mesh: Mesh) -> NamedSharding:
    """Shard a parameter-like array over 'fsdp' along its largest dimension that 'fsdp' divides (ties: the last
    such dimension); replicate it when none does, or when fsdp == 1."""
    size = mesh.shape["fsdp"]
    spec = [None] * len(shape)
    candidates = [i for i, d in enumerate(shape) if size > 1 and d % size == 0]
    if candidates:
        spec[max(candidates, key=lambda i: (shape[i], i))] = "fsdp"
    return NamedSharding(mesh, P(*spec))


def shard_like_params(tree: Any, mesh: Mesh) -> Any:
    """Shardings for a params-shaped pytree (params, EMA, optimizer moments; scalars are replicated)."""
    return jax.tree.map(lambda x: fsdp_sharding(np.shape(x), mesh), tree)


def batch_rows(mesh: Mesh, global_batch_size: int) -> tuple[int, int]:
    """(block index, block count): this process holds rows [index * B/count, (index + 1) * B/count) of each global
    batch, as read off the batch sharding (not assumed from the process index)."""
    index_map = batch_sharding(mesh).addressable_devices_indices_map((global_batch_size,))
    ranges = sorted({(rows.start or 0, global_batch_size if rows.stop is None else rows.stop)
                     for (rows,) in index_map.values()})
    start, stop = ranges[0][0], ranges[-1][1]
    rows = stop - start
    if sum(b - a for a, b in ranges) != rows or global_batch_size % rows or start % rows:
        raise UserError(f"this process's devices do not hold one contiguous block of the batch: {ranges}.")
    return start // rows, global_batch_size // rows


def to_global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's rows -> global arrays sharded over the batch axes."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}


def put(tree: Any, shardings: Any) -> Any:
    """Place host values (identical in every process) on the mesh with the given shardings."""
    return jax.tree.map(lambda x, s: jax.device_put(np.asarray(x), s), tree, shardings)


def replicate(tree: Any, mesh: Mesh) -> Any:
    return put(tree, jax.tree.map(lambda _: replicated(mesh), tree))


def fetch(tree: Any) -> Any:
    """Global arrays -> numpy arrays of their whole value, in every process (an all-gather across processes)."""
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, tree)
    return jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)), tree)


def is_main_process() -> bool:
    return jax.process_index() == 0


def any_process(flag: bool) -> bool:
    """True in every process if `flag` is true in any (a collective: every process must call it)."""
    if jax.process_count() == 1:
        return bool(flag)
    return bool(np.any(multihost_utils.process_allgather(np.asarray([flag]))))


def sync(name: str) -> None:
    """Barrier across processes (a no-op with one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


set_mesh = jax.set_mesh  # context manager: `with parallel.set_mesh(mesh): ...`
