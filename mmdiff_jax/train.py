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

from mmdiff_jax import checkpointing, config_check, failure_watch, objective, parallel
from mmdiff_jax.errors import UserError
from mmdiff_jax.data import augment, masking, pipeline, shapes, sources, vectors
from mmdiff_jax.metrics_writer import MetricWriter
from mmdiff_jax.models.mt_diffusion import MTDiffusion
from mmdiff_jax.models.adm import ADMConfig
from mmdiff_jax.models.unet import UNetConfig


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array  # int32 scalar
    params: Any  # nnx.State of Params
    ema_params: Any
    opt_state: Any
    rng: jax.Array  # uint32 raw key data (checkpointable)
    skipped: jax.Array  # int32: steps whose loss or gradient was non-finite (update skipped)
    bad_streak: jax.Array  # int32: consecutive such steps up to now


class Preempted(Exception):
    """Training stopped on SIGTERM/SIGINT after saving a checkpoint; rerun the same command to resume."""


class NonFiniteError(UserError):
    """Too many consecutive non-finite steps."""


def backbone_config(config) -> UNetConfig | ADMConfig:
    """The denoiser `model.backbone` names: 'unet' (the small U-Net) or 'adm' (models/adm.py)."""
    m = config.model
    out_channels = 2 * config.latent_shape[-1] if m.get("learn_sigma", False) else 0  # ε and the variance's v
    if m.get("backbone", "unet") == "adm":
        return ADMConfig(
            image_size=int(config.latent_shape[0]), latent_channels=config.latent_shape[-1],
            channels=tuple(m.channels), blocks_per_level=m.blocks_per_level,
            attention_resolutions=tuple(m.attention_resolutions), num_head_channels=m.num_head_channels,
            groups=m.groups, temb_dim=m.temb_dim, scale_shift_norm=bool(m.scale_shift_norm),
            resblock_updown=bool(m.resblock_updown), dropout=float(m.dropout), dtype=m.dtype,
            remat=bool(m.get("remat", False)), out_channels=out_channels)
    return UNetConfig(
        latent_channels=config.latent_shape[-1], channels=tuple(m.channels), blocks_per_level=m.blocks_per_level,
        groups=m.groups, temb_dim=m.temb_dim, dtype=m.dtype, remat=bool(m.get("remat", False)),
        out_channels=out_channels,
    )


def build_model(config, diff: objective.Diffusion) -> MTDiffusion:
    """The composed model the config describes (call under `nnx.eval_shape` for shapes alone)."""
    max_t = float(config.model.get("heads_train_backbone_max_t", 1.0))
    if not config.model.get("heads_train_backbone", True):
        heads_grad_max_t = 0  # no t: the heads never train the backbone
    else:
        heads_grad_max_t = None if max_t >= 1.0 else int(max_t * config.diffusion.num_steps)
    return MTDiffusion(backbone_config(config), diff.modalities, rngs=nnx.Rngs(config.seed),
                       num_classes=diff.num_classes, read_classes=diff.read_classes,
                       heads_grad_max_t=heads_grad_max_t, read_exact=diff.read_known_classes,
                       read_init_std=float(config.model.get("read_embedding_init_std", 1.0)))


def create_model(config, diff: objective.Diffusion) -> tuple[nnx.GraphDef, Any]:
    """The composed model, split into (graphdef, params). Everything in it is a Param (no mutable state)."""
    model = build_model(config, diff)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    if jax.tree.leaves(rest):
        raise TypeError("the model holds non-Param state; mmdiff_jax models must be stateless apart from params.")
    return graphdef, params


def learning_rate_schedule(ocfg, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `optim.lr`, then cosine decay to lr * final_lr_fraction at `total_steps`."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=ocfg.lr, warmup_steps=ocfg.warmup_steps,
        decay_steps=max(total_steps, ocfg.warmup_steps + 1), end_value=ocfg.lr * ocfg.final_lr_fraction,
    )


def make_optimizer(ocfg, total_steps: int) -> optax.GradientTransformation:
    """AdamW on `learning_rate_schedule`, and global-norm clipping."""
    return optax.chain(
        optax.clip_by_global_norm(ocfg.grad_clip),
        optax.adamw(learning_rate_schedule(ocfg, total_steps), b1=ocfg.b1, b2=ocfg.b2,
                    weight_decay=ocfg.weight_decay),
    )


def initial_state(config, params, tx) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema_params=jax.tree.map(jnp.copy, params),
        opt_state=tx.init(params),
        rng=jax.random.key_data(jax.random.key(config.seed)),
        skipped=jnp.zeros((), jnp.int32),
        bad_streak=jnp.zeros((), jnp.int32),
    )


