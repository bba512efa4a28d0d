"""The modality registry: encoders, heads, likelihoods and batch checks for each kind; config errors."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mmdiff_jax import modalities as M
from mmdiff_jax.models.mt_diffusion import MTDiffusion
from mmdiff_jax.models.unet import Features, UNetConfig

LATENT = (8, 8, 1)


def _mods():
    return M.build_modalities(
        [M.ModalitySpec("image", "image", shape=LATENT), M.ModalitySpec("label", "label", num_classes=10)], LATENT)


def test_label_encoder_head_and_likelihood():
    mods = _mods()
    label = mods.aux[0]
    codes = label.codes
    chex.assert_shape(codes, (10,) + LATENT)
    np.testing.assert_allclose(np.sqrt(np.mean(codes.reshape(10, -1) ** 2, axis=1)), 1.0, rtol=1e-6)
    x = jnp.asarray([3, 0, 9])
    enc = label.encode(x)
    chex.assert_shape(enc, (3,) + LATENT)
    np.testing.assert_allclose(enc[0], codes[3])
    # a confident head predicts its class's code; a uniform one the mean code
    logits = 50.0 * jax.nn.one_hot(x, 10)
    np.testing.assert_allclose(label.expected_encoding(logits), enc, atol=1e-5)
    np.testing.assert_allclose(label.expected_encoding(jnp.zeros((1, 10)))[0], codes.mean(0), atol=1e-6)
    np.testing.assert_array_equal(label.decode(logits), x)
    nll = label.nll(logits, x)
    chex.assert_shape(nll, (3,))
    assert float(nll.max()) < 1e-6
    model = MTDiffusion(UNetConfig(channels=(16, 32), temb_dim=32), mods, rngs=nnx.Rngs(0))
    eps_hat, heads = model(jnp.zeros((3,) + LATENT), jnp.asarray([1, 5, 100]))
    chex.assert_shape(eps_hat, (3,) + LATENT)
    chex.assert_shape(heads["label"], (3, 10))
    enc_hat = mods.expected_encodings(heads, 3)
    chex.assert_shape(enc_hat, (3, 1) + LATENT)
    chex.assert_shape(mods.nlls(heads, {"label": x}, 3), (3, 1))


def test_conv_label_head_reads_the_full_resolution_features():
    """head="conv": logits [B, K] from the full-resolution feature map, the same with and without jit; a change of
    the map alone (pooled features and time embedding fixed) changes them."""
    mods = M.build_modalities([M.ModalitySpec("image", "image", shape=LATENT),
                               M.ModalitySpec("label", "label", num_classes=10, head="conv")], LATENT)
    head = mods.aux[0].make_head(feature_dim=24, fmap_channels=16, temb_dim=32, rngs=nnx.Rngs(0))
    keys = jax.random.split(jax.random.key(0), 3)
    feats = Features(jax.random.normal(keys[0], (3, 24)), jax.random.normal(keys[1], (3, 8, 8, 16)),
                     jax.random.normal(keys[2], (3, 32)))
    logits = head(feats)
    chex.assert_shape(logits, (3, 10))
    chex.assert_type(logits, jnp.float32)
    jitted = nnx.jit(lambda h, pooled, fmap, temb: h(Features(pooled, fmap, temb)))
    np.testing.assert_allclose(jitted(head, feats.pooled, feats.fmap, feats.temb), logits, rtol=1e-5, atol=1e-6)
    moved = Features(feats.pooled, jnp.roll(feats.fmap, 3, axis=1), feats.temb)
    assert float(jnp.max(jnp.abs(head(moved) - logits))) > 1e-3


def test_conv_latent_label_head_reads_the_image_latent():
    """head="conv_latent": logits [B, K] from the features and the backbone's input latent, the same with and without
    jit; a change of the latent alone changes them; without the latent it refuses to run; the composed model gives
    its heads the latent it denoises."""
    mods = M.build_modalities([M.ModalitySpec("image", "image", shape=LATENT),
                               M.ModalitySpec("label", "label", num_classes=10, head="conv_latent")], LATENT)
    head = mods.aux[0].make_head(feature_dim=24, fmap_channels=16, temb_dim=32, rngs=nnx.Rngs(0))
    keys = jax.random.split(jax.random.key(1), 4)
    feats = Features(jax.random.normal(keys[0], (3, 24)), jax.random.normal(keys[1], (3, 8, 8, 16)),
                     jax.random.normal(keys[2], (3, 32)), latent=jax.random.normal(keys[3], (3,) + LATENT))
    logits = head(feats)
    chex.assert_shape(logits, (3, 10))
    chex.assert_type(logits, jnp.float32)
    jitted = nnx.jit(lambda h, pooled, fmap, temb, latent: h(Features(pooled, fmap, temb, latent)))
    np.testing.assert_allclose(jitted(head, feats.pooled, feats.fmap, feats.temb, feats.latent), logits, rtol=1e-5,
                               atol=1e-6)
    other = Features(feats.pooled, feats.fmap, feats.temb, latent=-feats.latent)
    assert float(jnp.max(jnp.abs(head(other) - logits))) > 1e-3
    with pytest.raises(ValueError, match="reads the latent"):
        head(Features(feats.pooled, feats.fmap, feats.temb))
    model = MTDiffusion(UNetConfig(channels=(16, 32), temb_dim=32), mods, rngs=nnx.Rngs(0))
    z = jax.random.normal(keys[3], (3,) + LATENT)
    t = jnp.asarray([1, 5, 100])
    _, heads = model(z, t)
    _, heads_other = model(-z, t)
    chex.assert_shape(heads["label"], (3, 10))
    assert float(jnp.max(jnp.abs(heads["label"] - heads_other["label"]))) > 1e-4


def test_latent_label_head_reads_only_the_latent_and_t():
    """head="latent": logits [B, K] from the backbone's input latent and the embedding of t alone, the same with and
    without jit; in the composed model a class given to the backbone (read probabilities) changes ε̂ but not the
    head's logits, and a change of the latent changes them."""
    mods = M.build_modalities([M.ModalitySpec("image", "image", shape=LATENT),
                               M.ModalitySpec("label", "label", num_classes=10, head="latent")], LATENT)
    head = mods.aux[0].make_head(feature_dim=24, fmap_channels=16, temb_dim=32, rngs=nnx.Rngs(0))
    keys = jax.random.split(jax.random.key(2), 5)
    feats = Features(jax.random.normal(keys[0], (3, 24)), jax.random.normal(keys[1], (3, 8, 8, 16)),
                     jax.random.normal(keys[2], (3, 32)), latent=jax.random.normal(keys[3], (3,) + LATENT),
                     time_emb=jax.random.normal(keys[4], (3, 32)))
    logits = head(feats)
    chex.assert_shape(logits, (3, 10))
    chex.assert_type(logits, jnp.float32)
    jitted = nnx.jit(lambda h, latent, time_emb: h(Features(feats.pooled, feats.fmap, feats.temb, latent, time_emb)))
    np.testing.assert_allclose(jitted(head, feats.latent, feats.time_emb), logits, rtol=1e-5, atol=1e-6)
    others = Features(-feats.pooled, -feats.fmap, -feats.temb, latent=feats.latent, time_emb=feats.time_emb)
    np.testing.assert_array_equal(np.asarray(head(others)), np.asarray(logits))
    with pytest.raises(ValueError, match="reads the latent and the time embedding"):
        head(Features(feats.pooled, feats.fmap, feats.temb, latent=feats.latent))
    model = MTDiffusion(UNetConfig(channels=(16, 32), temb_dim=32), mods, rngs=nnx.Rngs(0), read_classes=10,
                        read_exact=True)
    out_kernel = model.backbone.conv_out.kernel  # zero at initialisation: ε̂ = 0 whatever the input
    out_kernel[...] = 0.1 * jax.random.normal(keys[0], out_kernel.shape)
    z = jax.random.normal(keys[3], (3,) + LATENT)
    t = jnp.asarray([1, 5, 100])
    eps_a, heads_a = model(z, t, read_probs=jax.nn.one_hot(jnp.asarray([0, 1, 2]), 10))
    eps_b, heads_b = model(z, t, read_probs=jax.nn.one_hot(jnp.asarray([7, 8, 9]), 10))
    assert float(jnp.max(jnp.abs(eps_a - eps_b))) > 0.0  # the backbone takes the class (random initial embedding)
    np.testing.assert_allclose(np.asarray(heads_a["label"]), np.asarray(heads_b["label"]), atol=1e-6)
    _, heads_c = model(-z, t, read_probs=jax.nn.one_hot(jnp.asarray([0, 1, 2]), 10))
    assert float(jnp.max(jnp.abs(heads_a["label"] - heads_c["label"]))) > 1e-4


