"""The closed-form label-code reader (diffusion/code_reader.py) and `diffusion.denoiser_output = 'read_codes'`:
float64 Gaussian reference, Monte-Carlo calibration, how `objective.predict` uses it, and one training step."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from flax import nnx

from mmdiff_jax import config_check, evaluate, modalities, objective, sample, train
from mmdiff_jax.configs import tiny
from mmdiff_jax.diffusion import code_reader, losses, process, samplers
from mmdiff_jax.errors import UserError

SHAPE = (8, 8, 2)


def _reference_log_posterior(codes, z, c, var):
    """float64: log p(k | z) for z = (per-channel constants) + c e_k + N(0, var I), flat prior on the constants and a
    uniform one on k: the Gaussian log-likelihood of z projected off the per-channel constants, normalised over k."""
    codes, z = np.asarray(codes, np.float64), np.asarray(z, np.float64)
    def off_constants(x):  # the projection P: subtract each channel's spatial mean
        return x - x.mean(axis=(-3, -2), keepdims=True)
    resid = off_constants(z[:, None] - c[:, None, None, None, None] * codes[None])  # [B, K, *S]
    loglik = -0.5 * np.sum(resid.reshape(resid.shape[:2] + (-1,)) ** 2, axis=-1) / var[:, None]
    return loglik - np.logaddexp.reduce(loglik, axis=1, keepdims=True)


class ClassLogitsTest(parameterized.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_matches_the_float64_gaussian_posterior(self):
        codes = modalities.unit_rms_codes(5, SHAPE, seed=1)
        keys = jax.random.split(jax.random.key(0), 3)
        labels = np.array([0, 1, 2, 3, 4, 2])
        c = np.array([0.02, 0.05, 0.1, 0.2, 0.5, 0.0], np.float32)
        var = np.array([1.0, 0.9, 1.3, 0.7, 1.0, 1.0], np.float32)
        brightness = 3.0 * jax.random.normal(keys[0], (6, 1, 1, SHAPE[-1]))  # per-channel constants, any size
        z = brightness + c[:, None, None, None] * codes[labels] + np.sqrt(var)[:, None, None, None] * jax.random.normal(
            keys[1], (6,) + SHAPE)
        logits = self.variant(code_reader.class_logits)(jnp.asarray(codes), z, jnp.asarray(c), jnp.asarray(var))
        chex.assert_shape(logits, (6, 5))
        chex.assert_type(logits, jnp.float32)
        got = np.asarray(jax.nn.log_softmax(logits, axis=-1), np.float64)
        np.testing.assert_allclose(got, _reference_log_posterior(codes, z, c, var), atol=2e-4)
        np.testing.assert_allclose(got[-1], -np.log(5.0), atol=1e-6)  # c = 0: nothing to read


def test_reader_is_calibrated_when_its_assumptions_hold():
    """Monte Carlo: with z drawn exactly from the reader's model (random brightness per channel, a uniform class,
    Gaussian noise of variance v), the posterior is exact, so E[p(true class)] = E[sum_k p_k^2] and the accuracy of
    its argmax is E[max_k p_k]."""
    n, k = 40000, 6
    codes = modalities.unit_rms_codes(k, SHAPE, seed=2)
    keys = jax.random.split(jax.random.key(3), 3)
    labels = jax.random.randint(keys[0], (n,), 0, k)
    var = 1.0
    c = 0.12  # an uncertain regime: mean max p about 0.6
    brightness = 2.0 * jax.random.normal(keys[1], (n, 1, 1, SHAPE[-1]))
    z = brightness + c * jnp.asarray(codes)[labels] + jnp.sqrt(var) * jax.random.normal(keys[2], (n,) + SHAPE)
    p = jax.nn.softmax(code_reader.class_logits(jnp.asarray(codes), z, jnp.full((n,), c), jnp.full((n,), var)))
    p = np.asarray(p, np.float64)
    p_true = p[np.arange(n), np.asarray(labels)]
    assert 0.4 < np.mean(p.max(axis=1)) < 0.85  # the test is in the regime where calibration can fail
    se = 4 * np.std(p_true) / np.sqrt(n)
    np.testing.assert_allclose(np.mean(p_true), np.mean(np.sum(p**2, axis=1)), atol=se)
    accuracy = np.mean(p.argmax(axis=1) == np.asarray(labels))
    np.testing.assert_allclose(accuracy, np.mean(p.max(axis=1)), atol=4 * 0.5 / np.sqrt(n))


def _diffusion(output="read_codes", dropout=0.0, read_known=False):
    config = tiny.get_config()
    config.diffusion.denoiser_output = output
    config.diffusion.read_known_classes = read_known
    config.modalities.label.dropout = dropout
    return config, objective.build_diffusion(config)


class _RecordingModel:
    """Fixed backbone output r and head logits; records what it was given."""

    takes_dropout_key = False

    def __init__(self, r, logits):
        self.r, self.logits, self.seen = r, logits, {}

    def __call__(self, zt, t, present=None, read_probs=None):
        self.seen.update(zt=zt, read_probs=read_probs)
        return self.r, {"label": self.logits}


def _draw(diff, t, seed=0, batch=6):
    keys = jax.random.split(jax.random.key(seed), 3)
    labels = jnp.arange(batch) % 10
    z0 = jax.random.uniform(keys[0], (batch, 8, 8, 1), minval=-1, maxval=1)
    eps = jax.random.normal(keys[1], z0.shape)
    enc = diff.modalities.encode({"image": z0, "label": labels})
    return labels, z0, eps, process.q_sample(diff.sched, t, z0, enc, eps)


def test_predict_reads_the_codes_removes_them_and_explains_them_by_the_heads():
    _, diff = _diffusion()
    assert diff.read_classes == 10
    t = jnp.array([1, 10, 37, 50, 80, 100], jnp.int32)
    labels, z0, eps, zt = _draw(diff, t)
    r = jax.random.normal(jax.random.key(5), zt.shape)
    logits = 3.0 * jax.random.normal(jax.random.key(6), (6, 10))
    model = _RecordingModel(r, logits)
    eps_hat, enc_hat, *_ = objective.predict(model, diff, zt, t)
    probs, enc_read = code_reader.read(diff.modalities, diff.sched, zt, t)
    chex.assert_shape(probs, (6, 10))
    np.testing.assert_allclose(np.asarray(model.seen["read_probs"]), np.asarray(probs))
    c = np.asarray(diff.sched.c)[np.asarray(t), 0].reshape(-1, 1, 1, 1)
    s = np.asarray(diff.sched.s)[np.asarray(t)].reshape(-1, 1, 1, 1)
    abar = np.asarray(diff.sched.abar)[np.asarray(t)].reshape(-1, 1, 1, 1)
    z_tilde = np.asarray(zt) - c * np.asarray(enc_read[:, 0])
    np.testing.assert_allclose(np.asarray(model.seen["zt"]), z_tilde, atol=1e-6)  # the backbone's input
    np.testing.assert_allclose(np.asarray(eps_hat),
                               np.asarray(r) + c * (np.asarray(enc_read[:, 0]) - np.asarray(enc_hat[:, 0])) / s,
                               atol=1e-5)
    # ẑ_0 is the backbone's denoising of the latent without the read codes: (z~_t - s_t r) / abar_t
    z0_hat = process.predict_z0(diff.sched, t, zt, eps_hat, enc_hat)
    np.testing.assert_allclose(np.asarray(z0_hat), (z_tilde - s * np.asarray(r)) / abar, rtol=1e-4, atol=1e-4)
    # where the code is large (t = 37, 50: c_t near its peak of 1) the reader is certain of the true class
    np.testing.assert_array_equal(np.asarray(probs.argmax(axis=1))[2:4], np.asarray(labels)[2:4])
    assert float(jnp.min(probs[2:4].max(axis=1))) > 0.99


def test_the_true_image_noise_and_a_certain_head_give_the_forward_noise():
    """r = (z~_t - abar z_0) / s_t and a head certain of the true label give ε̂ = ε exactly, whatever was read."""
    _, diff = _diffusion()
    t = jnp.array([2, 20, 40, 60, 80, 99], jnp.int32)
    labels, z0, eps, zt = _draw(diff, t, seed=1)
    _, enc_read = code_reader.read(diff.modalities, diff.sched, zt, t)
    z_tilde = zt - process.mix_modalities(diff.sched.c, t, enc_read)
    r = (z_tilde - process.per_example(diff.sched.abar, t, z0) * z0) / process.per_example(diff.sched.s, t, z0)
    eps_hat, *_ = objective.predict(_RecordingModel(r, 1e4 * jax.nn.one_hot(labels, 10)), diff, zt, t)
    np.testing.assert_allclose(np.asarray(eps_hat), np.asarray(eps), atol=2e-4)


def test_an_absent_modality_is_not_read():
    _, diff = _diffusion(dropout=0.2)
    t = jnp.array([40, 50, 60, 70, 80, 90], jnp.int32)
    _, _, _, zt = _draw(diff, t)
    absent = jnp.zeros((6, 1), jnp.float32)
    model = _RecordingModel(jnp.zeros_like(zt), jnp.zeros((6, 10)))
    objective.predict(model, diff, zt, t, absent)
    np.testing.assert_array_equal(np.asarray(model.seen["read_probs"]), 0.0)
    np.testing.assert_array_equal(np.asarray(model.seen["zt"]), np.asarray(zt))


def test_one_training_step_trains_the_read_embedding():
    config, diff = _diffusion()
    graphdef, params = train.create_model(config, diff)
    assert params["read_embedding"]["kernel"].shape == (10, config.model.temb_dim)
    batch = {"image": jax.random.uniform(jax.random.key(0), (8, 8, 8, 1), minval=-1, maxval=1),
             "label": jnp.arange(8) % 10}

    @jax.jit
    def loss_and_grads(p):
        return jax.value_and_grad(lambda q: objective.compute_loss(nnx.merge(graphdef, q), diff, batch,
                                                                   jax.random.key(1))[0])(p)

    loss, grads = loss_and_grads(params)
    assert np.isfinite(float(loss))
    assert float(jnp.max(jnp.abs(grads["read_embedding"]["kernel"]))) > 0.0
    with pytest.raises(ValueError, match="read_probs"):  # the model refuses to run without what it was built for
        nnx.merge(graphdef, params)(batch["image"], jnp.ones((8,), jnp.int32))


def test_the_head_probe_reads_a_read_codes_model_through_its_reader():
    """eval.head_probe_steps on a read_codes model: the probe calls the reverse model as the samplers do (the reader
    first), so it runs, and its accuracies are fractions; a bare model call would be refused (no read_probs)."""
    config, diff = _diffusion()
    graphdef, params = train.create_model(config, diff)
    gen = sample.Generator(config, diff, graphdef, params, step=0)
    arrays = {"image": np.asarray(jax.random.uniform(jax.random.key(0), (6, 8, 8, 1), minval=-1, maxval=1)),
              "label": np.arange(6, dtype=np.int32) % 10}
    metrics = evaluate._head_probe_metrics(config, gen, jax.random.key(1), arrays, (1, 50))
    assert sorted(metrics) == ["label/head_accuracy_t1", "label/head_accuracy_t1_without_label",
                               "label/head_accuracy_t50", "label/head_accuracy_t50_without_label"]
    assert all(0.0 <= v <= 1.0 and abs(v * 24 - round(v * 24)) < 1e-6 for v in metrics.values())  # 4 draws of 6


def test_read_codes_without_a_label_modality_is_refused_in_one_line():
    config = tiny.get_config()
    del config.modalities["label"]
    config.diffusion.denoiser_output = "read_codes"
    with pytest.raises(UserError, match="diffusion.denoiser_output: 'read_codes'"):
        config_check.validate(config)


def test_read_codes_l0_is_the_image_noise_loss_of_the_backbone():
    """With 'read_codes', L0 = ‖r - (z~_t - abar_t z_0) / s_t‖² per dimension: the heads' code errors do not enter it."""
    config, diff = _diffusion()
    batch = {"image": jax.random.uniform(jax.random.key(0), (6, 8, 8, 1), minval=-1, maxval=1),
             "label": jnp.arange(6) % 10}
    key = jax.random.key(4)
    r = jax.random.normal(jax.random.key(5), (6, 8, 8, 1))
    logits = 3.0 * jax.random.normal(jax.random.key(6), (6, 10))
    _, metrics = objective.compute_loss(_RecordingModel(r, logits), diff, batch, key)
    # the draws compute_loss makes from `key` (t, ε), repeated here
    t_key, eps_key = jax.random.split(key)
    t = process.sample_timesteps(t_key, 6, diff.num_steps)
    eps = jax.random.normal(eps_key, batch["image"].shape, jnp.float32)
    enc = diff.modalities.encode(batch)
    zt = process.q_sample(diff.sched, t, batch["image"], enc, eps)
    _, enc_read = code_reader.read(diff.modalities, diff.sched, zt, t)
    z_tilde = zt - process.mix_modalities(diff.sched.c, t, enc_read)
    target = (z_tilde - process.per_example(diff.sched.abar, t, zt) * batch["image"]) / process.per_example(
        diff.sched.s, t, zt)
    expected = np.mean(np.mean((np.asarray(r) - np.asarray(target)) ** 2, axis=(1, 2, 3)))
    np.testing.assert_allclose(float(metrics["loss/l0"]), expected, rtol=1e-4)


