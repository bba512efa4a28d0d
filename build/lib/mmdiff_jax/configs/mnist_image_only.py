"""The single-task baseline of mmdiff_jax/configs/mnist_image_label.py: the same backbone, data and step budget, image only.

    python -m mmdiff_jax.main --config mnist_image_only --workdir runs/mnist_image_only
    python -m mmdiff_jax.main --config mnist_image_only:fashion --workdir runs/fashion_image_only
"""

from mmdiff_jax.configs import mnist_image_label

PRESETS = mnist_image_label.PRESETS


def get_config(preset: str = ""):
    return mnist_image_label.get_config(preset, with_label=False)
