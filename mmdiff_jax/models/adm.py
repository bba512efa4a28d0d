"""The ADM U-Net (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs on Image Synthesis") as a denoiser backbone.

Per level `channels[l]` wide, `blocks_per_level` residual blocks, then a downsampling block; a middle of ResBlock,
attention, ResBlock; the mirror image on the way up with one more block per level, each reading a skip connection.
Multi-head self-attention after the blocks at the resolutions in `attention_resolutions` (pixels per side),
`num_head_channels` per head, through `jax.nn.dot_product_attention`. ResBlocks: GroupNorm(32) -> SiLU -> 3x3 conv,
the time embedding as a scale and shift of the second GroupNorm (`scale_shift_norm`, AdaGN) or added, SiLU, dropout,
a zero-initialised 3x3 conv; with `resblock_updown` the down/upsampling layers are ResBlocks that resample between
their first norm and conv (BigGAN style). The time embedding: sinusoids of width `channels[0]` through
Linear -> SiLU -> Linear to `temb_dim`. The output conv is zero-initialised.

With guided-diffusion's ImageNet-64 flags (192 channels, multipliers 1, 2, 3, 4, 3 blocks, attention at 32/16/8,
64 head channels, scale-shift norm, resblock up/down) and 3 output channels it has the parameters of guided-diffusion's
`UNetModel` with the same flags: 295,131,267 (`tests/test_adm.py`).

Dropout needs a key per call (`dropout_key`); without one the network is deterministic (sampling, evaluation).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from mmdiff_jax.models.layers import sinusoidal_embedding
from mmdiff_jax.models.unet import Features


@dataclasses.dataclass(frozen=True)
class ADMConfig:
    image_size: int = 64  # side of the latent (attention resolutions are in its pixels)
    latent_channels: int = 3
    channels: Sequence[int] = (192, 384, 576, 768)  # width per level (model_channels x channel_mult)
    blocks_per_level: int = 3  # num_res_blocks
    attention_resolutions: Sequence[int] = (32, 16, 8)
    num_head_channels: int = 64
    groups: int = 32
    temb_dim: int = 768  # 4 x model_channels in ADM
    scale_shift_norm: bool = True
    resblock_updown: bool = True
    dropout: float = 0.0
    out_channels: int = 0  # 0: latent_channels (2 x that with a learned variance)
    input_channels: int = 0  # extra input channels after z_t's (a given mask's one-hot classes)
    dtype: str = "float32"
    remat: bool = False


def _norm(ch: int, groups: int, rngs: nnx.Rngs) -> nnx.GroupNorm:
    """GroupNorm computed in float32 (as ADM's GroupNorm32)."""
    return nnx.GroupNorm(ch, num_groups=min(groups, ch), dtype=jnp.float32, rngs=rngs)


def _zero_conv(cin: int, cout: int, dtype, rngs: nnx.Rngs) -> nnx.Conv:
    return nnx.Conv(cin, cout, (3, 3), dtype=dtype, rngs=rngs, kernel_init=nnx.initializers.zeros_init(),
                    bias_init=nnx.initializers.zeros_init())


def _upsample(x: jax.Array) -> jax.Array:
    """Nearest neighbour x2: [B, H, W, C] -> [B, 2H, 2W, C]."""
    b, h, w, c = x.shape
    return jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)


def _downsample(x: jax.Array) -> jax.Array:
    """2x2 average pooling: [B, H, W, C] -> [B, H/2, W/2, C]."""
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def _dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


