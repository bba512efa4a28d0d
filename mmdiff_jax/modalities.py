"""The registry of modality kinds that configs name.

A modality couples, for one input of the batch:
  * its data check (shape, dtype, range) that fails at the first batch with a message naming the modality;
  * its encoder into the diffusion space (`encode`: data [B, ...] -> e [B, *S]);
  * its decoder head (an nnx.Module reading the denoiser's `Features`);
  * its likelihood (`nll`: head output, data -> [B] nats) and the predicted encoding ê (`expected_encoding`);
  * its weight schedule (shape name, scale) and its loss weight λ in L2.

The *primary* modality (kind 'image') is the diffusion latent itself: identity encoder, the denoiser's ε̂ as its head.
Adding a modality kind means adding one class here and naming it in a config; nothing in the core changes.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmdiff_jax.diffusion import likelihoods
from mmdiff_jax.errors import UserError
from mmdiff_jax.models.unet import Features

# Encodings set the forward process's mean: their small products run in full float32 on every backend (a GPU's default
# float32 dot runs as TF32, a TPU's in bfloat16 passes; TF32 put 5e-4 relative error in a label's expected
# encoding on an H100).
_EXACT = jax.lax.Precision.HIGHEST


class ModalityError(UserError):
    """Bad modality configuration or bad data for a modality; the message names the modality and the fix."""


@dataclasses.dataclass(frozen=True)
class ModalitySpec:
    """What a config says about one modality (`config.modalities.<name>`)."""

    name: str
    kind: str
    shape: tuple[int, ...] = ()  # the data shape of one example
    num_classes: int = 0  # label / mask
    weight_schedule: str = "profile"
    weight_scale: float = 1.0
    loss_weight: float = 1.0
    seed: int = 0  # for fixed random codes / projections
    dropout: float = 0.0  # training: probability that an example's encoding is dropped (any-direction generation)
    # training with dropout: train the head on the dropped examples too (by default their head loss is masked)
    head_loss_when_dropped: bool = False
    # label codes: 0 = white noise over the whole latent; n > 0 = a random n x n grid per channel, upsampled
    # bilinearly to the latent (a smooth, low-frequency code)
    code_grid: int = 0
    # "": the kind's own head; a label also takes "conv": a small strided CNN on the full-resolution features instead
    # of the MLP on the pooled ones (a classifier with spatial features, e.g. on features it cannot train), and
    # "conv_latent": that CNN, one layer deeper, on the features and the backbone's input latent (the image itself),
    # and "latent": a five-layer CNN on that latent alone, with the embedding of t (for diffusion.read_known_classes,
    # whose backbone features carry the given class); a mask takes "latent": four full-resolution convolutions on
    # that latent and the time embedding (with a given label's class), for a backbone its head should not train
    head: str = ""
    # head "latent": its first width W (0: the backbone's first width); a label's convolutions have 2W, 2W, 4W, 4W,
    # 4W channels, a mask's W, so the parameters grow about as W^2
    head_width: int = 0
    # mask: the probability that a training example whose mask drives the process also gives the mask to the
    # denoiser, as its one-hot classes in extra input channels (the mask head's loss is then not counted, as for a
    # dropped mask); in sampling a given mask always goes to it. 0: the denoiser knows a mask only from its shift
    to_denoiser: float = 0.0


class Modality:
    """Base class: the primary image or an auxiliary modality."""

    kind: str = ""
    is_primary: bool = False
    head_options: tuple[str, ...] = ()  # the values of `spec.head` besides "" (the kind's own head)

    def __init__(self, spec: ModalitySpec, latent_shape: tuple[int, ...]):
        self.spec = spec
        self.name = spec.name
        self.latent_shape = tuple(latent_shape)
        if spec.head and spec.head not in self.head_options:
            self._fail(f"head {spec.head!r} is not one of this kind's: {['', *self.head_options]}.")
        width = spec.head_width
        if int(width) != width or width < 0 or (width and spec.head != "latent"):
            self._fail(f"head_width must be 0 (the backbone's first width) or, with head 'latent', a positive "
                       f"integer; got {width!r} with head {spec.head!r}.")
        rate = spec.to_denoiser
        if not isinstance(rate, (int, float)) or isinstance(rate, bool) or not 0.0 <= rate <= 1.0:
            self._fail(f"to_denoiser must be a probability in [0, 1], got {rate!r}.")
        if rate and self.kind != "mask":
            self._fail("to_denoiser is for masks (a one-hot class map the denoiser can take as input); set it to 0.")

    def latent_head_width(self, fmap_channels: int) -> int:
        """The width W of a head="latent": `head_width`, or with 0 the backbone's first width."""
        return int(self.spec.head_width) or fmap_channels

    @property
    def data_dims(self) -> int:
        """Number of data dimensions (for bits per dimension)."""
        return int(np.prod(self.spec.shape)) if self.spec.shape else 1

    def check_batch(self, x: np.ndarray, batch_size: int) -> None:
        """Raise ModalityError if the data of this modality in a (host) batch is malformed."""
        raise NotImplementedError

    # Auxiliary-modality interface.
    def encode(self, x: jax.Array) -> jax.Array:  # [B, ...] -> [B, *S]
        raise NotImplementedError

    def make_head(self, feature_dim: int, fmap_channels: int, temb_dim: int, rngs: nnx.Rngs) -> nnx.Module:
        raise NotImplementedError

    def nll(self, head_out: jax.Array, x: jax.Array) -> jax.Array:  # -> [B]
        raise NotImplementedError

    def expected_encoding(self, head_out: jax.Array) -> jax.Array:  # -> [B, *S]
        raise NotImplementedError

    def decode(self, head_out: jax.Array) -> jax.Array:  # head output -> data-space prediction
        raise NotImplementedError

    def _fail(self, msg: str) -> None:
        raise ModalityError(f"modality '{self.name}' ({self.kind}): {msg}")

    def _require_latent_shape(self) -> None:
        if tuple(self.spec.shape) != self.latent_shape:
            self._fail(f"shape {tuple(self.spec.shape)} must equal the latent shape {self.latent_shape}.")

    def _check_pixels(self, x: np.ndarray, batch_size: int) -> None:
        """Images on the latent's grid: the shape, a floating dtype, finite values in [-1, 1]."""
        expected = (batch_size,) + self.latent_shape
        if tuple(x.shape) != expected:
            self._fail(f"expected a batch of shape {expected}, got {tuple(x.shape)}.")
        if not np.issubdtype(x.dtype, np.floating):
            self._fail(f"expected floating-point pixels in [-1, 1], got dtype {x.dtype}.")
        if not np.all(np.isfinite(x)) or np.min(x) < -1.0 - 1e-6 or np.max(x) > 1.0 + 1e-6:
            self._fail(f"pixels must be finite and in [-1, 1]; got range [{np.nanmin(x):.3g}, {np.nanmax(x):.3g}].")

    def _check_class_ids(self, x: np.ndarray, expected_shape: tuple[int, ...], noun: str) -> None:
        """Categorical data: the shape, an integer dtype, and ids in [0, num_classes)."""
        if tuple(x.shape) != tuple(expected_shape):
            self._fail(f"expected {noun} of shape {tuple(expected_shape)}, got {tuple(x.shape)}.")
        if not np.issubdtype(x.dtype, np.integer):
            self._fail(f"expected integer {noun}, got dtype {x.dtype}.")
        if x.size and (x.min() < 0 or x.max() >= self.spec.num_classes):
            self._fail(f"{noun} must lie in [0, {self.spec.num_classes - 1}]; got range [{x.min()}, {x.max()}].")


