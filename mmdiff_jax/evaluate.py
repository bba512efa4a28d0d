"""`--mode eval`: every metric the config's modalities call for, written to `workdir/eval.json`, and the samples
behind them (`samples/*.npz` with PNG grids, as `--mode sample` writes them).

Images (when the data has class labels to train the evaluator on): Fréchet distance and improved precision/recall in
the evaluator's feature space against the held-out real images (with the train-vs-held-out distance as the floor).
Labels: agreement between each jointly generated label and the evaluator's reading of its generated image; the share
of the rarest class; image -> label accuracy of the model on held-out real images (the first
`eval.conditional_examples` of them when set, as for image -> mask; with `eval.image_to_label_draws` > 1, the
mean over independent reverse processes and the accuracy of their majority vote); label -> image accuracy (the
evaluator reads the requested class). Masks: image -> mask mIoU and pixel accuracy on held-out images; consistency
of joint samples (mIoU between the generated mask and the model's mask for the generated image). Vectors (evaluator
embeddings): cosine similarity between each generated embedding and the embedding of its generated image.
Inpainting (`eval.inpainting_counts`): held-out images with fixed random black squares, filled in by the model, the
unmasked pixels kept; masked-region MSE and PSNR, and LPIPS (see `_inpainting_metrics`). Likelihood: the negative
ELBO of held-out examples in bits per dimension, split by modality. Head probe (`eval.head_probe_steps`): the
accuracy of each label or mask head on held-out examples at fixed steps t of the forward process, with and without
the modality's encoding in z_t. Models trained with modality dropout: label ->
image accuracy for each classifier-free guidance weight in `eval.guidance_weights` (under
`sample.guidance_interval`, and under each of `eval.guidance_intervals`), and the Fréchet distance of images
generated without the label.
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from mmdiff_jax import checkpointing, metrics_writer, objective, parallel
from mmdiff_jax.errors import UserError
from mmdiff_jax import sample as sample_lib
from mmdiff_jax.data import masking, sources, vectors
from mmdiff_jax.diffusion import code_reader, losses, samplers
from mmdiff_jax.evaluation import evaluator as evaluator_lib
from mmdiff_jax.evaluation import feature_metrics, grids, head_probe, inpainting, segmentation


def output_paths(workdir: str, tag: str) -> tuple[str, str]:
    """(the results .json, the samples directory) of an evaluation: eval.json and samples/ for the run's own
    (untagged) evaluation, eval_<tag>.json and samples/<tag>/ for a tagged one."""
    if tag:
        return os.path.join(workdir, f"eval_{tag}.json"), os.path.join(workdir, "samples", tag)
    return os.path.join(workdir, "eval.json"), os.path.join(workdir, "samples")


def evaluate(config, workdir: str, tagged: bool = False) -> dict:
    """The metrics of the latest checkpoint and the samples behind them.

    The evaluation after training (`tagged=False`, no eval.tag) writes eval.json and samples/. `--mode eval`
    (`tagged=True`) writes eval_<tag>.json and samples/<tag>/, the tag being `eval.tag` or `step<S>_seed<K>`
    (checkpoint step, sample.seed); an existing tagged result is never replaced (a one-line error says so)."""
    start = time.perf_counter()

    def outputs(step):  # checked before the restore (fast) and after it (the step restored may be an older one)
        tag = config.eval.tag or (f"step{step}_seed{config.sample.seed}" if tagged else "")
        json_path, out_dir = output_paths(workdir, tag)
        if tag and (os.path.exists(json_path) or os.path.exists(out_dir)):
            raise UserError(f"{json_path} (or {out_dir}) exists from an earlier evaluation; to keep both, pass "
                            "--config.eval.tag=<new name> (or another --config.sample.seed); to redo it, delete them.")
        return tag, json_path, out_dir

    outputs(checkpointing.Checkpointer.newest_saved_step(workdir))
    gen = sample_lib.load_generator(config, workdir)
    tag, json_path, out_dir = outputs(gen.step)
    config = gen.config  # its shapes resolved from the data
    logging.info("Evaluating step %d: results to %s, samples to %s", gen.step, json_path, out_dir)
    train_src = sources.for_eval(config, "train", workdir)
    test_src = sources.for_eval(config, "test", workdir)
    key = jax.random.key(config.sample.seed)
    n = config.eval.num_samples
    os.makedirs(out_dir, exist_ok=True)

    joint = gen.generate(jax.random.fold_in(key, 0), n)
    results = {
        "step": gen.step,
        "num_samples": n,
        "sampler": f"{config.sample.sampler} {config.sample.num_steps} steps (eta {config.sample.eta}), EMA params",
    }
    ev = read = real_feats = embed = None
    if "label" in train_src.arrays and config.primary in train_src.arrays:  # image quality in an evaluator's features
        ev = evaluator_lib.for_sources(config, workdir, train_src, test_src)
        image_results, read, real_feats = _image_metrics(config, ev, gen, train_src, test_src, joint)
        results.update(image_results)
    n_cond = config.eval.conditional_examples  # 0: all; each example costs a reverse process per conditional metric
    conditional_src = test_src.first(n_cond) if n_cond else test_src
    results["conditional_examples"] = len(conditional_src)
    for m in gen.diff.modalities.aux:
        if m.kind == "label":
            results.update(_label_metrics(gen, m, key, conditional_src, joint, ev, read, out_dir, real_feats))
        elif m.kind == "mask":
            results.update(_mask_metrics(gen, m, key, conditional_src, joint))
            if "label" in conditional_src.arrays:
                results.update(_mask_to_rest_metrics(gen, m, key, conditional_src, ev, out_dir))
        elif (m.kind == "vector" and vectors.origin(config, m.name) == vectors.EVALUATOR
              and m.name not in train_src.arrays):  # not the data's own vectors
            embed = embed or vectors.evaluator_embedding(config, workdir, train_src, test_src)
            results.update(_vector_metrics(config, embed, m, joint))
    if gen.diff.num_classes and ev is not None:
        results.update(_class_conditional_metrics(gen, key, ev, out_dir))
    if config.eval.inpainting_counts:
        results.update(_inpainting_metrics(config, gen, key, test_src, out_dir))
    probe_steps = tuple(config.eval.get("head_probe_steps", ()))
    if config.eval.elbo_examples or probe_steps:  # every held-out modality: derived vectors and masked copies too
        test_arrays = vectors.attach_vectors(config, test_src, "test", workdir, embed).arrays
        test_arrays = masking.with_held_out_masked(config, test_arrays)
        if config.eval.elbo_examples:
            results.update(_likelihood_metrics(config, gen, key, test_arrays))
        if probe_steps:
            results.update(_head_probe_metrics(config, gen, key, test_arrays, probe_steps))
    sample_lib.write_samples(out_dir, "joint", joint, gen)
    results["eval_seconds"] = time.perf_counter() - start
    if parallel.is_main_process():
        with open(json_path + ".tmp", "w") as f:
            json.dump(results, f, indent=2)
        os.replace(json_path + ".tmp", json_path)
        metrics_writer.write_evaluation(workdir, gen.step, f"eval_{tag}" if tag else "eval", results,
                                        sample_lib.grid_files(out_dir))
    logging.info("Evaluation: %s", json.dumps(results, indent=2))
    logging.info("Wrote %s and the samples in %s", json_path, out_dir)
    return results


def _image_metrics(config, ev, gen, train_src, test_src, joint) -> tuple[dict, np.ndarray, np.ndarray]:
    """Fréchet distance, precision/recall against held-out images, the evaluator's class balance of the samples.
    Returns (metrics, the evaluator's reading of each joint sample, its features of every held-out image [N, F])."""
    image_name = gen.diff.modalities.primary.name
    num_classes = int(train_src.arrays["label"].max()) + 1
    self_read, fake_feats = ev(joint[image_name])
    _, real_feats = ev(test_src.arrays[image_name])
    _, train_feats = ev(train_src.arrays[image_name])
    precision, recall = feature_metrics.precision_recall(real_feats, fake_feats, config.eval.knn_k)
    counts = np.bincount(self_read, minlength=num_classes)
    metrics = {
        "evaluator_test_accuracy": ev.test_accuracy,
        "image/frechet_distance": feature_metrics.frechet_distance(real_feats, fake_feats),
        "image/precision": precision,
        "image/recall": recall,
        "reference/frechet_distance_train_vs_test": feature_metrics.frechet_distance(real_feats, train_feats),
        "image/min_class_fraction_evaluator": float(counts.min() / len(self_read)),
    }
    return metrics, self_read, real_feats


def _label_metrics(gen, m, key, test_src, joint, ev, read, out_dir, real_feats) -> dict:
    """Agreement of generated labels with the evaluator's reading of their images; the rarest generated class;
    image -> label accuracy on held-out images `test_src` (the first eval.conditional_examples); label -> image accuracy
    (the evaluator reads the requested class); the Fréchet distance of the images generated without the label against
    `real_feats`, the evaluator's features of every held-out image [N, F] (the joint samples' reference)."""
    image_name = gen.diff.modalities.primary.name
    n, num_classes = len(joint[m.name]), m.spec.num_classes
    labels = joint[m.name]
    metrics = {f"{m.name}/min_class_fraction": float(np.bincount(labels, minlength=num_classes).min() / n)}
    given = {image_name: test_src.arrays[image_name]}
    draws = int(gen.config.eval.get("image_to_label_draws", 1))  # independent reverse processes per held-out image
    keys = [jax.random.fold_in(key, 1)]  # the first draw's key is the one a single draw has always used
    keys += [jax.random.fold_in(keys[0], d) for d in range(1, draws)]
    truth = test_src.arrays[m.name]
    drawn = np.stack([gen.generate(k, len(test_src), given=given)[m.name] for k in keys])  # [draws, N]
    per_draw = [float(np.mean(d == truth)) for d in drawn]
    metrics[f"{m.name}/image_to_label_accuracy"] = float(np.mean(per_draw))
    if draws > 1:
        metrics[f"{m.name}/image_to_label_accuracy_per_draw"] = per_draw
        metrics[f"{m.name}/image_to_label_accuracy_std"] = float(np.std(per_draw, ddof=1))
        # the label most draws agree on (ties: the smallest class), the model's estimate of the most likely label
        metrics[f"{m.name}/image_to_label_accuracy_vote"] = float(np.mean(majority_vote(drawn, num_classes) == truth))
    if m.spec.dropout > 0 and m.spec.head_loss_when_dropped:
        # a head also trained on the examples without the label reads it from the image alone: the label left out of
        # the process, its head's output at the last reverse step, the first draw's key
        alone = gen.generate(keys[0], len(test_src), given=given, absent=[m.name])[m.name]
        metrics[f"{m.name}/image_to_label_accuracy_head_alone"] = float(np.mean(alone == truth))
    if ev is None:  # no evaluator for this data
        return metrics
    metrics[f"{m.name}/agreement"] = float(np.mean(labels == read))
    accuracy, wanted = _label_to_image(gen, m.name, num_classes, n, key, ev, out_dir)
    metrics[f"{m.name}/label_to_image_accuracy"] = accuracy
    if gen.diff.modalities.conditions_on_presence:
        # classifier-free guidance on the label, the same noise: each weight under sample.guidance_interval, each
        # nonzero one also under the eval.guidance_intervals (suffix _t<t_min>-<t_max>)
        weights, intervals = gen.config.eval.guidance_weights, gen.config.eval.get("guidance_intervals", ())
        settings = [(w, None, "") for w in weights]
        settings += [(w, (int(lo), int(hi)), f"_t{int(lo)}-{int(hi)}") for lo, hi in intervals
                     for w in weights if float(w) != 0.0]
        for w, interval, suffix in settings:
            if float(w) == 0.0 and interval is None:  # the plain conditional above: same key, same samples
                metrics[f"{m.name}/label_to_image_accuracy_guidance_0"] = accuracy
                continue
            guided = gen.generate(jax.random.fold_in(key, 2), n, given={m.name: wanted}, guidance={m.name: w},
                                  guidance_interval=interval)
            metrics[f"{m.name}/label_to_image_accuracy_guidance_{w:g}{suffix}"] = float(
                np.mean(ev(guided[image_name])[0] == wanted))
            sample_lib.write_samples(out_dir, f"{m.name}_to_image_guidance_{w:g}{suffix}", guided, gen,
                                     sort_grid_by_label=True)
        marginal = gen.generate(jax.random.fold_in(key, 5), n, absent=[m.name])  # the image without the label
        metrics["image/frechet_distance_without_" + m.name] = feature_metrics.frechet_distance(
            real_feats, ev(marginal[image_name])[1])
    return metrics


def majority_vote(drawn: np.ndarray, num_classes: int) -> np.ndarray:
    """The most frequent class per column of `drawn` [D, N] (ties: the smallest class); returns [N]."""
    counts = (drawn[..., None] == np.arange(num_classes)).sum(axis=0)  # [N, K]
    return counts.argmax(axis=1).astype(drawn.dtype)


def _class_conditional_metrics(gen, key, ev, out_dir) -> dict:
    """A class-conditional model (ADM's baseline): label -> image accuracy, the evaluator reading the requested
    class, on the same labels and key as a joint model's `label/label_to_image_accuracy`."""
    accuracy, _ = _label_to_image(gen, objective.CLASS_LABELS, gen.diff.num_classes, gen.config.eval.num_samples,
                                  key, ev, out_dir)
    return {f"{objective.CLASS_LABELS}/label_to_image_accuracy": accuracy}


def _label_to_image(gen, name, num_classes, n, key, ev, out_dir) -> tuple[float, np.ndarray]:
    """n images generated for the requested labels 0, 1, ..., K-1, 0, ... of `name` (a label modality or a
    class-conditional model's labels), written as `<name>_to_image`; returns (the share the evaluator reads as
    requested, the requested labels [n])."""
    wanted = np.arange(n, dtype=np.int32) % num_classes
    cond = gen.generate(jax.random.fold_in(key, 2), n, given={name: wanted})
    sample_lib.write_samples(out_dir, f"{name}_to_image", cond, gen, sort_grid_by_label=True)
    return float(np.mean(ev(cond[gen.diff.modalities.primary.name])[0] == wanted)), wanted


def _mask_metrics(gen, m, key, test_src, joint) -> dict:
    """image -> mask mIoU (and pixel accuracy) on held-out images against their true masks; consistency of joint
    samples: mIoU between each generated mask and the mask the model predicts from the generated image."""
    image_name = gen.diff.modalities.primary.name
    k = m.spec.num_classes
    pred = gen.generate(jax.random.fold_in(key, 3), len(test_src), given={image_name: test_src.arrays[image_name]})
    truth = test_src.arrays[m.name]
    from_generated = gen.generate(jax.random.fold_in(key, 4), len(joint[image_name]),
                                  given={image_name: joint[image_name]})[m.name]
    return {
        f"{m.name}/image_to_mask_miou": segmentation.mean_iou(pred[m.name], truth, k),
        f"{m.name}/image_to_mask_pixel_accuracy": segmentation.pixel_accuracy(pred[m.name], truth),
        f"{m.name}/joint_consistency_miou": segmentation.mean_iou(joint[m.name], from_generated, k),
    }


def _mask_to_rest_metrics(gen, m, key, test_src, ev, out_dir) -> dict:
    """mask -> the other modalities, on held-out masks of labelled data: the evaluator's reading of the generated
    image against the true label (mask -> image accuracy) and, for a model with a label modality, the generated
    label against it (mask -> label accuracy)."""
    truth = test_src.arrays["label"]
    out = gen.generate(jax.random.fold_in(key, 8), len(truth), given={m.name: test_src.arrays[m.name]})
    metrics = {}
    if ev is not None:
        metrics[f"{m.name}/mask_to_image_accuracy"] = float(np.mean(ev(out[gen.diff.modalities.primary.name])[0]
                                                                    == truth))
        sample_lib.write_samples(out_dir, f"{m.name}_to_image", out, gen)
    for other in gen.diff.modalities.aux:
        if other.kind == "label":
            metrics[f"{m.name}/mask_to_{other.name}_accuracy"] = float(np.mean(out[other.name] == truth))
    return metrics


def _inpainting_metrics(config, gen, key, test_src, out_dir) -> dict:
    """Inpaint every held-out image (`data.masking.source`) with `count` fixed random squares of side
    `data.masking.square`, for each count in `eval.inpainting_counts`; the unmasked pixels are kept.

    How the model fills in follows from its modalities: with the masked image as a modality (`data.masking.into`),
    the model generates the full image given it (joint model: the image given the masked image, and with
    `eval.inpainting_replace_known` its known pixels replaced at every reverse step as well; the reconstruction-only
    baseline, whose primary is the masked image: its head's full image). A model without one (image-only) inpaints by
    replacement alone (`samplers.sample(known_pixels=...)`).
    Per count: the masked fraction, masked-region MSE (mean over images), the PSNR of that mean, LPIPS (mean)."""
    spec, mods = config.data.masking, gen.diff.modalities
    truth = test_src.arrays[spec.source]  # [N, H, W, C]
    lpips = inpainting.LPIPS()
    metrics = {}
    for count in config.eval.inpainting_counts:
        holes = masking.held_out_holes(len(truth), truth.shape[1:3], spec.square, count)  # [N, H, W]
        masked_images = masking.apply_holes(truth, holes)
        count_key = jax.random.fold_in(key, 100 + count)
        known = np.broadcast_to(~holes[..., None], truth.shape)
        if spec.into in mods.names:  # given the masked image (its shift), and for a joint model its known pixels too
            replace = config.eval.inpainting_replace_known and mods.primary.name == spec.source
            out = gen.generate(count_key, len(truth), given={spec.into: masked_images},
                               known_pixels=(masked_images, known) if replace else None)[spec.source]
        else:
            out = gen.generate(count_key, len(truth), known_pixels=(masked_images, known))[mods.primary.name]
        filled = np.where(holes[..., None], out, truth)
        mse = inpainting.masked_mse(filled, truth, holes)
        prefix = f"inpaint_{count}sq"
        metrics.update({
            f"{prefix}/masked_fraction": float(holes.mean()),
            f"{prefix}/masked_mse": float(np.mean(mse)),
            f"{prefix}/psnr_db": float(inpainting.psnr(np.mean(mse))),  # of the mean MSE (finite when some are 0)
            f"{prefix}/lpips": float(np.mean(lpips(filled, truth))),
        })
        if parallel.is_main_process():  # rows of ten: true, masked, filled in
            rows = [a[:10] for a in (truth, masked_images, filled)]
            grids.save_grid(os.path.join(out_dir, f"{prefix}.png"), np.concatenate(rows))
    return metrics


def _likelihood_metrics(config, gen, key, test_arrays) -> dict:
    """The negative ELBO of the first `eval.elbo_examples` held-out examples (every modality given), as an exact sum
    over all T steps (`losses.elbo`), in bits per dimension: the primary (prior + diffusion + reconstruction terms
    over its dimensions), each auxiliary modality (its decoder NLL at t = 1 over its own dimensions), and the total.

    A `diffusion.read_known_classes` model generates the image given its labels (the labels drawn first from their
    heads at t = T in joint sampling), and its bound is of that model: the primary's terms are of p(image | labels)
    (the known codes replace the heads' ê, ε̂ kept consistent with the model's ẑ_0 as in the samplers:
    `samplers.condition_eps`), and each known label is charged -log of its head's probability at t = T on a prior
    draw z_T ~ N(0, I), the marginal the sampler draws from (in expectation an upper bound of -log p(label))."""
    mods = gen.diff.modalities
    num = min(config.eval.elbo_examples, len(test_arrays[mods.primary.name]))
    names = mods.names + gen.diff.input_fields
    batch = {name: jnp.asarray(test_arrays[name][:num]) for name in names}
    z0 = batch[mods.primary.name].astype(jnp.float32)
    enc = mods.encode(batch)
    model = nnx.merge(gen.graphdef, gen.params)
    known_names = [m.name for m in mods.aux if m.kind in code_reader.read_kinds()] if gen.diff.read_known_classes \
        else []
    known_cols = jnp.asarray([m.name in known_names for m in mods.aux], bool)  # [N]
    known_mask = known_cols.reshape((1, -1) + (1,) * (enc.ndim - 2))  # [1, N, 1...]: broadcasts against [B, N, *S]

    @jax.jit
    def run(z0, enc, batch, k):
        labels = batch[objective.CLASS_LABELS] if gen.diff.num_classes else None
        known = {name: batch[name] for name in known_names}
        marginal_nll = jnp.zeros((z0.shape[0], len(mods.aux)), jnp.float32)  # [B, N]
        if known_names:
            z_prior = jax.random.normal(jax.random.fold_in(k, 1), z0.shape, jnp.float32)
            t_prior = jnp.full((z0.shape[0],), gen.diff.num_steps, jnp.int32)
            heads = objective.predict(model, gen.diff, z_prior, t_prior, labels=labels).heads
            marginal_nll = mods.nlls(heads, batch, z0.shape[0])

        def denoise(zt, t):
            pred = objective.predict(model, gen.diff, zt, t, labels=labels, known_classes=known)
            eps_hat, enc_hat = pred.eps, pred.enc
            if known_names:  # the image given its labels: their codes are known, not predicted
                enc_hat = jnp.where(known_mask, enc, pred.enc)
                eps_hat = samplers.condition_eps(gen.diff.sched, t, zt, pred.eps, pred.enc, enc_hat)
            aux_nll = jnp.where(known_cols, marginal_nll, mods.nlls(pred.heads, batch, zt.shape[0]))
            learned = () if pred.var_frac is None else (pred.var_frac,)
            return (eps_hat, enc_hat, aux_nll) + learned

        return losses.elbo(gen.diff.sched, denoise, k, z0, enc, [m.data_dims for m in mods.aux], gen.diff.bin_width)

    out = run(z0, enc, batch, jax.random.fold_in(key, 6))
    metrics = {"elbo/num_examples": num, f"bpd/{mods.primary.name}": float(jnp.mean(out["bpd/primary"]))}
    for i, m in enumerate(mods.aux):
        metrics[f"bpd/{m.name}"] = float(jnp.mean(out["bpd/aux"][:, i]))
    metrics["bpd/total"] = float(jnp.mean(out["bpd/total"]))
    return metrics


def _head_probe_metrics(config, gen, key, test_arrays, steps) -> dict:
    """The heads of categorical modalities (label, mask) probed on held-out examples at the training steps
    `eval.head_probe_steps` (`head_probe.head_accuracy_by_step`): accuracy with z_t drawn from the forward process
    with the modality's encoding, and without it."""
    mods = gen.diff.modalities
    model = nnx.merge(gen.graphdef, gen.params)

    def apply(zt, t, present):  # the reverse model as the samplers see it (with read_codes: the reader first)
        pred = objective.predict(model, gen.diff, zt, t, present)
        return pred.eps, pred.heads

    batch = {name: jnp.asarray(test_arrays[name]) for name in mods.names}
    z0, enc = np.asarray(batch[mods.primary.name], np.float32), np.asarray(mods.encode(batch))
    metrics = {}
    for i, m in enumerate(mods.aux):
        if m.kind not in ("label", "mask"):
            continue
        acc = head_probe.head_accuracy_by_step(
            gen.diff.sched, apply, lambda heads, m=m: m.decode(heads[m.name]), z0, enc, test_arrays[m.name], i,
            steps, jax.random.fold_in(key, 7), batch_size=config.sample.batch_size,
            tell_presence=mods.conditions_on_presence)
        for t, (with_it, without_it) in zip(steps, acc):
            metrics[f"{m.name}/head_accuracy_t{t}"] = float(with_it)
            metrics[f"{m.name}/head_accuracy_t{t}_without_{m.name}"] = float(without_it)
    return metrics


def _vector_metrics(config, embed, m, joint) -> dict:
    """Cosine similarity between each generated embedding and the (standardized evaluator) embedding of its
    generated image; the same with the images shuffled is the chance level."""
    of_images = embed(joint[config.primary])  # [N, D]
    generated = np.asarray(joint[m.name], np.float64)
    shuffled = of_images[np.random.default_rng(0).permutation(len(of_images))]
    return {
        f"{m.name}/cosine_to_image_embedding": float(np.mean(_cosine(generated, of_images))),
        f"{m.name}/cosine_to_image_embedding_shuffled": float(np.mean(_cosine(generated, shuffled))),
    }


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of [N, D] arrays."""
    return np.sum(a * b, -1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-12)
