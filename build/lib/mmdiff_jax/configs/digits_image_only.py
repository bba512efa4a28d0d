"""Single-task baseline: image-only diffusion on the digits, same backbone and step budget as the joint model.

    python -m mmdiff_jax.main --config digits_image_only --workdir runs/digits_image_only
"""

from mmdiff_jax import config_base

PRESETS = ("",)


def get_config():
    return config_base.get_base_config()
