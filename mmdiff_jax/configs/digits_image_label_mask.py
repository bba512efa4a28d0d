"""Three modalities in one model, the article's stated future work: image + label + segmentation mask on the 8x8
digits (ink pixels take class 1 + digit, the rest background), trained with modality dropout on the label and the
mask (each left out of the forward process with probability 0.15; the mask's NLL weighted per pixel, as
`digits_image_mask:per_pixel_mask_loss`), so one model serves every direction: joint,
label -> (image, mask), image -> (label, mask) and mask -> (image, label). The evaluation reports each direction.

The label's class goes to the denoiser wherever it is known, as in `mnist_image_label`
(`config_base.give_known_labels_to_the_denoiser`); the mask head still trains the backbone. Where the label is not
given (image -> (label, mask), mask -> (image, label)) it is left out of the process and read by its head at the end
(`sample.unknown_labels = 'absent'`). `:plain` is the model without these (the denoiser reads z_t as it is, the
label head reads the backbone's features). `:mask_head_latent` gives the mask a head of its own on the noisy latent
and keeps every head's loss out of the backbone (the recipe of its image + label counterpart). `:mask_to_denoiser`
gives the mask a tenth of its shift and, in half of the training examples where it is present and whenever it is
given in sampling, gives it to the denoiser as one-hot input channels (`modalities.mask.to_denoiser`): joint samples
then feed back a small predicted shift, and mask -> (image, label) does not depend on it.

    python -m mmdiff_jax.main --config digits_image_label_mask --workdir runs/digits_three
    python -m mmdiff_jax.main --config digits_image_label_mask:plain --workdir runs/digits_three_plain

Its two-modality counterparts, same backbone, data, dropout and steps: `digits_image_label:any_direction_read_known`
and `digits_image_mask:any_direction` (docs/results.md, "Digits, three modalities in one model").
"""

from mmdiff_jax import config_base

PRESETS = ("", "plain", "mask_head_latent", "mask_to_denoiser")


def get_config(preset: str = ""):
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; use one of {PRESETS}.")
    c = config_base.get_base_config()
    c.data.source = "digits_masks"
    c.modalities.label = config_base.modality("label", num_classes=10, weight_schedule="profile", weight_scale=1.0,
                                              loss_weight=1.0, dropout=0.15)
    # the mask's loss weight: one number per pixel, like L0
    c.modalities.mask = config_base.modality("mask", shape=(8, 8), num_classes=11, weight_schedule="profile",
                                             weight_scale=1.0, loss_weight=1.0 / (8 * 8), dropout=0.15)
    if preset != "plain":
        config_base.give_known_labels_to_the_denoiser(c)
        # image -> (label, mask) and mask -> (image, label): the unknown label is left out of the process and read at
        # the end, so the backbone sees no label (as in training, dropout 0.15) rather than a soft read of one
        c.sample.unknown_labels = "absent"
    if preset == "mask_head_latent":
        # the mask's head reads the noisy latent and the time embedding (with a given label's class), so no head
        # trains the backbone: it learns from the denoising loss alone, as in the image + label counterpart
        c.modalities.mask.head = "latent"
        c.model.heads_train_backbone = False
    if preset == "mask_to_denoiser":
        c.modalities.mask["weight_scale"] = 0.1
        c.modalities.mask["to_denoiser"] = 0.5
    return c
