"""Joint image + label diffusion on ImageNet 64x64 with the ADM backbone (the article's scale).

    python -m mmdiff_jax.data.prepare --source imagenet64 --root $HOME/data/imagenet64 --out $HOME/data/in64
    python -m mmdiff_jax.main --config imagenet64_image_label --workdir runs/in64 \
        --config.data.source_kwargs.path=$HOME/data/in64
    python -m mmdiff_jax.main --config imagenet64_image_label --workdir runs/in64 --mode summary

The backbone is ADM with guided-diffusion's ImageNet-64 flags (192 channels, multipliers 1, 2, 3, 4, 3 res blocks,
attention at 32/16/8 with 64 channels per head, scale-shift norm, resblock up/down, dropout 0.1; 295M parameters)
and the training recipe of Dhariwal & Nichol's ImageNet-64 model: Adam at 3e-4 (constant), batch 2048, EMA 0.9999,
the cosine noise schedule, T = 1000. The label is the auxiliary modality (1,000 classes). Compute in bfloat16
(parameters, optimizer and loss in float32); `--config.model.remat=True` and `--config.mesh.fsdp=N` trade compute
for memory. `--mode summary` costs it without data or parameters.

`:smoke` shrinks width, depth and resolution (16x16, channels 16/32) to a few CPU steps (tests).
"""

from mmdiff_jax import config_base

PRESETS = config_base.IMAGENET64_PRESETS


def get_config(preset: str = ""):
    c = config_base.get_base_config()
    c.latent_shape = (64, 64, 3)  # checked against the shards when they are there
    c.modalities.image = dict(kind="image", shape=(64, 64, 3))
    c.modalities.label = config_base.modality("label", num_classes=1000, weight_schedule="profile", weight_scale=1.0,
                                              loss_weight=1.0)
    config_base.use_imagenet64_recipe(c, preset)
    return c
