"""The ELBO terms: L1 in closed form vs float64 and Monte Carlo, L2 vanishing with one modality, the whole loss
reducing to DDPM's, the exact-sum ELBO against its float64 expectation for Gaussian data, likelihood helpers,
training_loss weighting, and jit/no-jit agreement."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from mmdiff_jax.diffusion import likelihoods, losses, process, schedules
from tests import references

T = 1000
f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731


def _schedule(scales, num_steps=T):
    factor = T / num_steps
    betas = schedules.linear_betas(num_steps, 1e-4 * factor, 0.02 * factor)
    weights = schedules.make_weights(betas, [("profile", s) for s in scales])
    return betas, weights, schedules.make_schedule(betas, weights)


def test_l1_matches_float64_gaussian_kl_for_every_t():
    betas, weights, sched = _schedule([1.0, 0.5])
    co = schedules.compute_coefficients(np.sqrt(1 - betas), weights, betas)
    rng = np.random.default_rng(0)
    t = np.arange(1, T + 1)
    z0, eps, eps_hat = (rng.normal(size=(T, 3)) for _ in range(3))
    enc, enc_hat = (rng.normal(size=(T, 2, 3)) for _ in range(2))
    zt = co.abar[t, None] * z0 + np.einsum("bn,bns->bs", co.c[t], enc) + np.sqrt(co.s2[t])[:, None] * eps
    mix = lambda coef, e: np.einsum("bn,bns->bs", coef, e)  # noqa: E731
    # q's mean (SPEC formula with the true z_0, e) and p's mean (the same formula at ẑ_0, ê), float64
    z0_hat = (zt - mix(co.c[t], enc_hat) - np.sqrt(co.s2[t])[:, None] * eps_hat) / co.abar[t, None]

    def mu(z0_, e_):
        return (co.sigma2[t, None] * (co.abar[t - 1, None] * z0_ + mix(co.c[t - 1], e_))
                + co.a[t, None] * co.s2[t - 1, None] * (zt - mix(co.b[t], e_))) / co.s2[t, None]

    var = np.broadcast_to(co.post_var[t, None], zt.shape)
    ref = references.gaussian_kl(mu(z0, enc)[1:], var[1:], mu(z0_hat, enc_hat)[1:], var[1:])
    got = losses.l1_posterior_kl(sched, jnp.asarray(t, jnp.int32), f32(eps), f32(eps_hat), f32(enc), f32(enc_hat))
    assert float(got[0]) == 0.0  # t = 1 belongs to L3
    np.testing.assert_allclose(got[1:], ref, rtol=1e-5)


def test_l1_closed_form_equals_monte_carlo():
    _, _, sched = _schedule([1.0, -0.7], num_steps=100)
    key = jax.random.key(3)
    ks = jax.random.split(key, 6)
    z0 = jax.random.normal(ks[0], (1, 4))
    enc = jax.random.normal(ks[1], (1, 2, 4))
    enc_hat = enc + 0.3 * jax.random.normal(ks[2], (1, 2, 4))
    eps = jax.random.normal(ks[3], (1, 4))
    eps_hat = eps + 0.5 * jax.random.normal(ks[4], (1, 4))
    t = jnp.asarray([37], jnp.int32)
    closed = float(losses.l1_posterior_kl(sched, t, eps, eps_hat, enc, enc_hat)[0])
    zt = process.q_sample(sched, t, z0, enc, eps)
    mu_q, var = process.q_posterior(sched, t, zt, z0, enc)
    mu_p = process.p_mean(sched, t, zt, eps_hat, enc_hat)
    n = 400_000
    z = mu_q + jnp.sqrt(var) * jax.random.normal(ks[5], (n, 4))
    log_ratio = jnp.sum(((z - mu_p) ** 2 - (z - mu_q) ** 2) / (2 * var), axis=1)  # log q - log p
    mc, se = float(jnp.mean(log_ratio)), float(jnp.std(log_ratio)) / math.sqrt(n)
    assert closed > 0.05  # a non-trivial KL (0.148 nats here)
    assert abs(mc - closed) < 5 * se, (mc, closed, se)


def test_l2_vanishes_with_a_single_modality_and_weights_modalities():
    assert losses.l2_modality_recovery(jnp.zeros((5, 0)), []).shape == (5,)
    np.testing.assert_array_equal(losses.l2_modality_recovery(jnp.ones((5, 0)), []), 0.0)
    nll = f32([[1.0, 2.0], [3.0, 4.0]])
    np.testing.assert_allclose(losses.l2_modality_recovery(nll, [0.5, 2.0]), [4.5, 9.5])
    with pytest.raises(ValueError, match="loss_weights"):
        losses.l2_modality_recovery(nll, [1.0])


def _ddpm_terms64(betas, t, x0, eps, eps_hat):
    """Plain DDPM's loss terms in float64 (Ho et al. 2020), written independently of the package."""
    ref = references.ddpm_reference(betas)
    ab = ref["alpha_bar"]
    xt = np.sqrt(ab[t])[:, None] * x0 + np.sqrt(1 - ab[t])[:, None] * eps
    x0_hat = (xt - np.sqrt(1 - ab[t])[:, None] * eps_hat) / np.sqrt(ab[t])[:, None]
    true_mean = ref["coef_x0"][t, None] * x0 + ref["coef_xt"][t, None] * xt
    model_mean = ref["coef_x0"][t, None] * x0_hat + ref["coef_xt"][t, None] * xt
    pv = np.where(t >= 2, ref["post_var"][t], 1.0)[:, None]
    kl = np.where(t >= 2, np.sum((true_mean - model_mean) ** 2 / (2 * pv), axis=1), 0.0)
    prior_var = 1 - ab[-1]
    prior = 0.5 * np.sum(prior_var + ab[-1] * x0**2 - 1 - np.log(prior_var), axis=1)
    rec = np.sum(0.5 * np.log(2 * np.pi * betas[0]) + (x0 - x0_hat) ** 2 / (2 * betas[0]), axis=1)
    return dict(l0=np.mean((eps - eps_hat) ** 2, axis=1), l1=kl, l2=np.zeros(len(t)),
                l3=prior + np.where(t == 1, rec, 0.0))


