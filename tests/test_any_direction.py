"""Modality dropout (one model for the joint, the marginals and the conditionals), classifier-free guidance per
modality, and the per-modality ELBO in `--mode eval`, on a tiny image + label model."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mmdiff_jax.configs import digits_image_label, tiny
from mmdiff_jax import config_check, evaluate, objective, sample, train
from mmdiff_jax.config_check import ConfigError
from mmdiff_jax.data import sources
from mmdiff_jax.diffusion import process
from mmdiff_jax.errors import UserError
from mmdiff_jax.evaluation import feature_metrics


class _Recorder(nnx.Module):
    """A stand-in model that records what the loss gives it: ε̂ = 0, label logits 0."""

    def __init__(self):
        self.seen = []

    def __call__(self, zt, t, present=None):
        self.seen.append((zt, t, present))
        return jnp.zeros_like(zt), {"label": jnp.zeros((zt.shape[0], 10))}


def test_dropout_zeroes_the_encoding_and_the_head_loss_of_dropped_examples_unless_asked():
    config = tiny.get_config("dropout")
    config.modalities.label["dropout"] = 0.5
    diff = objective.build_diffusion(config)
    assert diff.modalities.conditions_on_presence
    rng = np.random.default_rng(0)
    batch = {"image": jnp.asarray(rng.uniform(-1, 1, size=(512, 8, 8, 1)), jnp.float32),
             "label": jnp.asarray(rng.integers(0, 10, size=512), jnp.int32)}
    model, key = _Recorder(), jax.random.key(3)
    _, metrics = objective.compute_loss(model, diff, batch, key)
    zt, t, present = model.seen[-1]
    assert present.shape == (512, 1) and 0.4 < float(present.mean()) < 0.6
    # the same draws as compute_loss: t and ε from the key, and the label's encoding only where present
    t_key, eps_key = jax.random.split(key)
    np.testing.assert_array_equal(t, process.sample_timesteps(t_key, 512, diff.num_steps))
    eps = jax.random.normal(eps_key, (512, 8, 8, 1), jnp.float32)
    enc = diff.modalities.encode(batch) * present.reshape(512, 1, 1, 1, 1)
    np.testing.assert_allclose(zt, process.q_sample(diff.sched, t, batch["image"], enc, eps), atol=1e-6)
    np.testing.assert_allclose(metrics["nll/label"], np.log(10.0), rtol=1e-5)  # the mean over the kept examples
    kept = float(present.mean())
    np.testing.assert_allclose(metrics["loss/l2"], kept * np.log(10.0), rtol=1e-5)  # dropped: no head loss
    config.modalities.label["head_loss_when_dropped"] = True  # the head trained on every example
    _, metrics = objective.compute_loss(model, objective.build_diffusion(config), batch, key)
    np.testing.assert_array_equal(model.seen[-1][2], present)  # the same draws: the label still leaves the process
    np.testing.assert_allclose(model.seen[-1][0], zt, atol=1e-6)
    np.testing.assert_allclose(metrics["loss/l2"], np.log(10.0), rtol=1e-5)
    np.testing.assert_allclose(metrics["nll/label"], np.log(10.0), rtol=1e-5)
    no_dropout = tiny.get_config()
    diff0 = objective.build_diffusion(no_dropout)
    objective.compute_loss(model, diff0, batch, key)
    assert model.seen[-1][2] is None and not diff0.modalities.conditions_on_presence


def test_guidance_and_dropout_config_errors_name_the_field():
    config = tiny.get_config()  # no dropout
    config.sample.guidance = {"label": 2.0, "image": 1.0}
    config.sample.guidance_interval = (500, 100)
    config.eval.guidance_intervals = ((0, 200), (300,))
    config.modalities.label["dropout"] = 1.0
    with pytest.raises(ConfigError) as err:
        config_check.validate(config, device_count=2, process_count=1)
    for text in ("modalities.label.dropout: must be a probability in [0, 1)", "sample.guidance.image: not an "
                 "auxiliary modality", "sample.guidance_interval", "eval.guidance_intervals: must be a tuple of "
                 "(t_min, t_max)"):
        assert text in str(err.value)
    for preset in ("any_direction", "any_direction_head_on_dropped"):
        config_check.validate(digits_image_label.get_config(preset), device_count=2, process_count=1)
    head_on_dropped = digits_image_label.get_config("any_direction_head_on_dropped")
    assert head_on_dropped.modalities.label["head_loss_when_dropped"] and head_on_dropped.sample.clip_z0
    assert tuple(head_on_dropped.sample.guidance_interval) == (200, 1000)
    plain = tiny.get_config()
    plain.sample.guidance = {"label": 2.0}
    with pytest.raises(ConfigError, match="sample.guidance: needs a model trained with modality dropout"):
        config_check.validate(plain, device_count=2, process_count=1)


@pytest.fixture(scope="module")
def dropout_run(tmp_path_factory):
    config = tiny.get_config("dropout")
    workdir = str(tmp_path_factory.mktemp("dropout"))
    train.train(config, workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return config, workdir, [json.loads(line) for line in f]


def test_one_model_samples_joint_marginal_conditional_and_guided(dropout_run):
    config, workdir, metrics = dropout_run
    assert len(metrics) == 40 and all(np.isfinite(m["loss/total"]) for m in metrics)
    gen = sample.load_generator(config, workdir)
    presence = nnx.merge(gen.graphdef, gen.params).presence
    assert presence is not None and float(jnp.abs(presence.kernel[...]).sum()) > 0  # it learned something
    labels = np.arange(6, dtype=np.int32) % 10
    joint = gen.generate(jax.random.key(0), 6)
    marginal = gen.generate(jax.random.key(0), 6, absent=["label"])
    assert marginal["image"].shape == joint["image"].shape == (6, 8, 8, 1)
    assert not np.allclose(marginal["image"], joint["image"])  # the label's shift is left out
    cond = gen.generate(jax.random.key(1), 6, given={"label": labels})
    same = gen.generate(jax.random.key(1), 6, given={"label": labels}, guidance={"label": 0.0})
    np.testing.assert_array_equal(cond["image"], same["image"])  # weight 0 is the plain conditional
    guided = gen.generate(jax.random.key(1), 6, given={"label": labels}, guidance={"label": 3.0})
    np.testing.assert_array_equal(guided["label"], labels)
    assert not np.allclose(guided["image"], cond["image"])
    with pytest.raises(ValueError, match=r"given or absent modalities \['colour'\]"):
        gen.generate(jax.random.key(1), 6, absent=["colour"])
    with pytest.raises(UserError, match="sample.guidance: \\['image'\\] are not auxiliary"):
        gen.generate(jax.random.key(1), 6, guidance={"image": 1.0})


def test_drawn_joint_labels_come_from_the_head_at_t_max_and_then_condition_the_rest(dropout_run):
    config, workdir, _ = dropout_run
    config = config.copy_and_resolve_references()
    config.sample.joint_labels = "drawn"
    gen = sample.load_generator(config, workdir)
    key = jax.random.key(4)
    joint = gen.generate(key, 6)
    drawn = gen._draw_labels(jax.random.fold_in(key, 2**31 - 2), 6, ["label"], None, None)["label"]
    np.testing.assert_array_equal(joint["label"], drawn)
    np.testing.assert_array_equal(joint["image"], gen.generate(key, 6, given={"label": drawn})["image"])
    # the draws follow the head's distribution: a head made to output fixed logits (its last layer's kernel zeroed,
    # its bias log p) is drawn from with frequencies p, within four binomial standard deviations over 4,000 draws
    model = nnx.merge(gen.graphdef, gen.params)
    probs = np.array([0.3, 0.2, 0.15, 0.1, 0.08, 0.06, 0.05, 0.03, 0.02, 0.01])
    model.heads["label"].lin2.kernel[...] = jnp.zeros_like(model.heads["label"].lin2.kernel[...])
    model.heads["label"].lin2.bias[...] = jnp.log(jnp.asarray(probs, jnp.float32))
    fixed = sample.Generator(config=config, diff=gen.diff, graphdef=gen.graphdef, params=nnx.split(model)[1],
                             step=gen.step)
    freq = np.bincount(fixed._draw_labels(jax.random.key(5), 4000, ["label"], None, None)["label"], minlength=10)
    np.testing.assert_array_less(np.abs(freq / 4000 - probs), 4 * np.sqrt(probs * (1 - probs) / 4000))
    # anything given (here the image: image -> label) leaves the label to the process, as 'expected' does
    images = np.asarray(joint["image"])
    config.sample.joint_labels = "expected"
    expected = sample.load_generator(config, workdir)
    np.testing.assert_array_equal(gen.generate(key, 6, given={"image": images})["label"],
                                  expected.generate(key, 6, given={"image": images})["label"])


def test_unknown_labels_absent_leaves_them_out_of_conditional_sampling_only(dropout_run):
    """sample.unknown_labels='absent': with the image given, the label is left out of the process and read by its
    head at the last step, exactly as an explicit absent=['label']; a given label and joint samples are unchanged."""
    config, workdir, _ = dropout_run
    config = config.copy_and_resolve_references()
    read_gen = sample.load_generator(config, workdir)
    config.sample.unknown_labels = "absent"
    absent_gen = sample.Generator(config=config, diff=read_gen.diff, graphdef=read_gen.graphdef,
                                  params=read_gen.params, step=read_gen.step)
    key = jax.random.key(6)
    images = sources.for_eval(config, "test", workdir).first(100).arrays["image"]
    left_out = absent_gen.generate(key, 100, given={"image": images})
    explicit = read_gen.generate(key, 100, given={"image": images}, absent=["label"])
    np.testing.assert_array_equal(left_out["label"], explicit["label"])
    np.testing.assert_array_equal(left_out["image"], images)
    assert not np.array_equal(left_out["label"], read_gen.generate(key, 100, given={"image": images})["label"])
    for given in ({}, {"label": np.arange(6, dtype=np.int32)}):
        a, r = absent_gen.generate(key, 6, given=given), read_gen.generate(key, 6, given=given)
        np.testing.assert_array_equal(a["image"], r["image"])
        np.testing.assert_array_equal(a["label"], r["label"])
    with pytest.raises(ConfigError, match="sample.unknown_labels"):
        bad = config.copy_and_resolve_references()
        bad.sample.unknown_labels = "drop"
        config_check.validate(bad, device_count=2, process_count=1)


def test_eval_reports_guided_accuracy_bits_per_dim_by_modality_and_the_head_probe(dropout_run, monkeypatch):
    config, workdir, _ = dropout_run
    references = []  # every Fréchet distance's first argument: the held-out features it is measured against
    frechet_distance = feature_metrics.frechet_distance
    monkeypatch.setattr(feature_metrics, "frechet_distance", lambda real, fake: references.append(len(real)) or
                        frechet_distance(real, fake))
    config = config.copy_and_resolve_references()
    config.eval.image_to_label_draws = 2
    config.eval.conditional_examples = 100  # image -> label on the first 100 held-out digits (of 359)
    config.eval.head_probe_steps = (1, config.diffusion.num_steps)
    big_t = config.diffusion.num_steps
    config.eval.guidance_intervals = ((0, big_t), (big_t + 1, big_t + 1))  # every step; none
    config.modalities.label["head_loss_when_dropped"] = True  # says the head reads the image alone: measure that too
    results = evaluate.evaluate(config, workdir)
    assert results["conditional_examples"] == 100
    per_draw = results["label/image_to_label_accuracy_per_draw"]  # two independent reverse processes per image
    assert len(per_draw) == 2 and all(0.0 <= a <= 1.0 for a in per_draw)
    np.testing.assert_allclose(results["label/image_to_label_accuracy"], np.mean(per_draw))
    np.testing.assert_allclose(results["label/image_to_label_accuracy_std"], np.std(per_draw, ddof=1))
    alone = results["label/image_to_label_accuracy_head_alone"]  # the label left out, its head read at the end
    gen = sample.load_generator(config, workdir)
    held_out = sources.for_eval(config, "test", workdir).first(100)
    images, labels = held_out.arrays["image"], held_out.arrays["label"]
    first_draw = jax.random.fold_in(jax.random.key(config.sample.seed), 1)  # the key of image -> label's first draw
    read = gen.generate(first_draw, 100, given={"image": images}, absent=["label"])["label"]
    assert alone == float(np.mean(read == labels))
    with_label = gen.generate(first_draw, 100, given={"image": images})["label"]  # the label in the process
    assert not np.array_equal(read, with_label)
    second = gen.generate(jax.random.fold_in(first_draw, 1), 100, given={"image": images})["label"]
    np.testing.assert_allclose(per_draw, [np.mean(with_label == labels), np.mean(second == labels)])
    voted = evaluate.majority_vote(np.stack([with_label, second]), 10)  # two draws: a tie goes to the smaller class
    np.testing.assert_array_equal(voted, np.where(with_label == second, with_label, np.minimum(with_label, second)))
    assert results["label/image_to_label_accuracy_vote"] == float(np.mean(voted == labels))
    np.testing.assert_array_equal(evaluate.majority_vote(np.array([[1, 2, 3], [1, 3, 3], [2, 2, 0]]), 4), [1, 2, 3])
    for w in ("0", "2"):
        assert 0.0 <= results[f"label/label_to_image_accuracy_guidance_{w}"] <= 1.0
    assert results["label/label_to_image_accuracy_guidance_0"] == results["label/label_to_image_accuracy"]
    guided = "label/label_to_image_accuracy_guidance_"  # the same noise: an interval of every step is the default
    assert results[f"{guided}2_t0-{big_t}"] == results[f"{guided}2"]  # (0, 1000), and one of no step is no guidance
    assert results[f"{guided}2_t{big_t + 1}-{big_t + 1}"] == results[f"{guided}0"]
    assert f"{guided}0_t0-{big_t}" not in results  # weight 0 is not repeated per interval
    assert results["image/frechet_distance_without_label"] > 0
    # all of them against every held-out digit, not the first conditional_examples (the image -> label subset)
    assert len(references) == 3 and set(references) == {len(sources.for_eval(config, "test", workdir))}
    for t in config.eval.head_probe_steps:  # the label head probed on all held-out digits, with and without it
        assert 0.0 <= results[f"label/head_accuracy_t{t}"] <= 1.0
        assert 0.0 <= results[f"label/head_accuracy_t{t}_without_label"] <= 1.0
    assert results["elbo/num_examples"] == 16
    bpd_image, bpd_label, total = results["bpd/image"], results["bpd/label"], results["bpd/total"]
    assert bpd_image > 0 and bpd_label > 0 and np.isfinite(total)
    # the total is the dimension-weighted mean of the parts (64 image dims, 1 label dim)
    np.testing.assert_allclose(total, (64 * bpd_image + bpd_label) / 65, rtol=1e-5)
    assert bpd_label < 1.2 * np.log2(10)  # a label costs at most about log2(10) bits after 40 steps
