"""Image + segmentation mask on the 8x8 digits: ink pixels take class 1 + digit, the rest background (11 classes).

    python -m mmdiff_jax.main --config configs/digits_image_mask.py --workdir runs/digits_mask
    python -m mmdiff_jax.main --config configs/digits_image_mask.py:segmentation_only --workdir runs/digits_seg_only

`segmentation_only`: the baseline with the same backbone, data and steps, trained without the noise-matching term.
"""

from mmdiff_jax import config_base

PRESETS = ("", "segmentation_only")


def get_config(preset: str = ""):
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; use one of {PRESETS}.")
    c = config_base.get_base_config()
    c.modalities.mask = dict(kind="mask", shape=(8, 8), num_classes=11, weight_schedule="profile",
                             weight_scale=1.0, loss_weight=1.0)
    c.data.source = "digits_masks"
    if preset == "segmentation_only":
        c.diffusion.loss_weights.l0 = 0.0
    return c
