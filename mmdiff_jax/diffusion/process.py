"""The modality-driven forward process and the reverse mean (SPEC §1): pure, batched, jit-able.

Shapes: t int [B] in 1..T; latents z [B, *S]; encodings enc [B, N, *S] (N may be 0). Every function returns a mean of
the latent's shape and a variance of shape [B, 1, ..., 1] that broadcasts against it. Nothing loops over steps:
every closed form costs the same at t = T as at t = 1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mmdiff_jax.diffusion.schedules import Schedule


def per_example(coef: jax.Array, t: jax.Array, like: jax.Array) -> jax.Array:
    """coef [T+1] gathered at t [B] -> [B, 1, ..., 1] broadcasting against `like` [B, *S]."""
    return coef[t].reshape((t.shape[0],) + (1,) * (like.ndim - 1))


def mix_modalities(coef: jax.Array, t: jax.Array, enc: jax.Array) -> jax.Array:
    """sum_i coef[t, i] * enc[:, i]: coef [T+1, N], t [B], enc [B, N, *S] -> [B, *S]."""
    w = coef[t].reshape(coef[t].shape + (1,) * (enc.ndim - 2))  # [B, N, 1, ...]
    return jnp.sum(w * enc, axis=1)


def _check(t: jax.Array, z: jax.Array, enc: jax.Array, sched: Schedule) -> None:
    """Trace-time shape checks with messages that name the argument."""
    if t.ndim != 1 or t.shape[0] != z.shape[0]:
        raise ValueError(f"t must have shape (B,) = ({z.shape[0]},), got {t.shape}.")
    if not jnp.issubdtype(t.dtype, jnp.integer):
        raise TypeError(f"t must be an integer array of steps in 1..T, got dtype {t.dtype}.")
    expected = (z.shape[0], sched.num_modalities) + z.shape[1:]
    if enc.shape != expected:
        raise ValueError(
            f"enc must have shape (B, N, *S) = {expected} for this schedule (N = {sched.num_modalities}), "
            f"got {enc.shape}."
        )


def q_step(sched: Schedule, t: jax.Array, z_prev: jax.Array, enc: jax.Array) -> tuple[jax.Array, jax.Array]:
    """q(z_t | z_{t-1}, X) = N(a_t z_{t-1} + sum_i b_t(i) e_i, sigma_t^2 I).

    Returns mean [B, *S] and variance [B, 1, ..., 1].
    """
    _check(t, z_prev, enc, sched)
    mean = per_example(sched.a, t, z_prev) * z_prev + mix_modalities(sched.b, t, enc)
    return mean, per_example(sched.sigma2, t, z_prev)


def q_marginal(sched: Schedule, t: jax.Array, z0: jax.Array, enc: jax.Array) -> tuple[jax.Array, jax.Array]:
    """q(z_t | z_0, X) = N(abar_t z_0 + sum_i c_t(i) e_i, s_t^2 I), closed form. t = 0 gives (z_0, 0)."""
    _check(t, z0, enc, sched)
    mean = per_example(sched.abar, t, z0) * z0 + mix_modalities(sched.c, t, enc)
    return mean, per_example(sched.s2, t, z0)


def q_sample(sched: Schedule, t: jax.Array, z0: jax.Array, enc: jax.Array, noise: jax.Array) -> jax.Array:
    """A draw z_t = abar_t z_0 + sum_i c_t(i) e_i + s_t * noise, with noise ~ N(0, I) of z0's shape."""
    if noise.shape != z0.shape:
        raise ValueError(f"noise must have the shape of z0 {z0.shape}, got {noise.shape}.")
    _check(t, z0, enc, sched)
    mean = per_example(sched.abar, t, z0) * z0 + mix_modalities(sched.c, t, enc)
    return mean + per_example(sched.s, t, z0) * noise