def test_latent_head_width_sets_its_convolutions_and_needs_the_latent_head():
    """head_width W: the latent head's convolutions have 2W, 2W, 4W, 4W, 4W output channels (0: the backbone's first
    width), its logits keep their shape; a width without head 'latent', or a negative one, is refused."""
    def head_for(width):
        mods = M.build_modalities([M.ModalitySpec("image", "image", shape=LATENT),
                                   M.ModalitySpec("label", "label", num_classes=10, head="latent", head_width=width)],
                                  LATENT)
        return mods.aux[0].make_head(feature_dim=24, fmap_channels=16, temb_dim=32, rngs=nnx.Rngs(0))

    for width, expected in ((0, 16), (40, 40)):
        head = head_for(width)
        assert [conv.out_features for conv in head.convs] == [2 * expected, 2 * expected, 4 * expected,
                                                               4 * expected, 4 * expected]
        feats = Features(jnp.zeros((2, 24)), jnp.zeros((2, 8, 8, 16)), jnp.zeros((2, 32)),
                         latent=jnp.ones((2,) + LATENT), time_emb=jnp.ones((2, 32)))
        chex.assert_shape(head(feats), (2, 10))
    for spec in (M.ModalitySpec("label", "label", num_classes=10, head_width=32),
                 M.ModalitySpec("label", "label", num_classes=10, head="latent", head_width=-1)):
        with pytest.raises(M.ModalityError, match="head_width"):
            M.build_modalities([M.ModalitySpec("image", "image", shape=LATENT), spec], LATENT)


