"""A tiny joint image + label config for tests: a (16, 32) U-Net, 100 diffusion steps, a few training steps.

    python -m mmdiff_jax.main --config configs/tiny.py --workdir /tmp/tiny
"""

from mmdiff_jax import config_base


def get_config():
    c = config_base.get_base_config()
    c.modalities.label = dict(kind="label", num_classes=10, weight_schedule="profile", weight_scale=1.0,
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
    return c