class ADMResBlock(nnx.Module):
    """x [B, H, W, cin], emb [B, temb] -> [B, H', W', cout] (H' = 2H up, H/2 down, else H)."""

    def __init__(self, cin: int, cout: int, cfg: ADMConfig, *, resample: str = "", rngs: nnx.Rngs):
        dtype = jnp.dtype(cfg.dtype)
        self.resample, self.rate, self.scale_shift = resample, cfg.dropout, cfg.scale_shift_norm
        self.norm1 = _norm(cin, cfg.groups, rngs)
        self.conv1 = nnx.Conv(cin, cout, (3, 3), dtype=dtype, rngs=rngs)
        self.emb = nnx.Linear(cfg.temb_dim, 2 * cout if cfg.scale_shift_norm else cout, dtype=dtype, rngs=rngs)
        self.norm2 = _norm(cout, cfg.groups, rngs)
        self.conv2 = _zero_conv(cout, cout, dtype, rngs)
        self.skip = nnx.Conv(cin, cout, (1, 1), dtype=dtype, rngs=rngs) if cin != cout else None

    def __call__(self, x: jax.Array, emb: jax.Array, key: jax.Array | None) -> jax.Array:
        dtype = self.conv1.kernel.dtype if self.conv1.dtype is None else self.conv1.dtype
        h = nnx.silu(self.norm1(x)).astype(dtype)
        if self.resample == "up":
            h, x = _upsample(h), _upsample(x)
        elif self.resample == "down":
            h, x = _downsample(h), _downsample(x)
        h = self.conv1(h)
        e = self.emb(nnx.silu(emb))[:, None, None, :]
        if self.scale_shift:
            scale, shift = jnp.split(e, 2, axis=-1)
            h = self.norm2(h) * (1.0 + scale) + shift
        else:
            h = self.norm2(h + e)
        h = self.conv2(_dropout(nnx.silu(h).astype(dtype), self.rate, key))
        return (x if self.skip is None else self.skip(x)) + h


