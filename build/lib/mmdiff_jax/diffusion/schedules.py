"""Noise schedules and modality weight schedules for the modality-driven forward process.

Owns the `Schedule` pytree: every coefficient of SPEC §1, precomputed once in float64 (numpy) and stored as
float32 arrays of length T+1 (index 0 = clean data), plus the checks that refuse an unsound schedule.

Conventions (SPEC §1). Steps t = 1..T, modalities i = 1..N.

    q(z_t | z_{t-1}, X) = N(a_t z_{t-1} + sum_i b_t(i) e_i, sigma_t^2 I)
    q(z_t | z_0, X)     = N(abar_t z_0 + sum_i c_t(i) e_i, s_t^2 I)

`abar_t = prod a_s` is the *signal scale* (DDPM's sqrt(alpha_bar_t)), not its square.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from mmdiff_jax.errors import UserError


class ScheduleError(UserError):
    """A schedule that fails its checks; the message names the offending field and the fix."""


# ----------------------------------------------------------------------------------------------------------------
# Beta schedules: pure functions of T returning float64 numpy arrays [T] (beta_t for t = 1..T).
# ----------------------------------------------------------------------------------------------------------------


def linear_betas(num_steps: int, beta_start: float | None = None, beta_end: float | None = None) -> np.ndarray:
    """DDPM's linear schedule, 1e-4 .. 0.02 at T = 1000, both ends scaled by 1000 / T by default (Nichol & Dhariwal)
    so that a shorter chain still reaches the prior. Returns float64 [T]."""
    _check_num_steps(num_steps)
    scale = 1000.0 / num_steps
    beta_start = 1e-4 * scale if beta_start is None else beta_start
    beta_end = 0.02 * scale if beta_end is None else beta_end
    return np.linspace(beta_start, beta_end, num_steps, dtype=np.float64)


def cosine_betas(num_steps: int, offset: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Nichol & Dhariwal's cosine schedule (alpha_bar(t) = cos^2 of a shifted time). Returns float64 [T]."""
    _check_num_steps(num_steps)
    steps = np.arange(num_steps + 1, dtype=np.float64) / num_steps
    alpha_bar = np.cos((steps + offset) / (1.0 + offset) * math.pi / 2.0) ** 2
    betas = 1.0 - alpha_bar[1:] / alpha_bar[:-1]
    return np.clip(betas, 0.0, max_beta)


BETA_SCHEDULES = {"linear": linear_betas, "cosine": cosine_betas}


def make_betas(name: str, num_steps: int, **kwargs) -> np.ndarray:
    """Beta schedule by name ('linear' | 'cosine'). Returns float64 [T]."""
    if name not in BETA_SCHEDULES:
        raise ScheduleError(
            f"diffusion.beta_schedule: unknown beta schedule {name!r}; choose one of {sorted(BETA_SCHEDULES)}."
        )
    return BETA_SCHEDULES[name](num_steps, **kwargs)


def _check_num_steps(num_steps: int) -> None:
    if not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise ScheduleError(f"diffusion.num_steps: must be a positive integer, got {num_steps!r}.")


# ----------------------------------------------------------------------------------------------------------------
# Modality weight schedules: per-step weights b_t(i) for one modality, float64 [T], from the betas and a scale.
# ----------------------------------------------------------------------------------------------------------------


def _signal_scale(betas: np.ndarray) -> np.ndarray:
    """abar_t = prod_{s<=t} sqrt(1 - beta_s) for t = 0..T. float64 [T+1]."""
    return np.concatenate([[1.0], np.cumprod(np.sqrt(1.0 - betas))])


def constant_weights(betas: np.ndarray, scale: float) -> np.ndarray:
    """b_t = scale for every t. Breaks the prior for most scales (SPEC §1): use for experiments only."""
    return np.full(betas.shape, scale, dtype=np.float64)


def linear_decay_weights(betas: np.ndarray, scale: float) -> np.ndarray:
    """b_t decays linearly from `scale` at t = 1 to 0 at t = T."""
    num_steps = betas.shape[0]
    return scale * (1.0 - np.arange(num_steps, dtype=np.float64) / max(num_steps - 1, 1))


def cosine_decay_weights(betas: np.ndarray, scale: float) -> np.ndarray:
    """b_t = scale * cos(pi/2 * (t-1)/(T-1)): from `scale` at t = 1 to 0 at t = T."""
    num_steps = betas.shape[0]
    frac = np.arange(num_steps, dtype=np.float64) / max(num_steps - 1, 1)
    return scale * np.cos(0.5 * math.pi * frac)


