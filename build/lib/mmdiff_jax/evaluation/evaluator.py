"""The evaluator: a small CNN classifier the project trains on the real training images (seeded, so it is the same
network for every run on the same data), cached in the workdir. Its penultimate layer is the feature space of the
Fréchet distance and precision/recall; its argmax reads generated images for label agreement."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx

FEATURE_DIM = 128


class EvaluatorNet(nnx.Module):
    """[B, H, W, C] in [-1, 1] -> (logits [B, K], features [B, 128])."""

    def __init__(self, in_ch: int, height: int, width: int, num_classes: int, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(in_ch, 32, (3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(32, 64, (3, 3), strides=2, rngs=rngs)
        flat = ((height + 1) // 2) * ((width + 1) // 2) * 64
        self.fc = nnx.Linear(flat, FEATURE_DIM, rngs=rngs)
        self.out = nnx.Linear(FEATURE_DIM, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        h = nnx.relu(self.conv1(x))
        h = nnx.relu(self.conv2(h))
        feats = nnx.relu(self.fc(h.reshape(h.shape[0], -1)))
        return self.out(feats), feats


def _shift(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random translation by up to one pixel (background -1 fills in): [B, H, W, C]."""
    b, h, w, c = images.shape
    padded = np.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-1.0)
    dy, dx = rng.integers(0, 3, size=2)
    return padded[:, dy: dy + h, dx: dx + w, :]


class Evaluator:
    def __init__(self, graphdef, params, test_accuracy: float):
        self.graphdef, self.params, self.test_accuracy = graphdef, params, test_accuracy
        self._apply = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))

    def __call__(self, images: np.ndarray, batch_size: int = 1000) -> tuple[np.ndarray, np.ndarray]:
        """images [N, H, W, C] -> (predicted class [N], features [N, 128] float64)."""
        preds, feats = [], []
        for start in range(0, len(images), batch_size):
            logits, f = self._apply(self.params, jnp.asarray(images[start: start + batch_size], jnp.float32))
            preds.append(np.asarray(jnp.argmax(logits, -1)))
            feats.append(np.asarray(f, np.float64))
        return np.concatenate(preds), np.concatenate(feats)


def _flatten(tree) -> dict[str, np.ndarray]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in flat}


def get_evaluator(cache_dir: str, train_images, train_labels, test_images, test_labels, num_classes: int,
                  steps: int, seed: int = 0) -> Evaluator:
    """Load the cached evaluator from `cache_dir`, or train it (Adam, batch 128, shift augmentation) and cache it."""
    _, h, w, c = train_images.shape
    model = EvaluatorNet(c, h, w, num_classes, nnx.Rngs(seed))
    graphdef, params = nnx.split(model, nnx.Param)
    weights_path, meta_path = os.path.join(cache_dir, "evaluator.npz"), os.path.join(cache_dir, "evaluator.json")
    if os.path.exists(weights_path) and os.path.exists(meta_path):
        with open(meta_path) as f:
            meta = json.load(f)
        stored = np.load(weights_path)
        leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
        keys = [jax.tree_util.keystr(p) for p, _ in leaves_with_path]
        if meta.get("steps") == steps and set(keys) == set(stored.files):
            params = jax.tree_util.tree_unflatten(treedef, [jnp.asarray(stored[k]) for k in keys])
            return Evaluator(graphdef, params, meta["test_accuracy"])
    tx = optax.adam(optax.cosine_decay_schedule(1e-3, steps))
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, x, y):
        def loss_fn(p):
            logits, _ = nnx.merge(graphdef, p)(x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(seed)
    for _ in range(steps):
        idx = rng.integers(0, len(train_images), size=128)
        params, opt_state, _ = step(params, opt_state, jnp.asarray(_shift(train_images[idx], rng)),
                                    jnp.asarray(train_labels[idx]))
    ev = Evaluator(graphdef, params, 0.0)
    preds, _ = ev(test_images)
    ev.test_accuracy = float(np.mean(preds == test_labels))
    logging.info("Evaluator trained for %d steps: held-out accuracy %.4f", steps, ev.test_accuracy)
    if jax.process_index() == 0:  # every process trains the same evaluator; one writes the cache, atomically
        os.makedirs(cache_dir, exist_ok=True)
        np.savez(weights_path + ".tmp.npz", **_flatten(params))
        with open(meta_path + ".tmp", "w") as f:
            json.dump({"steps": steps, "test_accuracy": ev.test_accuracy}, f)
        os.replace(weights_path + ".tmp.npz", weights_path)
        os.replace(meta_path + ".tmp", meta_path)
    return ev


def for_sources(config, workdir: str, train_src, test_src) -> Evaluator:
    """The evaluator of a config's data (the sources' images and class labels), cached in workdir/evaluator."""
    from mmdiff_jax.errors import UserError

    if "label" not in train_src.arrays:
        raise UserError(f"data.source={config.data.source!r} has no class labels to train the evaluator on.")
    image, labels = config.primary, train_src.arrays["label"]
    return get_evaluator(os.path.join(workdir, "evaluator"), train_src.arrays[image], labels,
                         test_src.arrays[image], test_src.arrays["label"], int(labels.max()) + 1,
                         config.eval.evaluator_steps)
