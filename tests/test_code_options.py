"""The two options that change how auxiliary codes meet the denoiser: `diffusion.denoiser_output` ('eps' or
'composite', `objective.predict`) and smooth label codes (`modalities.<label>.code_grid`)."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from flax import nnx

from mmdiff_jax import config_check, modalities, objective, train
from mmdiff_jax.configs import tiny
from mmdiff_jax.diffusion import process


class _StubModel:
    """Fixed backbone output r [B, *S] and label logits [B, K], whatever the input."""

    takes_dropout_key = False

    def __init__(self, r, logits):
        self.r, self.logits = r, logits

    def __call__(self, zt, t, present=None):
        return self.r, {"label": self.logits}


def _diffusion(output: str):
    config = tiny.get_config()
    config.diffusion.denoiser_output = output
    return objective.build_diffusion(config)


def _inputs():
    keys = jax.random.split(jax.random.key(0), 4)
    batch, shape = 6, (8, 8, 1)
    zt = jax.random.normal(keys[0], (batch,) + shape)
    r = jax.random.normal(keys[1], (batch,) + shape)
    logits = 3.0 * jax.random.normal(keys[2], (batch, 10))
    t = jnp.array([1, 10, 37, 50, 80, 100], jnp.int32)
    return zt, r, logits, t


class PredictVariantsTest(parameterized.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_composite_output_subtracts_the_heads_expected_codes(self):
        zt, r, logits, t = _inputs()
        diff = _diffusion("composite")
        model = _StubModel(r, logits)
        eps_hat, enc_hat, *_ = self.variant(lambda z, tt: objective.predict(model, diff, z, tt))(zt, t)
        chex.assert_shape(eps_hat, zt.shape)
        chex.assert_shape(enc_hat, (zt.shape[0], 1) + zt.shape[1:])
        codes = diff.modalities.aux[0].codes  # [K, *S]
        probs = np.exp(np.asarray(logits, np.float64))
        probs /= probs.sum(axis=1, keepdims=True)
        expected_enc = np.einsum("bk,khwc->bhwc", probs, codes.astype(np.float64))
        np.testing.assert_allclose(np.asarray(enc_hat[:, 0]), expected_enc, atol=1e-5)
        c = np.asarray(diff.sched.c)[np.asarray(t), 0].reshape(-1, 1, 1, 1)
        s = np.asarray(diff.sched.s)[np.asarray(t)].reshape(-1, 1, 1, 1)
        np.testing.assert_allclose(np.asarray(eps_hat), np.asarray(r) - c * expected_enc / s, atol=1e-5)
        # the composite view: ẑ_0 depends on the backbone's output alone, (z_t - s_t r) / abar_t
        abar = np.asarray(diff.sched.abar)[np.asarray(t)].reshape(-1, 1, 1, 1)
        z0 = process.predict_z0(diff.sched, t, zt, eps_hat, enc_hat)
        np.testing.assert_allclose(np.asarray(z0), (np.asarray(zt) - s * np.asarray(r)) / abar, rtol=1e-4, atol=1e-4)

    @chex.variants(with_jit=True, without_jit=True)
    def test_eps_output_is_the_backbones_own(self):
        zt, r, logits, t = _inputs()
        model = _StubModel(r, logits)
        eps_hat, *_ = self.variant(lambda z, tt: objective.predict(model, _diffusion("eps"), z, tt))(zt, t)
        np.testing.assert_array_equal(np.asarray(eps_hat), np.asarray(r))


def test_composite_output_with_dropped_modality_is_plain_eps():
    zt, r, logits, t = _inputs()
    absent = jnp.zeros((zt.shape[0], 1), jnp.float32)
    eps_hat, enc_hat, *_ = objective.predict(_StubModel(r, logits), _diffusion("composite"), zt, t, absent)
    np.testing.assert_array_equal(np.asarray(enc_hat), 0.0)
    np.testing.assert_allclose(np.asarray(eps_hat), np.asarray(r), atol=1e-7)


def test_the_true_composite_noise_gives_zero_eps_error_when_the_head_is_certain():
    """With r = (z_t - abar z_0) / s and a head certain of the true label, ε̂ is the forward process's ε exactly."""
    diff = _diffusion("composite")
    keys = jax.random.split(jax.random.key(1), 3)
    labels = jnp.arange(6) % 10
    z0 = jax.random.uniform(keys[0], (6, 8, 8, 1), minval=-1, maxval=1)
    eps = jax.random.normal(keys[1], z0.shape)
    t = jnp.array([2, 20, 40, 60, 80, 99], jnp.int32)
    enc = diff.modalities.encode({"image": z0, "label": labels})
    zt = process.q_sample(diff.sched, t, z0, enc, eps)
    s = process.per_example(diff.sched.s, t, z0)
    r = (zt - process.per_example(diff.sched.abar, t, z0) * z0) / s
    certain = 1e4 * jax.nn.one_hot(labels, 10)
    eps_hat, *_ = objective.predict(_StubModel(r, certain), diff, zt, t)
    np.testing.assert_allclose(np.asarray(eps_hat), np.asarray(eps), atol=2e-4)


