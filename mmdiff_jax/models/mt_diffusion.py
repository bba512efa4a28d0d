"""The composed model: the shared U-Net denoiser plus one decoder head per auxiliary modality; one parameter pytree."""

from __future__ import annotations

import jax
from flax import nnx

from mmdiff_jax.modalities import ModalitySet
from mmdiff_jax.models.unet import UNet, UNetConfig


class MTDiffusion(nnx.Module):
    """(z_t [B, *S], t [B]) -> (ε̂ [B, *S], {aux modality name: head output})."""

    def __init__(self, backbone: UNetConfig, modalities: ModalitySet, *, rngs: nnx.Rngs):
        self.backbone = UNet(backbone, rngs=rngs)
        self.heads = nnx.Dict({
            m.name: m.make_head(self.backbone.feature_dim, backbone.channels[0], backbone.temb_dim, rngs)
            for m in modalities.aux
        })

    def __call__(self, zt: jax.Array, t: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        eps_hat, feats = self.backbone(zt, t)
        return eps_hat, {name: head(feats) for name, head in self.heads.items()}
