"""Reading the label codes out of z_t in closed form (`diffusion.denoiser_output = 'read_codes'`).

A label modality i adds one of K fixed codes e_k [*S] to the latent: z_t = abar_t z_0 + sum_j c_t(j) e_j + s_t ε.
At the weight profile's peak the code is as large as everything else in z_t, and it is white noise: a convolutional
denoiser can neither reproduce nor subtract a position-specific random pattern, so to it the code is extra noise.
The code table is known, though, so the class can be read by its Bayes classifier and the code's expected share taken
out of the latent before the denoiser sees it.

The classifier treats everything in z_t but label i's code as Gaussian with an unknown (flat) mean per channel (the
image's brightness) and variance v_t per dimension, v_t = abar_t^2 + s_t^2 + sum_{j != i} c_t(j)^2 (data in [-1, 1]
have at most unit variance per dimension, codes unit RMS): an upper bound, so the reader errs on the side of doubt.
With a uniform prior over the classes,

    log p(k | z_t) = c_t(i) <z_t, d_k> / v_t - c_t(i)^2 <e_k, d_k> / (2 v_t) + const,    d_k = e_k - its channel means,

the Gaussian log-likelihood of z_t projected off the per-channel constants. No parameters: it is exact when its
assumptions hold (tests/test_code_reader.py checks it against a float64 Gaussian likelihood and by Monte Carlo).
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from mmdiff_jax.diffusion.schedules import Schedule

_EXACT = jax.lax.Precision.HIGHEST


def read_kinds() -> tuple[str, ...]:
    """The modality kinds whose codes are read (a fixed table of codes per class)."""
    return ("label",)


def class_logits(codes: jax.Array, zt: jax.Array, c: jax.Array, var: jax.Array) -> jax.Array:
    """The classifier above: codes [K, *S], zt [B, *S], c [B] (the code's coefficient c_t(i)), var [B] (v_t) ->
    log p(k | z_t) up to a constant, [B, K]."""
    codes = jnp.asarray(codes, jnp.float32)
    spatial = tuple(range(1, codes.ndim - 1))  # the per-channel mean is over the spatial axes
    directions = codes - jnp.mean(codes, axis=spatial, keepdims=True)  # d_k [K, *S]
    flat_d = directions.reshape(codes.shape[0], -1)
    energy = jnp.sum(codes.reshape(codes.shape[0], -1) * flat_d, axis=1)  # <e_k, d_k> [K]
    corr = jnp.matmul(zt.reshape(zt.shape[0], -1).astype(jnp.float32), flat_d.T, precision=_EXACT)  # [B, K]
    c, var = c[:, None], var[:, None]
    return c * corr / var - 0.5 * c**2 * energy[None, :] / var


def read(mods, sched: Schedule, zt: jax.Array, t: jax.Array, present: jax.Array | None = None,
         known: Mapping[str, jax.Array] | None = None) -> tuple[jax.Array, jax.Array]:
    """The read classes and codes of every label modality at (z_t [B, *S], t [B]).

    Returns (probs [B, sum of the read modalities' K], enc_read [B, N, *S]): the reader's class probabilities,
    concatenated in modality order, and the expected codes sum_k p(k | z_t) e_k (zero for modalities that are not
    read). `present` [B, N] (modality dropout): an absent modality's code is not in z_t, so it reads as zero.
    `known` {label modality name: int [B]} (`diffusion.read_known_classes`): those classes are not read but taken as
    given, probabilities one-hot and codes exact (the data's in training, given or drawn labels in sampling).
    """
    batch = zt.shape[0]
    c_all = sched.c[t]  # [B, N]
    total = sched.abar[t] ** 2 + sched.s2[t] + jnp.sum(c_all**2, axis=1)  # [B]
    probs, enc = [], []
    for i, m in enumerate(mods.aux):
        if m.kind not in read_kinds():
            enc.append(jnp.zeros_like(zt))
            continue
        codes = jnp.asarray(m.codes)
        c = c_all[:, i]
        if known is not None and m.name in known:
            p = jax.nn.one_hot(known[m.name], codes.shape[0], dtype=jnp.float32)  # [B, K]
        else:
            p = jax.nn.softmax(class_logits(codes, zt, c, total - c**2), axis=-1)  # [B, K]
        if present is not None:
            p = p * present[:, i:i + 1].astype(p.dtype)
        probs.append(p)
        enc.append(jnp.tensordot(p, codes, axes=(1, 0), precision=_EXACT))
    probs = jnp.concatenate(probs, axis=1) if probs else jnp.zeros((batch, 0), jnp.float32)
    enc_read = jnp.stack(enc, axis=1) if enc else jnp.zeros((batch, 0) + zt.shape[1:], jnp.float32)
    return probs, enc_read


def num_read_classes(mods) -> int:
    """sum of K over the modalities whose codes are read: the width of `read`'s probabilities."""
    return int(np.sum([m.spec.num_classes for m in mods.aux if m.kind in read_kinds()], dtype=np.int64))
