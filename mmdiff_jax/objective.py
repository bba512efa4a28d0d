"""From a config to the training objective: the modalities, the schedule, and the batch -> loss function.

Data flows one way: batch {modality: array} -> encoders -> q_sample -> denoiser -> heads -> loss terms.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mmdiff_jax import modalities as modalities_lib
from mmdiff_jax.diffusion import code_reader, losses, process, schedules


@dataclasses.dataclass(frozen=True)
class Diffusion:
    """Everything about the process that is fixed by the config; hashable host data plus the device `Schedule`."""

    modalities: modalities_lib.ModalitySet
    sched: schedules.Schedule
    betas: np.ndarray  # float64 [T]
    weights: np.ndarray  # float64 [T, N]
    loss_weights: Mapping[str, float]
    bin_width: float | None  # spacing of the primary's discrete data grid, for the decoder likelihood
    denoiser_output: str = "eps"  # what the backbone's output is (see `predict`)
    learn_sigma: bool = False  # the backbone also outputs the reverse variance (model.learn_sigma)
    vlb_trains_mean: bool = True  # False: ADM's hybrid loss (L1, L3 train the variance only; see losses.loss_terms)
    num_classes: int = 0  # > 0: a class-conditional model (model.num_classes): batch["label"] is an input
    read_known_classes: bool = False  # read_codes: known label classes are given to the reader, not read (`predict`)

    @property
    def num_steps(self) -> int:
        return self.sched.num_steps

    @property
    def input_fields(self) -> list[str]:
        """Batch fields the model reads besides the modalities: a class-conditional model's class labels."""
        return [CLASS_LABELS] if self.num_classes else []

    @property
    def read_classes(self) -> int:
        """Width of the code reader's class probabilities the model takes (0: the codes are not read)."""
        return code_reader.num_read_classes(self.modalities) if self.denoiser_output == "read_codes" else 0


def modality_specs(config) -> list[modalities_lib.ModalitySpec]:
    """`config.modalities` (name -> fields) as specs, primary first, then the others sorted by name."""
    mods = config.modalities
    if config.primary not in mods:
        raise modalities_lib.ModalityError(
            f"primary: {config.primary!r} is not one of the configured modalities {sorted(mods)}."
        )
    names = [config.primary] + sorted(n for n in mods if n != config.primary)
    specs = []
    allowed = {f.name for f in dataclasses.fields(modalities_lib.ModalitySpec)} - {"name"}
    for name in names:
        fields = dict(mods[name])
        unknown = sorted(set(fields) - allowed)
        if unknown:
            raise modalities_lib.ModalityError(f"modalities.{name}: unknown field(s) {unknown}; allowed: {sorted(allowed)}.")
        if "shape" in fields:
            fields["shape"] = tuple(fields["shape"])
        specs.append(modalities_lib.ModalitySpec(name=name, **fields))
    return specs


def build_diffusion(config) -> Diffusion:
    """The modalities and the schedule of a config (checks the prior; errors name the config field)."""
    mods = modalities_lib.build_modalities(modality_specs(config), tuple(config.latent_shape))
    dcfg = config.diffusion
    betas = schedules.make_betas(dcfg.beta_schedule, dcfg.num_steps)
    weights = schedules.make_weights(betas, mods.weight_specs())
    try:
        sched = schedules.make_schedule(betas, weights, prior_tol=dcfg.prior_tol)
    except schedules.ScheduleError as e:
        raise schedules.ScheduleError(f"{e} (config: diffusion.* and modalities.*.weight_schedule/weight_scale)") from None
    return Diffusion(
        modalities=mods, sched=sched, betas=betas, weights=weights,
        loss_weights=losses.check_loss_weights(dict(dcfg.loss_weights)),
        bin_width=dcfg.get("bin_width", None),
        denoiser_output=dcfg.get("denoiser_output", "eps"),
        learn_sigma=bool(config.model.get("learn_sigma", False)),
        vlb_trains_mean=float(dcfg.loss_weights.get("l0", 0.0)) == 0.0,
        num_classes=int(config.model.get("num_classes", 0)),
        read_known_classes=bool(dcfg.get("read_known_classes", False)),
    )


CLASS_LABELS = "label"  # the batch field a class-conditional model reads


DENOISER_OUTPUTS = ("eps", "composite", "read_codes")


class Prediction(NamedTuple):
    """The reverse model's output at (z_t, t)."""

    eps: jax.Array  # ε̂ [B, *S]
    enc: jax.Array  # ê [B, N, *S]
    heads: dict  # {aux modality name: head output}
    var_frac: jax.Array | None = None  # [B, *S] with model.learn_sigma: (v + 1) / 2, see process.learned_log_variance


