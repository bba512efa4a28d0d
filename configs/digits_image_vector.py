"""Joint image + representation (the article's fourth experiment) on the 8x8 digits: the representation is the
evaluator network's 128-d penultimate features of each image (standing in for CLIP embeddings, which cannot be
downloaded here), standardized; any .npz of vectors works instead (mmdiff_jax/data/vectors.py):

    python -m mmdiff_jax.main --config configs/digits_image_vector.py --workdir runs/digits_vector
    python -m mmdiff_jax.main --config configs/digits_image_vector.py --workdir runs/my_vectors \\
        --config.data.vectors.embedding=/path/to/vectors.npz     # arrays 'train' [1438, 128] and 'test' [359, 128]

The baseline with the same backbone and step budget is configs/digits_image_only.py.
"""

from mmdiff_jax import config_base


def get_config():
    c = config_base.get_base_config()
    c.modalities.embedding = dict(kind="vector", shape=(128,), weight_schedule="profile", weight_scale=1.0,
                                  loss_weight=1.0)
    c.data.vectors = {"embedding": "evaluator"}
    return c
