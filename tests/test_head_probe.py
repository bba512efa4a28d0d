"""The head probe (mmdiff_jax/evaluation/head_probe.py) against a float64 Monte-Carlo reference: a "head" that
decodes the label as the nearest class code reads z_t = c_t(1) code_y + c_t(0) e_0 + s_t ε (blank images), so its
accuracy at each t is that of a known Gaussian channel."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmdiff_jax.diffusion import schedules
from mmdiff_jax.evaluation import head_probe
from mmdiff_jax.modalities import unit_rms_codes

T, K, SHAPE = 100, 10, (4, 4, 1)
CODES = unit_rms_codes(K, SHAPE, seed=0)  # [K, *S]
STEPS = (1, 20, 40, 70, 100)


@pytest.fixture(scope="module")
def sched():
    betas = schedules.linear_betas(T, 1e-2, 0.2)
    return schedules.make_schedule(betas, schedules.make_weights(betas, [("profile", 0.3), ("profile", 1.0)]),
                                   prior_tol=float("inf"))


def _nearest_code(z):  # [B, *S] -> int [B]
    return jnp.argmax(z.reshape(z.shape[0], -1) @ jnp.asarray(CODES.reshape(K, -1)).T, axis=-1)


def _reads_nearest_code(zt, t, present):
    """A head output that is z_t itself; the read function decodes it. Told the label is absent: class 3."""
    if present is None:
        return None, {"label": zt}
    return None, {"label": jnp.where(present[:, 1, None, None, None] > 0, zt, jnp.asarray(CODES[3]))}


def _inputs(num, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, K, size=num)
    enc = np.stack([rng.normal(size=(num,) + SHAPE), CODES[labels]], axis=1).astype(np.float32)  # [M, 2, *S]
    return np.zeros((num,) + SHAPE, np.float32), enc, labels.astype(np.int32)


def _reference(sched, t, with_label, n=200_000, seed=1):
    """float64 Monte Carlo of the same channel."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, K, size=n)
    c0, c1, s = (float(np.asarray(x, np.float64)) for x in (sched.c[t, 0], sched.c[t, 1], sched.s[t]))
    z = c0 * rng.normal(size=(n,) + SHAPE) + s * rng.normal(size=(n,) + SHAPE)
    if with_label:
        z = z + c1 * CODES[labels].astype(np.float64)
    read = np.argmax(z.reshape(n, -1) @ CODES.reshape(K, -1).astype(np.float64).T, axis=-1)
    return float(np.mean(read == labels))


def test_matches_a_monte_carlo_reference_with_and_without_the_label(sched):
    num, draws = 2000, 4
    z0, enc, labels = _inputs(num)
    acc = head_probe.head_accuracy_by_step(sched, _reads_nearest_code, lambda h: _nearest_code(h["label"]), z0, enc,
                                           labels, 1, STEPS, jax.random.key(0), draws=draws, batch_size=512)
    assert acc.shape == (len(STEPS), 2) and acc.dtype == np.float64
    ref = np.array([[_reference(sched, t, True), _reference(sched, t, False)] for t in STEPS])
    se = np.sqrt(ref * (1 - ref) / (num * draws)) + np.sqrt(ref * (1 - ref) / 200_000)
    np.testing.assert_array_less(np.abs(acc - ref), 4 * se + 1e-9)
    assert ref[:, 0].max() > 0.9 and ((ref[:, 0] > 0.2) & (ref[:, 0] < 0.9)).any()  # an informative range of steps
    np.testing.assert_allclose(ref[:, 1], 1 / K, atol=0.01)  # blank images, no label: chance


def test_tells_the_model_the_modality_is_absent_and_ignores_the_padding(sched):
    num = 50  # batches of 7: the last one padded
    z0, enc, labels = _inputs(num, seed=2)
    read = lambda h: _nearest_code(h["label"])  # noqa: E731
    told = head_probe.head_accuracy_by_step(sched, _reads_nearest_code, read, z0, enc, labels, 1, (1, 40),
                                            jax.random.key(1), draws=2, batch_size=7, tell_presence=True)
    np.testing.assert_allclose(told[:, 1], np.mean(labels == 3))  # the absent head answers 3, exactly
    untold = head_probe.head_accuracy_by_step(sched, _reads_nearest_code, read, z0, enc, labels, 1, (1, 40),
                                              jax.random.key(1), draws=2, batch_size=7, tell_presence=False)
    np.testing.assert_array_equal(told[:, 0], untold[:, 0])  # with the label: the same draws, the same reading
    with jax.disable_jit():
        eager = head_probe.head_accuracy_by_step(sched, _reads_nearest_code, read, z0, enc, labels, 1, (1, 40),
                                                 jax.random.key(1), draws=2, batch_size=7, tell_presence=True)
    np.testing.assert_allclose(eager, told, atol=1e-12)


def test_rejects_bad_steps_and_index(sched):
    z0, enc, labels = _inputs(8)
    args = (sched, _reads_nearest_code, lambda h: _nearest_code(h["label"]), z0, enc, labels)
    with pytest.raises(ValueError, match="1..100"):
        head_probe.head_accuracy_by_step(*args, 1, (0, 5), jax.random.key(0))
    with pytest.raises(ValueError, match="index 2"):
        head_probe.head_accuracy_by_step(*args, 2, (5,), jax.random.key(0))
