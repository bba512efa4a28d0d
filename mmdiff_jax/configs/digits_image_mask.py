"""Image + segmentation mask on the 8x8 digits: ink pixels take class 1 + digit, the rest background (11 classes).

    python -m mmdiff_jax.main --config digits_image_mask --workdir runs/digits_mask
    python -m mmdiff_jax.main --config digits_image_mask:segmentation_only --workdir runs/digits_seg_only

`segmentation_only`: the baseline with the same backbone, data and steps, trained without the noise-matching term.
`any_direction`: the per-pixel mask loss and mask dropout 0.15 (the two-modality counterpart of
`digits_image_label_mask`).
`per_pixel_mask_loss`: the mask's NLL (summed over its 64 pixels) weighted by 1/64, one number per pixel like L0.

    python -m mmdiff_jax.main --config digits_image_mask:per_pixel_mask_loss --workdir runs/digits_mask_pp
"""

from mmdiff_jax import config_base

PRESETS = ("", "segmentation_only", "per_pixel_mask_loss", "any_direction")


def get_config(preset: str = ""):
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; use one of {PRESETS}.")
    c = config_base.get_base_config()
    loss_weight = 1.0 / (8 * 8) if preset in ("per_pixel_mask_loss", "any_direction") else 1.0
    c.modalities.mask = config_base.modality("mask", shape=(8, 8), num_classes=11, weight_schedule="profile",
                                             weight_scale=1.0, loss_weight=loss_weight,
                                             dropout=0.15 if preset == "any_direction" else 0.0)
    c.data.source = "digits_masks"
    if preset == "segmentation_only":
        c.diffusion.loss_weights.l0 = 0.0
    return c
