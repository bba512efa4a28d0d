"""Ancestral (DDPM), DDIM and DPM-Solver++(2M) samplers for the modality-driven process; the whole loop is one
`lax.scan`. Classifier-free guidance per auxiliary modality for models trained with modality dropout.

Respacing. Sampling on a subsequence 0 = τ_0 < τ_1 < ... < τ_K = T of the training steps is itself a member of the
affine-Gaussian family: the transition τ_{k-1} -> τ_k has

    a'_k = abar_{τ_k} / abar_{τ_{k-1}},  b'_k = c_{τ_k} - a'_k c_{τ_{k-1}},  sigma'^2_k = s^2_{τ_k} - a'^2_k s^2_{τ_{k-1}},

so its marginals are exactly those of the training process at τ_k, and the same closed forms apply.

Conditioning. A predict function returns ε̂, the predicted encodings ê and the heads' outputs. Known auxiliary
modalities replace ê with their true encodings (`known_enc`, `known_mask`) in p_θ = N(mu~(z_t, ẑ_0, e), sigma~^2),
with ẑ_0 the model's own estimate (see `condition_eps`); a known primary z_0 turns each step into a draw from the
true posterior q(z_{k-1} | z_k, z_0, ê) (image -> label).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from mmdiff_jax.diffusion import process, schedules
from mmdiff_jax.errors import UserError

# (z_t [B, *S], t [B] in the *training* step numbering) -> (eps_hat [B, *S], enc_hat [B, N, *S], head outputs pytree)
# and, for a model with a learned variance, a fourth item var_frac [B, *S] (`process.learned_log_variance`; None or
# absent: the posterior variance). `objective.predict` returns these four.
PredictFn = Callable[[jax.Array, jax.Array], tuple]


@dataclasses.dataclass(frozen=True)
class SamplingChain:
    """A (possibly respaced) schedule and, for each of its steps k = 0..K, the training step τ_k."""

    sched: schedules.Schedule
    model_t: np.ndarray  # int32 [K+1]

    @property
    def num_steps(self) -> int:
        return self.sched.num_steps


def respace(betas: np.ndarray, weights: np.ndarray, num_steps: int) -> SamplingChain:
    """The chain on `num_steps` evenly spaced training steps (always ending at T). betas [T], weights [T, N]."""
    total = betas.shape[0]
    if not 1 <= num_steps <= total:
        raise UserError(f"sample.num_steps={num_steps} must lie in 1..diffusion.num_steps={total}.")
    co = schedules.compute_coefficients(np.sqrt(1.0 - betas), weights, betas)
    taus = np.unique(np.round(np.linspace(0, total, num_steps + 1)).astype(np.int64))
    prev, cur = taus[:-1], taus[1:]
    a = co.abar[cur] / co.abar[prev]
    b = co.c[cur] - a[:, None] * co.c[prev]
    sigma2 = co.s2[cur] - a**2 * co.s2[prev]
    sched = schedules.make_schedule_from_coefficients(a, b, sigma2, prior_tol=float("inf"))
    return SamplingChain(sched=sched, model_t=taus.astype(np.int32))


METHODS = ("ddpm", "ddim", "dpm2m")


@dataclasses.dataclass(frozen=True)
class Guidance:
    """Classifier-free guidance for auxiliary modality `index`: ε̃ = ε̂ + weight (ε̂ - ε̂_without), applied where the
    training step t lies in [t_min, t_max] (see `make_reverse_step`)."""

    index: int
    weight: float
    t_min: int = 0
    t_max: int = 1 << 30


def make_reverse_step(
    chain: SamplingChain,
    predict_fn: PredictFn,
    key: jax.Array,
    batch_size: int,
    latent_shape: tuple[int, ...],
    *,
    method: str = "ddpm",
    eta: float = 0.0,
    known_z0: jax.Array | None = None,
    known_enc: jax.Array | None = None,
    known_mask: jax.Array | None = None,
    clip_z0: bool = False,
    known_pixels: tuple[jax.Array, jax.Array] | None = None,
    present: jax.Array | None = None,
    guidance: tuple[Guidance, ...] = (),
) -> Callable[[Any, jax.Array], tuple[Any, Any]]:
    """One reverse step k -> k-1 of the chain, `step(carry, k) -> (carry, head outputs)`; the carry is z_k (for
    'dpm2m': (z_k, the previous step's ẑ_0)) and the step's noise is `fold_in(key, k)`. `sample` scans it; anything
    else (a Python loop, a benchmark) can call it step by step. The arguments are those of `sample`."""
    if method not in METHODS:
        raise UserError(f"sample.sampler: unknown sampler {method!r}; choose one of {', '.join(METHODS)}.")
    sched = chain.sched
    model_t = jnp.asarray(chain.model_t)
    n = sched.num_modalities
    if known_mask is None:
        known_mask = jnp.zeros((n,), bool)
    if known_enc is None:
        known_enc = jnp.zeros((batch_size, n) + tuple(latent_shape), jnp.float32)
    if guidance and present is None:
        present = jnp.ones((n,), bool)
    bad = [g.index for g in guidance if not 0 <= g.index < n]
    if bad:
        raise ValueError(f"guidance for auxiliary modality {bad}: the model has {n}.")
    per_mod = (1, n) + (1,) * len(latent_shape)  # [N] -> broadcast against [B, N, *S]
    mask = jnp.asarray(known_mask).reshape(per_mod)
    lam = _log_snr(sched)  # [K+1], +inf at k = 0

    def encodings_and_eps(z, t, t_model, keep):
        """ε̂ conditioned on the known encodings, ê with the modalities outside `keep` [N] dropped, the heads'
        outputs and the learned variance's frac (or None)."""
        if keep is None:
            eps_model, enc_model, heads, *learned = predict_fn(z, t_model)
        else:
            eps_model, enc_model, heads, *learned = predict_fn(z, t_model, jnp.broadcast_to(keep, (batch_size, n)))
            enc_model = enc_model * keep.reshape(per_mod)  # a dropped modality does not drive the process
        enc_hat = jnp.where(mask, known_enc, enc_model)
        if keep is not None:
            enc_hat = enc_hat * keep.reshape(per_mod)
        var_frac = learned[0] if learned else None
        return condition_eps(sched, t, z, eps_model, enc_model, enc_hat), enc_hat, heads, var_frac

    def step(carry, k):
        z, x0_prev = carry if method == "dpm2m" else (carry, None)
        t = jnp.full((batch_size,), k, jnp.int32)
        t_model = jnp.full((batch_size,), model_t[k], jnp.int32)
        eps_hat, enc_hat, heads, var_frac = encodings_and_eps(z, t, t_model, present)
        guided = eps_hat
        for g in guidance:  # ε̂_without: the latent with modality i's shift removed, and i marked absent
            keep = present.at[g.index].set(False)
            z_without = z - process.mix_modalities(sched.c, t, enc_hat * (~keep).reshape(per_mod))
            eps_without = encodings_and_eps(z_without, t, t_model, keep)[0]
            active = (model_t[k] >= g.t_min) & (model_t[k] <= g.t_max)
            guided = guided + jnp.where(active, g.weight, 0.0) * (eps_hat - eps_without)
        eps_hat = guided
        if clip_z0:
            eps_hat = clip_eps(sched, t, z, eps_hat, enc_hat)
        noise = jax.random.normal(jax.random.fold_in(key, k), z.shape, jnp.float32)
        x0 = None
        if known_z0 is not None:
            mean, var = process.q_posterior(sched, t, z, known_z0, enc_hat)
            z_next = mean + jnp.sqrt(var) * noise
        elif method == "ddpm":
            mean = process.p_mean(sched, t, z, eps_hat, enc_hat)
            if var_frac is None:
                var = process.per_example(sched.post_var, t, z)
            else:  # the learned variance of this chain's step; the last step adds no noise (ADM's p_sample)
                var = jnp.where(k > 1, jnp.exp(process.learned_log_variance(sched, t, var_frac)), 0.0)
            z_next = mean + jnp.sqrt(var) * noise
        elif method == "ddim":
            z_next = ddim_step(sched, t, z, eps_hat, enc_hat, noise, eta)
        else:
            x0 = process.predict_z0(sched, t, z, eps_hat, enc_hat)
            z_next = dpm_solver_2m_step(sched, lam, k, chain.num_steps, z, x0, x0_prev, enc_hat)
        if known_pixels is not None:
            values, where = known_pixels
            fresh = jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, k), 1), z.shape, jnp.float32)
            z_next = jnp.where(where, process.q_sample(sched, t - 1, values, enc_hat, fresh), z_next)
        if method == "dpm2m":
            return (z_next, x0 if x0 is not None else z_next), heads
        return z_next, heads

    return step


