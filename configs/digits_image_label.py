"""Joint image + label diffusion on scikit-learn's 8x8 digits (the README default).

    python -m mmdiff_jax.main --config configs/digits_image_label.py --workdir runs/digits
    python -m mmdiff_jax.main --config configs/digits_image_label.py:any_direction --workdir runs/digits_any

`any_direction`: the same model and budget trained with label dropout (each example's label is left out of the
forward process with probability 0.15), so one model learns the joint, the image marginal and both conditionals, and
label -> image sampling can use classifier-free guidance (`sample.guidance.label`). The dropped examples' label head
loss is masked; `--config.modalities.label.head_loss_when_dropped=True` keeps it (the head then reads the image alone):
over four seeds that raised image -> label accuracy from 0.976 to 0.983, against 0.980 for the joint-only model, but
label -> image accuracy at guidance weight 4 fell (README, "Training the label head on the dropped examples too").
"""

from mmdiff_jax import config_base

PRESETS = ("", "any_direction")


def get_config(preset: str = ""):
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; use one of {PRESETS}.")
    c = config_base.get_base_config()
    c.modalities.label = dict(kind="label", num_classes=10, weight_schedule="profile", weight_scale=1.0,
                              loss_weight=1.0, dropout=0.15 if preset == "any_direction" else 0.0,
                              head_loss_when_dropped=False)
    return c