def sqrt_alpha_bar_weights(betas: np.ndarray, scale: float) -> np.ndarray:
    """b_t = scale * abar_t: the per-step weight follows the signal level and dies with it."""
    return scale * _signal_scale(betas)[1:]


def profile_weights(betas: np.ndarray, scale: float) -> np.ndarray:
    """The sound default (SPEC §1): a *marginal* profile c_t = scale * 4 abar_t (1 - abar_t).

    The profile vanishes at t = 0 and t = T (where abar -> 0) and peaks at exactly `scale` where abar_t = 1/2.
    The per-step weights are derived from it: b_t = c_t - a_t c_{t-1}.
    """
    abar = _signal_scale(betas)  # [T+1]
    profile = scale * 4.0 * abar * (1.0 - abar)  # [T+1], profile[0] = 0
    a = np.sqrt(1.0 - betas)
    return profile[1:] - a * profile[:-1]


WEIGHT_SCHEDULES = {
    "constant": constant_weights,
    "linear_decay": linear_decay_weights,
    "cosine_decay": cosine_decay_weights,
    "sqrt_alpha_bar": sqrt_alpha_bar_weights,
    "profile": profile_weights,
}


def make_weights(betas: np.ndarray, specs: Sequence[tuple[str, float]]) -> np.ndarray:
    """Stack one weight schedule per modality.

    Args:
      betas: float64 [T].
      specs: one (schedule name, scale) pair per auxiliary modality, in modality order.
    Returns:
      float64 [T, N] with column i = b_t(i) for t = 1..T.
    """
    betas = np.asarray(betas, dtype=np.float64)
    columns = []
    for i, (name, scale) in enumerate(specs):
        if name not in WEIGHT_SCHEDULES:
            raise ScheduleError(
                f"modality weight schedule #{i}: unknown shape {name!r}; choose one of {sorted(WEIGHT_SCHEDULES)}."
            )
        columns.append(WEIGHT_SCHEDULES[name](betas, float(scale)))
    if not columns:
        return np.zeros((betas.shape[0], 0), dtype=np.float64)
    return np.stack(columns, axis=1)


# ----------------------------------------------------------------------------------------------------------------
# The Schedule pytree.
# ----------------------------------------------------------------------------------------------------------------


@flax.struct.dataclass
class Schedule:
    """Every coefficient of the forward process, float32 arrays indexed by t = 0..T (index 0 = clean).

    Shapes: scalar-per-step arrays are [T+1]; per-modality arrays are [T+1, N].
    Static fields (not traced): num_steps T, num_modalities N, prior_kl (nats per dimension, for unit
    encodings, see `prior_mismatch_kl`).
    """

    # transition q(z_t | z_{t-1}, X)
    a: jax.Array  # [T+1]   a_t, a_0 = 1
    sigma2: jax.Array  # [T+1]   sigma_t^2, sigma_0^2 = 0
    b: jax.Array  # [T+1, N] b_t(i), b_0 = 0
    # marginal q(z_t | z_0, X)
    abar: jax.Array  # [T+1]   prod a_s
    c: jax.Array  # [T+1, N] c_t(i)
    s2: jax.Array  # [T+1]   s_t^2
    s: jax.Array  # [T+1]   s_t
    # posterior q(z_{t-1} | z_t, z_0, X): mean = post_z0 z_0 + sum post_e e + post_zt z_t
    post_var: jax.Array  # [T+1] sigma~_t^2 (0 at t = 0, 1)
    post_z0: jax.Array  # [T+1]
    post_zt: jax.Array  # [T+1]
    post_e: jax.Array  # [T+1, N]
    # reverse mean in eps-form: p_mean = inv_a z_t - sum b_over_a e^ - eps_coef eps^
    inv_a: jax.Array  # [T+1] 1 / a_t
    b_over_a: jax.Array  # [T+1, N] b_t(i) / a_t
    eps_coef: jax.Array  # [T+1] sigma_t^2 / (s_t a_t)
    num_steps: int = flax.struct.field(pytree_node=False, default=0)
    num_modalities: int = flax.struct.field(pytree_node=False, default=0)
    prior_kl: float = flax.struct.field(pytree_node=False, default=0.0)


