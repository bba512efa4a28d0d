"""Validate a whole experiment config before anything compiles: every field's type and range, modality and dataset
names, batch divisibility by the devices, and the schedule's own checks. All problems are reported at once, one line
each, naming the field and the fix."""

from __future__ import annotations

import math
import re
from typing import Any

import jax

from mmdiff_jax import modalities as modalities_lib
from mmdiff_jax import objective
from mmdiff_jax.data import sources
from mmdiff_jax.diffusion import code_reader, losses, samplers, schedules
from mmdiff_jax.errors import UserError


class ConfigError(UserError):
    """One or more invalid config fields; the message lists each with its fix."""


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


_MISSING = object()


class _Checker:
    def __init__(self, config):
        self.config = config
        self.problems: list[str] = []

    def get(self, path: str):
        node = self.config
        for part in path.split("."):
            if not hasattr(node, "__contains__") or part not in node:
                self.problems.append(f"{path}: missing; start from mmdiff_jax.config_base.get_base_config().")
                return _MISSING
            node = node[part]
        return node

    def int_range(self, path: str, low: int, high: int | None = None, hint: str = "") -> int | None:
        v = self.get(path)
        if v is _MISSING:
            return None
        if not _is_int(v) or v < low or (high is not None and v > high):
            bound = f">= {low}" if high is None else f"in [{low}, {high}]"
            self.problems.append(f"{path}: must be an integer {bound}, got {v!r}.{' ' + hint if hint else ''}")
            return None
        return v

    def number_range(self, path: str, low: float, high: float | None = None, low_open: bool = False,
                     high_open: bool = False) -> float | None:
        v = self.get(path)
        if v is _MISSING:
            return None
        ok = _is_number(v) and (v > low if low_open else v >= low)
        if ok and high is not None:
            ok = v < high if high_open else v <= high
        if not ok:
            lo = f"{'(' if low_open else '['}{low}"
            hi = f"{high}{')' if high_open else ']'}" if high is not None else "inf)"
            self.problems.append(f"{path}: must be a finite number in {lo}, {hi}, got {v!r}.")
            return None
        return float(v)

    def choice(self, path: str, options) -> Any:
        v = self.get(path)
        if v is _MISSING:
            return None
        if v not in options:
            self.problems.append(f"{path}: unknown value {v!r}; choose one of {sorted(options)}.")
            return None
        return v


def _check_masking(c: "_Checker", config, latent) -> None:
    """data.masking and eval.inpainting_counts: sizes that fit the image, and modalities of a kind that fits."""
    masking = c.get("data.masking")
    counts = c.get("eval.inpainting_counts")
    if masking in (_MISSING, None):
        return
    into = masking.get("into", "")
    square = c.int_range("data.masking.square", 1)
    c.int_range("data.masking.count", 1)
    if latent is not None and _is_int(square) and square > min(latent[0], latent[1]):
        c.problems.append(f"data.masking.square={square} does not fit in the {latent[0]}x{latent[1]} image.")
    kinds = {n: dict(m).get("kind") for n, m in config.modalities.items()} if "modalities" in config else {}
    if into and kinds.get(into) not in ("image", "pixels"):
        c.problems.append(f"data.masking.into={into!r} must name an image or pixels modality; the modalities are "
                          f"{kinds}.")
    if counts not in (_MISSING, None):
        if not all(_is_int(k) and k >= 1 for k in counts):
            c.problems.append(f"eval.inpainting_counts: must be positive numbers of squares, got {counts!r}.")
        elif counts and not into and kinds.get(masking.get("source")) != "image":
            c.problems.append(f"eval.inpainting_counts: data.masking.source={masking.get('source')!r} must be the "
                              "primary image to inpaint without a masked-image modality.")


