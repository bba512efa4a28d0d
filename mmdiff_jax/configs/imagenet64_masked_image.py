"""Masked-image pretraining at ImageNet 64x64 with the ADM backbone (the article's third experiment at its scale).

    python -m mmdiff_jax.main --config imagenet64_masked_image --workdir runs/in64_masked \\
        --config.data.source_kwargs.path=$HOME/data/in64
    python -m mmdiff_jax.main --config imagenet64_masked_image:label --workdir runs/in64_masked_label \\
        --config.data.source_kwargs.path=$HOME/data/in64

The image with two random black 16x16 squares (new ones for every example in every epoch) is a second modality
(kind 'pixels', identity encoder) that drives the forward process beside the image; `:label` adds the class label
as a third. The backbone and recipe are those of `imagenet64_image_label` (ADM, Adam 3e-4, batch 2048, EMA 0.9999,
cosine schedule, T = 1000, bfloat16). The evaluation inpaints held-out images with 1, 2 and 3 squares.

`:smoke` and `:label_smoke` shrink it to a few CPU steps at 16x16 with 4x4 squares (tests).
"""

from mmdiff_jax import config_base

PRESETS = ("", "label") + tuple(f"{p}_smoke" if p else "smoke" for p in ("", "label"))


def get_config(preset: str = ""):
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; use one of {PRESETS}.")
    with_label = preset.startswith("label")
    c = config_base.get_base_config()
    c.latent_shape = (64, 64, 3)
    c.modalities.image = dict(kind="image", shape=(64, 64, 3))
    config_base.use_imagenet64_recipe(c, "smoke" if preset.endswith("smoke") else "")
    size = tuple(c.latent_shape)
    c.modalities.masked = config_base.modality("pixels", shape=size, weight_schedule="profile", weight_scale=1.0,
                                               loss_weight=0.1)
    if with_label:
        c.modalities.label = config_base.modality("label", num_classes=1000, weight_schedule="profile",
                                                  weight_scale=1.0, loss_weight=1.0)
    c.data.masking.into = "masked"
    c.data.masking.square = size[0] // 4
    c.data.masking.count = 2
    c.eval.inpainting_counts = (1, 2, 3)
    return c