@dataclasses.dataclass(frozen=True)
class Coefficients64:
    """The same coefficients in float64 numpy, for references and reporting. Shapes as in `Schedule`."""

    a: np.ndarray
    sigma2: np.ndarray
    b: np.ndarray
    abar: np.ndarray
    c: np.ndarray
    s2: np.ndarray
    post_var: np.ndarray
    post_z0: np.ndarray
    post_zt: np.ndarray
    post_e: np.ndarray


def prior_mismatch_kl(abar_T: float, c_T: np.ndarray, s2_T: float) -> float:
    """KL(q(z_T | z_0, X) || N(0, I)) per dimension, in nats, for unit encodings (|z_0| = |e_i| = 1, aligned signs).

    The worst case over unit inputs: the mean is abar_T + sum_i |c_T(i)|.
    """
    mean = abs(abar_T) + float(np.sum(np.abs(c_T)))
    return 0.5 * (s2_T + mean**2 - 1.0 - math.log(s2_T))


def compute_coefficients(a: np.ndarray, b: np.ndarray, sigma2: np.ndarray) -> Coefficients64:
    """All closed-form coefficients in float64 from the transition arrays a [T], b [T, N], sigma2 [T]."""
    num_steps, num_modalities = b.shape
    a_full = np.concatenate([[1.0], a])
    sigma2_full = np.concatenate([[0.0], sigma2])
    b_full = np.concatenate([np.zeros((1, num_modalities)), b], axis=0)
    abar = np.cumprod(a_full)
    c = np.zeros((num_steps + 1, num_modalities))
    s2 = np.zeros(num_steps + 1)
    for t in range(1, num_steps + 1):  # the recursions of SPEC §1, once, in float64
        c[t] = a_full[t] * c[t - 1] + b_full[t]
        s2[t] = a_full[t] ** 2 * s2[t - 1] + sigma2_full[t]
    post_var = np.zeros(num_steps + 1)
    post_z0 = np.zeros(num_steps + 1)
    post_zt = np.zeros(num_steps + 1)
    post_e = np.zeros((num_steps + 1, num_modalities))
    t = np.arange(1, num_steps + 1)
    post_var[t] = s2[t - 1] * sigma2_full[t] / s2[t]
    post_z0[t] = sigma2_full[t] * abar[t - 1] / s2[t]
    post_zt[t] = a_full[t] * s2[t - 1] / s2[t]
    post_e[t] = (
        sigma2_full[t, None] * c[t - 1] - a_full[t, None] * s2[t - 1, None] * b_full[t]
    ) / s2[t, None]
    return Coefficients64(
        a=a_full, sigma2=sigma2_full, b=b_full, abar=abar, c=c, s2=s2,
        post_var=post_var, post_z0=post_z0, post_zt=post_zt, post_e=post_e,
    )


def _require_finite(name: str, x: np.ndarray) -> None:
    if not np.all(np.isfinite(x)):
        bad = np.argwhere(~np.isfinite(x))[0].tolist()
        raise ScheduleError(f"make_schedule: `{name}` contains NaN or inf (first at index {bad}); fix its values.")


