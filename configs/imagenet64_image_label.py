"""Joint image + label diffusion on ImageNet 64x64 with the ADM backbone (the article's scale).

    python -m mmdiff_jax.data.prepare --source imagenet64 --root $HOME/data/imagenet64 --out $HOME/data/in64
    python -m mmdiff_jax.main --config configs/imagenet64_image_label.py --workdir runs/in64 \
        --config.data.source_kwargs.path=$HOME/data/in64
    python -m mmdiff_jax.main --config configs/imagenet64_image_label.py --workdir runs/in64 --mode summary

The backbone is ADM with guided-diffusion's ImageNet-64 flags (192 channels, multipliers 1, 2, 3, 4, 3 res blocks,
attention at 32/16/8 with 64 channels per head, scale-shift norm, resblock up/down, dropout 0.1; 295M parameters)
and the training recipe of Dhariwal & Nichol's ImageNet-64 model: Adam at 3e-4 (constant), batch 2048, EMA 0.9999,
the cosine noise schedule, T = 1000. The label is the auxiliary modality (1,000 classes). Compute in bfloat16
(parameters, optimizer and loss in float32); `--config.model.remat=True` and `--config.mesh.fsdp=N` trade compute
for memory. `--mode summary` costs it without data or parameters.

`:smoke` shrinks width, depth and resolution (16x16, channels 16/32) to a few CPU steps (tests).
"""

import ml_collections

from mmdiff_jax import config_base

PRESETS = ("", "smoke")


def get_config(preset: str = ""):
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; use one of {PRESETS}.")
    c = config_base.get_base_config()
    c.latent_shape = (64, 64, 3)  # checked against the shards when they are there
    c.modalities.image = dict(kind="image", shape=(64, 64, 3))
    c.modalities.label = dict(kind="label", num_classes=1000, weight_schedule="profile", weight_scale=1.0,
                              loss_weight=1.0)
    c.data.source = "array_record"
    c.data.source_kwargs = ml_collections.ConfigDict({"path": ""})
    c.data.image_size = 0
    c.data.flip = False
    c.data.global_batch_size = 2048
    c.data.workers = 2
    c.diffusion.num_steps = 1000
    c.diffusion.beta_schedule = "cosine"
    c.diffusion.bin_width = 2.0 / 255.0
    c.model.backbone = "adm"
    c.model.channels = (192, 384, 576, 768)
    c.model.blocks_per_level = 3
    c.model.attention_resolutions = (32, 16, 8)
    c.model.num_head_channels = 64
    c.model.groups = 32
    c.model.temb_dim = 768
    c.model.scale_shift_norm = True
    c.model.resblock_updown = True
    c.model.dropout = 0.1
    c.model.dtype = "bfloat16"
    c.optim.lr = 3e-4
    c.optim.warmup_steps = 0
    c.optim.final_lr_fraction = 1.0  # constant
    c.optim.b2 = 0.999
    c.optim.ema_decay = 0.9999
    c.train.num_steps = 540_000
    c.train.log_every = 100
    c.train.checkpoint_every = 5000
    c.sample.batch_size = 256
    c.eval.num_samples = 10_000
    c.eval.evaluator_steps = 5000
    c.eval.conditional_examples = 2000
    if preset == "smoke":
        c.latent_shape = (16, 16, 3)
        c.modalities.image = dict(kind="image", shape=(16, 16, 3))
        c.data.global_batch_size = 8
        c.data.workers = 0
        c.diffusion.num_steps = 100
        c.sample.num_steps = 10
        c.sample.batch_size = 16
        c.eval.num_samples = 16
        c.eval.conditional_examples = 8
        c.eval.evaluator_steps = 20
        c.model.channels = (16, 32)
        c.model.blocks_per_level = 1
        c.model.attention_resolutions = (8,)
        c.model.num_head_channels = 8
        c.model.groups = 8
        c.model.temb_dim = 64
        c.model.dtype = "float32"
        c.optim.lr = 1e-3
        c.train.num_steps = 3
        c.train.log_every = 1
        c.train.checkpoint_every = 3
    return c
