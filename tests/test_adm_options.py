"""ADM's options. The learned reverse variance (`model.learn_sigma`) and hybrid loss: the N = 1 case against
guided-diffusion's formulas in float64, the learned-variance KL against Monte Carlo, the hybrid loss's
stop-gradient, the ancestral sampler's variance, and a tiny model that learns its variance. The class-conditional
model (`model.num_classes`): the label embedding enters the time embedding and nothing else."""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized
from flax import nnx

from mmdiff_jax import config_check, objective, train
from mmdiff_jax.configs import tiny
from mmdiff_jax.diffusion import losses, process, samplers, schedules
from tests import references

T = 1000
BETAS = schedules.linear_betas(T)
SCHED = schedules.make_schedule(BETAS, np.zeros((T, 0)))  # N = 1: the image alone, DDPM
f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731


class LearnedLogVarianceTest(parameterized.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_is_guided_diffusions_learned_range(self):
        rng = np.random.default_rng(0)
        t = np.array([1, 2, 3, 10, 500, 999, 1000])
        v = rng.uniform(-1.2, 1.2, size=(len(t), 5))  # ADM does not clip v
        ours = self.variant(process.learned_log_variance)(SCHED, jnp.asarray(t, jnp.int32), f32((v + 1) / 2))
        chex.assert_shape(ours, v.shape)
        chex.assert_type(ours, jnp.float32)
        ref = np.stack([references.adm_learned_range(BETAS, ti, vi) for ti, vi in zip(t, v)])
        np.testing.assert_allclose(np.asarray(ours), ref, rtol=1e-5, atol=2e-4)


def test_vb_terms_match_guided_diffusion_for_one_modality():
    """L1 (t >= 2) and L3's decoder (t = 1) with the learned variance, in bits per dimension, equal guided-diffusion's
    `_vb_terms_bpd` on the same x_0, x_t, ε̂ and v (8-bit data grid)."""
    rng = np.random.default_rng(1)
    t = np.array([1, 2, 5, 100, 999, 1000])
    batch, dims, bin_width = len(t), 16, 2.0 / 255.0
    x0 = rng.integers(0, 256, size=(batch, dims)) * bin_width - 1.0
    eps = rng.normal(size=(batch, dims))
    eps_hat = eps + 0.3 * rng.normal(size=(batch, dims))
    v = rng.uniform(-1.0, 1.0, size=(batch, dims))
    alpha_bar = np.cumprod(1.0 - BETAS)[t - 1]
    xt = np.sqrt(alpha_bar)[:, None] * x0 + np.sqrt(1.0 - alpha_bar)[:, None] * eps
    none = jnp.zeros((batch, 0, dims), jnp.float32)
    terms = losses.loss_terms(SCHED, jnp.asarray(t, jnp.int32), f32(x0), none, f32(eps), f32(eps_hat), none,
                              jnp.zeros((batch, 0)), [], bin_width, var_frac=f32((v + 1) / 2))
    rec = terms.l3 - losses.l3_prior_kl(SCHED, f32(x0), none)
    ours = np.where(t == 1, np.asarray(rec), np.asarray(terms.l1)) / (dims * math.log(2.0))
    ref = [references.adm_vb_terms_bpd(BETAS, ti, x0[i], xt[i], eps_hat[i], v[i], bin_width) for i, ti in enumerate(t)]
    np.testing.assert_allclose(ours, ref, rtol=2e-4, atol=1e-5)


def test_learned_kl_equals_monte_carlo_and_the_fixed_kl_at_the_posterior_variance():
    betas = schedules.linear_betas(T)
    weights = schedules.make_weights(betas, [("profile", 1.0)])
    sched = schedules.make_schedule(betas, weights)
    co = schedules.compute_coefficients(np.sqrt(1 - betas), weights, betas)
    rng = np.random.default_rng(2)
    t, dims = 300, 4
    z0, eps, eps_hat = (rng.normal(size=(1, dims)) for _ in range(3))
    enc, enc_hat = (rng.normal(size=(1, 1, dims)) for _ in range(2))
    frac = rng.uniform(0.0, 1.0, size=(1, dims))
    tt = jnp.full((1,), t, jnp.int32)
    args = (sched, tt, f32(eps), f32(eps_hat), f32(enc), f32(enc_hat))
    log_var = process.learned_log_variance(sched, tt, f32(frac))
    ours = float(losses.l1_posterior_kl(*args, log_var)[0])
    # Monte Carlo in float64: q = N(mu~, sigma~^2), p = N(mu~ - gap, exp(log_var)), gap from the SPEC's formula
    gap = (co.b[t] * (enc - enc_hat)[:, 0] + co.sigma2[t] / np.sqrt(co.s2[t]) * (eps - eps_hat)) / co.a[t]
    q_var, p_var = co.s2[t - 1] * co.sigma2[t] / co.s2[t], np.exp(np.asarray(log_var, np.float64))
    x = rng.normal(size=(400_000, dims)) * np.sqrt(q_var)  # x - mu~
    log_q = -0.5 * (np.log(2 * np.pi * q_var) + x**2 / q_var)
    log_p = -0.5 * (np.log(2 * np.pi * p_var) + (x + gap) ** 2 / p_var)
    samples = (log_q - log_p).sum(axis=1)
    assert abs(ours - samples.mean()) < 4 * samples.std() / math.sqrt(len(samples)) + 1e-4
    np.testing.assert_allclose(ours, references.gaussian_kl(np.zeros((1, dims)), q_var, -gap, p_var)[0], rtol=1e-4)
    # frac = 0 is the posterior variance itself: the fixed-variance KL
    at_post = losses.l1_posterior_kl(*args, process.learned_log_variance(sched, tt, jnp.zeros((1, dims))))
    np.testing.assert_allclose(np.asarray(at_post), np.asarray(losses.l1_posterior_kl(*args)), rtol=1e-4)


@pytest.mark.parametrize("trains_mean", [False, True])
def test_hybrid_loss_trains_the_variance_only_through_the_likelihood_terms(trains_mean):
    rng = np.random.default_rng(3)
    batch, dims = 4, 6
    t = jnp.asarray([1, 2, 40, 900], jnp.int32)
    z0, eps, eps_hat = (f32(rng.normal(size=(batch, dims))) for _ in range(3))
    none = jnp.zeros((batch, 0, dims), jnp.float32)

    def vlb(eps_hat, frac):
        terms = losses.loss_terms(SCHED, t, z0, none, eps, eps_hat, none, jnp.zeros((batch, 0)), [], 2 / 255,
                                  var_frac=frac, vlb_trains_mean=trains_mean)
        return jnp.sum(terms.l1 + terms.l3)

    d_eps, d_frac = jax.grad(vlb, argnums=(0, 1))(eps_hat, jnp.full((batch, dims), 0.5))
    assert float(jnp.max(jnp.abs(d_frac))) > 0
    assert (float(jnp.max(jnp.abs(d_eps))) > 0) == trains_mean


def test_ancestral_step_draws_with_the_chains_learned_variance_and_no_noise_at_the_end():
    chain = samplers.respace(BETAS, np.zeros((T, 0)), 10)
    batch, shape = 3, (2, 2, 1)
    frac = jnp.full((batch,) + shape, 0.8)
    eps_hat = jax.random.normal(jax.random.key(4), (batch,) + shape)
    none = jnp.zeros((batch, 0) + shape)
    predict = lambda z, t: (eps_hat, none, {}, frac)  # noqa: E731
    key = jax.random.key(5)
    step = samplers.make_reverse_step(chain, predict, key, batch, shape)
    z = jax.random.normal(jax.random.key(6), (batch,) + shape)
    for k in (7, 1):
        tk = jnp.full((batch,), k, jnp.int32)
        mean = process.p_mean(chain.sched, tk, z, eps_hat, none)
        std = jnp.sqrt(jnp.exp(process.learned_log_variance(chain.sched, tk, frac))) if k > 1 else 0.0
        expected = mean + std * jax.random.normal(jax.random.fold_in(key, k), z.shape)
        np.testing.assert_allclose(np.asarray(step(z, jnp.int32(k))[0]), np.asarray(expected), rtol=1e-5, atol=1e-6)


def test_model_outputs_a_variance_that_starts_halfway_and_is_trained():
    """The small U-Net (the ADM backbone trains with it in tests/test_imagenet64_recipe.py)."""
    config = tiny.get_config()
    config.model.learn_sigma = True
    config.diffusion.loss_weights = {"l0": 1.0, "l1": 1e-3, "l2": 1.0, "l3": 1e-3}
    diff = objective.build_diffusion(config)
    assert diff.learn_sigma and not diff.vlb_trains_mean
    graphdef, params = train.create_model(config, diff)
    rng = np.random.default_rng(7)
    batch = {"image": f32(rng.uniform(-1, 1, size=(8, 8, 8, 1))), "label": jnp.asarray(rng.integers(0, 10, 8))}
    zt, t = f32(rng.normal(size=(8, 8, 8, 1))), jnp.arange(1, 9, dtype=jnp.int32) * 10
    predict = jax.jit(lambda p: objective.predict(nnx.merge(graphdef, p), diff, zt, t))  # one compile, not per op
    pred = predict(params)
    chex.assert_shape([pred.eps, pred.var_frac], (8, 8, 8, 1))
    np.testing.assert_allclose(np.asarray(pred.var_frac), 0.5)  # the zero-initialised output layer: v = 0

    tx = optax.adam(3e-3)
    opt_state = tx.init(params)
    fixed_key = jax.random.key(8)

    @jax.jit
    def step(params, opt_state, key):
        (loss, metrics), grads = jax.value_and_grad(
            lambda p: objective.compute_loss(nnx.merge(graphdef, p), diff, batch, key), has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, metrics

    before = step(params, opt_state, fixed_key)[2]
    for i in range(40):
        params, opt_state, _ = step(params, opt_state, jax.random.fold_in(jax.random.key(9), i))
    after = step(params, opt_state, fixed_key)[2]
    assert float(after["loss/l1"]) < float(before["loss/l1"])
    moved = predict(params).var_frac
    assert float(jnp.max(jnp.abs(moved - 0.5))) > 1e-2


def test_class_conditional_model_reads_labels_through_the_time_embedding_only():
    config = tiny.get_config()
    del config.modalities["label"]
    config.model.num_classes = 10
    config_check.validate(config)
    diff = objective.build_diffusion(config)
    assert diff.num_classes == 10 and diff.modalities.names == ["image"]
    graphdef, params = train.create_model(config, diff)
    params = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(0), x.shape), params)  # no zeros
    model = nnx.merge(graphdef, params)
    zt, t = jax.random.normal(jax.random.key(1), (4, 8, 8, 1)), jnp.full((4,), 50, jnp.int32)
    predict = jax.jit(lambda labels: objective.predict(model, diff, zt, t, labels=labels))
    a, b = predict(jnp.array([0, 1, 2, 3])), predict(jnp.array([0, 1, 2, 9]))
    np.testing.assert_array_equal(np.asarray(a.eps[:3]), np.asarray(b.eps[:3]))  # per example
    assert not np.allclose(np.asarray(a.eps[3]), np.asarray(b.eps[3]))
    chex.assert_shape(a.enc, (4, 0, 8, 8, 1))  # no modality but the image: nothing shifts the process
    with pytest.raises(ValueError, match="needs `labels`"):
        jax.eval_shape(lambda: objective.predict(model, diff, zt, t))
    joint = tiny.get_config()
    joint.model.num_classes = 10
    with pytest.raises(config_check.ConfigError, match="model.num_classes: .* also a modality"):
        config_check.validate(joint)
