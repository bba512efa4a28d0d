"""The forward process: DDPM reduction, Monte Carlo against the closed forms, Gaussian conjugacy of the posterior,
the reverse-mean identity, jit/no-jit agreement, float32 accuracy at T = 1000, and O(1) cost of q_sample."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from mmdiff_jax.diffusion import process, schedules
from tests import references

T = 1000
ALL_T = np.arange(1, T + 1)


def _profile_schedule(scales, num_steps=T):
    scale = T / num_steps  # fewer steps: larger betas, as DDPM rescales, so the prior still holds
    betas = schedules.linear_betas(num_steps, 1e-4 * scale, 0.02 * scale)
    weights = schedules.make_weights(betas, [("profile", s) for s in scales])
    return betas, weights, schedules.make_schedule(betas, weights)


def _inputs(seed, batch, n, shape=(3,)):
    rng = np.random.default_rng(seed)
    z0 = rng.normal(size=(batch,) + shape)
    enc = rng.normal(size=(batch, n) + shape)
    zt = rng.normal(size=(batch,) + shape)
    return z0, enc, zt


def test_zero_weights_reduce_to_ddpm_for_every_t():
    betas = schedules.linear_betas(T)
    sched = schedules.make_schedule(betas, np.zeros((T, 2)))
    ref = references.ddpm_reference(betas)
    z0, enc, zt = _inputs(0, T, 2)
    t = jnp.asarray(ALL_T, jnp.int32)
    mean, var = process.q_marginal(sched, t, jnp.asarray(z0, jnp.float32), jnp.asarray(enc, jnp.float32))
    np.testing.assert_allclose(mean, np.sqrt(ref["alpha_bar"][ALL_T])[:, None] * z0, atol=1e-5)
    np.testing.assert_allclose(var[:, 0], 1 - ref["alpha_bar"][ALL_T], atol=1e-5)
    mean, var = process.q_posterior(
        sched, t, jnp.asarray(zt, jnp.float32), jnp.asarray(z0, jnp.float32), jnp.asarray(enc, jnp.float32)
    )
    expected = ref["coef_x0"][ALL_T, None] * z0 + ref["coef_xt"][ALL_T, None] * zt
    np.testing.assert_allclose(mean, expected, atol=1e-5)
    np.testing.assert_allclose(var[:, 0], ref["post_var"][ALL_T], atol=1e-5)


@pytest.mark.parametrize("num_modalities", [0, 1, 3])
def test_iterated_q_step_matches_q_marginal_monte_carlo(num_modalities):
    """Run the chain z_0 -> z_t by q_step with 200k samples; compare mean and variance to the closed form."""
    num_steps, num_samples = 60, 200_000
    rng = np.random.default_rng(num_modalities)
    betas = np.linspace(0.01, 0.2, num_steps)
    weights = rng.uniform(-0.3, 0.3, size=(num_steps, num_modalities))  # random non-zero per-step weights
    sched = schedules.make_schedule(betas, weights, prior_tol=float("inf"))
    z0_one = jnp.asarray([0.7, -1.2], jnp.float32)
    enc_one = jnp.asarray(rng.normal(size=(num_modalities, 2)), jnp.float32)
    z0 = jnp.broadcast_to(z0_one, (num_samples, 2))
    enc = jnp.broadcast_to(enc_one, (num_samples, num_modalities, 2))

    @jax.jit
    def chain(key):
        def body(step, z):
            t = jnp.full((num_samples,), step, jnp.int32)
            mean, var = process.q_step(sched, t, z, enc)
            return mean + jnp.sqrt(var) * jax.random.normal(jax.random.fold_in(key, step), z.shape)

        checkpoints = []
        z = z0
        for start, stop in ((1, 8), (8, 31), (31, num_steps + 1)):  # z_7, z_30, z_60
            z = jax.lax.fori_loop(start, stop, body, z)
            checkpoints.append(z)
        return checkpoints

    samples = chain(jax.random.key(42))
    for t_check, z in zip((7, 30, 60), samples):
        t = jnp.full((1,), t_check, jnp.int32)
        mean, var = process.q_marginal(sched, t, z0_one[None], enc_one[None])
        emp_mean, emp_var = np.mean(z, axis=0), np.var(z, axis=0)
        mean_se = np.sqrt(float(var[0, 0]) / num_samples)
        var_se = float(var[0, 0]) * np.sqrt(2.0 / num_samples)
        assert np.all(np.abs(emp_mean - np.asarray(mean[0])) < 5 * mean_se), (t_check, emp_mean, mean)
        assert np.all(np.abs(emp_var - float(var[0, 0])) < 5 * var_se), (t_check, emp_var, var)
        if num_modalities:  # the encodings really move the mean: the test would see them missing
            mean_no_enc, _ = process.q_marginal(sched, t, z0_one[None], jnp.zeros_like(enc_one[None]))
            assert np.max(np.abs(np.asarray(mean_no_enc[0]) - emp_mean)) > 20 * mean_se


def test_posterior_is_the_gaussian_product_in_float64():
    rng = np.random.default_rng(1)
    num_steps = 200
    betas = np.linspace(1e-3, 0.1, num_steps)
    weights = rng.uniform(-0.05, 0.05, size=(num_steps, 3))
    sched = schedules.make_schedule(betas, weights, prior_tol=float("inf"))
    a, sigma2 = np.sqrt(1 - betas), betas
    z0, enc, zt = _inputs(2, 1, 3, shape=(4,))
    for t in (2, 3, 17, 100, 199, 200):
        ref_mean, ref_var = references.gaussian_product_posterior(t, zt[0], z0[0], enc[0], a, weights, sigma2)
        mean, var = process.q_posterior(
            sched, jnp.asarray([t]), jnp.asarray(zt, jnp.float32), jnp.asarray(z0, jnp.float32),
            jnp.asarray(enc, jnp.float32),
        )
        np.testing.assert_allclose(mean[0], ref_mean, atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(float(var[0, 0]), ref_var, rtol=1e-5)
    # t = 1: the posterior is the point mass at z_0
    mean, var = process.q_posterior(sched, jnp.asarray([1]), jnp.asarray(zt, jnp.float32),
                                    jnp.asarray(z0, jnp.float32), jnp.asarray(enc, jnp.float32))
    np.testing.assert_allclose(mean, z0, atol=1e-6)
    assert float(var[0, 0]) == 0.0


def _posterior64(betas, weights, t, zt, z0, enc):
    """Float64 mu~_t and sigma~_t^2 from SPEC §1's formula (vectorized over examples with per-example t)."""
    co = schedules.compute_coefficients(np.sqrt(1 - betas), weights, betas)
    mix = lambda coef: np.einsum("bn,bns->bs", coef, enc)  # noqa: E731  coef [B, N] already at each t
    num = co.sigma2[t, None] * (co.abar[t - 1, None] * z0 + mix(co.c[t - 1])) + (
        co.a[t, None] * co.s2[t - 1, None] * (zt - mix(co.b[t]))
    )
    return num / co.s2[t, None], co.post_var[t]


