"""The shared denoiser: a U-Net over the diffusion latent with a time embedding. It returns the noise prediction and
the features the decoder heads read."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from mmdiff_jax.models.layers import Downsample, ResBlock, TimeEmbedding, Upsample


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    latent_channels: int = 1
    channels: Sequence[int] = (32, 64)  # width per resolution level
    blocks_per_level: int = 2
    groups: int = 8
    temb_dim: int = 128
    dtype: str = "float32"  # compute dtype; params stay float32
    remat: bool = False  # recompute each ResBlock's activations in the backward pass (less memory, more FLOPs)
    out_channels: int = 0  # 0: latent_channels (2 x that with a learned variance)
    input_channels: int = 0  # extra input channels after z_t's (a given mask's one-hot classes)


@dataclasses.dataclass(frozen=True)
class Features:
    """What the heads read: pooled [B, F] vector, the full-resolution map [B, H, W, C0], the time embedding (with
    whatever the composed model adds to it), the embedding of t alone [B, temb_dim], and (set by the composed model,
    for heads that read it) the backbone's input latent [B, H, W, C]."""

    pooled: jax.Array
    fmap: jax.Array
    temb: jax.Array
    latent: jax.Array | None = None
    time_emb: jax.Array | None = None

    def gradient_only_where(self, keep: jax.Array) -> "Features":
        """The same features; the gradient reaches the backbone only through the examples where `keep` [B] holds."""
        def gate(x):
            if x is None:
                return None
            return jnp.where(keep.reshape((-1,) + (1,) * (x.ndim - 1)), x, jax.lax.stop_gradient(x))
        return Features(*(gate(x) for x in (self.pooled, self.fmap, self.temb)), latent=self.latent,
                        time_emb=gate(self.time_emb))


class UNet(nnx.Module):
    """z_t [B, H, W, C (+ input_channels)], t [B] -> (eps_hat [B, H, W, out_channels or C], Features)."""

    def __init__(self, cfg: UNetConfig, *, rngs: nnx.Rngs):
        dtype = jnp.dtype(cfg.dtype)
        kw = dict(groups=cfg.groups, dtype=dtype, rngs=rngs)
        self.cfg = cfg
        self.time = TimeEmbedding(cfg.temb_dim, dtype=dtype, rngs=rngs)
        self.conv_in = nnx.Conv(cfg.latent_channels + cfg.input_channels, cfg.channels[0], (3, 3), dtype=dtype,
                                rngs=rngs)
        down, skips_ch, ch = [], [cfg.channels[0]], cfg.channels[0]
        for level, width in enumerate(cfg.channels):
            for _ in range(cfg.blocks_per_level):
                down.append(ResBlock(ch, width, cfg.temb_dim, **kw))
                ch = width
                skips_ch.append(ch)
            if level < len(cfg.channels) - 1:
                down.append(Downsample(ch, dtype=dtype, rngs=rngs))
                skips_ch.append(ch)
        self.down = nnx.List(down)
        self.mid = nnx.List([ResBlock(ch, ch, cfg.temb_dim, **kw) for _ in range(2)])
        up = []
        for level, width in reversed(list(enumerate(cfg.channels))):
            for _ in range(cfg.blocks_per_level + 1):
                up.append(ResBlock(ch + skips_ch.pop(), width, cfg.temb_dim, **kw))
                ch = width
            if level > 0:
                up.append(Upsample(ch, dtype=dtype, rngs=rngs))
        self.up = nnx.List(up)
        self.norm_out = nnx.GroupNorm(ch, num_groups=min(cfg.groups, ch), dtype=dtype, rngs=rngs)
        self.conv_out = nnx.Conv(ch, cfg.out_channels or cfg.latent_channels, (3, 3), dtype=dtype, rngs=rngs,
                                 kernel_init=nnx.initializers.zeros_init())
        self.feature_dim = cfg.channels[-1] + cfg.channels[0]

    def __call__(self, zt: jax.Array, t: jax.Array, extra_temb: jax.Array | None = None,
                 dropout_key: jax.Array | None = None) -> tuple[jax.Array, Features]:
        """zt [B, H, W, C], t [B], extra_temb [B, temb_dim] added to the time embedding (or None). This U-Net has no
        dropout: `dropout_key` is accepted (the backbones' common signature) and unused."""
        dtype = jnp.dtype(self.cfg.dtype)
        res = nnx.remat(_res_block) if self.cfg.remat else _res_block
        temb = time_emb = self.time(t.astype(jnp.float32))
        if extra_temb is not None:
            temb = temb + extra_temb.astype(temb.dtype)
        h = self.conv_in(zt.astype(dtype))
        skips = [h]
        for block in self.down:
            h = res(block, h, temb) if isinstance(block, ResBlock) else block(h)
            skips.append(h)
        for block in self.mid:
            h = res(block, h, temb)
        mid_pooled = jnp.mean(h, axis=(1, 2))  # [B, C_last]
        for block in self.up:
            if isinstance(block, ResBlock):
                h = res(block, jnp.concatenate([h, skips.pop()], axis=-1), temb)
            else:
                h = block(h)
        fmap = nnx.silu(self.norm_out(h))  # [B, H, W, C0]
        eps_hat = self.conv_out(fmap).astype(jnp.float32)
        pooled = jnp.concatenate([mid_pooled, jnp.mean(fmap, axis=(1, 2))], axis=-1).astype(jnp.float32)
        return eps_hat, Features(pooled=pooled, fmap=fmap.astype(jnp.float32), temb=temb.astype(jnp.float32),
                                 time_emb=time_emb.astype(jnp.float32))


def _res_block(block: ResBlock, h: jax.Array, temb: jax.Array) -> jax.Array:
    """One ResBlock application (the unit that `UNetConfig.remat` checkpoints)."""
    return block(h, temb)