def sample(
    chain: SamplingChain,
    predict_fn: PredictFn,
    key: jax.Array,
    batch_size: int,
    latent_shape: tuple[int, ...],
    *,
    method: str = "ddpm",
    eta: float = 0.0,
    known_z0: jax.Array | None = None,
    known_enc: jax.Array | None = None,
    known_mask: jax.Array | None = None,
    clip_z0: bool = False,
    known_pixels: tuple[jax.Array, jax.Array] | None = None,
    present: jax.Array | None = None,
    guidance: tuple[Guidance, ...] = (),
) -> tuple[jax.Array, Any]:
    """Run the reverse chain from z_K ~ N(0, I) to z_0.

    Args:
      method: 'ddpm' (ancestral, variance sigma~^2 or the model's learned one), 'ddim' (eta = 0 deterministic; eta = 1 ancestral-like) or
        'dpm2m' (DPM-Solver++(2M) on the probability-flow ODE, see `dpm_solver_2m_step`).
      known_z0: [B, *S] a given primary (image -> other modalities), or None.
      known_enc: [B, N, *S] true encodings of the given auxiliary modalities; used where known_mask [N] is True.
      clip_z0: clip each step's ẑ_0 to the data range [-1, 1] (see `clip_eps`).
      known_pixels: (values [B, *S], where [B, *S] bool): inpainting by replacement (score-SDE style) for a model
        that has no masked-image modality: after every step the known latent entries are overwritten by a fresh
        draw of q(z_{k-1} | z_0 = values, ê), so they end exactly at `values`.
      present: [N] bool, for a model trained with modality dropout: the auxiliary modalities that drive the process
        (False = left out: marginal generation without them); None = the model's default (all).
        predict_fn is then called as predict_fn(z, t, present [B, N]).
      guidance: classifier-free guidance per auxiliary modality (`Guidance`), for models trained with dropout.
    Returns:
      z_0 [B, *S] (the final mean, no noise added) and the heads' outputs at the last step (t = τ_1).
    """
    init_key, loop_key = jax.random.split(key)
    step = make_reverse_step(chain, predict_fn, loop_key, batch_size, latent_shape, method=method, eta=eta,
                             known_z0=known_z0, known_enc=known_enc, known_mask=known_mask, clip_z0=clip_z0,
                             known_pixels=known_pixels, present=present, guidance=guidance)
    z_init = jax.random.normal(init_key, (batch_size,) + tuple(latent_shape), jnp.float32)
    carry_init = (z_init, jnp.zeros_like(z_init)) if method == "dpm2m" else z_init
    last = jnp.int32(chain.num_steps)
    heads_init = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(step, carry_init, last)[1])

    def body(carry, k):  # carries only the latest heads, not one per step
        carry_next, heads = step(carry[0], k)
        return (carry_next, heads), None

    steps = jnp.arange(chain.num_steps, 0, -1, dtype=jnp.int32)  # K .. 1
    (final, last_heads), _ = jax.lax.scan(body, (carry_init, heads_init), steps)
    return (final[0] if method == "dpm2m" else final), last_heads


