"""`--mode summary`: what a config costs, before any parameter exists.

The model is built under `nnx.eval_shape` (shapes only), the train step is lowered and compiled on abstract inputs
placed as the run would place them (the mesh, FSDP, the global batch), and nothing is allocated. Printed and written to
`workdir/summary.json`:

  params.backbone, params.heads.<name>, params.presence (models with modality dropout), params.total
  flops_per_example   XLA's cost analysis of one train step (the lowered, unpartitioned program) / global batch
  memory_per_device   the compiled step's argument, output, temporary and code bytes per device (XLA's analysis)

The data's shapes are taken from the data when it is there (`data/shapes.py`) and from the config otherwise, so a
config can be costed before its dataset is downloaded.
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
from absl import logging
from flax import nnx

from mmdiff_jax import checkpointing, config_check, objective, parallel, timing, train
from mmdiff_jax.data import shapes
from mmdiff_jax.errors import UserError


def abstract_batch(diff: objective.Diffusion, batch_size: int, sharding) -> dict[str, jax.ShapeDtypeStruct]:
    """One global batch as shapes: {modality name: ShapeDtypeStruct} in the dtypes the data check accepts."""
    out = {}
    for m in [diff.modalities.primary, *diff.modalities.aux]:
        if m.kind in ("image", "pixels"):
            shape, dtype = m.latent_shape, jnp.float32
        elif m.kind == "label":
            shape, dtype = (), jnp.int32
        elif m.kind == "mask":
            shape, dtype = tuple(m.spec.shape), jnp.int32
        else:
            shape, dtype = tuple(m.spec.shape), jnp.float32
        out[m.name] = jax.ShapeDtypeStruct((batch_size,) + tuple(shape), dtype, sharding=sharding)
    if diff.num_classes:  # a class-conditional model's input
        out[objective.CLASS_LABELS] = jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=sharding)
    return out


def _count(tree) -> int:
    return int(sum(x.size for x in jax.tree.leaves(tree)))


def summarize(config) -> dict:
    """The summary of a config (see the module docstring); nothing is allocated."""
    start = time.perf_counter()
    try:
        config = shapes.resolve(config)
    except UserError as e:  # no data here: the config's own shapes
        logging.warning("Shapes from the config, not the data (%s)", e)
    config_check.validate(config)
    diff = objective.build_diffusion(config)
    model = nnx.eval_shape(lambda: train.build_model(config, diff))
    graphdef, params = nnx.split(model, nnx.Param)
    counts = {"backbone": _count(params["backbone"])}
    for name in params.get("heads", {}):
        counts[f"heads.{name}"] = _count(params["heads"][name])
    for extra in ("presence", "class_embedding", "read_embedding"):
        if extra in params:
            counts[extra] = _count(params[extra])
    counts["total"] = _count(params)
    tx = train.make_optimizer(config.optim, config.train.num_steps)
    state = jax.eval_shape(lambda p: train.initial_state(config, p, tx), params)
    mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp)
    step_fn = train.jit_train_step(graphdef, diff, tx, config.optim.ema_decay, mesh, state)
    batch_size = int(config.data.global_batch_size)
    with parallel.set_mesh(mesh):
        lowered = step_fn.lower(checkpointing.abstract(state, train.state_shardings(state, mesh)),
                                abstract_batch(diff, batch_size, parallel.batch_sharding(mesh)))
        flops = timing.flops(lowered)
        compiled = lowered.compile()
    memory = compiled.memory_analysis()
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes",
              "generated_code_size_in_bytes")
    per_device = {f: int(getattr(memory, f, 0) or 0) for f in fields} if memory is not None else {}
    if per_device:
        per_device["peak_estimate_bytes"] = (per_device["argument_size_in_bytes"] + per_device["output_size_in_bytes"]
                                             + per_device["temp_size_in_bytes"] - per_device["alias_size_in_bytes"])
    return {
        "backbone": config.model.get("backbone", "unet"),
        "latent_shape": list(config.latent_shape),
        "modalities": diff.modalities.names,
        "params": counts,
        "global_batch_size": batch_size,
        "flops_per_step": flops,
        "flops_per_example": flops / batch_size,
        "devices": int(mesh.devices.size),
        "mesh": {k: int(v) for k, v in mesh.shape.items()},
        "platform": jax.default_backend(),
        "dtype": config.model.dtype,
        "memory_per_device": per_device,
        "seconds": time.perf_counter() - start,
    }


def summary(config, workdir: str) -> dict:
    """`summarize`, printed and written to workdir/summary.json."""
    result = summarize(config)
    if parallel.is_main_process():
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(result, f, indent=2)
    p, mem = result["params"], result["memory_per_device"]
    lines = [f"{name}: {count:,} parameters" for name, count in p.items()]
    lines.append(f"train step: {result['flops_per_example'] / 1e9:.2f} GFLOP per example, "
                 f"{result['flops_per_step'] / 1e12:.2f} TFLOP per step of {result['global_batch_size']}")
    if mem:
        gib = {k: v / 2**30 for k, v in mem.items()}
        lines.append(f"memory per device ({result['devices']} {result['platform']} device(s)): "
                     f"{gib['peak_estimate_bytes']:.2f} GiB (arguments {gib['argument_size_in_bytes']:.2f}, "
                     f"temporaries {gib['temp_size_in_bytes']:.2f})")
    print("\n".join(lines))
    return result