def test_known_classes_are_given_to_the_reader_not_read():
    """diffusion.read_known_classes: a known label's class reaches the backbone one-hot and its exact code is removed,
    so the backbone reads abar_t z_0 + s_t ε at every t, also where the reader would be unsure (t = 1, 99); without
    the flag known classes are ignored (read); an absent label is still zero."""
    t = jnp.array([1, 10, 37, 50, 80, 99], jnp.int32)
    _, diff = _diffusion(read_known=True)
    labels, z0, eps, zt = _draw(diff, t, seed=2)
    model = _RecordingModel(jnp.zeros_like(zt), jnp.zeros((6, 10)))
    objective.predict(model, diff, zt, t, known_classes={"label": labels})
    np.testing.assert_array_equal(np.asarray(model.seen["read_probs"]), np.asarray(jax.nn.one_hot(labels, 10)))
    image_part = process.per_example(diff.sched.abar, t, z0) * z0 + process.per_example(diff.sched.s, t, z0) * eps
    np.testing.assert_allclose(np.asarray(model.seen["zt"]), np.asarray(image_part), atol=1e-5)
    read_probs, _ = code_reader.read(diff.modalities, diff.sched, zt, t)
    assert float(jnp.max(jnp.abs(read_probs[0] - jax.nn.one_hot(labels[0], 10)))) > 0.5  # t = 1: the reader is unsure
    _, plain = _diffusion()
    objective.predict(model, plain, zt, t, known_classes={"label": labels})
    np.testing.assert_allclose(np.asarray(model.seen["read_probs"]), np.asarray(read_probs), atol=1e-6)
    _, dropping = _diffusion(dropout=0.2, read_known=True)
    objective.predict(model, dropping, zt, t, jnp.zeros((6, 1), jnp.float32), known_classes={"label": labels})
    np.testing.assert_array_equal(np.asarray(model.seen["read_probs"]), 0.0)