def predict(model, diff: Diffusion, zt: jax.Array, t: jax.Array, present: jax.Array | None = None,
            dropout_key: jax.Array | None = None, labels: jax.Array | None = None,
            known_classes: Mapping[str, jax.Array] | None = None,
            known_masks: Mapping[str, jax.Array] | None = None) -> Prediction:
    """The reverse model at (z_t [B, *S], t [B]): `Prediction` (ε̂, ê, the heads' outputs, the variance's frac).

    `present` [B, N] (models trained with modality dropout): a dropped modality does not drive the process, so its
    ê is zero. `diff.denoiser_output` says what the backbone's output r is:
      'eps'        r = ε̂ (SPEC §1): the backbone alone must also subtract the auxiliary codes' share of z_t;
      'composite'  r predicts the composite noise (z_t - abar_t z_0) / s_t = ε + sum_i c_t(i) e_i / s_t, and
                   ε̂ = r - sum_i c_t(i) ê_i / s_t, the codes' share explained by the heads' expected encodings.
      'read_codes' the label codes are read out of z_t in closed form (diffusion/code_reader.py: class probabilities p,
                   expected codes ẽ); the backbone reads z~_t = z_t - sum_i c_t(i) ẽ_i with p added to its time
                   embedding, r predicts (z~_t - abar_t z_0) / s_t, and ε̂ = r + sum_i c_t(i) (ẽ_i - ê_i) / s_t.
    All give the same ẑ_0 formula and sampler formulas; 'composite' spares a convolutional backbone from reproducing
    each code's pattern pixel by pixel (ẑ_0 = (z_t - s_t r) / abar_t depends on r alone); 'read_codes' also spares
    it from denoising through the codes (ẑ_0 = (z~_t - s_t r) / abar_t: an image denoiser told the read classes),
    and its L0 (`compute_loss`) is ‖r - (z~_t - abar_t z_0) / s_t‖², the heads being trained by L2 alone. With
    `diff.learn_sigma` the backbone's output has twice the latent's channels: r, then v (ADM's layout). `labels` int [B]: the class
    labels of a class-conditional model (`diff.num_classes` > 0). `known_classes` {label modality name: int [B]}:
    with 'read_codes' and `diff.read_known_classes`, those labels' classes are given to the reader instead of read
    from z_t (one-hot p, exact codes): the training data's, a sampler's given or drawn labels; unknown ones are read.
    `known_masks` {mask modality name: int [B, H, W], -1 = not given}: masks with `to_denoiser` > 0 given to the
    denoiser as one-hot input channels (zeros where not given, or where `present` leaves the mask out), their ê the
    true encoding where given; a mask missing from it is not given.
    """
    kwargs = {} if labels is None else {"labels": labels}
    mods = diff.modalities
    model_input = zt
    if diff.denoiser_output == "read_codes":
        known = known_classes if diff.read_known_classes else None
        kwargs["read_probs"], enc_read = code_reader.read(mods, diff.sched, zt, t, present, known)
        model_input = zt - process.mix_modalities(diff.sched.c, t, enc_read)
    given_masks = _given_masks(mods, known_masks, present, zt.shape[0])
    if given_masks:
        kwargs["mask_inputs"] = jnp.concatenate(
            [jax.nn.one_hot(ids, m.spec.num_classes, dtype=zt.dtype) for _, m, ids in given_masks], axis=-1)
    if dropout_key is not None and getattr(model, "takes_dropout_key", False):  # a backbone with dropout (ADM)
        kwargs["dropout_key"] = dropout_key
    out, heads = model(model_input, t, present, **kwargs)
    var_frac = None
    if diff.learn_sigma:
        channels = zt.shape[-1]
        out, var_frac = out[..., :channels], (out[..., channels:] + 1.0) / 2.0
    enc_hat = mods.expected_encodings(heads, zt.shape[0])
    for i, m, ids in given_masks:  # a given mask's encoding is known, not predicted
        true_enc = m.encode(jnp.maximum(ids, 0))
        enc_hat = enc_hat.at[:, i].set(jnp.where((ids >= 0)[..., None], true_enc, enc_hat[:, i]))
    if present is not None:
        enc_hat = enc_hat * _per_modality(present.astype(enc_hat.dtype), enc_hat)
    if diff.denoiser_output == "composite":
        shift = process.mix_modalities(diff.sched.c, t, enc_hat)
        out = out - shift / process.per_example(diff.sched.s, t, zt)
    elif diff.denoiser_output == "read_codes":
        shift = process.mix_modalities(diff.sched.c, t, enc_read - enc_hat)
        out = out + shift / process.per_example(diff.sched.s, t, zt)
    return Prediction(out, enc_hat, heads, var_frac)


def _given_masks(mods, known_masks, present, batch_size) -> list[tuple[int, Any, jax.Array]]:
    """(index, modality, class ids int [B, H, W] with -1 where not given) for every mask the denoiser takes; a mask
    that `present` [B, N] leaves out of the process is not given either."""
    out = []
    for i, m in mods.denoiser_inputs():
        ids = None if known_masks is None else known_masks.get(m.name)
        if ids is None:
            ids = jnp.full((batch_size,) + tuple(m.spec.shape), -1, jnp.int32)
        ids = ids.astype(jnp.int32)
        if present is not None:
            ids = jnp.where(present[:, i].reshape((-1,) + (1,) * (ids.ndim - 1)) > 0, ids, -1)
        out.append((i, m, ids))
    return out