def test_smooth_codes_are_unit_rms_low_frequency_and_seeded():
    codes = modalities.smooth_unit_rms_codes(10, (28, 28, 1), grid=4, seed=3)
    chex.assert_shape(codes, (10, 28, 28, 1))
    assert codes.dtype == np.float32
    np.testing.assert_allclose(np.sqrt(np.mean(codes.reshape(10, -1) ** 2, axis=1)), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(codes, modalities.smooth_unit_rms_codes(10, (28, 28, 1), grid=4, seed=3))
    white = modalities.unit_rms_codes(10, (28, 28, 1), seed=3)

    def neighbour_correlation(x):  # mean correlation of horizontally adjacent pixels
        a, b = x[:, :, :-1].ravel(), x[:, :, 1:].ravel()
        return np.corrcoef(a, b)[0, 1]

    assert neighbour_correlation(codes) > 0.9
    assert abs(neighbour_correlation(white)) < 0.1
    # the two ends of the family: a 1 x 1 grid is a constant code of +-1; a full-size grid is the white noise itself
    constant = modalities.smooth_unit_rms_codes(10, (8, 8, 1), grid=1, seed=0)
    np.testing.assert_allclose(np.abs(constant), 1.0, rtol=1e-6)
    full = modalities.smooth_unit_rms_codes(10, (8, 8, 1), grid=8, seed=0)
    coarse = np.random.default_rng(0).normal(size=(10, 8, 8, 1))
    np.testing.assert_allclose(full, coarse / np.sqrt(np.mean(coarse.reshape(10, -1) ** 2, axis=1))[:, None, None, None],
                               rtol=1e-5)


def test_label_code_grid_is_used_and_checked():
    spec = modalities.ModalitySpec(name="label", kind="label", num_classes=10, code_grid=4)
    label = modalities.LabelModality(spec, (28, 28, 1))
    np.testing.assert_array_equal(label.codes, modalities.smooth_unit_rms_codes(10, (28, 28, 1), 4, 0))
    for bad in (-1, 29, 2.5):
        with pytest.raises(modalities.ModalityError, match="code_grid"):
            modalities.LabelModality(modalities.ModalitySpec(name="label", kind="label", num_classes=10,
                                                             code_grid=bad), (28, 28, 1))


def test_heads_train_the_backbone_only_where_told():
    """model.heads_train_backbone=False: the same outputs and head gradients, and no gradient of the heads' loss (L2)
    reaches the backbone. model.heads_train_backbone_max_t=0.2 (T = 100): the backbone's gradient is that of the
    heads' loss over the examples with t <= 20 alone, the heads' gradient that of the whole loss."""
    batch = {"image": jax.random.uniform(jax.random.key(0), (4, 8, 8, 1), minval=-1, maxval=1),
             "label": jnp.arange(4)}
    t = jnp.array([5, 20, 50, 90], jnp.int32)
    kept = jnp.array([1.0, 1.0, 0.0, 0.0])  # t <= 0.2 T
    grads, outputs = {}, {}
    for name, trains, max_t, weights in (("all", True, 1.0, jnp.ones(4)), ("kept only", True, 1.0, kept),
                                         ("none", False, 1.0, jnp.ones(4)), ("t <= 20", True, 0.2, jnp.ones(4))):
        config = tiny.get_config()
        assert config.diffusion.num_steps == 100
        config.model.heads_train_backbone = trains
        config.model.heads_train_backbone_max_t = max_t
        diff = objective.build_diffusion(config)
        graphdef, params = train.create_model(config, diff)

        def head_loss(p, w):
            out, heads = nnx.merge(graphdef, p)(batch["image"], t)
            return jnp.mean(w[:, None] * diff.modalities.nlls(heads, batch, 4)), (out, heads)  # nlls: [B, N]

        grads[name], outputs[name] = jax.jit(jax.grad(head_loss, has_aux=True))(params, weights)

    def close(a, b, rtol, atol):  # separately compiled programs: equal to float32 precision
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b)

    for name in ("none", "t <= 20"):
        close(outputs[name], outputs["all"], 1e-5, 1e-6)
        close(grads[name]["heads"], grads["all"]["heads"], 1e-4, 1e-7)
    assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree.leaves(grads["none"]["backbone"]))
    close(grads["t <= 20"]["backbone"], grads["kept only"]["backbone"], 1e-4, 1e-7)
    differs = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(grads["all"]["backbone"]),
                                                                  jax.tree.leaves(grads["kept only"]["backbone"])))
    assert differs > 1e-3  # the examples above the cut do reach the backbone without it


def test_heads_train_backbone_max_t_is_checked():
    config = tiny.get_config()
    for bad in (0.0, 1.5, float("nan")):
        config.model.heads_train_backbone_max_t = bad
        with pytest.raises(config_check.ConfigError, match="model.heads_train_backbone_max_t"):
            config_check.validate(config)