def test_training_with_known_classes_matches_the_image_noise_exactly():
    """With read_known_classes the training loss gives the reader the batch's labels: L0 = ‖r - ε‖² per dimension."""
    _, diff = _diffusion(read_known=True)
    batch = {"image": jax.random.uniform(jax.random.key(0), (6, 8, 8, 1), minval=-1, maxval=1),
             "label": jnp.arange(6) % 10}
    key = jax.random.key(7)
    r = jax.random.normal(jax.random.key(5), (6, 8, 8, 1))
    _, metrics = objective.compute_loss(_RecordingModel(r, jnp.zeros((6, 10))), diff, batch, key)
    eps = jax.random.normal(jax.random.split(key)[1], batch["image"].shape, jnp.float32)  # compute_loss's ε
    expected = np.mean(np.mean((np.asarray(r) - np.asarray(eps)) ** 2, axis=(1, 2, 3)))
    np.testing.assert_allclose(float(metrics["loss/l0"]), expected, rtol=1e-4)


def test_given_labels_reach_the_reader_in_sampling():
    """Generator.generate with a given label on a read_known_classes model samples with the label's class given to
    the reader: the same images as the samplers' loop run with `known_classes`, different ones without."""
    config, diff = _diffusion(read_known=True)
    graphdef, params = train.create_model(config, diff)
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(3), p.shape, p.dtype), params)
    gen = sample.Generator(config, diff, graphdef, params, step=0, devices=jax.devices()[:1])
    labels = np.arange(8, dtype=np.int32) % 10
    key = jax.random.key(11)
    images = gen.generate(key, 8, given={"label": labels})["image"]
    cfg = config.sample
    known_enc = np.asarray(diff.modalities.aux[0].encode(jnp.asarray(labels)))[:, None]

    def direct(known_classes):
        def predict_fn(zt, t, present=None):
            return objective.predict(nnx.merge(graphdef, params), diff, zt, t, present, known_classes=known_classes)
        z0, _ = samplers.sample(gen.chain, predict_fn, jax.random.fold_in(key, 0), 8, tuple(config.latent_shape),
                                method=cfg.sampler, eta=cfg.eta, known_enc=jnp.asarray(known_enc),
                                known_mask=jnp.asarray([True]), clip_z0=cfg.clip_z0)
        return np.clip(np.asarray(z0), -1.0, 1.0)

    np.testing.assert_allclose(images, direct({"label": jnp.asarray(labels)}), atol=1e-4)
    assert float(np.max(np.abs(images - direct(None)))) > 1e-3


