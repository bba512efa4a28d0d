"""The composed model: the shared U-Net denoiser plus one decoder head per auxiliary modality; one parameter pytree."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from mmdiff_jax.modalities import ModalitySet
from mmdiff_jax.models.adm import ADM, ADMConfig
from mmdiff_jax.models.unet import UNet, UNetConfig

BACKBONES = {UNetConfig: UNet, ADMConfig: ADM}  # config type -> denoiser (model.backbone: 'unet' | 'adm')


class MTDiffusion(nnx.Module):
    """(z_t [B, *S], t [B], present [B, N] or None) -> (ε̂ [B, *S], {aux modality name: head output}).

    A model trained with modality dropout is told which auxiliary modalities drive the process (`present`, 1 = in):
    a linear map of the presence mask, zero at initialization, is added to the time embedding. Without dropout
    the model has no such map and ignores `present`.

    With `num_classes` > 0 it is ADM's class-conditional model: an embedding of the class label (`labels` [B]) is
    added to the time embedding. The label then is an input, not a modality: it does not drive the process.

    With `read_classes` > 0 (`diffusion.denoiser_output = 'read_codes'`) the code reader's class probabilities
    (`read_probs` [B, read_classes], diffusion/code_reader.py) enter through a linear map, zero at initialization,
    added to the time embedding; with `read_exact` (`diffusion.read_known_classes`: the classes are known exactly in
    training) that map starts random instead, one N(0, read_init_std^2 I) vector per class as a label embedding.

    With `heads_grad_max_t` (a step in 0..T; None: every t) the heads' losses reach the backbone only through the
    examples with t <= that step (the heads read the other examples' features through a stop-gradient); 0: never,
    the heads train on features the backbone learns from the denoising loss alone.

    With masks given to the denoiser (`modalities.<name>.to_denoiser`) the backbone is built with their classes as
    `input_channels` and reads z_t and `mask_inputs` [B, H, W, input_channels] (the given masks' one-hot classes, zeros where not
    given) side by side; the heads that read the latent still read z_t alone."""

    def __init__(self, backbone: UNetConfig | ADMConfig, modalities: ModalitySet, *, rngs: nnx.Rngs,
                 num_classes: int = 0, read_classes: int = 0, heads_grad_max_t: int | None = None,
                 read_exact: bool = False, read_init_std: float = 1.0):
        self.input_channels = modalities.denoiser_input_channels
        backbone = dataclasses.replace(backbone, input_channels=self.input_channels)
        self.backbone = BACKBONES[type(backbone)](backbone, rngs=rngs)
        # the loss draws a dropout key only for a backbone with dropout, so other models' programs stay as they were
        self.takes_dropout_key = isinstance(backbone, ADMConfig)
        self.heads = nnx.Dict({
            m.name: m.make_head(self.backbone.feature_dim, backbone.channels[0], backbone.temb_dim, rngs)
            for m in modalities.aux
        })
        self.num_aux = len(modalities.aux)
        self.heads_grad_max_t = heads_grad_max_t
        self.presence = nnx.data(
            nnx.Linear(self.num_aux, backbone.temb_dim, rngs=rngs, kernel_init=nnx.initializers.zeros_init())
            if modalities.conditions_on_presence else None)
        self.class_embedding = nnx.data(
            nnx.Embed(num_classes, backbone.temb_dim, rngs=rngs) if num_classes else None)
        # read probabilities start at zero effect (the model is an image denoiser at initialisation); exact known
        # classes (read_exact) start as a label embedding does, one random vector per class (std 1: ADM's, as large
        # as the time embedding they join)
        read_init = nnx.initializers.normal(read_init_std) if read_exact else nnx.initializers.zeros_init()
        self.read_embedding = nnx.data(
            nnx.Linear(read_classes, backbone.temb_dim, rngs=rngs, kernel_init=read_init) if read_classes else None)

    def __call__(self, zt: jax.Array, t: jax.Array, present: jax.Array | None = None,
                 dropout_key: jax.Array | None = None,
                 labels: jax.Array | None = None,
                 read_probs: jax.Array | None = None,
                 mask_inputs: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
        """`dropout_key`: the backbone's dropout in training (ignored by a backbone without dropout); `labels` int
        [B]: the class labels of a class-conditional model (required there, refused elsewhere); `read_probs`: the
        code reader's class probabilities (required with `read_classes`, refused elsewhere); `mask_inputs`: see the
        class docstring (None: no mask given)."""
        embedded = []  # [B, temb_dim] each, added to the time embedding
        if self.presence is not None:
            if present is None:
                present = jnp.ones((zt.shape[0], self.num_aux), jnp.float32)
            embedded.append(self.presence(present.astype(jnp.float32)))
        if (labels is None) != (self.class_embedding is None):
            raise ValueError("a class-conditional model needs `labels` [B], and only it takes them.")
        if labels is not None:
            embedded.append(self.class_embedding(labels.astype(jnp.int32)))
        if (read_probs is None) != (self.read_embedding is None):
            raise ValueError("a model built with read_classes needs `read_probs` [B, read_classes], and only it.")
        if read_probs is not None:
            embedded.append(self.read_embedding(read_probs.astype(jnp.float32)))
        extra = sum(embedded[1:], embedded[0]) if embedded else None
        backbone_in = zt
        if self.input_channels:
            if mask_inputs is None:
                mask_inputs = jnp.zeros(zt.shape[:-1] + (self.input_channels,), zt.dtype)
            backbone_in = jnp.concatenate([zt, mask_inputs.astype(zt.dtype)], axis=-1)
        elif mask_inputs is not None:
            raise ValueError("`mask_inputs` needs a backbone built with input_channels "
                             "(modalities.<mask>.to_denoiser).")
        eps_hat, feats = self.backbone(backbone_in, t, extra, dropout_key)
        if self.heads_grad_max_t is not None:
            feats = feats.gradient_only_where(t <= self.heads_grad_max_t)
        feats = dataclasses.replace(feats, latent=zt)  # the backbone's input, for heads that read the image itself
        return eps_hat, {name: head(feats) for name, head in self.heads.items()}