def _check_guidance(c: "_Checker", config) -> None:
    """sample.guidance: weights for auxiliary modalities of a model trained with dropout; a sound interval."""
    weights = c.get("sample.guidance")
    if weights in (_MISSING, None):
        return
    mods = {n: dict(m) for n, m in config.modalities.items()} if "modalities" in config else {}
    for name, w in dict(weights).items():
        if name not in mods or name == config.get("primary"):
            c.problems.append(f"sample.guidance.{name}: not an auxiliary modality; they are "
                              f"{sorted(n for n in mods if n != config.get('primary'))}.")
        elif not _is_number(w):
            c.problems.append(f"sample.guidance.{name}: must be a number, got {w!r}.")
    if weights and not any(float(m.get("dropout", 0.0) or 0.0) > 0 for m in mods.values()):
        c.problems.append("sample.guidance: needs a model trained with modality dropout; set "
                          "modalities.<name>.dropout > 0.")
    interval = c.get("sample.guidance_interval")
    if interval is not _MISSING and not _is_interval(interval):
        c.problems.append(f"sample.guidance_interval: must be (t_min, t_max) integers with t_min <= t_max, got "
                          f"{interval!r}.")


def _is_interval(value) -> bool:
    """(t_min, t_max): two integers, t_min <= t_max."""
    return (isinstance(value, (tuple, list)) and len(value) == 2 and all(_is_int(v) for v in value)
            and value[0] <= value[1])


