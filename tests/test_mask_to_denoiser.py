"""Masks given to the denoiser (`modalities.<mask>.to_denoiser`): the one-hot classes as extra input channels of the
backbone, the true encoding as ê where given, the head's loss not counted there, and the sampler giving a given mask."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mmdiff_jax import config_check, objective, sample, train
from mmdiff_jax.configs import tiny
from mmdiff_jax.data import sources
from mmdiff_jax.errors import UserError
from mmdiff_jax import modalities as M


def _config(rate=0.5, dropout=0.2):
    c = tiny.get_config("mask")
    c.modalities.mask["to_denoiser"] = rate
    c.modalities.mask["dropout"] = dropout
    return c


@pytest.fixture(scope="module")
def built():
    config = _config()
    diff = objective.build_diffusion(config)
    graphdef, params = train.create_model(config, diff)
    model = nnx.merge(graphdef, params)  # the output convolution starts at zero: give it weights, so ε̂ shows a change
    kernel = model.backbone.conv_out.kernel
    kernel[...] = 0.1 * jax.random.normal(jax.random.key(3), kernel[...].shape)
    graphdef, params = nnx.split(model, nnx.Param)
    src = sources.get_source(config.data.source, "test", **dict(config.data.source_kwargs))
    batch = {k: jnp.asarray(v[:6]) for k, v in src.arrays.items() if k in diff.modalities.names}
    return config, diff, graphdef, params, batch


def test_the_backbone_reads_the_latent_and_the_masks_one_hot_classes(built):
    config, diff, graphdef, params, _ = built
    model = nnx.merge(graphdef, params)
    assert diff.modalities.denoiser_input_channels == 4
    assert model.backbone.conv_in.kernel[...].shape == (3, 3, 1 + 4, 16)  # z_t's channel and 4 classes
    assert model.backbone.conv_out.kernel[...].shape[-1] == 1  # the output is still ε̂ of the latent's channel
    plain = train.create_model(tiny.get_config("mask"), objective.build_diffusion(tiny.get_config("mask")))[1]
    assert plain["backbone"]["conv_in"]["kernel"][...].shape[2] == 1  # none without to_denoiser


def test_predict_uses_a_given_mask_and_only_where_it_is_present(built):
    _, diff, graphdef, params, batch = built
    model = nnx.merge(graphdef, params)
    zt = jax.random.normal(jax.random.key(0), batch["image"].shape, jnp.float32)
    t = jnp.full((6,), 50, jnp.int32)
    mask = batch["mask"]
    partly = jnp.where(jnp.arange(6)[:, None, None] < 3, mask, -1)  # given for the first three examples only

    def run(known, present=None):
        return objective.predict(model, diff, zt, t, present, known_masks=None if known is None else {"mask": known})

    none, given, part = run(None), run(mask), run(partly)
    chex.assert_shape(given.eps, (6, 8, 8, 1))
    chex.assert_shape(given.enc, (6, 1, 8, 8, 1))
    # the input changes ε̂ where the mask is given, and nowhere else
    assert float(jnp.max(jnp.abs(given.eps - none.eps))) > 1e-4
    np.testing.assert_allclose(part.eps[:3], given.eps[:3], atol=1e-6)
    np.testing.assert_allclose(part.eps[3:], none.eps[3:], atol=1e-6)
    # ê: the true encoding where given, the head's expected one elsewhere
    m = diff.modalities.aux[0]
    np.testing.assert_allclose(given.enc[:, 0], m.encode(mask), atol=1e-6)
    np.testing.assert_allclose(part.enc[3:], none.enc[3:], atol=1e-6)
    assert float(jnp.max(jnp.abs(none.enc[:, 0] - m.encode(mask)))) > 1e-3
    # a mask left out of the process is not given to the denoiser either
    absent = jnp.zeros((6, 1), jnp.float32)
    np.testing.assert_allclose(run(mask, absent).eps, run(None, absent).eps, atol=1e-6)
    # jit and no jit agree
    jitted = jax.jit(lambda z, k: objective.predict(model, diff, z, t, known_masks={"mask": k}).eps)(zt, mask)
    np.testing.assert_allclose(jitted, given.eps, atol=1e-5)


def test_the_mask_head_is_not_trained_where_the_denoiser_was_given_the_mask(built):
    config, _, _, _, batch = built
    nll = {}
    for rate in (0.0, 1.0):
        c = _config(rate=rate, dropout=0.0)
        diff = objective.build_diffusion(c)
        graphdef, params = train.create_model(c, diff)
        _, metrics = objective.compute_loss(nnx.merge(graphdef, params), diff, batch, jax.random.key(1))
        nll[rate] = float(metrics["nll/mask"])
    assert nll[0.0] > 0.1 and nll[1.0] == 0.0, nll


def test_the_sampler_gives_a_given_mask_to_the_denoiser_and_none_in_joint_samples(built, monkeypatch):
    config, diff, graphdef, params, batch = built
    seen = []
    real = objective.predict

    def spy(*args, known_masks=None, **kwargs):
        seen.append(sorted(known_masks or {}))
        return real(*args, known_masks=known_masks, **kwargs)

    monkeypatch.setattr(objective, "predict", spy)
    gen = sample.Generator(config=config, diff=diff, graphdef=graphdef, params=params, step=0)
    out = gen.generate(jax.random.key(0), 4, given={"mask": np.asarray(batch["mask"][:4])})
    assert seen and all(s == ["mask"] for s in seen)
    np.testing.assert_array_equal(out["mask"], np.asarray(batch["mask"][:4]))
    seen.clear()
    gen.generate(jax.random.key(0), 4)
    assert seen and all(s == [] for s in seen)


@pytest.mark.parametrize("kind, fields, match", [
    ("label", dict(num_classes=10, to_denoiser=0.5), "to_denoiser is for masks"),
    ("mask", dict(shape=(8, 8), num_classes=4, to_denoiser=1.5), r"to_denoiser must be a probability"),
])
def test_bad_to_denoiser_is_refused_with_the_field_named(kind, fields, match):
    with pytest.raises(M.ModalityError, match=match):
        M.build_modalities([M.ModalitySpec("image", "image", shape=(8, 8, 1)), M.ModalitySpec("aux", kind, **fields)],
                           (8, 8, 1))
    c = _config(rate=2.0)
    with pytest.raises(UserError, match="modalities.mask.*to_denoiser|mask.*to_denoiser"):
        config_check.validate(c)
