"""Joint image + segmentation mask diffusion on your own pairs: ROOT/train/<class>/<file> with
ROOT/train_masks/<class>/<stem>.png (single-channel, pixel values = class ids), and the same for test.

    python -m mmdiff_jax.main --config folder_image_mask --workdir runs/scenes \
        --config.data.source_kwargs.root=$HOME/data/scenes --config.data.image_size=64 \
        --config.modalities.mask.num_classes=19

`modalities.mask.num_classes` is the one number to give: every mask value must lie in 0..num_classes-1 (checked
before training). Presets as in folder_image_label.py (`:array_record`, `:smoke`, `:array_record_smoke`).
"""

from mmdiff_jax import config_base

PRESETS = config_base.FILE_DATA_PRESETS


def get_config(preset: str = ""):
    c = config_base.get_base_config()
    c.latent_shape = None  # from the data
    c.modalities.image = dict(kind="image", shape=None)
    c.modalities.mask = config_base.modality("mask", shape=None, num_classes=0, weight_schedule="profile",
                                             weight_scale=1.0, loss_weight=1.0)
    config_base.use_file_data(c, preset)
    return c
