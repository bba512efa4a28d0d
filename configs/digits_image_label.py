"""Joint image + label diffusion on scikit-learn's 8x8 digits (the README default).

    python -m mmdiff_jax.main --config configs/digits_image_label.py --workdir runs/digits
"""

from mmdiff_jax import config_base


def get_config():
    c = config_base.get_base_config()
    c.modalities.label = dict(kind="label", num_classes=10, weight_schedule="profile", weight_scale=1.0,
                              loss_weight=1.0)
    return c
