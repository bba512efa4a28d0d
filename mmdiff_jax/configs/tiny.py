"""Tiny joint image + label configs for tests: a (16, 32) U-Net and 100 diffusion steps.

    python -m mmdiff_jax.main --config tiny --workdir /tmp/tiny            # 6 steps: plumbing only
    python -m mmdiff_jax.main --config tiny:learns --workdir /tmp/learns   # 600 steps: learns the digits
    python -m mmdiff_jax.main --config tiny:mask --workdir /tmp/mask       # image + mask on shapes
    python -m mmdiff_jax.main --config tiny:masked --workdir /tmp/masked   # image + masked image
"""

from mmdiff_jax import config_base

PRESETS = ("", "learns", "mask", "vector", "dropout", "masked", "reconstruction_only")


def get_config(preset: str = ""):
    c = config_base.get_base_config()
    c.modalities.label = config_base.modality("label", num_classes=10, weight_schedule="profile", weight_scale=1.0,
                                              loss_weight=1.0)
    c.data.global_batch_size = 16
    c.model.channels = (16, 32)
    c.model.temb_dim = 32
    c.diffusion.num_steps = 100
    c.optim.warmup_steps = 2
    c.train.num_steps = 6
    c.train.log_every = 1
    c.train.checkpoint_every = 3
    c.sample.num_steps = 10
    c.sample.batch_size = 64
    c.eval.num_samples = 64
    c.eval.evaluator_steps = 200
    c.eval.elbo_examples = 16
    if preset == "learns":  # enough training for label -> image to work (tests/test_end_to_end.py)
        c.data.global_batch_size = 64
        c.train.num_steps = 600
        c.train.log_every = 100
        c.train.checkpoint_every = 600
        c.optim.lr = 3e-3
        c.optim.warmup_steps = 50
        c.optim.ema_decay = 0.99
        c.sample.num_steps = 25
        c.sample.batch_size = 200
        c.eval.num_samples = 200
        c.eval.evaluator_steps = 400
    elif preset == "mask":  # image + segmentation mask on 8x8 procedural shapes (no label)
        del c.modalities["label"]
        c.modalities.mask = config_base.modality("mask", shape=(8, 8), num_classes=4, weight_schedule="profile",
                                                 weight_scale=1.0, loss_weight=1.0)
        c.data.source = "shapes"
        c.data.source_kwargs = {"size": 8, "num_train": 256, "num_test": 64, "seed": 0}
        c.optim.lr = 3e-3
        c.train.num_steps = 40
        c.train.log_every = 1
        c.train.checkpoint_every = 40
    elif preset == "vector":  # image + evaluator embedding on the digits
        del c.modalities["label"]
        c.modalities.embedding = config_base.modality("vector", shape=(128,), weight_schedule="profile",
                                                      weight_scale=1.0, loss_weight=1.0)
        c.data.vectors = {"embedding": "evaluator"}
        c.optim.lr = 3e-3
        c.train.num_steps = 40
        c.train.log_every = 1
        c.train.checkpoint_every = 40
        c.eval.evaluator_steps = 100
    elif preset == "dropout":  # label dropout: any-direction generation and guidance
        c.modalities.label["dropout"] = 0.3
        c.optim.lr = 3e-3
        c.train.num_steps = 40
        c.train.log_every = 1
        c.train.checkpoint_every = 40
        c.eval.evaluator_steps = 100
        c.eval.elbo_examples = 16
        c.eval.guidance_weights = (0.0, 2.0)
    elif preset in ("masked", "reconstruction_only"):  # masked-image pretraining and its baseline on the digits
        del c.modalities["label"]
        if preset == "masked":
            c.modalities.masked = config_base.modality("pixels", shape=(8, 8, 1), weight_schedule="profile",
                                                       weight_scale=1.0, loss_weight=0.1)
        else:
            c.primary = "masked"
            c.modalities.masked = dict(kind="image", shape=(8, 8, 1))
            c.modalities.image = config_base.modality("pixels", shape=(8, 8, 1), weight_schedule="profile",
                                                      weight_scale=0.0, loss_weight=1.0)
            c.diffusion.loss_weights.l0 = 0.0
        c.data.masking.into = "masked"
        c.optim.lr = 3e-3
        c.train.num_steps = 40
        c.train.log_every = 1
        c.train.checkpoint_every = 40
        c.eval.evaluator_steps = 100
        c.eval.inpainting_counts = (1, 3)
    elif preset:
        raise ValueError(f"unknown preset {preset!r}; use one of {PRESETS}.")
    return c
