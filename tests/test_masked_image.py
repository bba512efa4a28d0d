"""Masked-image pretraining: the black squares, the masked copy in the grain stream, the pixels modality, the
inpainting metrics (masked MSE/PSNR by hand, LPIPS of an image with itself is 0), replacement inpainting in the
sampler, and tiny joint and reconstruction-only models that train, sample and are evaluated."""

import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mmdiff_jax.configs import digits_masked_image, tiny
from mmdiff_jax import config_check, evaluate, sample, train
from mmdiff_jax import modalities as M
from mmdiff_jax.config_check import ConfigError
from mmdiff_jax.data import masking, pipeline, sources
from mmdiff_jax.diffusion import samplers, schedules
from mmdiff_jax.evaluation import inpainting
from mmdiff_jax.models.mt_diffusion import MTDiffusion
from mmdiff_jax.models.unet import UNetConfig

LATENT = (8, 8, 1)


def test_square_holes_cover_count_squares_inside_the_image():
    rng = np.random.default_rng(0)
    one = masking.square_holes(rng, 500, (8, 8), 3, 1)
    assert one.shape == (500, 8, 8) and one.dtype == bool
    np.testing.assert_array_equal(one.sum(axis=(1, 2)), 9)  # one square: exactly 3 x 3 pixels
    three = masking.square_holes(rng, 500, (8, 8), 3, 3)
    sizes = three.sum(axis=(1, 2))
    assert sizes.min() >= 9 and sizes.max() <= 27 and sizes.max() > sizes.min()  # overlaps allowed
    assert one.any(axis=0).all()  # every pixel can be hit
    np.testing.assert_array_equal(masking.held_out_holes(50, (8, 8), 3, 2), masking.held_out_holes(50, (8, 8), 3, 2))
    assert not np.array_equal(masking.held_out_holes(50, (8, 8), 3, 2), masking.held_out_holes(50, (8, 8), 3, 3))
    images = rng.uniform(-1, 1, size=(500, 8, 8, 1)).astype(np.float32)
    masked = masking.apply_holes(images, three)
    assert masked.dtype == np.float32
    np.testing.assert_array_equal(masked[three], -1.0)
    np.testing.assert_array_equal(masked[~three], images[~three])


def test_the_stream_carries_fresh_squares_deterministically():
    src = sources.get_source("digits", "train").select(["image"])
    spec = masking.MaskingSpec(source="image", into="masked", square=3, count=2)

    def batches(n, state=None):
        it = pipeline.train_iterator(src, 64, 0, random_map=masking.AddMaskedImage(spec))
        if state is not None:
            it.set_state(state)
        return [next(it) for _ in range(n)], it.get_state()

    first, _ = batches(30)
    again, _ = batches(30)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a["masked"], b["masked"])
    _, state = batches(10)
    resumed, _ = batches(20, state)
    for a, b in zip(first[10:], resumed):
        np.testing.assert_array_equal(a["masked"], b["masked"])
    plain = pipeline.train_iterator(src, 64, 0)
    for batch in first[:3]:  # the images are those of the stream without masking; only `masked` is added
        np.testing.assert_array_equal(batch["image"], next(plain)["image"])
    image, masked = first[0]["image"], first[0]["masked"]
    assert np.all((masked == image) | (masked == -1.0))
    # every example comes back in the next epoch (1438 per epoch) with new squares
    seen: dict[bytes, list] = {}
    for batch in first + batches(50)[0][30:]:
        for img, m in zip(batch["image"], batch["masked"]):
            seen.setdefault(img.tobytes(), []).append(m)
    repeated = [v for v in seen.values() if len(v) >= 2]
    assert len(repeated) > 1000
    assert np.mean([not np.array_equal(v[0], v[1]) for v in repeated]) > 0.8