def test_single_modality_loss_is_plain_ddpm():
    betas = schedules.linear_betas(T)
    sched = schedules.make_schedule(betas, np.zeros((T, 0)))
    rng = np.random.default_rng(1)
    t = np.arange(1, T + 1)
    x0 = rng.uniform(-1, 1, size=(T, 3))
    eps = rng.normal(size=(T, 3))
    eps_hat = eps + 0.1 * rng.normal(size=(T, 3))
    empty = jnp.zeros((T, 0, 3))
    terms = losses.loss_terms(sched, jnp.asarray(t, jnp.int32), f32(x0), empty, f32(eps), f32(eps_hat), empty,
                              jnp.zeros((T, 0)), [])
    ref = _ddpm_terms64(betas, t, x0, eps, eps_hat)
    for name in losses.LOSS_TERM_NAMES:
        np.testing.assert_allclose(getattr(terms, name), ref[name], rtol=1e-5, atol=1e-6, err_msg=name)
    weights = {"l0": 1.0, "l1": 0.001, "l2": 1.0, "l3": 0.01}
    total, metrics = losses.training_loss(terms, weights)
    expected = sum(w * np.mean(ref[k]) for k, w in weights.items())
    np.testing.assert_allclose(float(total), expected, rtol=1e-5)
    assert float(metrics["loss/l2"]) == 0.0


