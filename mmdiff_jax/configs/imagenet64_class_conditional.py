"""The article's class-conditional baseline at ImageNet 64x64: ADM's class-conditional model, with the backbone and
recipe of `mmdiff_jax/configs/imagenet64_image_label.py`. The image is the only modality; the label is an input whose
embedding is added to the time embedding (as in ADM), not a modality: it does not shift the forward process and has
no head.

    python -m mmdiff_jax.main --config imagenet64_class_conditional --workdir runs/in64_adm_cond \
        --config.data.source_kwargs.path=$HOME/data/in64

`:smoke`: the same shrinking as the joint config's (a few CPU steps, tests).
"""

from mmdiff_jax import config_base
from mmdiff_jax.configs import imagenet64_image_only

PRESETS = config_base.IMAGENET64_PRESETS


def get_config(preset: str = ""):
    c = imagenet64_image_only.get_config(preset)  # the unconditional baseline, plus the label as an input
    c.model.num_classes = 1000
    return c
