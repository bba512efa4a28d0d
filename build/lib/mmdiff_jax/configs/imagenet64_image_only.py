"""The article's unconditional baseline at ImageNet 64x64: the ADM backbone and recipe of
`mmdiff_jax/configs/imagenet64_image_label.py`, with the image as the only modality (no label, no head).

    python -m mmdiff_jax.main --config imagenet64_image_only --workdir runs/in64_adm \
        --config.data.source_kwargs.path=$HOME/data/in64

`:smoke`: the same shrinking as the joint config's (a few CPU steps, tests).
"""

from mmdiff_jax import config_base

PRESETS = config_base.IMAGENET64_PRESETS


def get_config(preset: str = ""):
    c = config_base.get_base_config()
    c.latent_shape = (64, 64, 3)  # checked against the shards when they are there
    c.modalities.image = dict(kind="image", shape=(64, 64, 3))
    config_base.use_imagenet64_recipe(c, preset)
    return c
