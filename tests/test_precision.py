"""The memory and precision switches: `model.remat` (gradient checkpointing per U-Net ResBlock) gives the same loss
and gradients, and `model.dtype = 'bfloat16'` computes in bf16 with float32 parameters, within bf16's precision."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmdiff_jax.configs import tiny
from mmdiff_jax import objective, train
from mmdiff_jax.data import sources


def _loss_and_grads(**model_overrides):
    config = tiny.get_config()
    for k, v in model_overrides.items():
        config.model[k] = v
    diff = objective.build_diffusion(config)
    graphdef, params = train.create_model(config, diff)
    src = sources.get_source("digits", "train").arrays
    batch = {"image": jnp.asarray(src["image"][:32]), "label": jnp.asarray(src["label"][:32])}

    def loss_fn(p):
        return objective.compute_loss(nnx.merge(graphdef, p), diff, batch, jax.random.key(0))[0]

    value_and_grad = jax.jit(jax.value_and_grad(loss_fn))
    loss, grads = value_and_grad(params)
    return params, loss, grads, jax.make_jaxpr(jax.value_and_grad(loss_fn))(params)


@functools.cache
def _float32_reference():
    """The default model's loss and gradients, computed once for both tests."""
    return _loss_and_grads()


def test_remat_gives_the_same_loss_and_gradients():
    params, loss, grads, jaxpr = _float32_reference()
    params_r, loss_r, grads_r, jaxpr_r = _loss_and_grads(remat=True)
    jax.tree.map(np.testing.assert_array_equal, params, params_r)  # same init
    assert "checkpoint" in str(jaxpr_r) or "remat" in str(jaxpr_r)
    assert "checkpoint" not in str(jaxpr) and "remat" not in str(jaxpr)
    np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads_r, grads)


def test_bfloat16_compute_keeps_float32_params_and_matches_float32():
    params, loss, grads, _ = _float32_reference()
    params16, loss16, grads16, jaxpr16 = _loss_and_grads(dtype="bfloat16")
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params16))  # fp32 master weights
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(grads16))
    assert "bf16" in str(jaxpr16)  # the convolutions run in bf16
    np.testing.assert_allclose(loss16, loss, rtol=2e-2)  # bf16 has 8 bits of mantissa
    flat, flat16 = (np.concatenate([np.ravel(g) for g in jax.tree.leaves(t)]) for t in (grads, grads16))
    cosine = flat @ flat16 / (np.linalg.norm(flat) * np.linalg.norm(flat16))
    assert cosine > 0.99, cosine
