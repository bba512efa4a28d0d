"""Data for vector modalities (the article's image + representation experiment).

Each vector modality takes its vectors from `config.data.vectors.<name>`:
  * "evaluator" (the default): the evaluator network's penultimate features of each image — the stand-in for CLIP
    embeddings, which cannot be downloaded here;
  * a path to an .npz with arrays `train` [N_train, D] and `test` [N_test, D], row i belonging to example i of the
    data source's split (any embedding computed elsewhere).
Either way the vectors are standardized per dimension with the training split's mean and standard deviation.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from mmdiff_jax.data import sources
from mmdiff_jax.data.sources import ArraySource
from mmdiff_jax.data.standardize import Standardizer
from mmdiff_jax.errors import UserError
from mmdiff_jax.evaluation import evaluator as evaluator_lib

EVALUATOR = "evaluator"


def vector_modalities(config) -> list[str]:
    return sorted(name for name, m in config.modalities.items() if dict(m)["kind"] == "vector")


def origin(config, name: str) -> str:
    vectors = config.data.get("vectors", None) or {}
    return str(dict(vectors).get(name, EVALUATOR))


class EvaluatorEmbedding:
    """Standardized evaluator features of images: [N, H, W, C] -> [N, 128] float32."""

    def __init__(self, evaluator: evaluator_lib.Evaluator, train_images: np.ndarray):
        self.evaluator = evaluator
        self.standardize = Standardizer.fit(evaluator(train_images)[1])

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.standardize(self.evaluator(images)[1])


def evaluator_embedding(config, workdir: str, train_src: ArraySource | None = None,
                        test_src: ArraySource | None = None) -> EvaluatorEmbedding:
    """The embedding behind data.vectors.<name> = 'evaluator' (sources loaded here unless given)."""
    train_src = train_src or sources.for_eval(config, "train", workdir)
    test_src = test_src or sources.for_eval(config, "test", workdir)
    try:
        evaluator = evaluator_lib.for_sources(config, workdir, train_src, test_src)
    except UserError as e:
        raise UserError(f"data.vectors: 'evaluator' embeddings need an evaluator: {e} Give an .npz of vectors "
                        "instead.") from None
    return EvaluatorEmbedding(evaluator, train_src.arrays[config.primary])


def _load_npz(path: str, name: str, split: str, length: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(this split's vectors, the train split's vectors) from an .npz, checked."""
    fix = f"data.vectors.{name}={path!r}"
    if not os.path.exists(path):
        raise UserError(f"{fix}: no such file; give an .npz with arrays 'train' and 'test' of shape [N, {dim}].")
    with np.load(path) as f:
        missing = [k for k in ("train", "test") if k not in f.files]
        if missing:
            raise UserError(f"{fix}: the .npz lacks array(s) {missing}; it has {f.files}.")
        this, train = np.asarray(f[split], np.float64), np.asarray(f["train"], np.float64)
    if this.shape != (length, dim):
        raise UserError(f"{fix}: array '{split}' has shape {this.shape}, but the {split} split has {length} examples "
                        f"and modalities.{name}.shape is ({dim},).")
    if not np.all(np.isfinite(this)):
        raise UserError(f"{fix}: array '{split}' holds non-finite values.")
    return this, train


def attach_vectors(config, source: ArraySource, split: str, workdir: str,
                   embedding: EvaluatorEmbedding | None = None) -> ArraySource:
    """The source plus one array per vector modality it does not already hold, standardized. `embedding`: an
    evaluator embedding already built (else built here when an 'evaluator' modality needs it). A file source's own
    vectors (key 'vector') serve the vector modality named 'vector'; its other sources hold no arrays to add to."""
    missing = [name for name in vector_modalities(config) if name not in source.keys]
    if not missing:
        return source
    if not isinstance(source, ArraySource):
        raise UserError(f"modalities {missing}: data.source={config.data.source!r} reads its examples lazily and "
                        "cannot take derived vectors; give the vectors in the data (folder: ROOT/<split>_vectors.npz) "
                        "and name the vector modality 'vector'.")
    arrays = dict(source.arrays)
    for name in vector_modalities(config):
        if name in arrays:
            continue
        where = origin(config, name)
        if where == EVALUATOR:
            embedding = embedding or evaluator_embedding(config, workdir)
            arrays[name] = embedding(arrays[config.primary])
        else:
            dim = int(tuple(dict(config.modalities[name])["shape"])[0])
            this, train = _load_npz(where, name, split, len(source), dim)
            arrays[name] = Standardizer.fit(train)(this)
    return dataclasses.replace(source, arrays=arrays)