class ImageModality(Modality):
    """The primary modality: images in [-1, 1], [B, H, W, C]; the latent is the image (identity encoder)."""

    kind = "image"
    is_primary = True

    def __init__(self, spec: ModalitySpec, latent_shape: tuple[int, ...]):
        super().__init__(spec, latent_shape)
        self._require_latent_shape()

    def check_batch(self, x: np.ndarray, batch_size: int) -> None:
        self._check_pixels(x, batch_size)


class _MLPHead(nnx.Module):
    """Pooled features and time embedding -> [B, out_dim] (class logits or a vector's mean)."""

    def __init__(self, feature_dim: int, temb_dim: int, out_dim: int, hidden: int, rngs: nnx.Rngs):
        self.lin1 = nnx.Linear(feature_dim + temb_dim, hidden, rngs=rngs)
        self.lin2 = nnx.Linear(hidden, out_dim, rngs=rngs)

    def __call__(self, feats: Features) -> jax.Array:
        h = jnp.concatenate([feats.pooled, feats.temb], axis=-1)
        return self.lin2(nnx.silu(self.lin1(h)))


class _ConvHead(nnx.Module):
    """Full-resolution features [B, H, W, C] and time embedding -> [B, out_dim]: two stride-2 3x3 convolutions
    (2C, then 4C channels), the spatial mean, then an MLP with the time embedding.

    With `latent_channels` > 0 it also reads the backbone's input latent (`Features.latent` [B, H, W, latent_channels],
    concatenated to the features) and adds a third 3x3 convolution (4C channels) at a quarter of the resolution, so
    that it can classify the image itself where the backbone's features do not hold the class."""

    def __init__(self, channels: int, temb_dim: int, out_dim: int, hidden: int, rngs: nnx.Rngs,
                 latent_channels: int = 0):
        self.conv1 = nnx.Conv(channels + latent_channels, 2 * channels, (3, 3), strides=(2, 2), rngs=rngs)
        self.conv2 = nnx.Conv(2 * channels, 4 * channels, (3, 3), strides=(2, 2), rngs=rngs)
        self.conv3 = nnx.data(nnx.Conv(4 * channels, 4 * channels, (3, 3), rngs=rngs) if latent_channels else None)
        self.mlp = _MLPHead(4 * channels, temb_dim, out_dim, hidden, rngs)

    def __call__(self, feats: Features) -> jax.Array:
        x = feats.fmap
        if self.conv3 is not None:  # the latent-reading variant
            if feats.latent is None:
                raise ValueError("this head reads the latent: the composed model must set Features.latent.")
            x = jnp.concatenate([x, feats.latent.astype(x.dtype)], axis=-1)  # [B, H, W, C + latent channels]
        h = nnx.silu(self.conv2(nnx.silu(self.conv1(x))))  # [B, H/4, W/4, 4C]
        if self.conv3 is not None:
            h = nnx.silu(self.conv3(h))
        return self.mlp(Features(jnp.mean(h, axis=(1, 2)), feats.fmap, feats.temb))


