"""`--mode eval`: every metric the config's modalities call for, written to `workdir/eval.json`, and the samples
behind them (`samples/*.npz` with PNG grids, as `--mode sample` writes them).

Images: Fréchet distance and improved precision/recall in the evaluator's feature space against the held-out real
images (with the train-vs-held-out distance as the floor). Labels: agreement between each jointly generated label and
the evaluator's reading of its generated image; the share of the rarest class; image -> label accuracy of the model
on held-out real images; label -> image accuracy (the evaluator reads the requested class).
"""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np
from absl import logging

from mmdiff_jax import parallel
from mmdiff_jax import sample as sample_lib
from mmdiff_jax.data import sources
from mmdiff_jax.evaluation import evaluator as evaluator_lib
from mmdiff_jax.evaluation import feature_metrics


def evaluate(config, workdir: str) -> dict:
    start = time.perf_counter()
    gen = sample_lib.load_generator(config, workdir)
    kwargs = dict(config.data.source_kwargs)
    train_src = sources.get_source(config.data.source, "train", **kwargs)
    test_src = sources.get_source(config.data.source, "test", **kwargs)
    mods = gen.diff.modalities
    image_name = mods.primary.name
    label_mods = [m for m in mods.aux if m.kind == "label"]
    num_classes = int(train_src.arrays["label"].max()) + 1
    ev = evaluator_lib.get_evaluator(
        os.path.join(workdir, "evaluator"), train_src.arrays[image_name], train_src.arrays["label"],
        test_src.arrays[image_name], test_src.arrays["label"], num_classes, config.eval.evaluator_steps,
    )
    key = jax.random.key(config.sample.seed)
    n = config.eval.num_samples
    out_dir = os.path.join(workdir, "samples")
    os.makedirs(out_dir, exist_ok=True)

    joint = gen.generate(jax.random.fold_in(key, 0), n)
    read, fake_feats = ev(joint[image_name])
    _, real_feats = ev(test_src.arrays[image_name])
    _, train_feats = ev(train_src.arrays[image_name])
    precision, recall = feature_metrics.precision_recall(real_feats, fake_feats, config.eval.knn_k)
    results = {
        "step": gen.step,
        "num_samples": n,
        "sampler": f"{config.sample.sampler} {config.sample.num_steps} steps (eta {config.sample.eta}), EMA params",
        "evaluator_test_accuracy": ev.test_accuracy,
        "image/frechet_distance": feature_metrics.frechet_distance(real_feats, fake_feats),
        "image/precision": precision,
        "image/recall": recall,
        "reference/frechet_distance_train_vs_test": feature_metrics.frechet_distance(real_feats, train_feats),
    }
    counts = np.bincount(read, minlength=num_classes)
    results["image/min_class_fraction_evaluator"] = float(counts.min() / n)
    for m in label_mods:
        labels = joint[m.name]
        results[f"{m.name}/agreement"] = float(np.mean(labels == read))
        results[f"{m.name}/min_class_fraction"] = float(np.bincount(labels, minlength=num_classes).min() / n)
        # image -> label on held-out real images
        given = {image_name: test_src.arrays[image_name]}
        pred = gen.generate(jax.random.fold_in(key, 1), len(test_src), given=given)[m.name]
        results[f"{m.name}/image_to_label_accuracy"] = float(np.mean(pred == test_src.arrays[m.name]))
        # label -> image: does the evaluator read the requested class?
        wanted = np.arange(n, dtype=np.int32) % num_classes
        cond = gen.generate(jax.random.fold_in(key, 2), n, given={m.name: wanted})
        cond_read, _ = ev(cond[image_name])
        results[f"{m.name}/label_to_image_accuracy"] = float(np.mean(cond_read == wanted))
        sample_lib.write_samples(out_dir, f"{m.name}_to_image", cond, gen, sort_grid_by_label=True)
    sample_lib.write_samples(out_dir, "joint", joint, gen)
    results["eval_seconds"] = time.perf_counter() - start
    if parallel.is_main_process():
        with open(os.path.join(workdir, "eval.json"), "w") as f:
            json.dump(results, f, indent=2)
    logging.info("Evaluation: %s", json.dumps(results, indent=2))
    return results