def q_posterior(
    sched: Schedule, t: jax.Array, zt: jax.Array, z0: jax.Array, enc: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """q(z_{t-1} | z_t, z_0, X) = N(mu~_t, sigma~_t^2 I), t in 1..T (at t = 1 the variance is 0 and mu~ = z_0).

    mu~_t = [sigma_t^2 (abar_{t-1} z_0 + sum c_{t-1} e) + a_t s_{t-1}^2 (z_t - sum b_t e)] / s_t^2, with the three
    coefficients precomputed in float64.
    """
    _check(t, z0, enc, sched)
    if zt.shape != z0.shape:
        raise ValueError(f"zt must have the shape of z0 {z0.shape}, got {zt.shape}.")
    mean = (
        per_example(sched.post_z0, t, z0) * z0
        + per_example(sched.post_zt, t, zt) * zt
        + mix_modalities(sched.post_e, t, enc)
    )
    return mean, per_example(sched.post_var, t, z0)


def predict_z0(sched: Schedule, t: jax.Array, zt: jax.Array, eps_hat: jax.Array, enc_hat: jax.Array) -> jax.Array:
    """ẑ_0 = (z_t - sum_i c_t(i) ê_i - s_t ε̂) / abar_t. Divides by abar_t (errors grow ~1/abar_t near t = T): the
    ancestral and DDIM steps avoid it; ẑ_0 clipping and DPM-Solver++ need ẑ_0 itself."""
    _check(t, zt, enc_hat, sched)
    shifted = zt - mix_modalities(sched.c, t, enc_hat) - per_example(sched.s, t, zt) * eps_hat
    return shifted / per_example(sched.abar, t, zt)


def p_mean(sched: Schedule, t: jax.Array, zt: jax.Array, eps_hat: jax.Array, enc_hat: jax.Array) -> jax.Array:
    """Reverse mean without dividing by abar_t (SPEC §1):

        p_mean = (z_t - sum_i b_t(i) ê_i - (sigma_t^2 / s_t) ε̂) / a_t  ==  mu~_t(z_t, ẑ_0, ê).

    Args:
      t: int [B] in 1..T; zt, eps_hat: [B, *S]; enc_hat: [B, N, *S] predicted (or known) encodings.
    Returns:
      [B, *S]; the reverse variance is `sched.post_var[t]`.
    """
    _check(t, zt, enc_hat, sched)
    return (
        per_example(sched.inv_a, t, zt) * zt
        - mix_modalities(sched.b_over_a, t, enc_hat)
        - per_example(sched.eps_coef, t, zt) * eps_hat
    )


def learned_log_variance(sched: Schedule, t: jax.Array, frac: jax.Array) -> jax.Array:
    """ADM's learned reverse variance (Nichol & Dhariwal 2021, "Improved DDPM"), per element:

        log sigma_θ^2 = frac log sigma_t^2 + (1 - frac) log sigma~_t^2,      frac = (v + 1) / 2,

    between the transition's variance sigma_t^2 (DDPM's beta_t) and the posterior's sigma~_t^2. sigma~_1^2 = 0 is
    replaced by sigma~_2^2 (ADM's `posterior_log_variance_clipped`). The shifts do not change either variance, so
    these are DDPM's formulas. t int [B] in 1..T; frac [B, *S]. Returns [B, *S].
    """
    clipped = jnp.where(t == 1, sched.post_var[min(2, sched.num_steps)], sched.post_var[t])  # [B]
    lower = jnp.log(jnp.maximum(clipped, 1e-20)).reshape((t.shape[0],) + (1,) * (frac.ndim - 1))
    upper = jnp.log(per_example(sched.sigma2, t, frac))
    return frac * upper + (1.0 - frac) * lower


def sample_timesteps(key: jax.Array, batch_size: int, num_steps: int) -> jax.Array:
    """Uniform t in 1..T, int32 [B]."""
    return jax.random.randint(key, (batch_size,), 1, num_steps + 1, dtype=jnp.int32)