def test_a_head_the_kind_does_not_have_is_refused():
    with pytest.raises(M.ModalityError, match=r"modality 'label' \(label\): head 'attention' is not one of"):
        M.build_modalities([M.ModalitySpec("image", "image", shape=LATENT),
                            M.ModalitySpec("label", "label", num_classes=10, head="attention")], LATENT)
    with pytest.raises(M.ModalityError, match=r"modality 'v' \(vector\): head 'conv' is not one of"):
        M.build_modalities([M.ModalitySpec("image", "image", shape=LATENT),
                            M.ModalitySpec("v", "vector", shape=(4,), head="conv")], LATENT)


def test_no_aux_modality_gives_empty_arrays():
    mods = M.build_modalities([M.ModalitySpec("image", "image", shape=LATENT)], LATENT)
    batch = {"image": jnp.zeros((2,) + LATENT)}
    chex.assert_shape(mods.encode(batch), (2, 0) + LATENT)
    chex.assert_shape(mods.nlls({}, batch, 2), (2, 0))


@pytest.mark.parametrize(
    "batch, match",
    [
        ({"image": np.zeros((4,) + LATENT, np.float32)}, r"batch lacks modality \['label'\]"),
        ({"image": np.zeros((4, 8, 8, 3), np.float32), "label": np.zeros(4, np.int32)},
         r"modality 'image' \(image\): expected a batch of shape \(4, 8, 8, 1\), got \(4, 8, 8, 3\)"),
        ({"image": np.full((4,) + LATENT, 2.0, np.float32), "label": np.zeros(4, np.int32)},
         r"pixels must be finite and in \[-1, 1\]"),
        ({"image": np.zeros((4,) + LATENT, np.uint8), "label": np.zeros(4, np.int32)}, r"dtype uint8"),
        ({"image": np.zeros((4,) + LATENT, np.float32), "label": np.array([0, 1, 10, 2])},
         r"modality 'label' \(label\): labels must lie in \[0, 9\]; got range \[0, 10\]"),
        ({"image": np.zeros((4,) + LATENT, np.float32), "label": np.zeros(4, np.float32)}, r"integer labels"),
    ],
)
def test_bad_batches_name_the_modality(batch, match):
    with pytest.raises(M.ModalityError, match=match):
        _mods().check_batch(batch, 4)


def test_bad_modality_configs():
    with pytest.raises(M.ModalityError, match=r"unknown kind 'audio'; the registered kinds are \['image', 'label', 'mask', 'pixels', 'vector'\]"):
        M.build_modalities([M.ModalitySpec("image", "image", shape=LATENT), M.ModalitySpec("a", "audio")], LATENT)
    with pytest.raises(M.ModalityError, match="the first modality must be the one primary image modality"):
        M.build_modalities([M.ModalitySpec("label", "label", num_classes=3)], LATENT)
    with pytest.raises(M.ModalityError, match="num_classes must be at least 2"):
        M.build_modalities([M.ModalitySpec("image", "image", shape=LATENT), M.ModalitySpec("l", "label")], LATENT)