def make_schedule_from_coefficients(
    a: np.ndarray, b: np.ndarray, sigma2: np.ndarray, prior_tol: float = 1e-2
) -> Schedule:
    """Schedule for any member of the affine-Gaussian family, given its transition arrays.

    Args:
      a: [T] a_t for t = 1..T.
      b: [T, N] b_t(i).
      sigma2: [T] sigma_t^2, strictly positive.
      prior_tol: the largest allowed prior-mismatch KL (nats per dimension); `float('inf')` disables the check.
    Raises:
      ScheduleError naming the field: wrong shapes, NaNs, non-positive variances, a prior mismatch over tolerance.
    """
    a = np.asarray(a, dtype=np.float64)
    sigma2 = np.asarray(sigma2, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.ndim != 1 or a.shape[0] < 1:
        raise ScheduleError(f"make_schedule: `a` must have shape (T,) with T >= 1, got {a.shape}.")
    num_steps = a.shape[0]
    if sigma2.shape != (num_steps,):
        raise ScheduleError(f"make_schedule: `sigma2` has shape {sigma2.shape}; expected (T,) = ({num_steps},).")
    if b.ndim != 2 or b.shape[0] != num_steps:
        raise ScheduleError(
            f"make_schedule: `weights` has shape {b.shape}; expected (T, N) = ({num_steps}, N), one column per "
            "auxiliary modality (use shape (T, 0) for none)."
        )
    for name, x in (("a", a), ("sigma2", sigma2), ("weights", b)):
        _require_finite(name, x)
    if np.any(sigma2 <= 0):
        t = int(np.argmax(sigma2 <= 0)) + 1
        raise ScheduleError(
            f"make_schedule: variance sigma_t^2 = {sigma2[t - 1]:.3g} at t = {t} is not positive; every step must add "
            "noise (betas in (0, 1))."
        )
    if np.any(a <= 0):
        t = int(np.argmax(a <= 0)) + 1
        raise ScheduleError(f"make_schedule: `a` must be positive; a_t = {a[t - 1]:.3g} at t = {t}.")
    co = compute_coefficients(a, b, sigma2)
    prior_kl = prior_mismatch_kl(co.abar[-1], co.c[-1], co.s2[-1])
    if not prior_kl <= prior_tol:
        raise ScheduleError(
            f"make_schedule: prior mismatch KL(q(z_T|z_0,X) || N(0,I)) = {prior_kl:.4g} nats/dim exceeds prior_tol = "
            f"{prior_tol:g} (abar_T = {co.abar[-1]:.3g}, c_T = {np.round(co.c[-1], 4).tolist()}). Encodings injected "
            "early are not washed out by t = T: use the 'profile' weight schedule, smaller weight scales, or more "
            "noise (larger betas / more steps)."
        )
    return _to_device(co, prior_kl)


def make_schedule(betas, weights, prior_tol: float = 1e-2) -> Schedule:
    """The default parametrization a_t = sqrt(1 - beta_t), sigma_t^2 = beta_t, b_t(i) = weights[t-1, i].

    Args:
      betas: [T] in (0, 1).
      weights: [T, N] per-step modality weights b_t(i) for t = 1..T (N may be 0).
      prior_tol: the largest allowed prior-mismatch KL in nats per dimension (inf = no check).
    Returns:
      A `Schedule` whose `prior_kl` field reports the mismatch.
    """
    betas = np.asarray(betas, dtype=np.float64)
    weights = np.asarray(weights, dtype=np.float64)
    if betas.ndim != 1 or betas.shape[0] < 1:
        raise ScheduleError(f"make_schedule: `betas` must have shape (T,) with T >= 1, got {betas.shape}.")
    _require_finite("betas", betas)
    if np.any((betas <= 0) | (betas >= 1)):
        t = int(np.argmax((betas <= 0) | (betas >= 1))) + 1
        raise ScheduleError(
            f"make_schedule: `betas` must lie in (0, 1) (variance sigma_t^2 = beta_t > 0, a_t real); "
            f"beta_t = {betas[t - 1]:.3g} at t = {t}."
        )
    if weights.ndim == 1 and weights.shape[0] == betas.shape[0]:
        raise ScheduleError(
            f"make_schedule: `weights` has shape {weights.shape}; expected (T, N) = ({betas.shape[0]}, N). "
            "For one modality pass weights[:, None]."
        )
    sched = make_schedule_from_coefficients(np.sqrt(1.0 - betas), weights, betas, prior_tol)
    logging.info("Schedule: T=%d, N=%d, prior mismatch KL = %.3g nats/dim", sched.num_steps, sched.num_modalities,
                 sched.prior_kl)
    return sched


def _to_device(co: Coefficients64, prior_kl: float) -> Schedule:
    f32 = lambda x: jnp.asarray(x, dtype=jnp.float32)  # noqa: E731
    t = np.arange(1, co.a.shape[0])
    inv_a = 1.0 / co.a
    eps_coef = np.zeros_like(co.a)
    eps_coef[t] = co.sigma2[t] / (np.sqrt(co.s2[t]) * co.a[t])
    return Schedule(
        a=f32(co.a), sigma2=f32(co.sigma2), b=f32(co.b),
        abar=f32(co.abar), c=f32(co.c), s2=f32(co.s2), s=f32(np.sqrt(co.s2)),
        post_var=f32(co.post_var), post_z0=f32(co.post_z0), post_zt=f32(co.post_zt), post_e=f32(co.post_e),
        inv_a=f32(inv_a), b_over_a=f32(co.b * inv_a[:, None]), eps_coef=f32(eps_coef),
        num_steps=int(co.a.shape[0] - 1), num_modalities=int(co.b.shape[1]), prior_kl=float(prior_kl),
    )

