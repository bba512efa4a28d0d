"""The single-task baseline of configs/mnist_image_label.py: the same backbone, data and step budget, image only.

    python -m mmdiff_jax.main --config configs/mnist_image_only.py --workdir runs/mnist_image_only
    python -m mmdiff_jax.main --config configs/mnist_image_only.py:fashion --workdir runs/fashion_image_only
"""

from configs import mnist_image_label


def get_config(preset: str = ""):
    return mnist_image_label.get_config(preset, with_label=False)