def compute_loss(model, diff: Diffusion, batch: Mapping[str, jax.Array], key: jax.Array):
    """The training loss of one batch. Returns (scalar, metrics dict)."""
    mods = diff.modalities
    z0 = batch[mods.primary.name].astype(jnp.float32)  # [B, *S]
    batch_size = z0.shape[0]
    enc = mods.encode(batch)  # [B, N, *S]
    t_key, eps_key = jax.random.split(key)
    t = process.sample_timesteps(t_key, batch_size, diff.num_steps)  # [B]
    eps = jax.random.normal(eps_key, z0.shape, jnp.float32)
    present = None  # [B, N]: modality dropout (static shapes: a mask, never a different batch)
    if mods.conditions_on_presence:
        rates = jnp.asarray(mods.dropout_rates(), jnp.float32)
        present = (jax.random.uniform(jax.random.fold_in(key, 2), (batch_size, len(mods.aux))) >= rates)
        present = present.astype(jnp.float32)
        enc = enc * _per_modality(present, enc)  # a dropped modality does not drive the forward process
    zt = process.q_sample(diff.sched, t, z0, enc, eps)
    labels = batch[CLASS_LABELS] if diff.num_classes else None
    known = {m.name: batch[m.name] for m in mods.aux if m.kind in code_reader.read_kinds()}
    # masks given to the denoiser: each present one with probability `to_denoiser` (the rest only drive the process)
    given, known_masks = {}, {}  # {index: bool [B]}, {name: int [B, H, W], -1 where not given}
    for i, m in mods.denoiser_inputs():
        draw = jax.random.uniform(jax.random.fold_in(jax.random.fold_in(key, 4), i), (batch_size,))
        given[i] = draw < m.spec.to_denoiser
        if present is not None:
            given[i] = given[i] & (present[:, i] > 0)
        known_masks[m.name] = jnp.where(given[i][:, None, None], batch[m.name], -1)
    eps_hat, enc_hat, head_outs, var_frac = predict(model, diff, zt, t, present, dropout_key=jax.random.fold_in(key, 3),
                                                    labels=labels, known_classes=known, known_masks=known_masks)
    aux_nll = mods.nlls(head_outs, batch, batch_size)
    trained = jnp.ones_like(aux_nll)  # [B, N]: the examples each head is trained on
    if present is not None:
        # a dropped modality's head is not trained on it, unless asked to (then it reads the primary alone)
        trained = jnp.maximum(present, jnp.asarray(mods.head_loss_when_dropped(), jnp.float32))
    for i, g in given.items():  # nor is a mask's head where the denoiser was given the mask
        trained = trained.at[:, i].multiply(1.0 - g.astype(jnp.float32))
    aux_nll = aux_nll * trained
    terms = losses.loss_terms(diff.sched, t, z0, enc, eps, eps_hat, enc_hat, aux_nll, mods.loss_weights(),
                              diff.bin_width, var_frac, diff.vlb_trains_mean)
    if diff.denoiser_output == "read_codes":
        # L0 trains the backbone on the image's noise alone: ε̂ with the true codes in place of the heads' (which L2
        # trains), so the heads' errors, c_t (e - ê) / s_t, add no noise to the backbone's gradient
        eps_with_true_codes = eps_hat + process.mix_modalities(diff.sched.c, t, enc_hat - enc) / process.per_example(
            diff.sched.s, t, z0)
        terms = terms._replace(l0=losses.l0_noise_matching(eps, eps_with_true_codes))
    loss, metrics = losses.training_loss(terms, diff.loss_weights)
    per_modality = jnp.sum(aux_nll, axis=0) / jnp.maximum(jnp.sum(trained, axis=0), 1.0)  # [N], over trained ones
    for i, m in enumerate(mods.aux):
        metrics[f"nll/{m.name}"] = per_modality[i]
    return loss, metrics


def _per_modality(present: jax.Array, like: jax.Array) -> jax.Array:
    """present [B, N] broadcast against [B, N, *S]."""
    return present.reshape(present.shape + (1,) * (like.ndim - 2))


def describe(diff: Diffusion) -> dict[str, Any]:
    """A JSON-able summary for logs."""
    return {
        "num_steps": diff.num_steps,
        "modalities": diff.modalities.names,
        "prior_kl_nats_per_dim": diff.sched.prior_kl,
        "peak_c": [float(np.max(np.abs(col))) for col in schedules.compute_coefficients(
            np.sqrt(1 - diff.betas), diff.weights, diff.betas).c.T],
    }
