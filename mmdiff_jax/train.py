"""Training: TrainState, the optimizer, a pure jitted `train_step(state, batch)`, and the loop with logging and
automatic resume from the latest checkpoint."""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx

from mmdiff_jax import checkpointing, objective, parallel
from mmdiff_jax.data import pipeline, sources
from mmdiff_jax.metrics_writer import MetricWriter
from mmdiff_jax.models.mt_diffusion import MTDiffusion
from mmdiff_jax.models.unet import UNetConfig


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array  # int32 scalar
    params: Any  # nnx.State of Params
    ema_params: Any
    opt_state: Any
    rng: jax.Array  # uint32 raw key data (checkpointable)


def unet_config(config) -> UNetConfig:
    m = config.model
    return UNetConfig(
        latent_channels=config.latent_shape[-1], channels=tuple(m.channels), blocks_per_level=m.blocks_per_level,
        groups=m.groups, temb_dim=m.temb_dim, dtype=m.dtype,
    )


def create_model(config, diff: objective.Diffusion) -> tuple[nnx.GraphDef, Any]:
    """The composed model, split into (graphdef, params). Everything in it is a Param (no mutable state)."""
    model = MTDiffusion(unet_config(config), diff.modalities, rngs=nnx.Rngs(config.seed))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    if jax.tree.leaves(rest):
        raise TypeError("the model holds non-Param state; mmdiff_jax models must be stateless apart from params.")
    return graphdef, params


def make_optimizer(ocfg, total_steps: int) -> optax.GradientTransformation:
    """AdamW with linear warmup then cosine decay, and global-norm clipping."""
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=ocfg.lr, warmup_steps=ocfg.warmup_steps,
        decay_steps=max(total_steps, ocfg.warmup_steps + 1), end_value=ocfg.lr * ocfg.final_lr_fraction,
    )
    return optax.chain(
        optax.clip_by_global_norm(ocfg.grad_clip),
        optax.adamw(schedule, b1=ocfg.b1, b2=ocfg.b2, weight_decay=ocfg.weight_decay),
    )


def initial_state(config, params, tx) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema_params=jax.tree.map(jnp.copy, params),
        opt_state=tx.init(params),
        rng=jax.random.key_data(jax.random.key(config.seed)),
    )


def make_train_step(graphdef, diff: objective.Diffusion, tx, ema_decay: float):
    def train_step(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

        def loss_fn(params):
            return objective.compute_loss(nnx.merge(graphdef, params), diff, batch, key)

        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, state.ema_params, params)
        metrics["grad_norm"] = optax.tree.norm(grads)
        new_state = state.replace(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state)
        return new_state, metrics

    return train_step


def jit_train_step(graphdef, diff, tx, ema_decay, mesh, state_example):
    state_sharding = jax.tree.map(lambda _: parallel.replicated(mesh), state_example)
    return jax.jit(
        make_train_step(graphdef, diff, tx, ema_decay),
        in_shardings=(state_sharding, parallel.batch_sharding(mesh)),
        out_shardings=(state_sharding, parallel.replicated(mesh)),
        donate_argnums=(0,),
    )


def model_meta(config, params) -> dict:
    return {"params": checkpointing.signature(params), "config": json.loads(config.to_json_best_effort())}


class _Preemption:
    """Turns SIGTERM into a flag the loop polls: it saves a checkpoint and stops cleanly."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread
            self._previous = None
        return self

    def _handle(self, signum, frame):
        logging.warning("SIGTERM received: saving a checkpoint and stopping.")
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def train(config, workdir: str, num_steps: int | None = None) -> TrainState:
    """Train (resuming from the latest checkpoint in `workdir` if any) up to `config.train.num_steps`.

    Args:
      num_steps: stop after this global step instead (for resume tests); the LR schedule still uses the config's.
    Returns:
      The final TrainState (replicated on the mesh).
    """
    start_time = time.perf_counter()
    os.makedirs(workdir, exist_ok=True)
    total_steps = config.train.num_steps
    stop_at = total_steps if num_steps is None else num_steps
    diff = objective.build_diffusion(config)
    mesh = parallel.make_mesh(config.mesh.data)
    parallel.check_global_batch(config.data.global_batch_size, mesh)
    train_source = sources.get_source(config.data.source, "train", **dict(config.data.source_kwargs))
    data_iter = pipeline.train_iterator(
        train_source, config.data.global_batch_size, config.data.shuffle_seed,
        jax.process_index(), jax.process_count(),
    )
    graphdef, params = create_model(config, diff)
    tx = make_optimizer(config.optim, total_steps)
    state = initial_state(config, params, tx)
    meta = model_meta(config, params)
    ckpt = checkpointing.Checkpointer(workdir, config.train.keep_checkpoints)
    latest = ckpt.latest_step()
    if latest is not None:
        ckpt.check_compatible(latest, meta)
        state, data_state = ckpt.restore(latest, state)
        data_iter.set_state(data_state)
        logging.info("Resuming from step %d", latest)
    else:
        logging.info("No checkpoint in %s: training from scratch", ckpt.directory)
    if parallel.is_main_process():
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
    state = parallel.replicate(state, mesh)
    step_fn = jit_train_step(graphdef, diff, tx, config.optim.ema_decay, mesh, state)
    writer = MetricWriter(workdir, stop_at)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    logging.info("Model: %d parameters; %s; mesh %s", n_params, objective.describe(diff), dict(mesh.shape))
    step = int(state.step)
    local_batch_size = config.data.global_batch_size // jax.process_count()
    checked = False
    writer.progress(step, {})
    with parallel.set_mesh(mesh), _Preemption() as preempt:
        while step < stop_at:
            local = next(data_iter)
            if not checked:
                diff.modalities.check_batch(local, local_batch_size)
                checked = True
            state, metrics = step_fn(state, parallel.to_global_batch(local, mesh))
            step += 1
            if step % config.train.log_every == 0 or step == stop_at:
                metrics = jax.device_get(metrics)
                if not np.isfinite(metrics["loss/total"]):
                    raise FloatingPointError(f"non-finite loss at step {step}: {metrics}")
                metrics.update(writer.progress(step, metrics))
                writer.write(step, metrics)
            if step % config.train.checkpoint_every == 0 or step == stop_at or preempt.requested:
                ckpt.save(step, state, data_iter.get_state(), meta)
            if preempt.requested:
                break
    ckpt.wait()
    seconds = time.perf_counter() - start_time
    logging.info("Trained to step %d in %.1f s", step, seconds)
    if parallel.is_main_process():
        _add_train_time(workdir, step, seconds)
    return state


def _add_train_time(workdir: str, step: int, seconds: float) -> None:
    """Accumulate wall time over resumed sessions in workdir/train_summary.json (compilation included)."""
    path = os.path.join(workdir, "train_summary.json")
    summary = {"seconds": 0.0, "sessions": 0}
    if os.path.exists(path):
        with open(path) as f:
            summary = json.load(f)
    summary = {"step": step, "seconds": summary["seconds"] + seconds, "sessions": summary["sessions"] + 1}
    with open(path, "w") as f:
        json.dump(summary, f)