def make_train_step(graphdef, diff: objective.Diffusion, tx, ema_decay: float):
    def train_step(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

        def loss_fn(params):
            return objective.compute_loss(nnx.merge(graphdef, params), diff, batch, key)

        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, state.ema_params, params)
        # A non-finite loss or gradient skips the whole update (params, EMA, optimizer) and is counted.
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)  # noqa: E731
        bad = jnp.logical_not(ok).astype(jnp.int32)
        new_state = state.replace(
            step=state.step + 1, params=keep(params, state.params), ema_params=keep(ema, state.ema_params),
            opt_state=keep(opt_state, state.opt_state), skipped=state.skipped + bad,
            bad_streak=(state.bad_streak + bad) * bad,
        )
        metrics["grad_norm"] = grad_norm
        metrics["skipped_steps"] = new_state.skipped
        metrics["bad_streak"] = new_state.bad_streak
        return new_state, metrics

    return train_step


def state_shardings(state: TrainState, mesh) -> TrainState:
    """Where each leaf of the train state lives: params, EMA and optimizer moments sharded over 'fsdp' (replicated
    when mesh.fsdp == 1); step, RNG and counters replicated."""
    rep = parallel.replicated(mesh)
    return TrainState(
        step=rep, params=parallel.shard_like_params(state.params, mesh),
        ema_params=parallel.shard_like_params(state.ema_params, mesh),
        opt_state=parallel.shard_like_params(state.opt_state, mesh), rng=rep, skipped=rep, bad_streak=rep,
    )


def jit_train_step(graphdef, diff, tx, ema_decay, mesh, state_example):
    shardings = state_shardings(state_example, mesh)
    return jax.jit(
        make_train_step(graphdef, diff, tx, ema_decay),
        in_shardings=(shardings, parallel.batch_sharding(mesh)),
        out_shardings=(shardings, parallel.replicated(mesh)),
        donate_argnums=(0,),
    )


def model_meta(config, state) -> dict:
    """What a checkpoint must match: the shapes of every leaf of the train state (params, EMA, optimizer, ...)."""
    return {"params": checkpointing.signature(state), "config": json.loads(config.to_json_best_effort())}


class _Preemption:
    """Turns SIGTERM and the first SIGINT into a flag the loop polls: it saves a checkpoint and stops cleanly.
    A second SIGINT gets Python's default behaviour (KeyboardInterrupt). With several processes, they agree at the
    next log step (see `agreed`)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested = None  # the signal's name once one arrives
        self._previous = {}

    def __enter__(self):
        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        logging.warning("%s received: saving a checkpoint at the current step and stopping.", name)
        self.requested = name
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def agreed(self, at_sync_point: bool) -> bool:
        """Whether every process stops now. One process stops at once; several agree at sync points only (log
        steps), so that all of them save the same step's checkpoint together."""
        if jax.process_count() == 1:
            return self.requested is not None
        if not at_sync_point:
            return False
        if parallel.any_process(self.requested is not None):
            self.requested = self.requested or "a signal to another process"
            return True
        return False

    def __exit__(self, *exc):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


