"""Sampling entry: restore the EMA parameters from a workdir and generate every modality jointly or conditionally
(any given modality enters the reverse process with its true encoding). Writes .npz files and PNG grids."""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from mmdiff_jax import checkpointing, config_check, metrics_writer, objective, parallel, train
from mmdiff_jax.data import shapes
from mmdiff_jax.diffusion import code_reader, samplers
from mmdiff_jax.errors import UserError
from mmdiff_jax.evaluation import grids


@dataclasses.dataclass
class Generator:
    """A trained model ready to sample: graphdef + EMA params + the process.

    Sampling is sharded like training: each batch is split over every device of every process (`devices`, default
    all of them), the parameters replicated; every process gets the whole result. With JAX's partitionable
    threefry RNG the samples are those of one device for the same seed."""

    config: Any
    diff: objective.Diffusion
    graphdef: Any
    params: Any
    step: int
    class_names: Sequence[str] | None = None  # label id -> name (workdir/class_names.json), for captions
    devices: Sequence[jax.Device] | None = None  # the devices the batch is split over (None: every device)

    @functools.cached_property
    def mesh(self):
        return parallel.make_mesh(-1, 1, self.devices)

    @functools.cached_property
    def _mesh_params(self):
        return parallel.replicate(self.params, self.mesh)

    @functools.cached_property
    def chain(self) -> samplers.SamplingChain:
        return samplers.respace(self.diff.betas, self.diff.weights, self.config.sample.num_steps)

    def _predict_fn(self, params, labels=None, known_classes=None, known_masks=None):
        def predict(zt, t, present=None):
            return objective.predict(nnx.merge(self.graphdef, params), self.diff, zt, t, present, labels=labels,
                                     known_classes=known_classes, known_masks=known_masks)

        return predict

    @functools.cached_property
    def _sample_jit(self):
        cfg = self.config.sample
        latent_shape = tuple(self.config.latent_shape)
        chain = self.chain  # built here, outside the trace

        @functools.partial(jax.jit, static_argnames=("batch_size", "has_z0", "guidance"))
        def run(params, key_data, known_enc, known_mask, known_z0, known_pixels, present, labels, known_classes,
                known_masks, batch_size, has_z0, guidance):
            key = jax.random.wrap_key_data(key_data)
            return samplers.sample(
                chain, self._predict_fn(params, labels, known_classes, known_masks), key, batch_size, latent_shape,
                method=cfg.sampler, eta=cfg.eta, known_z0=known_z0 if has_z0 else None, known_enc=known_enc,
                known_mask=known_mask, clip_z0=cfg.clip_z0, known_pixels=known_pixels, present=present,
                guidance=guidance,
            )

        return run

    @functools.cached_property
    def _draw_labels_jit(self):
        latent_shape = tuple(self.config.latent_shape)
        names = tuple(m.name for m in self.diff.modalities.aux if m.kind == "label")

        @functools.partial(jax.jit, static_argnames=("batch_size",))
        def run(params, key_data, present, labels, batch_size):
            """Each label modality drawn from its head at t = T, z_T ~ N(0, I): {name: int32 [batch_size]}."""
            z_key, draw_key = jax.random.split(jax.random.wrap_key_data(key_data))
            z = jax.random.normal(z_key, (batch_size,) + latent_shape, jnp.float32)
            t = jnp.full((batch_size,), self.diff.num_steps, jnp.int32)
            keep = None if present is None else jnp.broadcast_to(present, (batch_size, present.shape[0]))
            heads = self._predict_fn(params, labels)(z, t, keep).heads
            return {name: jax.random.categorical(jax.random.fold_in(draw_key, i), heads[name]).astype(jnp.int32)
                    for i, name in enumerate(names)}

        return run

    def _draw_labels(self, key: jax.Array, num: int, names: Sequence[str], present, class_labels) -> dict:
        """`sample.joint_labels = 'drawn'`: the labels of `num` joint samples, each drawn from its head's distribution
        at t = T (where z_T holds almost nothing of any modality, so the head gives the model's marginal of the
        label); the reverse process then generates everything else given them (ancestral sampling: label, then the
        rest given it)."""
        bs = min(self.config.sample.batch_size, num)
        whole = parallel.replicated(self.mesh)  # one small batch, every device (and process) draws all of it
        out = {name: [] for name in names}
        for i, start in enumerate(range(0, num, bs)):
            idx = np.minimum(np.arange(start, start + bs), num - 1)
            labels = None if class_labels is None else parallel.put(np.asarray(class_labels)[idx], whole)
            drawn = self._draw_labels_jit(
                self._mesh_params, parallel.put(jax.random.key_data(jax.random.fold_in(key, i)), whole),
                None if present is None else parallel.put(present, whole), labels, batch_size=bs)
            drawn = parallel.fetch(drawn)
            for name in names:
                out[name].append(np.asarray(drawn[name])[:min(bs, num - start)])
        return {name: np.concatenate(parts) for name, parts in out.items()}

    def generate(self, key: jax.Array, num: int, given: Mapping[str, np.ndarray] | None = None,
                 known_pixels: tuple[np.ndarray, np.ndarray] | None = None, absent: Sequence[str] = (),
                 guidance: Mapping[str, float] | None = None,
                 guidance_interval: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
        """Generate `num` examples of every modality; `given` maps modality names to data of the given ones.
        `known_pixels` = (images [num, *S], known [num, *S] bool) inpaints the primary by replacement (see
        `samplers.sample`). For a model trained with modality dropout: `absent` names auxiliary modalities left out
        of the process (marginal generation), and `guidance` maps given modalities to classifier-free guidance
        weights (default `sample.guidance`), applied for training steps t in `guidance_interval` = (t_min, t_max)
        (default `sample.guidance_interval`).

        A class-conditional model (`model.num_classes`) takes its class labels as `given["label"]`, drawn uniformly
        at random from `key` when not given; they are returned under "label".

        With `sample.joint_labels = 'drawn'` and nothing given, each label modality is drawn first from its head
        at t = T and the rest generated given it (see `_draw_labels`); 'expected' (the default) generates the label
        in the process, carried by its head's expected code at every step. When something is given, labels that are
        not stay in the process (`sample.unknown_labels = 'read'`) or are left out of it and read by their heads
        at the last step ('absent'); `sample.unknown_masks = 'absent'` does the same for masks that are not given,
        joint samples included.

        Returns {modality name: data} for every modality (the given ones are passed through; absent ones are the
        heads' outputs, which were not used).
        """
        given = dict(given or {})
        mods = self.diff.modalities
        aux_names = [m.name for m in mods.aux]
        class_field = self.diff.input_fields
        unknown = sorted((set(given) - set(mods.names + class_field)) | (set(absent) - set(aux_names)))
        if unknown:
            raise ValueError(f"given or absent modalities {unknown} are not among the model's {mods.names}.")
        if class_field and objective.CLASS_LABELS not in given:
            given[objective.CLASS_LABELS] = np.asarray(
                jax.random.randint(jax.random.fold_in(key, 2**31 - 1), (num,), 0, self.diff.num_classes), np.int32)
        guides = self._guidance(dict(self.config.sample.guidance) if guidance is None else dict(guidance),
                                tuple(self.config.sample.guidance_interval) if guidance_interval is None
                                else tuple(guidance_interval))
        joint = not (set(given) - set(class_field)) and known_pixels is None  # nothing of the data given
        left_out = set()  # kinds whose modalities are left out of the process where not given
        if not joint and self.config.sample.get("unknown_labels") == "absent":
            left_out.add("label")
        if self.config.sample.get("unknown_masks") == "absent":  # joint samples too
            left_out.add("mask")
        absent = list(absent) + [m.name for m in mods.aux
                                 if m.kind in left_out and m.name not in given and m.name not in absent]
        present = None
        if absent or guides:
            if not mods.conditions_on_presence:
                raise UserError("absent modalities, sample.unknown_labels or unknown_masks='absent' and guidance need a "
                                "model trained with modality dropout (modalities.<name>.dropout > 0).")
            present = jnp.asarray([name not in absent for name in aux_names])
        if joint and self.config.sample.get("joint_labels", "expected") == "drawn":
            names = [m.name for m in mods.aux if m.kind == "label" and m.name not in absent]
            if names:
                given.update(self._draw_labels(jax.random.fold_in(key, 2**31 - 2), num, names, present,
                                               given.get(objective.CLASS_LABELS)))
        latent_shape = tuple(self.config.latent_shape)
        n_aux = len(mods.aux)
        known_mask = np.array([m.name in given for m in mods.aux], bool)
        # diffusion.read_known_classes: the given (or drawn) labels' classes go to the code reader as well
        read_known = [m.name for m in mods.aux if m.name in given and m.kind in code_reader.read_kinds()] \
            if self.diff.read_known_classes else []
        masks_in = [m.name for _, m in mods.denoiser_inputs() if m.name in given]  # given masks the denoiser reads
        width = self.mesh.size  # a batch is a multiple of the devices it is split over
        bs = -(-min(self.config.sample.batch_size, num) // width) * width
        rows, whole = parallel.batch_sharding(self.mesh), parallel.replicated(self.mesh)
        outputs: dict[str, list] = {name: [] for name in mods.names + class_field}
        for i, start in enumerate(range(0, num, bs)):
            idx = np.minimum(np.arange(start, start + bs), num - 1)  # pad the last batch by repetition
            part = {k: np.asarray(v)[idx] for k, v in given.items()}
            known_enc = np.zeros((bs, n_aux) + latent_shape, np.float32)
            if n_aux and known_mask.any():
                known_enc = np.stack(
                    [np.asarray(m.encode(jnp.asarray(part[m.name]))) if m.name in given
                     else np.zeros((bs,) + latent_shape, np.float32) for m in mods.aux], axis=1)
            has_z0 = mods.primary.name in given
            z0_in = part[mods.primary.name] if has_z0 else np.zeros((bs,) + latent_shape, np.float32)
            pixels = None if known_pixels is None else tuple(np.asarray(a)[idx] for a in known_pixels)
            key_data = jax.random.key_data(jax.random.fold_in(key, i))
            batch_in = parallel.put((known_enc, z0_in, pixels), jax.tree.map(lambda _: rows, (known_enc, z0_in, pixels)))
            labels = parallel.put(part[objective.CLASS_LABELS], rows) if class_field else None
            known_classes = {name: parallel.put(np.asarray(part[name], np.int32), rows) for name in read_known}
            known_masks = {name: parallel.put(np.asarray(part[name], np.int32), rows) for name in masks_in}
            z0, heads = self._sample_jit(
                self._mesh_params, parallel.put(key_data, whole), batch_in[0], parallel.put(known_mask, whole),
                batch_in[1], batch_in[2], None if present is None else parallel.put(present, whole), labels,
                known_classes, known_masks, batch_size=bs, has_z0=has_z0, guidance=guides)
            z0, heads = parallel.fetch((z0, heads))
            take = min(bs, num - start)
            image = np.asarray(part[mods.primary.name]) if has_z0 else np.clip(np.asarray(z0), -1.0, 1.0)
            outputs[mods.primary.name].append(image[:take])
            for m in mods.aux:
                value = np.asarray(part[m.name]) if m.name in given else np.asarray(m.decode(heads[m.name]))
                outputs[m.name].append(value[:take])
            for name in class_field:
                outputs[name].append(np.asarray(part[name])[:take])
        return {k: np.concatenate(v, axis=0) for k, v in outputs.items()}

    def _guidance(self, weights: Mapping[str, float], interval: tuple[int, int]) -> tuple[samplers.Guidance, ...]:
        """{aux modality name: weight} (zero weights dropped) -> the samplers' Guidance for t in interval."""
        aux_names = [m.name for m in self.diff.modalities.aux]
        bad = sorted(set(weights) - set(aux_names))
        if bad:
            raise UserError(f"sample.guidance: {bad} are not auxiliary modalities of the model ({aux_names}).")
        low, high = interval
        return tuple(samplers.Guidance(aux_names.index(name), float(w), int(low), int(high))
                     for name, w in sorted(weights.items()) if float(w) != 0.0)


def load_generator(config, workdir: str) -> Generator:
    """Restore the latest checkpoint's EMA parameters; a missing checkpoint is a clear error."""
    config = shapes.resolve(config)
    config_check.validate(config)
    diff = objective.build_diffusion(config)
    graphdef, params = train.create_model(config, diff)
    tx = train.make_optimizer(config.optim, config.train.num_steps)
    template = train.initial_state(config, params, tx)
    ckpt = checkpointing.Checkpointer(workdir, config.train.keep_checkpoints)
    restored = ckpt.restore_latest(template, train.model_meta(config, template))
    if restored is None:
        raise UserError(f"no checkpoint in {ckpt.directory}: train first (--mode train) with this --workdir.")
    state, _, step = restored
    logging.info("Sampling with the EMA parameters of step %d", step)
    return Generator(config=config, diff=diff, graphdef=graphdef, params=state.ema_params, step=step,
                     class_names=train.read_class_names(workdir))


def sample(config, workdir: str) -> dict[str, str]:
    """Joint samples and, for each auxiliary label modality, label -> image samples; .npz + PNG in
    workdir/samples/<tag>/, the tag being `eval.tag` or `sample_step<S>_seed<K>` (checkpoint step, sample.seed). An
    existing directory is never written into (a one-line error says so)."""
    def outputs(step):  # checked before the restore (fast) and after it (the step restored may be an older one)
        tag = config.eval.tag or f"sample_step{step}_seed{config.sample.seed}"
        out_dir = os.path.join(workdir, "samples", tag)
        if os.path.exists(out_dir):
            raise UserError(f"{out_dir} exists from an earlier --mode sample; to keep both, pass "
                            "--config.eval.tag=<new name> (or another --config.sample.seed); to redo it, delete it.")
        return tag, out_dir

    outputs(checkpointing.Checkpointer.newest_saved_step(workdir))
    gen = load_generator(config, workdir)
    tag, out_dir = outputs(gen.step)
    config = gen.config
    os.makedirs(out_dir)
    key = jax.random.key(config.sample.seed)
    written = {}
    joint = gen.generate(jax.random.fold_in(key, 0), 100)
    written["joint"] = write_samples(out_dir, "joint", joint, gen)
    label_inputs = [(m.name, m.spec.num_classes) for m in gen.diff.modalities.aux if m.kind == "label"]
    if gen.diff.num_classes:  # a class-conditional model: the first ten classes
        label_inputs.append((objective.CLASS_LABELS, gen.diff.num_classes))
    for name, num_classes in label_inputs:
        labels = np.repeat(np.arange(min(num_classes, 10), dtype=np.int32), 10)
        cond = gen.generate(jax.random.fold_in(key, 1), len(labels), given={name: labels})
        written[f"{name}_to_image"] = write_samples(out_dir, f"{name}_to_image", cond, gen, sort_grid_by_label=True)
    if parallel.is_main_process():
        metrics_writer.write_evaluation(workdir, gen.step, tag, {}, grid_files(out_dir))
    logging.info("Wrote %s to %s", ", ".join(sorted(written)), out_dir)
    return written


def grid_files(out_dir: str) -> dict[str, str]:
    """The PNG grids in `out_dir`: name (file name without .png) -> path."""
    return {f[:-4]: os.path.join(out_dir, f) for f in sorted(os.listdir(out_dir)) if f.endswith(".png")}


def write_samples(out_dir: str, name: str, data: Mapping[str, np.ndarray], gen: Generator,
                  sort_grid_by_label: bool = False, grid_count: int = 100) -> str:
    """All of `data` to `<name>.npz`; the first `grid_count` images to `<name>.png`, captioned with (and optionally
    ordered by) the first label modality, and each mask modality's masks to `<name>_<mask>.png` in the same order.
    Returns the .npz path."""
    path = os.path.join(out_dir, f"{name}.npz")
    if not parallel.is_main_process():  # every process computes the same samples; process 0 writes them
        return path
    np.savez(path, **data)
    mods = gen.diff.modalities
    images = data[mods.primary.name][:grid_count]
    order, captions = np.arange(len(images)), None
    label_names = [m.name for m in mods.aux if m.kind == "label"] + [k for k in (objective.CLASS_LABELS,)
                                                                      if gen.diff.num_classes and k in data]
    if label_names:
        labels = data[label_names[0]][:grid_count]
        if sort_grid_by_label:
            order = np.argsort(labels, kind="stable")
        names = gen.class_names
        captions = [names[int(v)] if names else str(int(v)) for v in labels[order]]
    grids.save_grid(os.path.join(out_dir, f"{name}.png"), images[order], captions)
    for m in mods.aux:
        if m.kind == "mask":  # class ids as grey levels, same order as the images
            ids = data[m.name][:grid_count][order]
            grey = (2.0 * ids / max(m.spec.num_classes - 1, 1) - 1.0).astype(np.float32)[..., None]
            grids.save_grid(os.path.join(out_dir, f"{name}_{m.name}.png"), grey, captions)
    return path