def test_pixels_kind_encoder_head_and_likelihood():
    mods = M.build_modalities(
        [M.ModalitySpec("image", "image", shape=LATENT), M.ModalitySpec("masked", "pixels", shape=LATENT)], LATENT)
    (px,) = mods.aux
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, size=(2,) + LATENT), jnp.float32)
    np.testing.assert_array_equal(px.encode(x), x)
    model = MTDiffusion(UNetConfig(channels=(16, 32), temb_dim=32), mods, rngs=nnx.Rngs(0))
    _, heads = model(jnp.zeros((2,) + LATENT), jnp.asarray([1, 50]))
    chex.assert_shape(heads["masked"], (2,) + LATENT)
    chex.assert_shape(mods.expected_encodings(heads, 2), (2, 1) + LATENT)
    mean = x + 0.5
    expected = 0.5 * np.sum(np.log(2 * np.pi) + 0.25 * np.ones((2, 64)), axis=1)  # float64, by hand
    np.testing.assert_allclose(px.nll(mean, x), expected, rtol=1e-6)
    np.testing.assert_allclose(jax.jit(px.nll)(mean, x), expected, rtol=1e-6)
    np.testing.assert_array_equal(px.decode(jnp.full((1,) + LATENT, 3.0)), 1.0)  # clipped to the data range
    with pytest.raises(M.ModalityError, match=r"modality 'masked' \(pixels\): pixels must be finite and in"):
        px.check_batch(np.full((2,) + LATENT, 2.0, np.float32), 2)
    with pytest.raises(M.ModalityError, match=r"shape \(4, 4, 1\) must equal the latent shape"):
        M.PixelsModality(M.ModalitySpec("masked", "pixels", shape=(4, 4, 1)), LATENT)


def test_masked_mse_and_psnr_by_hand():
    truth = np.zeros((2, 2, 2, 1))
    pred = truth.copy()
    pred[0, 0, 0, 0] = 1.0  # a hole pixel off by 1
    pred[0, 1, 1, 0] = 5.0  # outside the holes: ignored
    holes = np.zeros((2, 2, 2), bool)
    holes[0, 0, :] = True
    holes[1, :, :] = True
    np.testing.assert_allclose(inpainting.masked_mse(pred, truth, holes), [0.5, 0.0])
    np.testing.assert_allclose(inpainting.psnr(np.array([0.5, 4.0])), [10 * np.log10(8.0), 0.0])
    assert np.isnan(inpainting.masked_mse(pred, truth, np.zeros((2, 2, 2), bool))).all()


def test_lpips_of_an_image_with_itself_is_zero():
    images = sources.get_source("digits", "test").arrays["image"][:16]
    lpips = inpainting.LPIPS(batch_size=8)
    same = lpips(images, images)
    assert same.shape == (16,) and same.dtype == np.float64
    np.testing.assert_allclose(same, 0.0, atol=1e-6)
    other = lpips(images, images[::-1])
    noisy = lpips(images, np.clip(images + 0.3 * np.random.default_rng(0).normal(size=images.shape), -1, 1))
    assert np.all(other[other > 0] > 0.01) and np.all(noisy > 0.01)
    with pytest.raises(ValueError, match="one shape"):
        lpips(images, images[:, :4])


def test_replacement_keeps_the_known_pixels_exactly():
    betas = schedules.linear_betas(100)
    chain = samplers.respace(betas, np.zeros((100, 0)), 10)

    def predict(z, t):  # any model: here a fixed nonlinear one
        return jnp.tanh(z), jnp.zeros((z.shape[0], 0) + z.shape[1:]), {}

    values = jax.random.uniform(jax.random.key(0), (4, 8, 8, 1), minval=-1, maxval=1)
    known = jnp.asarray(np.random.default_rng(0).uniform(size=(4, 8, 8, 1)) < 0.6)
    run = jax.jit(lambda kp: samplers.sample(chain, predict, jax.random.key(1), 4, LATENT, known_pixels=kp)[0])
    out = run((values, known))
    np.testing.assert_allclose(out[known], values[known], atol=1e-6)
    assert np.all(np.isfinite(out)) and not np.allclose(out[~known], values[~known], atol=1e-2)
    plain = samplers.sample(chain, predict, jax.random.key(1), 4, LATENT)[0]
    np.testing.assert_array_equal(run((values, jnp.zeros_like(known))), plain)  # nothing known: the plain sampler