def train(config, workdir: str, num_steps: int | None = None) -> TrainState:
    """Train (resuming from the latest checkpoint in `workdir` if any) up to `config.train.num_steps`.

    Args:
      num_steps: stop after this global step instead (for resume tests); the LR schedule still uses the config's.
    Returns:
      The final TrainState, on the mesh (see `state_shardings`).
    """
    start_time = time.perf_counter()
    config = shapes.resolve(config)
    config_check.validate(config)
    os.makedirs(workdir, exist_ok=True)
    total_steps = config.train.num_steps
    stop_at = total_steps if num_steps is None else num_steps
    diff = objective.build_diffusion(config)
    mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp)
    block, num_blocks = parallel.batch_rows(mesh, config.data.global_batch_size)
    train_source = sources.load(config, "train", workdir)
    if config.data.source in ("folder", "array_record"):  # the held-out files too, before any step (cached)
        sources.load(config, "test", workdir)
    train_source = vectors.attach_vectors(config, train_source, "train", workdir)
    masked = masking.spec_from_config(config)
    # Arrays no modality uses are never read; a masked image is made from its source on the fly.
    train_source = train_source.select(diff.modalities.names + ([masked.source] if masked else [])
                                       + diff.input_fields)
    random_maps = ([augment.RandomFlip()] if config.data.flip else []) + (
        [masking.AddMaskedImage(masked)] if masked else [])
    data_iter = pipeline.train_iterator(
        train_source, config.data.global_batch_size, config.data.shuffle_seed, block, num_blocks,
        random_map=random_maps, workers=int(config.data.workers), worker_buffer=int(config.data.worker_buffer),
        image_keys=["image"] + ([masked.source, masked.into] if masked else []))
    if parallel.is_main_process() and train_source.class_names:
        write_class_names(workdir, train_source.class_names)
    graphdef, params = create_model(config, diff)
    tx = make_optimizer(config.optim, total_steps)
    state = initial_state(config, params, tx)
    meta = model_meta(config, state)
    shardings = state_shardings(state, mesh)
    ckpt = checkpointing.Checkpointer(workdir, config.train.keep_checkpoints)
    # Restored straight into this run's shardings: a checkpoint from any process count or mesh reshards on load.
    restored = ckpt.restore_latest(checkpointing.abstract(state, shardings), meta)
    if restored is not None:
        state, data_state, latest = restored
        data_iter.set_state(data_state)
        logging.info("Resuming from step %d", latest)
    else:
        logging.info("No checkpoint in %s: training from scratch", ckpt.directory)
        state = parallel.put(state, shardings)
    if parallel.is_main_process():
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
    step_fn = jit_train_step(graphdef, diff, tx, config.optim.ema_decay, mesh, state)
    writer = MetricWriter(workdir, stop_at)
    schedule = learning_rate_schedule(config.optim, total_steps)
    learning_rate = lambda count: float(schedule(count))  # noqa: E731
    n_params = sum(x.size for x in jax.tree.leaves(params))
    logging.info("Model: %d parameters; %s; mesh %s", n_params, objective.describe(diff), dict(mesh.shape))
    step = int(state.step)
    local_batch_size = config.data.global_batch_size // num_blocks
    checked = False
    skipped_seen = int(state.skipped)
    writer.progress(step, {})
    stop_now = False
    with parallel.set_mesh(mesh), _Preemption() as preempt:
        fail_at = failure_watch.injected_failure_step(jax.process_index())  # None outside the failure tests
        while step < stop_at:
            local = next(data_iter)
            if not checked:
                diff.modalities.check_batch(local, local_batch_size)
                checked = True
            state, metrics = step_fn(state, parallel.to_global_batch(local, mesh))
            step += 1
            if step == fail_at:
                failure_watch.raise_injected(step)
            at_log_step = step % config.train.log_every == 0 or step == stop_at
            if at_log_step:
                metrics = jax.device_get(metrics)
                metrics["learning_rate"] = learning_rate(step - 1)  # the rate of the update just applied
                metrics.update(writer.progress(step, metrics))
                writer.write(step, metrics)
                if metrics["bad_streak"] >= config.train.max_bad_steps:
                    ckpt.wait()
                    last_good = ckpt.latest_step()
                    raise NonFiniteError(
                        f"{int(metrics['bad_streak'])} consecutive steps up to step {step} had a non-finite loss or "
                        f"gradient (train.max_bad_steps={config.train.max_bad_steps}); their updates were skipped, "
                        f"{int(metrics['skipped_steps'])} in all. The last good checkpoint is step {last_good} in "
                        f"{ckpt.directory}. Check the data and the learning rate.")
                if metrics["skipped_steps"] > skipped_seen:
                    skipped_seen = int(metrics["skipped_steps"])
                    logging.warning("%d step(s) skipped so far for a non-finite loss or gradient.", skipped_seen)
            stop_now = preempt.agreed(at_log_step)
            if step % config.train.checkpoint_every == 0 or step == stop_at or stop_now:
                ckpt.save(step, state, data_iter.get_state(), meta)
            if stop_now:
                break
    ckpt.wait()
    writer.close()
    seconds = time.perf_counter() - start_time
    logging.info("Trained to step %d in %.1f s", step, seconds)
    if parallel.is_main_process():
        _add_train_time(workdir, step, seconds)
    if stop_now:
        raise Preempted(f"{preempt.requested} at step {step}: checkpoint saved in {ckpt.directory}; rerun the same "
                        "command to resume.")
    return state


CLASS_NAMES = "class_names.json"


def write_class_names(workdir: str, names) -> None:
    """workdir/class_names.json: label id -> name, for captions and reports (written atomically)."""
    path = os.path.join(workdir, CLASS_NAMES)
    with open(path + ".tmp", "w") as f:
        json.dump(list(names), f, indent=1)
    os.replace(path + ".tmp", path)


def read_class_names(workdir: str) -> list[str] | None:
    path = os.path.join(workdir, CLASS_NAMES)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


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
