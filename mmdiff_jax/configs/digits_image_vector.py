"""Joint image + representation (the article's fourth experiment) on the 8x8 digits: the representation is the
evaluator network's 128-d penultimate features of each image (standing in for CLIP embeddings, which cannot be
downloaded here), standardized; any .npz of vectors works instead (mmdiff_jax/data/vectors.py):

    python -m mmdiff_jax.main --config digits_image_vector --workdir runs/digits_vector
    python -m mmdiff_jax.main --config digits_image_vector --workdir runs/my_vectors \\
        --config.data.vectors.embedding=/path/to/vectors.npz     # arrays 'train' [1438, 128] and 'test' [359, 128]

`per_dim_vector_loss`: the embedding's Gaussian NLL (summed over its 128 dimensions) weighted by 1/128, one number
per dimension like L0 (as `per_pixel_mask_loss` does for masks):

    python -m mmdiff_jax.main --config digits_image_vector:per_dim_vector_loss --workdir runs/digits_vector_pd

The baseline with the same backbone and step budget is mmdiff_jax/configs/digits_image_only.py.
"""

from mmdiff_jax import config_base

PRESETS = ("", "per_dim_vector_loss")


def get_config(preset: str = ""):
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; use one of {PRESETS}.")
    c = config_base.get_base_config()
    loss_weight = 1.0 / 128 if preset == "per_dim_vector_loss" else 1.0
    c.modalities.embedding = config_base.modality("vector", shape=(128,), weight_schedule="profile", weight_scale=1.0,
                                                  loss_weight=loss_weight)
    c.data.vectors = {"embedding": "evaluator"}
    return c