class Attention(nnx.Module):
    """Multi-head self-attention over the positions of [B, H, W, C], residual; the output projection starts at 0."""

    def __init__(self, ch: int, cfg: ADMConfig, *, rngs: nnx.Rngs):
        dtype = jnp.dtype(cfg.dtype)
        if ch % cfg.num_head_channels:
            raise ValueError(f"attention width {ch} is not a multiple of num_head_channels={cfg.num_head_channels}.")
        self.heads = ch // cfg.num_head_channels
        self.norm = _norm(ch, cfg.groups, rngs)
        self.qkv = nnx.Linear(ch, 3 * ch, dtype=dtype, rngs=rngs)
        self.out = nnx.Linear(ch, ch, dtype=dtype, rngs=rngs, kernel_init=nnx.initializers.zeros_init())

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        qkv = self.qkv(self.norm(x).reshape(b, h * w, c).astype(self.qkv.kernel.dtype if self.qkv.dtype is None
                                                                  else self.qkv.dtype))
        q, k, v = jnp.split(qkv.reshape(b, h * w, 3, self.heads, c // self.heads), 3, axis=2)
        a = jax.nn.dot_product_attention(q[:, :, 0], k[:, :, 0], v[:, :, 0])  # [B, T, heads, dh]
        return x + self.out(a.reshape(b, h * w, c)).reshape(b, h, w, c).astype(x.dtype)


class ADMBlock(nnx.Module):
    """One entry of the U-Net's lists: a ResBlock, then attention where asked, then an up/down ResBlock if asked."""

    def __init__(self, res: ADMResBlock | None, attn: Attention | None, resample: ADMResBlock | None):
        self.res, self.attn, self.resample = nnx.data(res), nnx.data(attn), nnx.data(resample)

    def __call__(self, h: jax.Array, emb: jax.Array, key: jax.Array | None) -> jax.Array:
        keys = [None, None] if key is None else list(jax.random.split(key))
        if self.res is not None:
            h = self.res(h, emb, keys[0])
        if self.attn is not None:
            h = self.attn(h)
        if self.resample is not None:
            h = self.resample(h, emb, keys[1])
        return h


class ADM(nnx.Module):
    """z_t [B, H, W, C], t [B] -> (ε̂ [B, H, W, out], Features); see the module docstring."""

    def __init__(self, cfg: ADMConfig, *, rngs: nnx.Rngs):
        dtype = jnp.dtype(cfg.dtype)
        self.cfg = cfg
        ch0 = cfg.channels[0]
        self.time1 = nnx.Linear(ch0, cfg.temb_dim, dtype=dtype, rngs=rngs)
        self.time2 = nnx.Linear(cfg.temb_dim, cfg.temb_dim, dtype=dtype, rngs=rngs)
        self.conv_in = nnx.Conv(cfg.latent_channels + cfg.input_channels, ch0, (3, 3), dtype=dtype, rngs=rngs)
        attend = set(cfg.attention_resolutions)
        down, skips, ch, res = [], [ch0], ch0, cfg.image_size
        for level, width in enumerate(cfg.channels):
            for _ in range(cfg.blocks_per_level):
                block = ADMResBlock(ch, width, cfg, rngs=rngs)
                ch = width
                down.append(ADMBlock(block, Attention(ch, cfg, rngs=rngs) if res in attend else None, None))
                skips.append(ch)
            if level < len(cfg.channels) - 1:
                down.append(ADMBlock(None, None, self._resampler(ch, "down", rngs)))
                skips.append(ch)
                res //= 2
        self.down = nnx.List(down)
        self.mid1 = ADMResBlock(ch, ch, cfg, rngs=rngs)
        self.mid_attn = Attention(ch, cfg, rngs=rngs)
        self.mid2 = ADMResBlock(ch, ch, cfg, rngs=rngs)
        up = []
        for level, width in reversed(list(enumerate(cfg.channels))):
            for i in range(cfg.blocks_per_level + 1):
                block = ADMResBlock(ch + skips.pop(), width, cfg, rngs=rngs)
                ch = width
                attn = Attention(ch, cfg, rngs=rngs) if res in attend else None
                resample = None
                if level and i == cfg.blocks_per_level:
                    resample = self._resampler(ch, "up", rngs)
                    res *= 2
                up.append(ADMBlock(block, attn, resample))
        self.up = nnx.List(up)
        self.norm_out = _norm(ch, cfg.groups, rngs)
        self.conv_out = _zero_conv(ch0, cfg.out_channels or cfg.latent_channels, dtype, rngs)
        self.feature_dim = cfg.channels[-1] + ch0
        self.fmap_channels = ch0
        self.temb_dim = cfg.temb_dim

    def _resampler(self, ch: int, kind: str, rngs: nnx.Rngs) -> nnx.Module:
        if self.cfg.resblock_updown:
            return ADMResBlock(ch, ch, self.cfg, resample=kind, rngs=rngs)
        return _ConvResample(ch, kind, jnp.dtype(self.cfg.dtype), rngs)

    def __call__(self, zt: jax.Array, t: jax.Array, extra_temb: jax.Array | None = None,
                 dropout_key: jax.Array | None = None) -> tuple[jax.Array, Features]:
        dtype = jnp.dtype(self.cfg.dtype)
        run = nnx.remat(_apply_block) if self.cfg.remat else _apply_block
        emb = time_emb = self.time2(nnx.silu(self.time1(sinusoidal_embedding(t, self.cfg.channels[0]).astype(dtype))))
        if extra_temb is not None:
            emb = emb + extra_temb.astype(emb.dtype)
        n_keys = len(self.down) + len(self.up) + 2
        keys = [None] * n_keys if dropout_key is None else list(jax.random.split(dropout_key, n_keys))
        h = self.conv_in(zt.astype(dtype))
        skips = [h]
        for i, block in enumerate(self.down):
            h = run(block, h, emb, keys[i])
            skips.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb, keys[-2])), emb, keys[-1])
        mid_pooled = jnp.mean(h.astype(jnp.float32), axis=(1, 2))
        for i, block in enumerate(self.up):
            h = run(block, jnp.concatenate([h, skips.pop()], axis=-1), emb, keys[len(self.down) + i])
        fmap = nnx.silu(self.norm_out(h))  # [B, H, W, channels[0]], float32
        eps_hat = self.conv_out(fmap.astype(dtype)).astype(jnp.float32)
        pooled = jnp.concatenate([mid_pooled, jnp.mean(fmap, axis=(1, 2))], axis=-1)
        return eps_hat, Features(pooled=pooled, fmap=fmap.astype(jnp.float32), temb=emb.astype(jnp.float32),
                                 time_emb=time_emb.astype(jnp.float32))


class _ConvResample(nnx.Module):
    """ADM without `resblock_updown`: a stride-2 3x3 conv down, nearest x2 then a 3x3 conv up."""

    def __init__(self, ch: int, kind: str, dtype, rngs: nnx.Rngs):
        self.kind = kind
        self.conv = nnx.Conv(ch, ch, (3, 3), strides=2 if kind == "down" else 1, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, emb: jax.Array, key: jax.Array | None) -> jax.Array:
        return self.conv(_upsample(x) if self.kind == "up" else x)


def _apply_block(block: ADMBlock, h: jax.Array, emb: jax.Array, key: jax.Array | None) -> jax.Array:
    """One block application (the unit that `ADMConfig.remat` checkpoints)."""
    return block(h, emb, key)
