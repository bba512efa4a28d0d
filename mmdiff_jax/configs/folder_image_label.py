"""Joint image + label diffusion on your own images: an ImageFolder root (ROOT/train/<class>/..., ROOT/test/<class>/...).

    python -m mmdiff_jax.main --config folder_image_label --workdir runs/pets \
        --config.data.source_kwargs.root=$HOME/data/pets --config.data.image_size=32
    # the same data as ArrayRecord shards (python -m mmdiff_jax.data.prepare ... --out DIR):
    python -m mmdiff_jax.main --config folder_image_label:array_record --workdir runs/pets \
        --config.data.source_kwargs.path=DIR

The latent shape, the label's class count and the U-Net's levels follow the data (`data/shapes.py`): images of side
`data.image_size` with `data.channels` channels, one class per class folder, `model.width` x ADM's channel
multipliers for that side. `:smoke` shrinks the model and the budget to a few CPU steps (tests).
"""

from mmdiff_jax import config_base

PRESETS = config_base.FILE_DATA_PRESETS


def get_config(preset: str = ""):
    c = config_base.get_base_config()
    c.latent_shape = None  # from the data
    c.modalities.image = dict(kind="image", shape=None)
    c.modalities.label = config_base.modality("label", num_classes=0, weight_schedule="profile", weight_scale=1.0,
                                              loss_weight=1.0)
    config_base.use_file_data(c, preset)
    return c
