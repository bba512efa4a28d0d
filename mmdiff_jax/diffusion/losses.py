"""The multimodal ELBO (SPEC §1): the four terms L0..L3 as separate pure functions on per-example arrays, the full
`elbo` (an exact sum over all t) for evaluation, and `training_loss` that weights the terms from a config.

Shapes: t int [B]; z0, eps, eps_hat [B, *S]; enc, enc_hat [B, N, *S]; aux_nll [B, N]. Every term returns [B] in
nats (summed over the latent's dimensions), except L0 which is the usual mean-squared "simple" loss.

How the terms add up. With t ~ U{1..T}, the single-sample estimate of -ELBO is
    L3_prior + T * (1[t >= 2] L1 + 1[t = 1] L3_reconstruction) + sum_i L2_i(t = 1),
and `elbo` computes it exactly as a sum over every t. With no auxiliary modality (N = 0) L2 vanishes, L1 is DDPM's
KL term and L3 DDPM's prior and decoder terms: the loss is plain DDPM's.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mmdiff_jax.diffusion import likelihoods, process
from mmdiff_jax.diffusion.schedules import Schedule
from mmdiff_jax.errors import UserError

LOSS_TERM_NAMES = ("l0", "l1", "l2", "l3")


class LossTerms(NamedTuple):
    """Per-example loss terms, each [B]."""

    l0: jax.Array  # noise matching (mean squared error of eps)
    l1: jax.Array  # posterior KL at the sampled t (0 at t = 1)
    l2: jax.Array  # weighted modality recovery NLL
    l3: jax.Array  # prior KL + decoder NLL at t = 1 (the latter only where t = 1)


def _sum_non_batch(x: jax.Array) -> jax.Array:
    return jnp.sum(x.reshape(x.shape[0], -1), axis=1)


def l0_noise_matching(eps: jax.Array, eps_hat: jax.Array) -> jax.Array:
    """L0: mean over dimensions of (eps - eps_hat)^2. [B, *S] x2 -> [B]."""
    return jnp.mean(((eps - eps_hat) ** 2).reshape(eps.shape[0], -1), axis=1)


def posterior_mean_gap(
    sched: Schedule, t: jax.Array, eps: jax.Array, eps_hat: jax.Array, enc: jax.Array, enc_hat: jax.Array
) -> jax.Array:
    """mu~_t(z_t, z_0, e) - p_mean(z_t, ε̂, ê) = [sum_i b_t(i)(e_i - ê_i) + (sigma_t^2 / s_t)(ε - ε̂)] / a_t.

    Exact for z_t = abar_t z_0 + sum c_t e + s_t ε; computed from the differences, so it keeps its float32 precision
    when the prediction is close. Returns [B, *S].
    """
    enc_gap = process.mix_modalities(sched.b_over_a, t, enc - enc_hat)
    return enc_gap + process.per_example(sched.eps_coef, t, eps) * (eps - eps_hat)


def l1_posterior_kl(
    sched: Schedule, t: jax.Array, eps: jax.Array, eps_hat: jax.Array, enc: jax.Array, enc_hat: jax.Array,
    log_var: jax.Array | None = None,
) -> jax.Array:
    """L1: KL(q(z_{t-1} | z_t, z_0, X) || p_θ(z_{t-1} | z_t)) in nats, summed over dimensions. [B].

    With the fixed reverse variance sigma~_t^2 both Gaussians share it and the KL is |mu~_t - p_mean|^2 /
    (2 sigma~_t^2); with a learned one (`log_var` [B, *S], `process.learned_log_variance`) it is
    0.5 sum [log_var - log sigma~_t^2 + (sigma~_t^2 + |mu~_t - p_mean|^2) / exp(log_var) - 1] (ADM's `normal_kl`).
    Either includes the error of the predicted encodings ê. At t = 1 the posterior is a point mass and the term is
    handled by `l3_reconstruction_nll`: L1 is 0 there.
    """
    gap = posterior_mean_gap(sched, t, eps, eps_hat, enc, enc_hat)
    post_var = sched.post_var[t]
    safe_var = jnp.where(t >= 2, post_var, 1.0)
    if log_var is None:
        kl = 0.5 * _sum_non_batch(gap**2) / safe_var
    else:
        # with d = log sigma~^2 - log_var: 0.5 sum [e^d - 1 - d + gap^2 / exp(log_var)], stable in float32 as d -> 0
        d = jnp.log(safe_var).reshape((t.shape[0],) + (1,) * (gap.ndim - 1)) - log_var
        kl = 0.5 * _sum_non_batch(jnp.expm1(d) - d + gap**2 * jnp.exp(-log_var))
    return jnp.where(t >= 2, kl, 0.0)


def l2_modality_recovery(aux_nll: jax.Array, loss_weights: jax.Array | Sequence[float]) -> jax.Array:
    """L2: sum_i λ_i · (-log p_{D_i}(x_i | z_t, t)). aux_nll [B, N], loss_weights [N] -> [B]; 0 when N = 0."""
    loss_weights = jnp.asarray(loss_weights, dtype=jnp.float32)
    if aux_nll.ndim != 2 or loss_weights.shape != (aux_nll.shape[1],):
        raise ValueError(
            f"aux_nll must be [B, N] and loss_weights [N]; got {aux_nll.shape} and {loss_weights.shape}."
        )
    return jnp.sum(aux_nll * loss_weights[None, :], axis=1)


def l3_prior_kl(sched: Schedule, z0: jax.Array, enc: jax.Array) -> jax.Array:
    """L3 (prior part): KL(q(z_T | z_0, X) || N(0, I)) in nats, summed over dimensions. [B]."""
    t_final = jnp.full((z0.shape[0],), sched.num_steps, dtype=jnp.int32)
    mean, var = process.q_marginal(sched, t_final, z0, enc)
    var = jnp.broadcast_to(var, mean.shape)
    return 0.5 * _sum_non_batch(var + mean**2 - 1.0 - jnp.log(var))


def decoder_mean(
    sched: Schedule, z0: jax.Array, eps: jax.Array, eps_hat: jax.Array, enc: jax.Array, enc_hat: jax.Array
) -> jax.Array:
    """ẑ_0 at t = 1, written as z_0 + [s_1 (ε - ε̂) + sum_i c_1(i)(e_i - ê_i)] / abar_1 (exact for z_1 = q_sample)."""
    t_one = jnp.ones((z0.shape[0],), dtype=jnp.int32)
    gap = process.per_example(sched.s, t_one, z0) * (eps - eps_hat) + process.mix_modalities(sched.c, t_one, enc - enc_hat)
    return z0 + gap / process.per_example(sched.abar, t_one, z0)


def l3_reconstruction_nll(
    sched: Schedule,
    z0: jax.Array,
    eps: jax.Array,
    eps_hat: jax.Array,
    enc: jax.Array,
    enc_hat: jax.Array,
    bin_width: float | None = None,
    data_range: tuple[float, float] = (-1.0, 1.0),
    log_var: jax.Array | None = None,
) -> jax.Array:
    """L3 (decoder part): -log p(z_0 | z_1) with p = N(ẑ_0, sigma_1^2) (continuous density), or its integral over
    the data's bins when `bin_width` is given (discrete data such as 8-bit images). ε, ε̂, ê are those at t = 1;
    `log_var` [B, *S] the learned log-variance at t = 1 (None: sigma_1^2). [B]."""
    mean = decoder_mean(sched, z0, eps, eps_hat, enc, enc_hat)
    var = sched.sigma2[1] if log_var is None else jnp.exp(log_var)
    if bin_width is None:
        return likelihoods.gaussian_nll(z0, mean, var)
    return likelihoods.discretized_gaussian_nll(z0, mean, var, bin_width, data_range)


def loss_terms(
    sched: Schedule,
    t: jax.Array,
    z0: jax.Array,
    enc: jax.Array,
    eps: jax.Array,
    eps_hat: jax.Array,
    enc_hat: jax.Array,
    aux_nll: jax.Array,
    modality_loss_weights: jax.Array | Sequence[float],
    bin_width: float | None = None,
    var_frac: jax.Array | None = None,
    vlb_trains_mean: bool = True,
) -> LossTerms:
    """All four terms at the sampled t, per example. The reconstruction part of L3 counts only where t = 1.

    `var_frac` [B, *S]: a learned reverse variance (`process.learned_log_variance`) for L1 and L3's decoder.
    `vlb_trains_mean=False` is ADM's hybrid loss: the likelihood terms L1 and L3 see the mean (ε̂, ê) through a
    stop-gradient, so they train the variance only and L0 (with L2) trains the mean.
    """
    l0 = l0_noise_matching(eps, eps_hat)
    log_var = log_var_1 = None
    if var_frac is not None:
        log_var = process.learned_log_variance(sched, t, var_frac)
        log_var_1 = process.learned_log_variance(sched, jnp.ones_like(t), var_frac)
        if not vlb_trains_mean:
            eps_hat, enc_hat = jax.lax.stop_gradient(eps_hat), jax.lax.stop_gradient(enc_hat)
    rec = l3_reconstruction_nll(sched, z0, eps, eps_hat, enc, enc_hat, bin_width, log_var=log_var_1)
    return LossTerms(
        l0=l0,
        l1=l1_posterior_kl(sched, t, eps, eps_hat, enc, enc_hat, log_var),
        l2=l2_modality_recovery(aux_nll, modality_loss_weights),
        l3=l3_prior_kl(sched, z0, enc) + jnp.where(t == 1, rec, 0.0),
    )


def check_loss_weights(weights: Mapping[str, float]) -> dict[str, float]:
    """Validate a {l0, l1, l2, l3} weight mapping (missing keys count as 0); names the bad key."""
    unknown = sorted(set(weights) - set(LOSS_TERM_NAMES))
    if unknown:
        raise UserError(f"diffusion.loss_weights: unknown term(s) {unknown}; the terms are {list(LOSS_TERM_NAMES)}.")
    out = {name: float(weights.get(name, 0.0)) for name in LOSS_TERM_NAMES}
    for name, value in out.items():
        if not (math.isfinite(value) and value >= 0):
            raise UserError(f"diffusion.loss_weights.{name}: must be a finite non-negative number, got {value}.")
    return out


def training_loss(
    terms: LossTerms, weights: Mapping[str, float], example_mask: jax.Array | None = None
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Weighted sum of the batch-mean terms: sum_k w_k mean_B(L_k). Returns (scalar loss, metrics).

    Args:
      terms: per-example `LossTerms`.
      weights: {'l0', 'l1', 'l2', 'l3'} -> weight (e.g. `config.diffusion.loss_weights`).
      example_mask: optional [B] (1 = counts); the mean is over the counted examples.
    """
    weights = check_loss_weights(weights)
    batch = terms.l0.shape[0]
    mask = jnp.ones((batch,), jnp.float32) if example_mask is None else example_mask.astype(jnp.float32)
    denom = jnp.maximum(jnp.sum(mask), 1.0)
    means = {name: jnp.sum(getattr(terms, name) * mask) / denom for name in LOSS_TERM_NAMES}
    total = sum(weights[name] * means[name] for name in LOSS_TERM_NAMES)
    metrics = {f"loss/{name}": value for name, value in means.items()}
    metrics["loss/total"] = total
    return total, metrics


# A denoiser for `elbo`: (z_t [B, *S], t [B]) -> (eps_hat [B, *S], enc_hat [B, N, *S], aux_nll [B, N]) where aux_nll
# is -log p_{D_i}(x_i | z_t, t) of the true auxiliary data; a model with a learned variance appends var_frac [B, *S].
DenoiseFn = Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array, jax.Array]]


