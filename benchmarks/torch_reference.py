"""A PyTorch reference of the default model's training step, for `python -m mmdiff_jax.bench --torch`.

The same network as `mmdiff_jax.models` (U-Net: conv in, per level `blocks_per_level` GroupNorm/SiLU ResBlocks with a
time projection, stride-2 conv down, two mid blocks, `blocks_per_level + 1` up blocks on skip concatenations, nearest
x2 + conv up, GroupNorm/SiLU/conv out; a 2-layer sinusoidal time MLP; the label head: an MLP on the pooled mid and
output features and the time embedding) and the same step: t ~ U{1..T}, z_t = abar_t z_0 + c_t e(label) + s_t ε,
loss = mean (ε̂ - ε)^2 + cross-entropy of the label head, AdamW with global-norm clipping, an EMA of the weights.
The parameter count equals the JAX model's (checked by tests/test_bench.py when torch is installed).

torch is not a dependency of the package: `pip install -r benchmarks/requirements.txt` (torch==2.13.0, CPU). On a
GPU host the bench runs the installed CUDA build of torch on the GPU.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from torch import nn


def _groups(groups: int, channels: int) -> int:
    return min(groups, channels)


class TimeEmbedding(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.lin1, self.lin2 = nn.Linear(dim, dim), nn.Linear(dim, dim)
        half = dim // 2
        self.register_buffer("freqs", torch.exp(-math.log(10_000.0) * torch.arange(half, dtype=torch.float32) / half))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        args = t.float()[:, None] * self.freqs[None, :]
        return self.lin2(nn.functional.silu(self.lin1(torch.cat([torch.sin(args), torch.cos(args)], dim=-1))))


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, temb_dim: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(groups, in_ch), in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb = nn.Linear(temb_dim, out_ch)
        self.norm2 = nn.GroupNorm(_groups(groups, out_ch), out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:  # x [B, C, H, W]
        h = self.conv1(nn.functional.silu(self.norm1(x)))
        h = h + self.temb(nn.functional.silu(temb))[:, :, None, None]
        h = self.conv2(nn.functional.silu(self.norm2(h)))
        return (x if self.skip is None else self.skip(x)) + h


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(nn.functional.interpolate(x, scale_factor=2, mode="nearest"))


class UNetWithLabelHead(nn.Module):
    """(z_t [B, C, H, W], t [B]) -> (ε̂ [B, C, H, W], label logits [B, K])."""

    def __init__(self, latent_channels: int, channels, blocks_per_level: int, groups: int, temb_dim: int,
                 num_classes: int):
        super().__init__()
        self.time = TimeEmbedding(temb_dim)
        self.conv_in = nn.Conv2d(latent_channels, channels[0], 3, padding=1)
        down, skips_ch, ch = [], [channels[0]], channels[0]
        for level, width in enumerate(channels):
            for _ in range(blocks_per_level):
                down.append(ResBlock(ch, width, temb_dim, groups))
                ch = width
                skips_ch.append(ch)
            if level < len(channels) - 1:
                down.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
                skips_ch.append(ch)
        self.down = nn.ModuleList(down)
        self.mid = nn.ModuleList([ResBlock(ch, ch, temb_dim, groups) for _ in range(2)])
        up = []
        for level, width in reversed(list(enumerate(channels))):
            for _ in range(blocks_per_level + 1):
                up.append(ResBlock(ch + skips_ch.pop(), width, temb_dim, groups))
                ch = width
            if level > 0:
                up.append(Upsample(ch))
        self.up = nn.ModuleList(up)
        self.norm_out = nn.GroupNorm(_groups(groups, ch), ch)
        self.conv_out = nn.Conv2d(ch, latent_channels, 3, padding=1)
        feature_dim = channels[-1] + channels[0]
        self.head = nn.Sequential(nn.Linear(feature_dim + temb_dim, 128), nn.SiLU(), nn.Linear(128, num_classes))

    def forward(self, zt: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        temb = self.time(t)
        h = self.conv_in(zt)
        skips = [h]
        for block in self.down:
            h = block(h, temb) if isinstance(block, ResBlock) else block(h)
            skips.append(h)
        for block in self.mid:
            h = block(h, temb)
        mid_pooled = h.mean(dim=(2, 3))
        for block in self.up:
            h = block(torch.cat([h, skips.pop()], dim=1), temb) if isinstance(block, ResBlock) else block(h)
        fmap = nn.functional.silu(self.norm_out(h))
        pooled = torch.cat([mid_pooled, fmap.mean(dim=(2, 3))], dim=-1)
        return self.conv_out(fmap), self.head(torch.cat([pooled, temb], dim=-1))


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class TrainStep:
    """One training step of the reference, on a fixed batch (images [B, H, W, C] in [-1, 1], labels [B])."""

    def __init__(self, config, abar: np.ndarray, s: np.ndarray, c: np.ndarray, codes: np.ndarray, images: np.ndarray,
                 labels: np.ndarray, device: str = "cpu"):
        torch.manual_seed(0)
        m = config.model
        self.model = UNetWithLabelHead(int(config.latent_shape[-1]), tuple(m.channels), int(m.blocks_per_level),
                                       int(m.groups), int(m.temb_dim), int(codes.shape[0])).to(device)
        self.ema = [p.detach().clone() for p in self.model.parameters()]
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=config.optim.lr,
                                     betas=(config.optim.b1, config.optim.b2), weight_decay=config.optim.weight_decay)
        self.clip, self.decay = float(config.optim.grad_clip), float(config.optim.ema_decay)
        self.abar = torch.tensor(abar, dtype=torch.float32, device=device)
        self.s = torch.tensor(s, dtype=torch.float32, device=device)
        self.c = torch.tensor(np.asarray(c)[:, 0], dtype=torch.float32, device=device)  # [T+1] the label's c_t
        self.codes = torch.tensor(np.transpose(codes, (0, 3, 1, 2)), dtype=torch.float32,
                                  device=device)  # [K, C, H, W]
        self.z0 = torch.tensor(np.transpose(images, (0, 3, 1, 2)), dtype=torch.float32, device=device)
        self.labels = torch.tensor(labels, dtype=torch.long, device=device)
        self.num_steps = len(abar) - 1
        self.gen = torch.Generator(device=device).manual_seed(0)

    def __call__(self) -> float:
        loss = self.loss_and_grads()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(self.ema, list(self.model.parameters()), 1.0 - self.decay)
        return loss.item()  # waits for the device, so wall-clock timing is right on CUDA too

    def loss_and_grads(self) -> torch.Tensor:
        """The forward pass on a fresh (t, ε) and the backward pass: the loss, with the gradients in `.grad`."""
        b = self.z0.shape[0]
        t = torch.randint(1, self.num_steps + 1, (b,), generator=self.gen, device=self.z0.device)
        eps = torch.randn(self.z0.shape, generator=self.gen, device=self.z0.device)
        view = (b, 1, 1, 1)
        zt = self.abar[t].view(view) * self.z0 + self.c[t].view(view) * self.codes[self.labels] + \
            self.s[t].view(view) * eps
        eps_hat, logits = self.model(zt, t)
        loss = ((eps_hat - eps) ** 2).mean() + nn.functional.cross_entropy(logits, self.labels)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        return loss


def time_steps(step: TrainStep, steps: int, warmup: int = 3) -> list[float]:
    """Wall seconds of `steps` train steps after `warmup` untimed ones."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times