def test_mask_and_vector_kinds():
    mods = M.build_modalities(
        [M.ModalitySpec("image", "image", shape=LATENT), M.ModalitySpec("mask", "mask", shape=(8, 8), num_classes=4),
         M.ModalitySpec("vec", "vector", shape=(16,))], LATENT)
    mask, vec = mods.aux
    m = jnp.asarray(np.random.default_rng(0).integers(0, 4, size=(2, 8, 8)))
    v = jnp.asarray(np.random.default_rng(1).normal(size=(2, 16)), jnp.float32)
    chex.assert_shape([mask.encode(m), vec.encode(v)], (2,) + LATENT)
    np.testing.assert_allclose(np.sqrt(np.mean(mask.codes**2)), 1.0, rtol=1e-6)
    # vector encodings have unit RMS on average for unit-variance vectors (the projection is scaled by 1/sqrt(D))
    big = jnp.asarray(np.random.default_rng(2).normal(size=(4000, 16)), jnp.float32)
    assert abs(float(jnp.sqrt(jnp.mean(vec.encode(big) ** 2))) - 1.0) < 0.05
    model = MTDiffusion(UNetConfig(channels=(16, 32), temb_dim=32), mods, rngs=nnx.Rngs(0))
    _, heads = model(jnp.zeros((2,) + LATENT), jnp.asarray([1, 50]))
    chex.assert_shape(heads["mask"], (2, 8, 8, 4))
    chex.assert_shape(heads["vec"], (2, 16))
    chex.assert_shape(mods.expected_encodings(heads, 2), (2, 2) + LATENT)
    chex.assert_shape(mods.nlls(heads, {"mask": m, "vec": v}, 2), (2, 2))
    confident = 50.0 * jax.nn.one_hot(m, 4)
    np.testing.assert_allclose(mask.expected_encoding(confident), mask.encode(m), atol=1e-5)
    np.testing.assert_array_equal(mask.decode(confident), m)
    np.testing.assert_allclose(vec.expected_encoding(v), vec.encode(v), atol=1e-6)
    with pytest.raises(M.ModalityError, match=r"modality 'mask' \(mask\): class ids must lie in \[0, 3\]"):
        mask.check_batch(np.full((2, 8, 8), 4), 2)
    with pytest.raises(M.ModalityError, match=r"shape \(4, 4\) must be the latent's grid \(8, 8\)"):
        M.MaskModality(M.ModalitySpec("mask", "mask", shape=(4, 4), num_classes=3), LATENT)


def test_latent_mask_head_reads_the_latent_and_the_embedding_not_the_feature_map():
    """A mask's head="latent": per-pixel logits [B, H, W, K] from the backbone's input latent and the time embedding
    (with what the composed model adds: a given class changes them), the same with and without jit; the feature map
    and pooled features are not read; head_width sets its width; without the latent it refuses."""
    mods = M.build_modalities([M.ModalitySpec("image", "image", shape=LATENT),
                               M.ModalitySpec("mask", "mask", shape=LATENT[:2], num_classes=5, head="latent")],
                              LATENT)
    head = mods.aux[0].make_head(feature_dim=24, fmap_channels=16, temb_dim=32, rngs=nnx.Rngs(0))
    assert head.conv_in.out_features == 16
    keys = jax.random.split(jax.random.key(3), 4)
    feats = Features(jax.random.normal(keys[0], (3, 24)), jax.random.normal(keys[1], (3, 8, 8, 16)),
                     jax.random.normal(keys[2], (3, 32)), latent=jax.random.normal(keys[3], (3,) + LATENT))
    logits = head(feats)
    chex.assert_shape(logits, (3,) + LATENT[:2] + (5,))
    chex.assert_type(logits, jnp.float32)
    jitted = nnx.jit(lambda h, temb, latent: h(Features(feats.pooled, feats.fmap, temb, latent)))
    np.testing.assert_allclose(jitted(head, feats.temb, feats.latent), logits, rtol=1e-5, atol=1e-5)
    others = Features(-feats.pooled, -feats.fmap, feats.temb, latent=feats.latent)
    np.testing.assert_array_equal(np.asarray(head(others)), np.asarray(logits))
    for changed in (Features(feats.pooled, feats.fmap, -feats.temb, latent=feats.latent),
                    Features(feats.pooled, feats.fmap, feats.temb, latent=-feats.latent)):
        assert float(jnp.max(jnp.abs(head(changed) - logits))) > 1e-4
    with pytest.raises(ValueError, match="reads the latent"):
        head(Features(feats.pooled, feats.fmap, feats.temb))
    wide = M.build_modalities([M.ModalitySpec("image", "image", shape=LATENT),
                               M.ModalitySpec("mask", "mask", shape=LATENT[:2], num_classes=5, head="latent",
                                              head_width=8)], LATENT)
    assert wide.aux[0].make_head(24, 16, 32, nnx.Rngs(0)).conv_in.out_features == 8
    model = MTDiffusion(UNetConfig(channels=(16, 32), temb_dim=32), mods, rngs=nnx.Rngs(0), num_classes=10,
                        heads_grad_max_t=0)
    z = jax.random.normal(keys[3], (3,) + LATENT)
    t = jnp.asarray([1, 5, 100])
    _, heads_a = model(z, t, labels=jnp.asarray([0, 1, 2]))
    _, heads_b = model(z, t, labels=jnp.asarray([7, 8, 9]))
    assert float(jnp.max(jnp.abs(heads_a["mask"] - heads_b["mask"]))) > 1e-4  # it reads the given class

    grads = nnx.grad(lambda m: jnp.sum(m(z, t, labels=jnp.asarray([0, 1, 2]))[1]["mask"] ** 2))(model)
    assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads["backbone"])) == 0.0  # heads_grad_max_t=0
    assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads["heads"])) > 0.0
