"""Probe a decoder head at fixed steps of the forward process: how well does the head of a categorical modality
(label, mask) read it from z_t ~ q(z_t | z_0, X), with the modality's own encoding in the process and without it?

With it, the head can read the modality from the encoding's shift c_t(i) e_i as well as from the image; without it,
only from the image. Where c_t(i) is negligible (t near 0) the two agree, and there the head is a classifier of
nearly clean images: that is the reading an image -> label reverse process ends with (see the README, issue 8).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mmdiff_jax.diffusion import process
from mmdiff_jax.diffusion.schedules import Schedule

# (z_t [B, *S], t [B], present [B, N] or None) -> (ε̂ [B, *S], {aux modality name: head output})
ApplyFn = Callable[[jax.Array, jax.Array, jax.Array | None], tuple[jax.Array, Any]]
# head outputs -> the head's decoded prediction of the probed modality, e.g. int [B] or [B, H, W]
ReadFn = Callable[[Any], jax.Array]


def head_accuracy_by_step(
    sched: Schedule,
    apply_fn: ApplyFn,
    read_fn: ReadFn,
    z0: np.ndarray,
    enc: np.ndarray,
    truth: np.ndarray,
    index: int,
    steps: Sequence[int],
    key: jax.Array,
    *,
    draws: int = 4,
    batch_size: int = 500,
    tell_presence: bool = False,
) -> np.ndarray:
    """Accuracy of `read_fn` against `truth`, per step and with / without auxiliary modality `index` in the process.

    Args:
      z0: [M, *S] held-out primaries; enc: [M, N, *S] their auxiliary encodings; truth: [M, ...] the probed
        modality's data, compared elementwise with the head's decoded prediction (a label: accuracy; a mask: pixel
        accuracy).
      steps: training steps t in 1..T.
      draws: independent forward draws of z_t per example and step (the same draws with and without the
        modality); the accuracy is their mean.
      tell_presence: the model was trained with modality dropout; without the modality it is told so
        (`present[:, index] = 0`), as in training. Otherwise it gets no presence input.
    Returns:
      float64 [len(steps), 2]: column 0 with the modality's encoding in z_t, column 1 without it.
    """
    num, n_aux = enc.shape[0], enc.shape[1]
    if not 0 <= index < n_aux:
        raise ValueError(f"index {index} must name one of the {n_aux} auxiliary modalities.")
    bad = [t for t in steps if not 1 <= int(t) <= sched.num_steps]
    if bad:
        raise ValueError(f"steps {bad} must lie in 1..{sched.num_steps} (diffusion.num_steps).")
    bs = min(batch_size, num)

    @jax.jit
    def correct(z0_b, enc_b, truth_b, valid_b, t, keep, k):
        """Number of correct elements among the valid examples of one batch, at step t with keep in {0., 1.}."""
        tt = jnp.full((bs,), t, jnp.int32)
        enc_k = enc_b.at[:, index].multiply(keep)
        zt = process.q_sample(sched, tt, z0_b, enc_k, jax.random.normal(k, z0_b.shape))
        present = jnp.ones((bs, n_aux), jnp.float32).at[:, index].set(keep) if tell_presence else None
        _, heads = apply_fn(zt, tt, present)
        hits = (read_fn(heads) == truth_b).reshape(bs, -1).mean(axis=1)  # [B], elementwise accuracy per example
        return jnp.sum(jnp.where(valid_b, hits, 0.0))

    out = np.zeros((len(steps), 2), np.float64)
    for start in range(0, num, bs):
        idx = np.minimum(np.arange(start, start + bs), num - 1)  # the last batch padded by repetition
        valid = jnp.asarray(np.arange(start, start + bs) < num)
        batch = tuple(jnp.asarray(np.asarray(a)[idx]) for a in (z0, enc, truth))
        for i, t in enumerate(steps):
            for j, keep in enumerate((1.0, 0.0)):
                for d in range(draws):
                    k = jax.random.fold_in(jax.random.fold_in(key, start), i * draws + d)  # the same noise for j = 0, 1
                    out[i, j] += float(correct(*batch, valid, int(t), keep, k))
    return out / (num * draws)
