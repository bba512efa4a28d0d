"""Building blocks of the denoiser: sinusoidal time embedding, a GroupNorm ResBlock, resampling. No mutable state."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx


def sinusoidal_embedding(t: jax.Array, dim: int, max_period: float = 10_000.0) -> jax.Array:
    """t [B] (any real) -> [B, dim] sin/cos features."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


class TimeEmbedding(nnx.Module):
    """t [B] -> [B, dim]: sinusoidal features through a 2-layer MLP."""

    def __init__(self, dim: int, *, dtype, rngs: nnx.Rngs):
        self.dim = dim
        self.lin1 = nnx.Linear(dim, dim, dtype=dtype, rngs=rngs)
        self.lin2 = nnx.Linear(dim, dim, dtype=dtype, rngs=rngs)

    def __call__(self, t: jax.Array) -> jax.Array:
        return self.lin2(nnx.silu(self.lin1(sinusoidal_embedding(t, self.dim))))


class ResBlock(nnx.Module):
    """GroupNorm -> SiLU -> conv, + time projection, GroupNorm -> SiLU -> conv, residual (1x1 conv on width change)."""

    def __init__(self, in_ch: int, out_ch: int, temb_dim: int, *, groups: int, dtype, rngs: nnx.Rngs):
        self.norm1 = nnx.GroupNorm(in_ch, num_groups=min(groups, in_ch), dtype=dtype, rngs=rngs)
        self.conv1 = nnx.Conv(in_ch, out_ch, (3, 3), dtype=dtype, rngs=rngs)
        self.temb = nnx.Linear(temb_dim, out_ch, dtype=dtype, rngs=rngs)
        self.norm2 = nnx.GroupNorm(out_ch, num_groups=min(groups, out_ch), dtype=dtype, rngs=rngs)
        self.conv2 = nnx.Conv(out_ch, out_ch, (3, 3), dtype=dtype, rngs=rngs,
                              kernel_init=nnx.initializers.variance_scaling(1e-2, "fan_avg", "uniform"))
        self.skip = nnx.Conv(in_ch, out_ch, (1, 1), dtype=dtype, rngs=rngs) if in_ch != out_ch else None

    def __call__(self, x: jax.Array, temb: jax.Array) -> jax.Array:
        # x [B, H, W, in_ch], temb [B, temb_dim] -> [B, H, W, out_ch]
        h = self.conv1(nnx.silu(self.norm1(x)))
        h = h + self.temb(nnx.silu(temb))[:, None, None, :]
        h = self.conv2(nnx.silu(self.norm2(h)))
        return (x if self.skip is None else self.skip(x)) + h


class Downsample(nnx.Module):
    """Stride-2 3x3 conv: [B, H, W, C] -> [B, H/2, W/2, C]."""

    def __init__(self, ch: int, *, dtype, rngs: nnx.Rngs):
        self.conv = nnx.Conv(ch, ch, (3, 3), strides=2, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x)


class Upsample(nnx.Module):
    """Nearest x2 then 3x3 conv: [B, H, W, C] -> [B, 2H, 2W, C]."""

    def __init__(self, ch: int, *, dtype, rngs: nnx.Rngs):
        self.conv = nnx.Conv(ch, ch, (3, 3), dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)
        return self.conv(x)
