"""Schedules: beta and weight schedules, the float64 coefficients, the prior-mismatch check and every refusal."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmdiff_jax.diffusion import schedules
from tests import references

T = 1000


def _coeffs(name, scale, betas=None):
    betas = schedules.linear_betas(T) if betas is None else betas
    w = schedules.make_weights(betas, [(name, scale)])
    return schedules.compute_coefficients(np.sqrt(1 - betas), w, betas)


def test_beta_schedules():
    lin = schedules.linear_betas(T)
    assert lin.shape == (T,) and lin.dtype == np.float64
    np.testing.assert_allclose([lin[0], lin[-1]], [1e-4, 0.02])
    cos = schedules.cosine_betas(T)
    assert np.all((cos > 0) & (cos < 1))
    steps = np.arange(T + 1) / T
    f = np.cos((steps + 0.008) / 1.008 * math.pi / 2) ** 2
    # the last step would be beta = 1 (alpha_bar(T) = 0); it is clipped to max_beta
    np.testing.assert_allclose(np.cumprod(1 - cos)[:-1], (f / f[0])[1:-1], rtol=1e-9)
    assert cos[-1] == 0.999


def test_spec_numbers_for_per_step_weights():
    # SPEC §1: constant 0.01 leaves c_T = 1.15 and peaks at 2.4; a linear decay from 0.05 peaks at 9.5.
    co = _coeffs("constant", 0.01)
    assert co.c[-1, 0] == pytest.approx(1.15, abs=0.005)
    assert co.c[:, 0].max() == pytest.approx(2.4, abs=0.01)
    co = _coeffs("linear_decay", 0.05)
    assert co.c[:, 0].max() == pytest.approx(9.5, abs=0.01)


@pytest.mark.parametrize("scale", [0.3, 1.0, 2.5])
def test_profile_weights_give_the_marginal_profile(scale):
    betas = schedules.linear_betas(T)
    co = _coeffs("profile", scale, betas)
    abar = np.concatenate([[1.0], np.cumprod(np.sqrt(1 - betas))])
    np.testing.assert_allclose(co.c[:, 0], scale * 4 * abar * (1 - abar), rtol=1e-10, atol=1e-12)
    assert co.c[:, 0].max() == pytest.approx(scale, rel=1e-3)  # peaks at exactly λ ...
    assert int(np.argmax(co.c[:, 0])) == 368  # ... at t ≈ 368 (SPEC)
    assert co.c[-1, 0] == pytest.approx(0.0252 * scale, rel=0.01)


def test_other_per_step_shapes():
    betas = schedules.linear_betas(10, 1e-3, 0.2)
    np.testing.assert_allclose(schedules.constant_weights(betas, 0.3), 0.3)
    lin = schedules.linear_decay_weights(betas, 0.3)
    np.testing.assert_allclose([lin[0], lin[-1]], [0.3, 0.0], atol=1e-15)
    cos = schedules.cosine_decay_weights(betas, 0.3)
    np.testing.assert_allclose([cos[0], cos[-1]], [0.3, 0.0], atol=1e-15)
    assert np.all(np.diff(cos) < 0)
    sab = schedules.sqrt_alpha_bar_weights(betas, 0.3)
    np.testing.assert_allclose(sab, 0.3 * np.cumprod(np.sqrt(1 - betas)))


def test_schedule_arrays_match_float64_recursion():
    betas = schedules.linear_betas(T)
    weights = schedules.make_weights(betas, [("profile", 1.0), ("profile", 0.5), ("sqrt_alpha_bar", 0.002)])
    sched = schedules.make_schedule(betas, weights)
    assert sched.num_steps == T and sched.num_modalities == 3
    for field in ("a", "sigma2", "abar", "s2", "post_var"):
        assert getattr(sched, field).shape == (T + 1,) and getattr(sched, field).dtype == jnp.float32
    assert sched.c.shape == (T + 1, 3) and sched.b.shape == (T + 1, 3)
    # independent recursion
    a = np.sqrt(1 - betas)
    c = np.zeros(3)
    s2 = 0.0
    abar = 1.0
    for t in range(1, T + 1):
        c = a[t - 1] * c + weights[t - 1]
        s2 = a[t - 1] ** 2 * s2 + betas[t - 1]
        abar *= a[t - 1]
        if t in (1, 2, 10, 368, 999, 1000):
            np.testing.assert_allclose(np.asarray(sched.c[t]), c, rtol=1e-6, atol=1e-7)
            np.testing.assert_allclose(float(sched.s2[t]), s2, rtol=1e-6)
            np.testing.assert_allclose(float(sched.abar[t]), abar, rtol=1e-6)
    # a_t^2 + sigma_t^2 = 1 => s_t^2 = 1 - abar_t^2
    np.testing.assert_allclose(np.asarray(sched.s2), 1 - np.asarray(sched.abar, np.float64) ** 2, atol=1e-6)


def test_prior_kl_is_reported_and_checked():
    betas = schedules.linear_betas(T)
    sched = schedules.make_schedule(betas, schedules.make_weights(betas, [("profile", 1.0)]))
    ref = references.ddpm_reference(betas)
    mean = math.sqrt(ref["alpha_bar"][-1]) + 4 * math.sqrt(ref["alpha_bar"][-1]) * (1 - math.sqrt(ref["alpha_bar"][-1]))
    var = 1 - ref["alpha_bar"][-1]
    expected = 0.5 * (var + mean**2 - 1 - math.log(var))
    assert sched.prior_kl == pytest.approx(expected, rel=1e-9)
    assert sched.prior_kl < 1e-3
    # the SPEC's broken constant schedule is refused, and accepted only with the check disabled
    bad = schedules.make_weights(betas, [("constant", 0.01)])
    with pytest.raises(schedules.ScheduleError, match=r"prior mismatch.*prior_tol"):
        schedules.make_schedule(betas, bad)
    loose = schedules.make_schedule(betas, bad, prior_tol=float("inf"))
    assert loose.prior_kl == pytest.approx(0.5 * (1 - ref["alpha_bar"][-1] + (math.sqrt(ref["alpha_bar"][-1]) + 1.1482) ** 2 - 1 - math.log(1 - ref["alpha_bar"][-1])), rel=1e-3)


def test_too_few_steps_breaks_the_prior_even_without_modalities():
    betas = schedules.linear_betas(10, 1e-4, 0.02)  # DDPM's T = 1000 endpoints on only 10 steps
    with pytest.raises(schedules.ScheduleError, match="prior mismatch"):
        schedules.make_schedule(betas, np.zeros((10, 0)))
    # the default rescales the endpoints by 1000 / T, so a 100-step chain still reaches the prior
    rescaled = schedules.linear_betas(100)
    np.testing.assert_allclose([rescaled[0], rescaled[-1]], [1e-3, 0.2])
    assert schedules.make_schedule(rescaled, np.zeros((100, 0))).prior_kl < 1e-3


@pytest.mark.parametrize(
    "betas, weights, match",
    [
        (np.full(5, -0.1), np.zeros((5, 0)), r"`betas` must lie in \(0, 1\).*t = 1"),
        (np.full(5, 1.5), np.zeros((5, 0)), r"`betas` must lie in \(0, 1\)"),
        (np.array([0.5, np.nan, 0.5]), np.zeros((3, 0)), r"`betas` contains NaN"),
        (np.full(5, 0.5), np.zeros((4, 1)), r"`weights` has shape \(4, 1\); expected \(T, N\) = \(5, N\)"),
        (np.full(5, 0.5), np.zeros(5), r"`weights` has shape \(5,\).*weights\[:, None\]"),
        (np.full(5, 0.5), np.array([[0.0], [np.nan], [0.0], [0.0], [0.0]]), r"`weights` contains NaN"),
        (np.zeros((5, 2)), np.zeros((5, 0)), r"`betas` must have shape \(T,\)"),
    ],
)
def test_make_schedule_refuses_bad_input(betas, weights, match):
    with pytest.raises(schedules.ScheduleError, match=match):
        schedules.make_schedule(betas, weights, prior_tol=float("inf"))


def test_custom_parametrization_refuses_negative_variance():
    with pytest.raises(schedules.ScheduleError, match=r"variance sigma_t\^2 = -0.1 at t = 2 is not positive"):
        schedules.make_schedule_from_coefficients(
            np.full(3, 0.9), np.zeros((3, 1)), np.array([0.1, -0.1, 0.1]), prior_tol=float("inf")
        )
    with pytest.raises(schedules.ScheduleError, match=r"`sigma2` has shape"):
        schedules.make_schedule_from_coefficients(np.full(3, 0.9), np.zeros((3, 1)), np.full(4, 0.1))


def test_unknown_schedule_names():
    with pytest.raises(schedules.ScheduleError, match=r"unknown shape 'cubic'.*profile"):
        schedules.make_weights(schedules.linear_betas(10), [("cubic", 1.0)])
    with pytest.raises(schedules.ScheduleError, match=r"diffusion.beta_schedule: unknown beta schedule 'quad'"):
        schedules.make_betas("quad", 10)
    with pytest.raises(schedules.ScheduleError, match="diffusion.num_steps"):
        schedules.make_betas("linear", 0)


def test_schedule_is_a_pytree_with_static_metadata():
    betas = schedules.linear_betas(T)
    sched = schedules.make_schedule(betas, schedules.make_weights(betas, [("profile", 1.0)]))
    leaves = jax.tree.leaves(sched)
    assert len(leaves) == 14 and all(leaf.dtype == jnp.float32 for leaf in leaves)
    out = jax.jit(lambda s: s.num_steps * s.abar[1])(sched)
    np.testing.assert_allclose(float(out), T * math.sqrt(1 - 1e-4), rtol=1e-6)