def test_read_known_classes_needs_read_codes():
    config = tiny.get_config()
    config.diffusion.read_known_classes = True
    with pytest.raises(UserError, match="diffusion.read_known_classes: gives known classes"):
        config_check.validate(config)


@pytest.mark.parametrize("std", [None, 0.25])
def test_known_class_vectors_start_at_the_configured_scale(std):
    """model.read_embedding_init_std: with read_known_classes the class vectors start N(0, std^2) (default 1, ADM's
    label embedding); without it they start at zero (read probabilities have no effect at initialisation)."""
    config, diff = _diffusion(read_known=True)
    if std is not None:
        config.model.read_embedding_init_std = std
    kernel = np.asarray(train.create_model(config, diff)[1]["read_embedding"]["kernel"], np.float64)
    n = kernel.size  # 10 x temb_dim draws: the sample std is within 4 standard errors (std / sqrt(2n))
    expected = 1.0 if std is None else std
    np.testing.assert_allclose(kernel.std(), expected, atol=4 * expected / np.sqrt(2 * n))
    assert abs(kernel.mean()) < 4 * expected / np.sqrt(n)
    config, diff = _diffusion()
    kernel = np.asarray(train.create_model(config, diff)[1]["read_embedding"]["kernel"])
    np.testing.assert_array_equal(kernel, 0.0)