def elbo(
    sched: Schedule,
    denoise_fn: DenoiseFn,
    key: jax.Array,
    z0: jax.Array,
    enc: jax.Array,
    aux_dims: Sequence[int] = (),
    bin_width: float | None = None,
) -> dict[str, jax.Array]:
    """The negative ELBO as an exact sum over t = 1..T (one noise draw per step), split by modality.

        -ELBO = KL(q(z_T|z_0,X) || p(z_T)) + sum_{t>=2} L1_t + [-log p(z_0 | z_1)] + sum_i [-log p_{D_i}(x_i | z_1)]

    The diffusion terms are charged to the primary modality (its latent has its dimensions); auxiliary modality i is
    charged its decoder NLL at t = 1 over its own `aux_dims[i]` data dimensions.

    Returns per-example arrays: 'prior', 'diffusion', 'reconstruction' [B] and 'aux_nll' [B, N] in nats;
    'bpd/primary' [B], 'bpd/aux' [B, N] and 'bpd/total' [B] in bits per dimension.
    """
    num_aux = enc.shape[1]
    if len(aux_dims) != num_aux:
        raise ValueError(f"aux_dims must give the data dimensions of each of the N = {num_aux} auxiliary modalities.")
    batch = z0.shape[0]
    primary_dims = int(np.prod(z0.shape[1:]))

    def step(carry, inputs):
        t_value, step_key = inputs
        t = jnp.full((batch,), t_value, dtype=jnp.int32)
        eps = jax.random.normal(step_key, z0.shape, z0.dtype)
        zt = process.q_sample(sched, t, z0, enc, eps)
        eps_hat, enc_hat, aux_nll, *learned = denoise_fn(zt, t)
        log_var = process.learned_log_variance(sched, t, learned[0]) if learned else None
        kl = l1_posterior_kl(sched, t, eps, eps_hat, enc, enc_hat, log_var)
        rec = l3_reconstruction_nll(sched, z0, eps, eps_hat, enc, enc_hat, bin_width, log_var=log_var)
        is_first = t_value == 1
        diffusion, reconstruction, aux = carry
        return (
            diffusion + kl,
            jnp.where(is_first, rec, reconstruction),
            jnp.where(is_first, aux_nll, aux),
        ), None

    steps = jnp.arange(1, sched.num_steps + 1, dtype=jnp.int32)
    keys = jax.random.split(key, sched.num_steps)
    init = (jnp.zeros((batch,)), jnp.zeros((batch,)), jnp.zeros((batch, num_aux)))
    (diffusion, reconstruction, aux_nll), _ = jax.lax.scan(step, init, (steps, keys))
    prior = l3_prior_kl(sched, z0, enc)
    primary_nats = prior + diffusion + reconstruction
    dims = jnp.asarray(aux_dims, dtype=jnp.float32).reshape((num_aux,))
    total_dims = primary_dims + float(sum(aux_dims))
    return {
        "prior": prior,
        "diffusion": diffusion,
        "reconstruction": reconstruction,
        "aux_nll": aux_nll,
        "bpd/primary": primary_nats / (primary_dims * math.log(2.0)),
        "bpd/aux": aux_nll / (dims[None, :] * math.log(2.0)),
        "bpd/total": (primary_nats + jnp.sum(aux_nll, axis=1)) / (total_dims * math.log(2.0)),
    }