class _LatentHead(nnx.Module):
    """The backbone's input latent [B, H, W, C] and the embedding of t alone -> [B, out_dim]: five 3x3 convolutions
    (2W, 2W stride 2, 4W, 4W stride 2, 4W channels, W the backbone's first width), the spatial mean, then an MLP
    with the time embedding. It reads nothing the backbone computed but the embedding of t: a classifier of the noisy
    image for a backbone whose features carry a given label (`diffusion.read_known_classes`)."""

    def __init__(self, latent_channels: int, width: int, temb_dim: int, out_dim: int, hidden: int, rngs: nnx.Rngs):
        plan = [(latent_channels, 2 * width, 1), (2 * width, 2 * width, 2), (2 * width, 4 * width, 1),
                (4 * width, 4 * width, 2), (4 * width, 4 * width, 1)]
        self.convs = nnx.List([nnx.Conv(i, o, (3, 3), strides=(s, s), rngs=rngs) for i, o, s in plan])
        self.mlp = _MLPHead(4 * width, temb_dim, out_dim, hidden, rngs)

    def __call__(self, feats: Features) -> jax.Array:
        if feats.latent is None or feats.time_emb is None:
            raise ValueError("this head reads the latent and the time embedding: the composed model must set them.")
        h = feats.latent
        for conv in self.convs:
            h = nnx.silu(conv(h))  # [B, H/4, W/4, 4W] at the end
        return self.mlp(Features(jnp.mean(h, axis=(1, 2)), feats.fmap, feats.time_emb))