@pytest.mark.parametrize("num_aux", [0, 1])
def test_elbo_matches_its_float64_expectation_for_gaussian_data(num_aux):
    """Data z_0 ~ N(0, v0 I); an auxiliary encoding e ~ N(0, I) known to the model; the Bayes-optimal
    ε̂ = s_t (z_t - c_t e) / (abar_t^2 v0 + s_t^2). Then every term's expectation is a float64 closed form:
        E[L1_t] = eps_coef_t^2 (1 - s_t^2 / V_t) / (2 sigma~_t^2) per dim, and so on.
    `elbo`'s Monte-Carlo sum over t must match it, and must bound the true NLL from above."""
    betas, weights, sched = _schedule([1.0] * num_aux)
    co = schedules.compute_coefficients(np.sqrt(1 - betas), weights, betas)
    v0, batch, dims, aux_nll_value = 0.5, 32768, 8, 0.7  # 5 s.e. of the diffusion sum: 0.3%
    key = jax.random.key(7)
    k0, k1, k2 = jax.random.split(key, 3)
    z0 = math.sqrt(v0) * jax.random.normal(k0, (batch, dims))
    enc = jax.random.normal(k1, (batch, num_aux, dims))
    V = sched.abar**2 * v0 + sched.s2  # [T+1]

    def oracle(zt, t):
        y = zt - process.mix_modalities(sched.c, t, enc)
        eps_hat = (sched.s[t] / V[t])[:, None] * y
        return eps_hat, enc, jnp.full((batch, num_aux), aux_nll_value)

    out = jax.jit(lambda k: losses.elbo(sched, oracle, k, z0, enc, aux_dims=[dims] * num_aux))(k2)
    t = np.arange(2, T + 1)
    V64 = co.abar**2 * v0 + co.s2
    eps_coef = co.sigma2 / (np.sqrt(np.maximum(co.s2, 1e-300)) * co.a)
    diffusion = dims * np.sum(eps_coef[t] ** 2 * (1 - co.s2[t] / V64[t]) / (2 * co.post_var[t]))
    rec = dims * (0.5 * math.log(2 * math.pi * co.sigma2[1]) + co.s2[1] / co.abar[1] ** 2 * (1 - co.s2[1] / V64[1]) / (2 * co.sigma2[1]))
    prior_var = co.s2[-1]
    prior = dims * 0.5 * (prior_var + co.abar[-1] ** 2 * v0 + np.sum(co.c[-1] ** 2) - 1 - math.log(prior_var))
    for name, expected in (("diffusion", diffusion), ("reconstruction", rec), ("prior", prior)):
        values = np.asarray(out[name], np.float64)
        se = values.std() / math.sqrt(batch)
        assert abs(values.mean() - expected) < 5 * se + 1e-6 * abs(expected), (name, values.mean(), expected, se)
    chex.assert_shape([out["bpd/primary"], out["bpd/total"]], (batch,))
    chex.assert_shape([out["aux_nll"], out["bpd/aux"]], (batch, num_aux))
    np.testing.assert_allclose(out["bpd/aux"], aux_nll_value / (dims * math.log(2)), rtol=1e-6)
    primary = np.asarray(out["prior"] + out["diffusion"] + out["reconstruction"])
    np.testing.assert_allclose(out["bpd/primary"], primary / (dims * math.log(2)), rtol=1e-5)
    total = primary + num_aux * aux_nll_value
    np.testing.assert_allclose(out["bpd/total"], total / ((dims + num_aux * dims) * math.log(2)), rtol=1e-5)
    true_nll = dims * 0.5 * math.log(2 * math.pi * math.e * v0)
    expected_neg_elbo = diffusion + rec + prior
    # A valid bound. It is not tight: with the fixed reverse variance sigma~_t^2 the first steps (t ~ 2..10, where
    # the true reverse variance is about twice sigma~_t^2) cost about 0.46 nats/dim for this data.
    assert true_nll < expected_neg_elbo


