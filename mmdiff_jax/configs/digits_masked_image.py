"""Masked-image pretraining (the article's third experiment) on the 8x8 digits: the digit with random black 3x3
squares is a second modality (kind 'pixels', identity encoder) that drives the forward process, trained jointly with
generation; new squares are drawn for every example in every epoch. Inpainting (`--mode eval`) generates the image
given the masked one, for 1, 2 and 3 squares, and keeps the unmasked pixels.

    python -m mmdiff_jax.main --config digits_masked_image --workdir runs/digits_masked
    python -m mmdiff_jax.main --config digits_masked_image:reconstruction_only \\
        --workdir runs/digits_reconstruction_only
    python -m mmdiff_jax.main --config digits_masked_image:image_only --workdir runs/digits_inpaint_image_only

Baselines with the same backbone, data and step budget:
* `reconstruction_only`: the masked image is the network's input (the primary) and a pixels head reads the full
  image from it; trained only on that reconstruction (no noise-matching term; the full image does not drive the
  forward process), so it reconstructs but cannot generate.
* `image_only`: trained exactly as mmdiff_jax/configs/digits_image_only.py; it inpaints by replacement (after every reverse step
  the unmasked pixels are reset to a fresh forward-process draw of the known image).
"""

from mmdiff_jax import config_base

PRESETS = ("", "reconstruction_only", "image_only")


def get_config(preset: str = ""):
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; use one of {PRESETS}.")
    c = config_base.get_base_config()
    c.data.masking.square = 3
    c.data.masking.count = 2
    c.eval.inpainting_counts = (1, 2, 3)
    if preset == "":
        c.modalities.masked = config_base.modality("pixels", shape=(8, 8, 1), weight_schedule="profile",
                                                   weight_scale=1.0, loss_weight=0.1)
        c.data.masking.into = "masked"
    elif preset == "reconstruction_only":
        c.primary = "masked"
        c.modalities.masked = dict(kind="image", shape=(8, 8, 1))
        c.modalities.image = config_base.modality("pixels", shape=(8, 8, 1), weight_schedule="profile",
                                                  weight_scale=0.0, loss_weight=1.0)
        c.data.masking.into = "masked"
        c.diffusion.loss_weights.l0 = 0.0
    return c