def unit_rms_codes(num_codes: int, latent_shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Fixed random codes [K, *S], each with root-mean-square 1 (so a weight scale λ means a shift of λ per dim)."""
    rng = np.random.default_rng(seed)
    codes = rng.normal(size=(num_codes,) + tuple(latent_shape))
    flat = codes.reshape(num_codes, -1)
    return (codes / np.sqrt(np.mean(flat**2, axis=1)).reshape((num_codes,) + (1,) * len(latent_shape))).astype(
        np.float32
    )


def smooth_unit_rms_codes(num_codes: int, latent_shape: tuple[int, ...], grid: int, seed: int) -> np.ndarray:
    """Fixed random codes [K, H, W, C] that vary slowly in space: N(0, 1) on a grid x grid x C lattice, upsampled
    bilinearly (half-pixel centres, edges clamped) to H x W, then scaled to root-mean-square 1."""
    height, width, channels = latent_shape
    coarse = np.random.default_rng(seed).normal(size=(num_codes, grid, grid, channels))

    def taps(out_size):  # for each output index: the two coarse indices and the weight of the second
        pos = np.clip((np.arange(out_size) + 0.5) * grid / out_size - 0.5, 0.0, grid - 1.0)
        lo = np.floor(pos).astype(np.int64)
        hi = np.minimum(lo + 1, grid - 1)
        return lo, hi, pos - lo

    r0, r1, rw = taps(height)
    c0, c1, cw = taps(width)
    rows = coarse[:, r0] * (1 - rw)[None, :, None, None] + coarse[:, r1] * rw[None, :, None, None]
    codes = rows[:, :, c0] * (1 - cw)[None, None, :, None] + rows[:, :, c1] * cw[None, None, :, None]
    rms = np.sqrt(np.mean(codes.reshape(num_codes, -1) ** 2, axis=1)).reshape(num_codes, 1, 1, 1)
    return (codes / rms).astype(np.float32)


class LabelModality(Modality):
    """A class label, int [B] in 0..K-1. Encoder: a fixed unit-RMS random code per class, of the latent's shape
    (white noise, or smooth with `code_grid`).
    Head: an MLP on pooled features (or with head="conv" a small CNN on the full-resolution ones, with "conv_latent"
    on those and the backbone's input latent, with "latent" on that latent alone) -> logits [B, K];
    ê = softmax(logits) · codes; categorical likelihood."""

    kind = "label"
    head_options = ("mlp", "conv", "conv_latent", "latent")

    def __init__(self, spec: ModalitySpec, latent_shape: tuple[int, ...]):
        super().__init__(spec, latent_shape)
        if spec.num_classes < 2:
            self._fail(f"num_classes must be at least 2, got {spec.num_classes}.")
        if spec.code_grid < 0 or spec.code_grid > min(latent_shape[:2]) or int(spec.code_grid) != spec.code_grid:
            self._fail(f"code_grid must be 0 (white noise) or an integer grid side in 1..{min(latent_shape[:2])}, "
                       f"got {spec.code_grid!r}.")
        if spec.code_grid:
            self.codes = smooth_unit_rms_codes(spec.num_classes, latent_shape, int(spec.code_grid), spec.seed)
        else:
            self.codes = unit_rms_codes(spec.num_classes, latent_shape, spec.seed)

    @property
    def data_dims(self) -> int:
        return 1

    def check_batch(self, x: np.ndarray, batch_size: int) -> None:
        self._check_class_ids(x, (batch_size,), "labels")

    def encode(self, x: jax.Array) -> jax.Array:
        return jnp.asarray(self.codes)[x]

    def make_head(self, feature_dim, fmap_channels, temb_dim, rngs):
        if self.spec.head == "latent":
            return _LatentHead(self.latent_shape[-1], self.latent_head_width(fmap_channels), temb_dim,
                               self.spec.num_classes, 128, rngs)
        if self.spec.head in ("conv", "conv_latent"):
            latent_channels = self.latent_shape[-1] if self.spec.head == "conv_latent" else 0
            return _ConvHead(fmap_channels, temb_dim, self.spec.num_classes, 128, rngs, latent_channels)
        return _MLPHead(feature_dim, temb_dim, self.spec.num_classes, 128, rngs)

    def nll(self, head_out: jax.Array, x: jax.Array) -> jax.Array:
        return likelihoods.categorical_nll(head_out, x)

    def expected_encoding(self, head_out: jax.Array) -> jax.Array:
        probs = jax.nn.softmax(head_out.astype(jnp.float32), axis=-1)  # [B, K]
        return jnp.tensordot(probs, jnp.asarray(self.codes), axes=(1, 0), precision=_EXACT)

    def decode(self, head_out: jax.Array) -> jax.Array:
        return jnp.argmax(head_out, axis=-1).astype(jnp.int32)


class VectorModality(Modality):
    """An embedding vector, float [B, D] (standardized by the data source). Encoder: a fixed random linear map into
    the latent, scaled so a unit-variance vector gives unit-RMS encodings. Head: an MLP -> mean; Gaussian likelihood
    with unit variance; ê = encoder(predicted mean) (exact: the encoder is linear)."""

    kind = "vector"

    def __init__(self, spec: ModalitySpec, latent_shape: tuple[int, ...]):
        super().__init__(spec, latent_shape)
        if len(spec.shape) != 1 or spec.shape[0] < 1:
            self._fail(f"shape must be (D,), got {tuple(spec.shape)}.")
        dim = spec.shape[0]
        rng = np.random.default_rng(spec.seed)
        self.projection = (rng.normal(size=(dim, int(np.prod(latent_shape)))) / np.sqrt(dim)).astype(np.float32)

    def check_batch(self, x: np.ndarray, batch_size: int) -> None:
        expected = (batch_size,) + tuple(self.spec.shape)
        if tuple(x.shape) != expected:
            self._fail(f"expected vectors of shape {expected}, got {tuple(x.shape)}.")
        if not np.issubdtype(x.dtype, np.floating) or not np.all(np.isfinite(x)):
            self._fail(f"expected finite floating-point vectors, got dtype {x.dtype}.")

    def encode(self, x: jax.Array) -> jax.Array:
        projected = jnp.matmul(x.astype(jnp.float32), jnp.asarray(self.projection), precision=_EXACT)
        return projected.reshape((x.shape[0],) + self.latent_shape)

    def make_head(self, feature_dim, fmap_channels, temb_dim, rngs):
        return _MLPHead(feature_dim, temb_dim, self.spec.shape[0], 256, rngs)

    def nll(self, head_out: jax.Array, x: jax.Array) -> jax.Array:
        return likelihoods.gaussian_nll(x.astype(jnp.float32), head_out, 1.0)

    def expected_encoding(self, head_out: jax.Array) -> jax.Array:
        return self.encode(head_out)

    def decode(self, head_out: jax.Array) -> jax.Array:
        return head_out


class _PerPixelHead(nnx.Module):
    """Full-resolution feature map -> per-pixel outputs [B, H, W, out] (class logits or values; a 1x1 conv after a
    3x3 conv)."""

    def __init__(self, channels: int, out_channels: int, rngs: nnx.Rngs):
        self.conv = nnx.Conv(channels, channels, (3, 3), rngs=rngs)
        self.out = nnx.Conv(channels, out_channels, (1, 1), rngs=rngs)

    def __call__(self, feats: Features) -> jax.Array:
        return self.out(nnx.silu(self.conv(feats.fmap)))


class _LatentPerPixelHead(nnx.Module):
    """The backbone's input latent [B, H, W, C] and the time embedding with what the composed model adds to it (a
    given label's class, the presence flags) -> per-pixel outputs [B, H, W, out]: four 3x3 convolutions of width W at
    full resolution (residual after the first; the embedding added after the first, the spatial mean after the
    third), then a 1x1 convolution. It reads no backbone feature map: a segmenter of the noisy image for a backbone
    trained by the denoising loss alone."""

    def __init__(self, latent_channels: int, width: int, temb_dim: int, out_channels: int, rngs: nnx.Rngs):
        self.conv_in = nnx.Conv(latent_channels, width, (3, 3), rngs=rngs)
        self.temb_proj = nnx.Linear(temb_dim, width, rngs=rngs)
        self.convs = nnx.List([nnx.Conv(width, width, (3, 3), rngs=rngs) for _ in range(3)])
        self.pool_proj = nnx.Linear(width, width, rngs=rngs)
        self.out = nnx.Conv(width, out_channels, (1, 1), rngs=rngs)

    def __call__(self, feats: Features) -> jax.Array:
        if feats.latent is None:
            raise ValueError("this head reads the latent: the composed model must set Features.latent.")
        h = nnx.silu(self.conv_in(feats.latent) + self.temb_proj(feats.temb)[:, None, None, :])  # [B, H, W, W]
        for i, conv in enumerate(self.convs):
            if i == 2:  # what the whole image says (e.g. its class) reaches every pixel
                h = h + self.pool_proj(jnp.mean(h, axis=(1, 2)))[:, None, None, :]
            h = h + nnx.silu(conv(h))
        return self.out(nnx.silu(h))


class MaskModality(Modality):
    """A segmentation mask, int [B, H, W] in 0..K-1 on the latent's grid. Encoder: a fixed unit-RMS code per class in
    the latent's channels, placed per pixel. Head: a per-pixel classifier on the full-resolution features (with
    head="latent" a small CNN on the backbone's input latent and the time embedding instead); ê = per-pixel softmax ·
    codes; categorical likelihood summed over pixels."""

    kind = "mask"
    head_options = ("latent",)

    def __init__(self, spec: ModalitySpec, latent_shape: tuple[int, ...]):
        super().__init__(spec, latent_shape)
        if spec.num_classes < 2:
            self._fail(f"num_classes must be at least 2, got {spec.num_classes}.")
        if tuple(spec.shape) != tuple(latent_shape[:-1]):
            self._fail(f"shape {tuple(spec.shape)} must be the latent's grid {tuple(latent_shape[:-1])}.")
        channels = latent_shape[-1]
        if channels == 1:  # one channel: class codes evenly spaced, unit RMS
            codes = np.linspace(-1.0, 1.0, spec.num_classes)[:, None]
            self.codes = (codes / np.sqrt(np.mean(codes**2))).astype(np.float32)
        else:
            self.codes = unit_rms_codes(spec.num_classes, (channels,), spec.seed)

    def check_batch(self, x: np.ndarray, batch_size: int) -> None:
        self._check_class_ids(x, (batch_size,) + tuple(self.spec.shape), "class ids")

    def encode(self, x: jax.Array) -> jax.Array:
        return jnp.asarray(self.codes)[x]  # [B, H, W, C]

    def make_head(self, feature_dim, fmap_channels, temb_dim, rngs):
        if self.spec.head == "latent":
            return _LatentPerPixelHead(self.latent_shape[-1], self.latent_head_width(fmap_channels), temb_dim,
                                       self.spec.num_classes, rngs)
        return _PerPixelHead(fmap_channels, self.spec.num_classes, rngs)

    def nll(self, head_out: jax.Array, x: jax.Array) -> jax.Array:
        return likelihoods.categorical_nll(head_out, x)

    def expected_encoding(self, head_out: jax.Array) -> jax.Array:
        probs = jax.nn.softmax(head_out.astype(jnp.float32), axis=-1)  # [B, H, W, K]
        return jnp.matmul(probs, jnp.asarray(self.codes), precision=_EXACT)

    def decode(self, head_out: jax.Array) -> jax.Array:
        return jnp.argmax(head_out, axis=-1).astype(jnp.int32)


class PixelsModality(Modality):
    """A second image on the latent's grid, float [B, H, W, C] in [-1, 1] (e.g. a masked image, or the full image in
    a reconstruction-only baseline). Encoder: the identity. Head: a per-pixel regressor on the full-resolution
    features -> mean; Gaussian likelihood with unit variance summed over pixels; ê = the predicted mean (exact: the
    encoder is linear)."""

    kind = "pixels"

    def __init__(self, spec: ModalitySpec, latent_shape: tuple[int, ...]):
        super().__init__(spec, latent_shape)
        self._require_latent_shape()

    def check_batch(self, x: np.ndarray, batch_size: int) -> None:
        self._check_pixels(x, batch_size)

    def encode(self, x: jax.Array) -> jax.Array:
        return x.astype(jnp.float32)

    def make_head(self, feature_dim, fmap_channels, temb_dim, rngs):
        return _PerPixelHead(fmap_channels, self.latent_shape[-1], rngs)

    def nll(self, head_out: jax.Array, x: jax.Array) -> jax.Array:
        return likelihoods.gaussian_nll(x.astype(jnp.float32), head_out.astype(jnp.float32), 1.0)

    def expected_encoding(self, head_out: jax.Array) -> jax.Array:
        return head_out.astype(jnp.float32)

    def decode(self, head_out: jax.Array) -> jax.Array:
        return jnp.clip(head_out, -1.0, 1.0)


KINDS: dict[str, type[Modality]] = {
    "image": ImageModality,
    "label": LabelModality,
    "mask": MaskModality,
    "pixels": PixelsModality,
    "vector": VectorModality,
}


@dataclasses.dataclass(frozen=True)
class ModalitySet:
    """The primary modality and the auxiliary ones, in config order."""

    primary: Modality
    aux: tuple[Modality, ...]

    @property
    def names(self) -> list[str]:
        return [self.primary.name] + [m.name for m in self.aux]

    def weight_specs(self) -> list[tuple[str, float]]:
        return [(m.spec.weight_schedule, m.spec.weight_scale) for m in self.aux]

    def loss_weights(self) -> list[float]:
        return [m.spec.loss_weight for m in self.aux]

    def dropout_rates(self) -> list[float]:
        return [m.spec.dropout for m in self.aux]

    def head_loss_when_dropped(self) -> list[bool]:
        return [m.spec.head_loss_when_dropped for m in self.aux]

    def denoiser_inputs(self) -> list[tuple[int, Modality]]:
        """(index among the auxiliary modalities, modality) of the masks given to the denoiser (`to_denoiser` > 0)."""
        return [(i, m) for i, m in enumerate(self.aux) if m.spec.to_denoiser > 0]

    @property
    def denoiser_input_channels(self) -> int:
        """The denoiser's input channels besides z_t's: the one-hot classes of `denoiser_inputs`."""
        return sum(int(m.spec.num_classes) for _, m in self.denoiser_inputs())

    @property
    def conditions_on_presence(self) -> bool:
        """Whether the model is told which modalities are present (trained with modality dropout)."""
        return any(rate > 0 for rate in self.dropout_rates())

    def check_batch(self, batch: Mapping[str, Any], batch_size: int) -> None:
        """Validate a host batch: every configured modality present, no unknown key, each well formed."""
        missing = [n for n in self.names if n not in batch]
        if missing:
            raise ModalityError(
                f"batch lacks modality {missing}; the data source gives {sorted(batch)}. Check `modalities` and "
                "`data.source` in the config."
            )
        for m in (self.primary,) + self.aux:
            m.check_batch(np.asarray(batch[m.name]), batch_size)

    def encode(self, batch: Mapping[str, jax.Array]) -> jax.Array:
        """All auxiliary encodings, [B, N, *S] (N may be 0)."""
        z0 = batch[self.primary.name]
        if not self.aux:
            return jnp.zeros((z0.shape[0], 0) + self.primary.latent_shape, z0.dtype)
        return jnp.stack([m.encode(batch[m.name]) for m in self.aux], axis=1)

    def expected_encodings(self, head_outs: Mapping[str, jax.Array], batch_size: int) -> jax.Array:
        """ê for every auxiliary modality from its head's output, [B, N, *S]."""
        if not self.aux:
            return jnp.zeros((batch_size, 0) + self.primary.latent_shape, jnp.float32)
        return jnp.stack([m.expected_encoding(head_outs[m.name]) for m in self.aux], axis=1)

    def nlls(self, head_outs: Mapping[str, jax.Array], batch: Mapping[str, jax.Array], batch_size: int) -> jax.Array:
        """-log p_{D_i}(x_i | z_t, t) for every auxiliary modality, [B, N]."""
        if not self.aux:
            return jnp.zeros((batch_size, 0), jnp.float32)
        return jnp.stack([m.nll(head_outs[m.name], batch[m.name]) for m in self.aux], axis=1)


def build_modalities(specs: Sequence[ModalitySpec], latent_shape: tuple[int, ...]) -> ModalitySet:
    """Instantiate the configured modalities. Exactly one must be primary (kind 'image'), named first."""
    built = []
    for spec in specs:
        if spec.kind not in KINDS:
            raise ModalityError(
                f"modality '{spec.name}': unknown kind {spec.kind!r}; the registered kinds are {sorted(KINDS)}."
            )
        built.append(KINDS[spec.kind](spec, latent_shape))
    primaries = [m for m in built if m.is_primary]
    if len(primaries) != 1 or not built[0].is_primary:
        raise ModalityError(
            f"modalities: the first modality must be the one primary image modality; got kinds "
            f"{[s.kind for s in specs]}."
        )
    names = [m.name for m in built]
    if len(set(names)) != len(names):
        raise ModalityError(f"modalities: names must be unique, got {names}.")
    return ModalitySet(primary=built[0], aux=tuple(built[1:]))