def test_the_elbo_of_a_known_classes_model_is_of_the_image_given_its_label():
    """evaluate's ELBO for read_known_classes: the image's terms are those of the model told the label (its codes
    known, not the head's ê: the reverse mean of the backbone's own output r on z_t - c_t e, computed here without
    `predict`), and the label is charged its head's NLL at t = T on a prior draw (the drawn-first marginal)."""
    config, diff = _diffusion(read_known=True)
    config.eval.elbo_examples = 4
    graphdef, params = train.create_model(config, diff)
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(3), p.shape, p.dtype), params)
    gen = type("Gen", (), dict(diff=diff, graphdef=graphdef, params=params))()
    test = {"image": np.asarray(jax.random.uniform(jax.random.key(0), (4, 8, 8, 1), minval=-1, maxval=1)),
            "label": np.arange(4, dtype=np.int32) * 3}
    key = jax.random.key(5)
    got = evaluate._likelihood_metrics(config, gen, key, test)

    model = nnx.merge(graphdef, params)
    mods, sched = diff.modalities, diff.sched
    z0 = jnp.asarray(test["image"])
    enc = mods.encode({k: jnp.asarray(v) for k, v in test.items()})
    one_hot = jax.nn.one_hot(jnp.asarray(test["label"]), 10)

    def told_the_label(zt, t):  # the backbone on z_t without the exact code, told the class one-hot
        r, heads = model(zt - process.mix_modalities(sched.c, t, enc), t, read_probs=one_hot)
        return r, enc, jnp.zeros((4, 1))

    k = jax.random.fold_in(key, 6)
    expected = jax.jit(lambda k: losses.elbo(sched, told_the_label, k, z0, enc, [1], diff.bin_width))(k)
    np.testing.assert_allclose(got["bpd/image"], float(jnp.mean(expected["bpd/primary"])), rtol=1e-4)
    z_prior = jax.random.normal(jax.random.fold_in(k, 1), z0.shape, jnp.float32)
    logits = objective.predict(model, diff, z_prior, jnp.full((4,), diff.num_steps, jnp.int32)).heads["label"]
    label_nats = -jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.asarray(test["label"])[:, None], 1)[:, 0]
    np.testing.assert_allclose(got["bpd/label"], float(jnp.mean(label_nats)) / np.log(2.0), rtol=1e-4)
    np.testing.assert_allclose(got["bpd/total"], (64 * got["bpd/image"] + got["bpd/label"]) / 65, rtol=1e-5)