def test_discretized_gaussian_is_a_distribution_over_the_grid():
    levels = np.linspace(-1, 1, 17)  # the digits' 17 grey levels
    width = 2 / 16
    for mean, var in ((0.1, 0.04), (-0.95, 1e-4), (0.99, 0.3), (0.0, 1e-6), (3.0, 0.01)):
        x = f32(levels[:, None])
        nll = likelihoods.discretized_gaussian_nll(x, jnp.full_like(x, mean), var, width)
        np.testing.assert_allclose(float(jnp.sum(jnp.exp(-nll))), 1.0, atol=1e-5, err_msg=str((mean, var)))
    # wide Gaussian: bin probability ≈ width * density
    x = f32([[0.25]])
    nll = likelihoods.discretized_gaussian_nll(x, f32([[0.2]]), 4.0, 1e-3)
    dens = likelihoods.gaussian_nll(x, f32([[0.2]]), 4.0)
    np.testing.assert_allclose(float(nll[0]), float(dens[0]) - math.log(1e-3), rtol=1e-4)


def test_categorical_nll_matches_numpy():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(3, 5, 4))
    labels = rng.integers(0, 4, size=(3, 5))
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = -np.take_along_axis(log_p, labels[..., None], -1)[..., 0].sum(1)
    np.testing.assert_allclose(likelihoods.categorical_nll(f32(logits), jnp.asarray(labels)), expected, rtol=1e-5)
    with pytest.raises(ValueError, match="labels must have shape"):
        likelihoods.categorical_nll(f32(logits), jnp.asarray(labels[:, :4]))


def test_training_loss_weights_mask_and_errors():
    terms = losses.LossTerms(*(f32([1.0, 2.0, 3.0, 4.0]) * (k + 1) for k in range(4)))
    total, metrics = losses.training_loss(terms, {"l0": 1.0, "l2": 0.5})
    assert float(total) == pytest.approx(2.5 + 0.5 * 7.5)
    assert float(metrics["loss/l1"]) == pytest.approx(5.0)
    total, _ = losses.training_loss(terms, {"l0": 1.0}, example_mask=f32([1, 1, 0, 0]))
    assert float(total) == pytest.approx(1.5)
    with pytest.raises(ValueError, match=r"diffusion.loss_weights: unknown term\(s\) \['l4'\]"):
        losses.training_loss(terms, {"l4": 1.0})
    with pytest.raises(ValueError, match=r"diffusion.loss_weights.l1: must be a finite non-negative"):
        losses.training_loss(terms, {"l1": -1.0})


class LossVariantsTest(parameterized.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_loss_terms_shapes_and_agreement(self):
        _, _, sched = _schedule([1.0, 0.5], num_steps=100)
        ks = jax.random.split(jax.random.key(0), 6)
        B, S = 4, (8, 8, 1)
        z0, eps, eps_hat = (jax.random.normal(k, (B,) + S) for k in ks[:3])
        enc, enc_hat = (jax.random.normal(k, (B, 2) + S) for k in ks[3:5])
        t = jnp.asarray([1, 2, 50, 100], jnp.int32)
        aux_nll = jnp.abs(jax.random.normal(ks[5], (B, 2)))

        def fn(t, z0, enc, eps, eps_hat, enc_hat, aux_nll):
            terms = losses.loss_terms(sched, t, z0, enc, eps, eps_hat, enc_hat, aux_nll, [1.0, 0.3], bin_width=2 / 16)
            return terms, losses.training_loss(terms, {"l0": 1, "l1": 1e-3, "l2": 1, "l3": 1e-3})[0]

        args = (t, z0, enc, eps, eps_hat, enc_hat, aux_nll)
        terms, total = self.variant(fn)(*args)
        chex.assert_shape(list(terms), (B,))
        chex.assert_type(list(terms) + [total], jnp.float32)
        chex.assert_tree_all_finite((terms, total))
        chex.assert_trees_all_close((terms, total), fn(*args), rtol=1e-5)
