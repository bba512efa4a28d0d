"""Per-example negative log-likelihoods (nats) of the decoder heads: Gaussian (continuous or discretized) and
categorical. Each sums over every non-batch dimension and returns [B]."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.scipy.special import log_ndtr


def _sum_non_batch(x: jax.Array) -> jax.Array:
    return jnp.sum(x.reshape(x.shape[0], -1), axis=1)


def gaussian_nll(x: jax.Array, mean: jax.Array, var: jax.Array) -> jax.Array:
    """-log N(x; mean, var) summed over non-batch dims. x, mean [B, *S]; var broadcastable. Returns [B]."""
    var = jnp.broadcast_to(var, x.shape)
    nll = 0.5 * (jnp.log(2.0 * math.pi * var) + (x - mean) ** 2 / var)
    return _sum_non_batch(nll)


def _log_prob_between(lower: jax.Array, upper: jax.Array) -> jax.Array:
    """log(Phi(upper) - Phi(lower)) for standardized bounds, stable in both tails."""
    # In the upper tail use the survival function: Phi(u) - Phi(l) = Phi(-l) - Phi(-u).
    flip = lower > 0
    hi = jnp.where(flip, -lower, upper)
    lo = jnp.where(flip, -upper, lower)
    log_hi, log_lo = log_ndtr(hi), log_ndtr(lo)
    return log_hi + jnp.log1p(-jnp.exp(jnp.minimum(log_lo - log_hi, -1e-12)))


def discretized_gaussian_nll(
    x: jax.Array, mean: jax.Array, var: jax.Array, bin_width: float, data_range: tuple[float, float] = (-1.0, 1.0)
) -> jax.Array:
    """-log P(x) for data on a grid of spacing `bin_width` inside `data_range`, under N(mean, var) integrated over
    each bin; the two edge bins extend to -inf and +inf (DDPM's decoder). x, mean [B, *S]. Returns [B] in nats."""
    std = jnp.sqrt(jnp.broadcast_to(var, x.shape))
    lower = (x - 0.5 * bin_width - mean) / std
    upper = (x + 0.5 * bin_width - mean) / std
    low_edge = x <= data_range[0] + 0.5 * bin_width
    high_edge = x >= data_range[1] - 0.5 * bin_width
    log_p = jnp.where(
        low_edge,
        log_ndtr(upper),
        jnp.where(high_edge, log_ndtr(-lower), _log_prob_between(lower, upper)),
    )
    return -_sum_non_batch(log_p)


def categorical_nll(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Cross-entropy summed over positions. logits [B, *P, K]; labels int [B, *P]. Returns [B]."""
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"labels must have shape {logits.shape[:-1]} (logits minus classes), got {labels.shape}.")
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(log_probs, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return -_sum_non_batch(picked)