def _log_snr(sched: schedules.Schedule) -> jax.Array:
    """λ_k = log(abar_k / s_k) [K+1] (+inf at k = 0, where s_0 = 0)."""
    return jnp.log(sched.abar) - jnp.log(sched.s)


def dpm_solver_2m_step(sched, lam, k, num_steps, zt, x0, x0_prev, enc_hat) -> jax.Array:
    """DPM-Solver++(2M) (Lu et al. 2022, data prediction) on y_t = z_t - sum c_t ê, which is a plain DDPM chain with
    signal abar_t and noise s_t, shifted back with the same ê (as in `ddim_step`):

        y_{k-1} = (s_{k-1} / s_k) y_k + (abar_{k-1} - s_{k-1} abar_k / s_k) D,      [= -abar_{k-1}(e^{-h} - 1) D]
        D = (1 + 1/(2r)) ẑ_0 - 1/(2r) ẑ_0^{prev},  h = λ_{k-1} - λ_k,  r = h_prev / h,  λ = log(abar / s).

    The first step (k = K) and the last (k = 1, h = inf) are first order (D = ẑ_0: DDIM with eta = 0).
    k is a traced scalar; zt, x0, x0_prev [B, *S]; enc_hat [B, N, *S].
    """
    y = zt - process.mix_modalities(sched.c, jnp.full((zt.shape[0],), k, jnp.int32), enc_hat)
    h = lam[k - 1] - lam[k]
    h_prev = lam[k] - lam[jnp.minimum(k + 1, num_steps)]
    first_order = (k == num_steps) | (k == 1)
    r = jnp.where(first_order, 1.0, h_prev / jnp.where(first_order, 1.0, h))
    d = jnp.where(first_order, x0, (1.0 + 0.5 / r) * x0 - (0.5 / r) * x0_prev)
    ratio = sched.s[k - 1] / sched.s[k]
    y_next = ratio * y + (sched.abar[k - 1] - ratio * sched.abar[k]) * d
    return y_next + process.mix_modalities(sched.c, jnp.full((zt.shape[0],), k - 1, jnp.int32), enc_hat)