def test_float32_within_1e5_of_float64_references_at_T1000():
    betas, weights, sched = _profile_schedule([1.0, 0.5, 2.0])
    co = schedules.compute_coefficients(np.sqrt(1 - betas), weights, betas)
    z0, enc, zt = _inputs(3, T, 3)
    t = jnp.asarray(ALL_T, jnp.int32)
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    mean, var = process.q_marginal(sched, t, f32(z0), f32(enc))
    ref_mean = co.abar[ALL_T, None] * z0 + np.einsum("bn,bns->bs", co.c[ALL_T], enc)
    np.testing.assert_allclose(mean, ref_mean, atol=1e-5)
    np.testing.assert_allclose(var[:, 0], co.s2[ALL_T], atol=1e-5)
    mean, var = process.q_posterior(sched, t, f32(zt), f32(z0), f32(enc))
    ref_mean, ref_var = _posterior64(betas, weights, ALL_T, zt, z0, enc)
    np.testing.assert_allclose(mean, ref_mean, atol=1e-5)
    np.testing.assert_allclose(var[:, 0], ref_var, atol=1e-5)
    step_mean, step_var = process.q_step(sched, t, f32(zt), f32(enc))
    np.testing.assert_allclose(step_mean, co.a[ALL_T, None] * zt + np.einsum("bn,bns->bs", co.b[ALL_T], enc), atol=1e-5)
    np.testing.assert_allclose(step_var[:, 0], co.sigma2[ALL_T], atol=1e-5)


def test_p_mean_equals_posterior_at_predicted_z0_for_every_t():
    """p_mean(z_t, ε̂, ê) = mu~_t(z_t, ẑ_0, ê) with ẑ_0 = (z_t - sum c_t ê - s_t ε̂) / abar_t (float64 reference)."""
    betas, weights, sched = _profile_schedule([1.0, 0.5])
    co = schedules.compute_coefficients(np.sqrt(1 - betas), weights, betas)
    _, enc_hat, zt = _inputs(4, T, 2)
    eps_hat = np.random.default_rng(5).normal(size=zt.shape)
    z0_hat = (zt - np.einsum("bn,bns->bs", co.c[ALL_T], enc_hat) - np.sqrt(co.s2[ALL_T])[:, None] * eps_hat) / co.abar[
        ALL_T, None
    ]
    ref_mean, _ = _posterior64(betas, weights, ALL_T, zt, z0_hat, enc_hat)
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    t = jnp.asarray(ALL_T, jnp.int32)
    got = process.p_mean(sched, t, f32(zt), f32(eps_hat), f32(enc_hat))
    np.testing.assert_allclose(got, ref_mean, atol=1e-5)
    # and predict_z0 inverts q_sample where abar_t is not tiny
    early = jnp.arange(1, 400, dtype=jnp.int32)
    noise = f32(eps_hat[:399])
    z = process.q_sample(sched, early, f32(zt[:399]), f32(enc_hat[:399]), noise)
    np.testing.assert_allclose(process.predict_z0(sched, early, z, noise, f32(enc_hat[:399])), zt[:399], atol=1e-4)