def test_masking_config_errors_name_the_field():
    config = digits_masked_image.get_config()
    config_check.validate(config, device_count=2, process_count=1)
    for preset in ("reconstruction_only", "image_only"):
        config_check.validate(digits_masked_image.get_config(preset), device_count=2, process_count=1)
    config.data.masking.square = 9
    config.data.masking.into = "image_typo"
    config.eval.inpainting_counts = (0,)
    with pytest.raises(ConfigError) as err:
        config_check.validate(config, device_count=2, process_count=1)
    for field in ("data.masking.square=9 does not fit", "data.masking.into='image_typo'", "eval.inpainting_counts"):
        assert field in str(err.value)


def _masked_test_digits(num: int) -> np.ndarray:
    """The first held-out digits with two fixed 3x3 squares each: [num, 8, 8, 1]."""
    test = sources.get_source("digits", "test").arrays["image"][:num]
    return masking.apply_holes(test, masking.held_out_holes(num, (8, 8), 3, 2))


def _train_tiny(preset, tmp_path_factory):
    config = tiny.get_config(preset)
    workdir = str(tmp_path_factory.mktemp(preset))
    train.train(config, workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return config, workdir, [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def masked_run(tmp_path_factory):
    return _train_tiny("masked", tmp_path_factory)


def test_masked_image_model_trains_inpaints_and_is_evaluated(masked_run):
    config, workdir, metrics = masked_run
    nll = [m["nll/masked"] for m in metrics]
    excess = np.asarray(nll) - 0.5 * 64 * np.log(2 * np.pi)  # above a perfect mean's NLL (unit variance)
    assert len(nll) == 40 and np.mean(excess[-5:]) < 0.5 * np.mean(excess[:5]), nll
    gen = sample.load_generator(config, workdir)
    joint = gen.generate(jax.random.key(0), 6)
    assert joint["image"].shape == (6,) + LATENT and joint["masked"].shape == (6,) + LATENT
    masked = _masked_test_digits(6)
    cond = gen.generate(jax.random.key(1), 6, given={"masked": masked})
    np.testing.assert_array_equal(cond["masked"], masked)
    assert cond["image"].shape == (6,) + LATENT and np.all(np.abs(cond["image"]) <= 1.0)
    results = evaluate.evaluate(config, workdir)
    for count in (1, 3):
        prefix = f"inpaint_{count}sq"
        assert 0.0 < results[f"{prefix}/masked_fraction"] < 1.0
        assert results[f"{prefix}/masked_mse"] >= 0.0 and results[f"{prefix}/lpips"] >= 0.0
        assert os.path.getsize(os.path.join(workdir, "samples", f"{prefix}.png")) > 0
    assert results["inpaint_3sq/masked_fraction"] > results["inpaint_1sq/masked_fraction"]
    assert "image/frechet_distance" in results
    # the ELBO of held-out examples with their masked copies (fixed squares), split by modality
    np.testing.assert_allclose(results["bpd/total"], (64 * results["bpd/image"] + 64 * results["bpd/masked"]) / 128,
                               rtol=1e-5)


@pytest.fixture(scope="module")
def reconstruction_run(tmp_path_factory):
    return _train_tiny("reconstruction_only", tmp_path_factory)


def test_reconstruction_only_baseline_reads_the_full_image(reconstruction_run):
    config, workdir, metrics = reconstruction_run
    nll = np.asarray([m["nll/image"] for m in metrics]) - 0.5 * 64 * np.log(2 * np.pi)
    assert np.mean(nll[-5:]) < 0.5 * np.mean(nll[:5]), nll
    assert all(m["loss/l0"] > 0 for m in metrics)  # computed, but weighted 0: only the reconstruction is trained
    gen = sample.load_generator(config, workdir)
    masked = _masked_test_digits(6)
    out = gen.generate(jax.random.key(1), 6, given={"masked": masked})
    np.testing.assert_array_equal(out["masked"], masked)
    assert out["image"].shape == (6,) + LATENT and np.all(np.abs(out["image"]) <= 1.0)
    results = evaluate.evaluate(config, workdir)
    assert "image/frechet_distance" not in results  # its primary is the masked image: no image metrics
    assert results["inpaint_1sq/masked_mse"] >= 0.0 and np.isfinite(results["bpd/image"])
