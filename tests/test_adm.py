"""The ADM backbone: guided-diffusion's ImageNet-64 parameter count (abstract shapes, nothing allocated); attention
against a float64 reference; zero-initialised output; jit == no jit; remat changes nothing; dropout only with a key;
the composed model trains with it in tests/test_imagenet64_recipe.py."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmdiff_jax.models import adm

TINY = adm.ADMConfig(image_size=8, latent_channels=1, channels=(16, 32), blocks_per_level=1,
                     attention_resolutions=(4,), num_head_channels=8, groups=8, temb_dim=32, dropout=0.0)


def _count(cfg) -> int:
    abstract = nnx.eval_shape(lambda: adm.ADM(cfg, rngs=nnx.Rngs(0)))
    return sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


def test_imagenet64_flags_give_guided_diffusions_parameter_count():
    # image_size 64, num_channels 192, channel_mult 1,2,3,4, num_res_blocks 3, attention 32,16,8, 64 head channels,
    # use_scale_shift_norm, resblock_updown, learn_sigma False, class_cond False
    assert _count(adm.ADMConfig()) == 295_131_267
    # learn_sigma True: 6 output channels, guided-diffusion's out conv 192 -> 6 instead of 192 -> 3
    assert _count(adm.ADMConfig(out_channels=6)) == 295_131_267 + 192 * 9 * 3 + 3 == 295_136_454


def _randomized(model, seed=1):
    """The model with every parameter drawn at random (the zero-initialised layers too)."""
    graphdef, params = nnx.split(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    params = jax.tree.unflatten(treedef, [0.2 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
    return nnx.merge(graphdef, params)


def test_forward_shapes_zero_output_and_jit():
    model = adm.ADM(TINY, rngs=nnx.Rngs(0))
    z = jax.random.normal(jax.random.key(0), (3, 8, 8, 1))
    t = jnp.array([1.0, 50.0, 999.0])
    eps, feats = model(z, t)
    chex.assert_shape(eps, (3, 8, 8, 1))
    chex.assert_shape(feats.pooled, (3, model.feature_dim))
    chex.assert_shape(feats.fmap, (3, 8, 8, 16))
    chex.assert_type([eps, feats.pooled, feats.fmap, feats.temb], jnp.float32)
    np.testing.assert_array_equal(eps, 0.0)  # zero-initialised output conv
    model = _randomized(model)
    eager = model(z, t)[0]
    jitted = nnx.jit(lambda m, z, t: m(z, t)[0])(model, z, t)
    np.testing.assert_allclose(eager, jitted, rtol=1e-5, atol=1e-5)
    assert float(jnp.std(eager)) > 0


def test_attention_matches_a_float64_reference():
    block = adm.Attention(16, TINY, rngs=nnx.Rngs(0))
    block = _randomized(block, 2)
    x = np.asarray(jax.random.normal(jax.random.key(3), (2, 4, 4, 16)))
    got = np.asarray(block(jnp.asarray(x)), np.float64)
    # reference: GroupNorm(8 groups, eps 1e-6), qkv projection, per-head softmax(q k^T / sqrt(d)) v, projection
    g = x.reshape(2, 16, 8, 2).astype(np.float64)
    mean, var = g.mean(axis=(1, 3), keepdims=True), g.var(axis=(1, 3), keepdims=True)
    n = ((g - mean) / np.sqrt(var + 1e-6)).reshape(2, 16, 16)
    n = n * np.asarray(block.norm.scale[...]) + np.asarray(block.norm.bias[...])
    qkv = n @ np.asarray(block.qkv.kernel[...], np.float64) + np.asarray(block.qkv.bias[...])
    q, k, v = np.split(qkv.reshape(2, 16, 3, 2, 8), 3, axis=2)
    q, k, v = (a[:, :, 0].transpose(0, 2, 1, 3) for a in (q, k, v))  # [B, heads, T, d]
    w = q @ k.transpose(0, 1, 3, 2) / np.sqrt(8)
    w = np.exp(w - w.max(-1, keepdims=True))
    a = (w / w.sum(-1, keepdims=True)) @ v
    out = a.transpose(0, 2, 1, 3).reshape(2, 16, 16) @ np.asarray(block.out.kernel[...], np.float64)
    out = out + np.asarray(block.out.bias[...])
    np.testing.assert_allclose(got, x + out.reshape(2, 4, 4, 16), rtol=1e-4, atol=1e-4)


def test_remat_and_dropout():
    z = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
    t = jnp.array([3.0, 300.0])
    base = _randomized(adm.ADM(TINY, rngs=nnx.Rngs(0)))
    remat = nnx.merge(nnx.graphdef(adm.ADM(adm.ADMConfig(**{**TINY.__dict__, "remat": True}), rngs=nnx.Rngs(0))),
                      nnx.state(base))
    loss = lambda m: jnp.sum(m(z, t)[0] ** 2)  # noqa: E731
    np.testing.assert_allclose(nnx.jit(loss)(base), nnx.jit(loss)(remat), rtol=1e-6)
    grad = nnx.jit(nnx.grad(loss))  # compiled once per model (op by op, a backward pass is slow)
    g1, g2 = grad(base), grad(remat)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g1, g2)
    dropping = nnx.merge(nnx.graphdef(adm.ADM(adm.ADMConfig(**{**TINY.__dict__, "dropout": 0.5}), rngs=nnx.Rngs(0))),
                         nnx.state(base))
    key = jax.random.key(4)
    run = nnx.jit(lambda m, k: m(z, t, dropout_key=k)[0])
    plain = run(base, None)
    np.testing.assert_array_equal(run(dropping, None), plain)  # no key: deterministic
    assert not np.allclose(run(dropping, key), plain)
    np.testing.assert_array_equal(run(base, key), plain)  # rate 0: the key changes nothing
    x = jnp.ones((100_000,))
    dropped = adm._dropout(x, 0.25, key)
    assert abs(float(jnp.mean(dropped == 0)) - 0.25) < 0.01 and abs(float(jnp.mean(dropped)) - 1.0) < 0.02


def test_attention_sits_at_exactly_the_configured_resolutions():
    cfg = adm.ADMConfig(image_size=16, latent_channels=3, channels=(8, 16, 16), blocks_per_level=2,
                        attention_resolutions=(8,), num_head_channels=8, groups=4, temb_dim=16)
    model = nnx.eval_shape(lambda: adm.ADM(cfg, rngs=nnx.Rngs(0)))
    side, down_attn = 16, []
    for block in model.down:  # two blocks per level, then a downsampling block (not after the last level)
        down_attn.append((side, block.attn is not None))
        if block.resample is not None:
            side //= 2
    assert down_attn == [(16, False), (16, False), (16, False), (8, True), (8, True), (8, False), (4, False),
                         (4, False)]
    up_attn = []
    for block in model.up:  # three blocks per level, the last one of a level upsamples
        up_attn.append((side, block.attn is not None))
        if block.resample is not None:
            side *= 2
    assert up_attn == [(4, False)] * 3 + [(8, True)] * 3 + [(16, False)] * 3
    assert model.mid_attn is not None  # the middle always attends
    # up/down-sampling ResBlocks change the side by 2; AdaGN projects the time embedding to 2 x width
    down = [b.resample for b in model.down if b.resample is not None]
    assert [d.resample for d in down] == ["down", "down"] and down[0].emb.out_features == 2 * 8