def validate(config, device_count: int | None = None, process_count: int | None = None) -> None:
    """Raise ConfigError listing every invalid field of `config`; return None when it is sound."""
    device_count = jax.device_count() if device_count is None else device_count
    process_count = jax.process_count() if process_count is None else process_count
    c = _Checker(config)
    c.int_range("seed", 0)
    latent = c.get("latent_shape")
    if latent is _MISSING:
        latent = None
    elif not (isinstance(latent, (tuple, list)) and len(latent) == 3 and all(_is_int(d) and d > 0 for d in latent)):
        c.problems.append(f"latent_shape: must be three positive integers (H, W, C), got {latent!r}.")
        latent = None
    # modalities
    try:
        specs = objective.modality_specs(config)
        if latent is not None:
            modalities_lib.build_modalities(specs, tuple(latent))
        for spec in specs:
            if spec.kind != "image":
                if spec.weight_schedule not in schedules.WEIGHT_SCHEDULES:
                    c.problems.append(
                        f"modalities.{spec.name}.weight_schedule: unknown shape {spec.weight_schedule!r}; choose one "
                        f"of {sorted(schedules.WEIGHT_SCHEDULES)}.")
                if not _is_number(spec.weight_scale):
                    c.problems.append(f"modalities.{spec.name}.weight_scale: must be a finite number, got "
                                      f"{spec.weight_scale!r}.")
                if not (_is_number(spec.dropout) and 0.0 <= spec.dropout < 1.0):
                    c.problems.append(f"modalities.{spec.name}.dropout: must be a probability in [0, 1), got "
                                      f"{spec.dropout!r}.")
                if spec.head_loss_when_dropped not in (True, False):
                    c.problems.append(f"modalities.{spec.name}.head_loss_when_dropped: must be True or False, got "
                                      f"{spec.head_loss_when_dropped!r}.")
                if not (_is_number(spec.loss_weight) and spec.loss_weight >= 0):
                    c.problems.append(f"modalities.{spec.name}.loss_weight: must be a finite number >= 0, got "
                                      f"{spec.loss_weight!r}.")
    except (modalities_lib.ModalityError, TypeError) as e:
        c.problems.append(str(e))
    c.choice("model.heads_train_backbone", {True, False})
    c.number_range("model.heads_train_backbone_max_t", 0.0, 1.0, low_open=True)
    c.choice("diffusion.denoiser_output", set(objective.DENOISER_OUTPUTS))
    if c.get("diffusion.denoiser_output") == "read_codes" and not any(
            dict(m).get("kind") in code_reader.read_kinds() for m in config.get("modalities", {}).values()):
        c.problems.append("diffusion.denoiser_output: 'read_codes' reads the codes of label modalities and this config "
                          "has none; use 'eps' or 'composite'.")
    c.choice("diffusion.read_known_classes", {True, False})
    c.number_range("model.read_embedding_init_std", 0.0, low_open=True)
    if c.get("diffusion.read_known_classes") is True and c.get("diffusion.denoiser_output") != "read_codes":
        c.problems.append("diffusion.read_known_classes: gives known classes to the code reader of "
                              "denoiser_output='read_codes'; set that too, or set this to False.")
    # data
    c.choice("data.source", sources.SOURCES)
    batch = c.int_range("data.global_batch_size", 1)
    c.int_range("data.shuffle_seed", 0)
    if c.get("data.image_size") is not _MISSING:
        c.int_range("data.image_size", 0)
        c.choice("data.channels", {1, 3})
        c.choice("data.flip", {True, False})
        c.int_range("data.workers", 0)
        c.int_range("data.worker_buffer", 1)
    vector_sources = c.get("data.vectors")
    if vector_sources not in (_MISSING, None):
        kinds = {n: dict(m).get("kind") for n, m in config.modalities.items()} if "modalities" in config else {}
        for name, where in dict(vector_sources).items():
            if kinds.get(name) != "vector":
                c.problems.append(f"data.vectors.{name}: {name!r} is not a vector modality; the vector modalities "
                                  f"are {sorted(n for n, k in kinds.items() if k == 'vector')}.")
            elif not (where == "evaluator" or (isinstance(where, str) and where.endswith(".npz"))):
                c.problems.append(f"data.vectors.{name}: use 'evaluator' or the path of an .npz, got {where!r}.")
    _check_masking(c, config, latent)
    # mesh
    mesh_data, fsdp = c.get("mesh.data"), c.get("mesh.fsdp")
    mesh_devices = None
    if fsdp is not _MISSING and not (_is_int(fsdp) and fsdp >= 1 and device_count % fsdp == 0):
        c.problems.append(f"mesh.fsdp: must be an integer >= 1 that divides the {device_count} devices, got {fsdp!r}.")
    elif mesh_data is not _MISSING:
        fsdp = 1 if fsdp is _MISSING else fsdp
        if not (_is_int(mesh_data) and (mesh_data == -1 or 1 <= mesh_data * fsdp <= device_count)):
            c.problems.append(f"mesh.data: must be -1 (all devices) or in [1, {device_count // fsdp}] (devices / "
                              f"mesh.fsdp={fsdp}), got {mesh_data!r}.")
        elif process_count > 1 and mesh_data != -1 and mesh_data * fsdp != device_count:
            c.problems.append(f"mesh.data: {process_count} processes must use all {device_count} devices; use -1.")
        else:
            mesh_devices = device_count if mesh_data == -1 else mesh_data * fsdp
    if batch is not None and mesh_devices and batch % mesh_devices:
        c.problems.append(
            f"data.global_batch_size: {batch} is not divisible by the {mesh_devices} devices of the mesh "
            f"(mesh.data x mesh.fsdp); use a multiple of {mesh_devices}.")
    if batch is not None and batch % process_count:
        c.problems.append(f"data.global_batch_size: {batch} is not divisible by the {process_count} processes.")
    # model
    channels = c.get("model.channels")
    groups = c.int_range("model.groups", 1)
    if channels is _MISSING:
        channels = None
    elif not (isinstance(channels, (tuple, list)) and channels and all(_is_int(w) and w > 0 for w in channels)):
        c.problems.append(f"model.channels: must be a non-empty tuple of positive integers, got {channels!r}.")
    elif groups is not None:
        for w in channels:
            if w % min(groups, w):
                c.problems.append(f"model.channels: width {w} is not divisible by model.groups={groups} "
                                  "(GroupNorm); use multiples of the group count.")
    if latent is not None and isinstance(channels, (tuple, list)) and channels:
        factor = 2 ** (len(channels) - 1)
        if latent[0] % factor or latent[1] % factor:
            c.problems.append(f"model.channels: {len(channels)} levels halve the {latent[0]}x{latent[1]} latent "
                              f"{len(channels) - 1} times; H and W must be divisible by {factor}.")
    temb = c.int_range("model.temb_dim", 2)
    if temb is not None and temb % 2:
        c.problems.append(f"model.temb_dim: must be even (sin/cos pairs), got {temb}.")
    c.int_range("model.blocks_per_level", 1)
    if c.choice("model.backbone", {"unet", "adm"}) == "adm":
        heads = c.int_range("model.num_head_channels", 1)
        c.number_range("model.dropout", 0.0, 1.0, high_open=True)
        for field in ("scale_shift_norm", "resblock_updown"):
            c.choice(f"model.{field}", {True, False})
        resolutions = c.get("model.attention_resolutions")
        if not (isinstance(resolutions, (tuple, list)) and all(_is_int(r) and r > 0 for r in resolutions)):
            c.problems.append(f"model.attention_resolutions: must be a tuple of positive side lengths (pixels), "
                              f"got {resolutions!r}.")
        elif latent is not None and isinstance(channels, (tuple, list)) and heads:
            sides = {latent[0] // 2 ** level: w for level, w in enumerate(channels)}
            if channels[-1] % heads:  # the middle block always attends
                c.problems.append(f"model.num_head_channels={heads}: the middle block's attention is "
                                  f"{channels[-1]} channels wide, not a multiple; change one of them.")
            for r in resolutions:
                if r in sides and sides[r] % heads:
                    c.problems.append(f"model.num_head_channels={heads}: the attention at {r}x{r} is "
                                      f"{sides[r]} channels wide, not a multiple; change one of them.")
    c.choice("model.dtype", {"float32", "bfloat16"})
    num_classes = c.int_range("model.num_classes", 0) if "num_classes" in config.model else 0
    if num_classes and "label" in config.get("modalities", {}):
        c.problems.append("model.num_classes: a class-conditional model reads the label as an input, but 'label' is "
                          "also a modality; remove one of them (modalities.label or model.num_classes).")
    learn_sigma = c.choice("model.learn_sigma", {True, False}) if "learn_sigma" in config.model else False
    if learn_sigma and not float(config.diffusion.loss_weights.get("l1", 0.0)) > 0:
        dims = math.prod(latent) if isinstance(latent, (tuple, list)) and all(_is_int(d) for d in latent) else 1
        adm = config.diffusion.num_steps / (1000 * max(dims, 1) * math.log(2.0))
        c.problems.append("model.learn_sigma: the variance is trained by the likelihood terms, but "
                          "diffusion.loss_weights.l1 is 0; ADM's hybrid loss sets diffusion.loss_weights.l1 and .l3 to "
                          f"T / (1000 D ln 2) = {adm:.4g} for this config.")
    # diffusion
    steps = c.int_range("diffusion.num_steps", 1)
    c.choice("diffusion.beta_schedule", schedules.BETA_SCHEDULES)
    c.number_range("diffusion.prior_tol", 0.0, low_open=True)
    weights = c.get("diffusion.loss_weights")
    if weights is not _MISSING:
        try:
            losses.check_loss_weights(dict(weights))
        except UserError as e:
            c.problems.append(str(e))
    bin_width = c.get("diffusion.bin_width")
    if bin_width not in (None, _MISSING) and not (_is_number(bin_width) and bin_width > 0):
        c.problems.append(f"diffusion.bin_width: must be None (continuous data) or > 0, got {bin_width!r}.")
    # optim
    c.number_range("optim.lr", 0.0, low_open=True)
    c.int_range("optim.warmup_steps", 0)
    c.number_range("optim.final_lr_fraction", 0.0, 1.0)
    c.number_range("optim.b1", 0.0, 1.0, high_open=True)
    c.number_range("optim.b2", 0.0, 1.0, high_open=True)
    c.number_range("optim.weight_decay", 0.0)
    c.number_range("optim.grad_clip", 0.0, low_open=True)
    c.number_range("optim.ema_decay", 0.0, 1.0, high_open=True)
    # train
    for field in ("num_steps", "log_every", "checkpoint_every", "keep_checkpoints", "max_bad_steps"):
        c.int_range(f"train.{field}", 1)
    # sample / eval
    c.choice("sample.sampler", set(samplers.METHODS))
    _check_guidance(c, config)
    c.int_range("eval.elbo_examples", 0)
    c.int_range("eval.conditional_examples", 0)
    c.int_range("eval.image_to_label_draws", 1)
    tag = c.get("eval.tag")
    if tag is not _MISSING and not (isinstance(tag, str) and re.fullmatch(r"[A-Za-z0-9_.-]*", tag)):
        c.problems.append(f"eval.tag: letters, digits, '_', '.' or '-' only (it names eval_<tag>.json), got {tag!r}.")
    probe = c.get("eval.head_probe_steps")
    if probe is not _MISSING and not (isinstance(probe, (tuple, list)) and all(
            _is_int(t) and 1 <= t <= (steps or t) for t in probe)):
        c.problems.append(f"eval.head_probe_steps: must be a tuple of training steps in 1..diffusion.num_steps="
                          f"{steps}, got {probe!r}.")
    weights = c.get("eval.guidance_weights")
    if weights is not _MISSING and not (isinstance(weights, (tuple, list)) and all(_is_number(w) for w in weights)):
        c.problems.append(f"eval.guidance_weights: must be a tuple of numbers, got {weights!r}.")
    intervals = c.get("eval.guidance_intervals")
    if intervals is not _MISSING and not (isinstance(intervals, (tuple, list)) and all(map(_is_interval, intervals))):
        c.problems.append(f"eval.guidance_intervals: must be a tuple of (t_min, t_max) integer pairs with "
                          f"t_min <= t_max, e.g. ((0, 200), (200, 1000)), got {intervals!r}.")
    if steps is not None:
        c.int_range("sample.num_steps", 1, steps, hint="(at most diffusion.num_steps)")
    c.number_range("sample.eta", 0.0)
    c.choice("sample.clip_z0", {True, False})
    c.choice("sample.joint_labels", {"expected", "drawn"})
    c.choice("sample.unknown_labels", {"read", "absent"})
    if c.choice("sample.unknown_masks", {"read", "absent"}) == "absent" and "modalities" in config:
        undropped = sorted(n for n, m in config.modalities.items()
                           if dict(m).get("kind") == "mask" and not float(dict(m).get("dropout", 0.0) or 0.0) > 0)
        if undropped:
            c.problems.append(f"sample.unknown_masks: 'absent' leaves a mask out of the process, which the model must "
                              f"have seen in training: set modalities.<name>.dropout > 0 for {undropped}, or use 'read'.")
    c.int_range("sample.batch_size", 1)
    knn = c.int_range("eval.knn_k", 1)
    c.int_range("eval.num_samples", (knn or 1) + 1)
    c.int_range("eval.evaluator_steps", 1)
    if c.get("eval.max_data_examples") is not _MISSING:
        c.int_range("eval.max_data_examples", 0)
    if c.get("model.width") is not _MISSING:
        c.int_range("model.width", 0)
    if not c.problems:  # the schedule's own checks (prior mismatch) need sound fields
        try:
            objective.build_diffusion(config)
        except UserError as e:
            c.problems.append(str(e))
    if c.problems:
        raise ConfigError(f"{len(c.problems)} problem(s) in the config:\n  - " + "\n  - ".join(c.problems))
