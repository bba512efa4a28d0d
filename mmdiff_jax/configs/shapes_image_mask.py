"""Image + segmentation mask ("image transition", the article's second experiment) on procedural 16x16 shapes.

    python -m mmdiff_jax.main --config shapes_image_mask --workdir runs/shapes
    python -m mmdiff_jax.main --config shapes_image_mask:segmentation_only --workdir runs/shapes_seg_only

`segmentation_only` is the baseline with the same backbone, data and step budget: the noise-matching term L0 is
off, so the network learns only to read the mask from the (noisy) image; it segments but cannot generate.

`per_pixel_mask_loss` weighs the mask's NLL (summed over its 256 pixels) by 1/256, which puts it on the same
per-dimension footing as L0 (a mean over the image's dimensions); with weight 1 the mask term is about 70 nats
against an L0 below 1, and it dominates training.

    python -m mmdiff_jax.main --config shapes_image_mask:per_pixel_mask_loss --workdir runs/shapes_pp
"""

from mmdiff_jax import config_base

PRESETS = ("", "segmentation_only", "per_pixel_mask_loss")


def get_config(preset: str = ""):
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; use one of {PRESETS}.")
    c = config_base.get_base_config()
    c.latent_shape = (16, 16, 1)
    c.modalities.image = dict(kind="image", shape=(16, 16, 1))
    loss_weight = 1.0 / (16 * 16) if preset == "per_pixel_mask_loss" else 1.0
    c.modalities.mask = config_base.modality("mask", shape=(16, 16), num_classes=4, weight_schedule="profile",
                                             weight_scale=1.0, loss_weight=loss_weight)
    c.data.source = "shapes"
    c.data.source_kwargs = {"size": 16, "num_train": 4000, "num_test": 1000, "seed": 0}
    c.data.global_batch_size = 64
    c.train.num_steps = 3000
    c.optim.ema_decay = 0.995
    c.sample.sampler = "ddim"
    c.sample.num_steps = 50
    c.eval.num_samples = 500
    if preset == "segmentation_only":
        c.diffusion.loss_weights.l0 = 0.0
    return c