class VariantsTest(parameterized.TestCase):
    """Every public function of process.py: shapes, dtypes and jit vs no-jit agreement."""

    def setUp(self):
        super().setUp()
        _, _, self.sched = _profile_schedule([1.0, 0.5], num_steps=100)
        key = jax.random.key(0)
        k1, k2, k3, k4 = jax.random.split(key, 4)
        self.z = jax.random.normal(k1, (4, 8, 8, 1))
        self.enc = jax.random.normal(k2, (4, 2, 8, 8, 1))
        self.noise = jax.random.normal(k3, (4, 8, 8, 1))
        self.t = jax.random.randint(k4, (4,), 1, 101)

    @chex.variants(with_jit=True, without_jit=True)
    def test_shapes_dtypes_and_agreement(self):
        sched, t, z, enc, noise = self.sched, self.t, self.z, self.enc, self.noise
        calls = {
            "q_step": lambda: process.q_step(sched, t, z, enc),
            "q_marginal": lambda: process.q_marginal(sched, t, z, enc),
            "q_posterior": lambda: process.q_posterior(sched, t, noise, z, enc),
        }
        for name, call in calls.items():
            mean, var = self.variant(call)()
            chex.assert_shape(mean, (4, 8, 8, 1))
            chex.assert_shape(var, (4, 1, 1, 1))
            chex.assert_type([mean, var], jnp.float32)
            ref_mean, ref_var = call()
            chex.assert_trees_all_close((mean, var), (ref_mean, ref_var), rtol=1e-6, atol=1e-6, custom_message=name)
        for fn in (process.q_sample, process.p_mean, process.predict_z0):
            args = (sched, t, z, enc, noise) if fn is process.q_sample else (sched, t, z, noise, enc)
            out = self.variant(fn)(*args)
            chex.assert_shape(out, (4, 8, 8, 1))
            chex.assert_type(out, jnp.float32)
            chex.assert_trees_all_close(out, fn(*args), rtol=1e-6, atol=1e-6)


def test_shape_errors_name_the_argument():
    _, _, sched = _profile_schedule([1.0], num_steps=100)
    z = jnp.zeros((2, 3))
    with pytest.raises(ValueError, match=r"enc must have shape \(B, N, \*S\) = \(2, 1, 3\)"):
        process.q_marginal(sched, jnp.ones((2,), jnp.int32), z, jnp.zeros((2, 2, 3)))
    with pytest.raises(TypeError, match="t must be an integer array"):
        process.q_marginal(sched, jnp.ones((2,)), z, jnp.zeros((2, 1, 3)))
    with pytest.raises(ValueError, match=r"t must have shape \(B,\)"):
        process.q_marginal(sched, jnp.ones((3,), jnp.int32), z, jnp.zeros((2, 1, 3)))
    with pytest.raises(ValueError, match="noise must have the shape of z0"):
        process.q_sample(sched, jnp.ones((2,), jnp.int32), z, jnp.zeros((2, 1, 3)), jnp.zeros((2, 4)))


def _cost(fn, *args):
    lowered = jax.jit(fn).lower(*args)
    jaxpr = jax.make_jaxpr(fn)(*args)
    cost = lowered.compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return cost, str(jaxpr)


def test_q_sample_costs_the_same_at_t_T_as_at_t_1():
    """XLA's cost analysis with t baked in as a constant: identical for t = 1 and t = T, and no loop in the jaxpr.
    The same measurement on a step-by-step chain grows with t, so it would catch an O(t) implementation."""
    _, _, sched = _profile_schedule([1.0, 0.5])
    z = jnp.ones((16, 8, 8, 1))
    enc = jnp.ones((16, 2, 8, 8, 1))
    noise = jnp.ones((16, 8, 8, 1))

    def closed_form(t_value):
        return lambda z, e, n: process.q_sample(sched, jnp.full((16,), t_value, jnp.int32), z, e, n)

    cost_1, jaxpr_1 = _cost(closed_form(1), z, enc, noise)
    cost_T, jaxpr_T = _cost(closed_form(T), z, enc, noise)
    for prim in ("while", "scan", "fori"):
        assert prim not in jaxpr_1 and prim not in jaxpr_T
    assert cost_1["flops"] == cost_T["flops"] > 0
    assert cost_1["bytes accessed"] == cost_T["bytes accessed"]

    def chain(t_value):
        def run(z, e, n):
            for step in range(1, t_value + 1):
                mean, var = process.q_step(sched, jnp.full((16,), step, jnp.int32), z, e)
                z = mean + jnp.sqrt(var) * n
            return z
        return run

    assert _cost(chain(8), z, enc, noise)[0]["flops"] > 4 * _cost(chain(1), z, enc, noise)[0]["flops"]