def condition_eps(sched, t, zt, eps_model, enc_model, enc_hat) -> jax.Array:
    """The noise estimate consistent with replacing the model's encodings by known ones (SPEC §1).

    The denoiser only sees z_t, so its ε̂ absorbs the part c_t (e - ê) of any encoding it is unsure of. Keeping its
    ẑ_0 = (z_t - sum c_t ê - s_t ε̂) / abar_t and substituting the known e gives, without dividing by abar_t,
        ε' = ε̂ + sum_i c_t(i) (ê_i - e_i) / s_t,   so that   p_mean(z_t, ε', e) = mu~_t(z_t, ẑ_0, e).
    For unknown modalities e = ê and nothing changes.
    """
    shift = process.mix_modalities(sched.c, t, enc_model - enc_hat)
    return eps_model + shift / process.per_example(sched.s, t, zt)


def clip_eps(sched, t, zt, eps_hat, enc_hat, low: float = -1.0, high: float = 1.0) -> jax.Array:
    """The noise estimate whose ẑ_0 is clipped to the data range (DDPM's `clip_denoised`, for the shifted mean):

        ẑ_0 = (z_t - sum c_t ê - s_t ε̂) / abar_t,   ε' = ε̂ + abar_t (ẑ_0 - clip(ẑ_0)) / s_t,

    so that (z_t - sum c_t ê - s_t ε') / abar_t = clip(ẑ_0). Where ẑ_0 is in range, ε' = ε̂ exactly.
    """
    z0 = process.predict_z0(sched, t, zt, eps_hat, enc_hat)
    excess = z0 - jnp.clip(z0, low, high)
    return eps_hat + process.per_example(sched.abar, t, zt) * excess / process.per_example(sched.s, t, zt)


def ddim_step(sched, t, zt, eps_hat, enc_hat, noise, eta: float) -> jax.Array:
    """DDIM on y_t = z_t - sum c_t e (a plain DDPM chain), shifted back:

        z_{t-1} = sum c_{t-1} ê + (z_t - sum c_t ê - s_t ε̂) / a_t + sqrt(s_{t-1}^2 - σ_η^2) ε̂ + σ_η ξ,
        σ_η^2 = η^2 sigma~_t^2.
    """
    var_eta = (eta**2) * process.per_example(sched.post_var, t, zt)
    s_prev2 = process.per_example(sched.s2, t - 1, zt)
    y0_scaled = (zt - process.mix_modalities(sched.c, t, enc_hat) - process.per_example(sched.s, t, zt) * eps_hat)
    y0_scaled = y0_scaled * process.per_example(sched.inv_a, t, zt)  # = abar_{t-1} ŷ_0
    direction = jnp.sqrt(jnp.maximum(s_prev2 - var_eta, 0.0)) * eps_hat
    return process.mix_modalities(sched.c, t - 1, enc_hat) + y0_scaled + direction + jnp.sqrt(var_eta) * noise
