"""The ImageNet-64 recipe at smoke size: npz files in the downsampled-ImageNet format, written here, converted with
`prepare`, trained a few steps with the ADM backbone; `--mode summary` costs a config from abstract shapes (counts
that match the model, FLOPs, memory) without allocating it."""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from mmdiff_jax.configs import (imagenet64_class_conditional, imagenet64_image_label, imagenet64_image_only,
                                imagenet64_masked_image)
from mmdiff_jax import objective, sample, summary, train
from mmdiff_jax.models.mt_diffusion import MTDiffusion
from mmdiff_jax.data import prepare

SIDE = 16


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("npz")
    rng = np.random.default_rng(0)
    for name, n in (("train_data_batch_1.npz", 24), ("train_data_batch_2.npz", 16), ("val_data.npz", 8)):
        np.savez(str(root / name), data=rng.integers(0, 256, (n, 3 * SIDE * SIDE), dtype=np.uint8),
                 labels=rng.integers(1, 1001, n))
    out = os.path.join(str(tmp_path_factory.mktemp("shards")), "in16")
    prepare.prepare("imagenet64", str(root), out, shard_size=10, workers=2)
    return out


@pytest.fixture(scope="module")
def masked_run(shards, tmp_path_factory):
    """The masked-image config with the label (ADM, three modalities) trained 16 data-parallel steps on the prepared
    npz shards: (config, workdir, final state)."""
    config = imagenet64_masked_image.get_config("label_smoke")
    config.data.source_kwargs.path = shards
    config.train.num_steps = 16
    workdir = str(tmp_path_factory.mktemp("masked_dp"))
    return config, workdir, jax.device_get(train.train(config, workdir))


def test_smoke_recipe_trains_on_prepared_npz_with_a_falling_loss(shards, masked_run):
    config, workdir, state = masked_run
    assert int(state.step) == 16 and int(state.skipped) == 0
    assert sorted(state.params["heads"].keys()) == ["label", "masked"]
    info = json.load(open(os.path.join(shards, "info.json")))
    assert info["splits"]["train"]["count"] == 40 and info["num_classes"] == 1000
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        l0 = [json.loads(line)["loss/l0"] for line in f]
    assert len(l0) == 16
    # the zero-initialised output predicts ε̂ = 0 (noise matching 1.0 at the first step); at the smoke recipe's
    # constant 1e-3 it falls by about a tenth in 16 steps
    assert abs(l0[0] - 1.0) < 0.05 and np.mean(l0[-4:]) < 0.95 * np.mean(l0[:4]), l0


def test_summary_counts_flops_and_memory_without_allocating(shards, tmp_path):
    """On the class-conditional smoke config with a learned variance: the label embedding is counted, and the
    abstract batch carries the labels the step reads."""
    config = imagenet64_class_conditional.get_config("smoke")
    config.data.source_kwargs.path = shards
    config.model.learn_sigma = True
    config.diffusion.loss_weights.l1 = config.diffusion.loss_weights.l3 = 1e-3
    result = summary.summary(config, str(tmp_path))
    assert json.load(open(os.path.join(str(tmp_path), "summary.json"))) == json.loads(json.dumps(result))
    _, params = train.create_model(config, objective.build_diffusion(config))
    assert result["params"]["total"] == sum(x.size for x in jax.tree.leaves(params))
    assert result["params"]["class_embedding"] == 1000 * 64
    assert result["params"]["backbone"] + result["params"]["class_embedding"] == result["params"]["total"]
    assert result["flops_per_example"] * config.data.global_batch_size == pytest.approx(result["flops_per_step"])
    assert result["flops_per_example"] > 0 and result["memory_per_device"]["argument_size_in_bytes"] > 0
    assert result["latent_shape"] == [16, 16, 3] and result["devices"] == jax.device_count()


@pytest.mark.parametrize("module", [imagenet64_image_label, imagenet64_image_only, imagenet64_masked_image,
                                    imagenet64_class_conditional])
def test_full_configs_have_the_adm_imagenet64_backbone(module):
    """The ImageNet-64 configs (joint, and ADM's two baselines), with no data anywhere, built abstractly: ADM's
    295,131,267 backbone parameters; the unconditional baseline has nothing else, the class-conditional one adds
    guided-diffusion's label embedding (1,000 x 768 = 768,000)."""
    config = module.get_config()
    diff = objective.build_diffusion(config)
    model = nnx.eval_shape(lambda: MTDiffusion(train.backbone_config(config), diff.modalities, rngs=nnx.Rngs(0),
                                               num_classes=diff.num_classes))
    assert sum(x.size for x in jax.tree.leaves(nnx.state(model.backbone, nnx.Param))) == 295_131_267
    total = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert (total == 295_131_267) == (module is imagenet64_image_only)
    if module is imagenet64_class_conditional:
        assert total == 295_131_267 + 768_000 and diff.modalities.names == ["image"]
    if module is imagenet64_masked_image:  # the masked image's per-pixel head on the full-resolution features
        assert set(diff.modalities.names) == {"image", "masked"}


def test_class_conditional_smoke_with_learned_variance_trains_and_samples_by_class(shards, tmp_path):
    """ADM's class-conditional model with its learned variance and hybrid loss (ADM's ImageNet-64 model): the label
    read from the shards as an input, a falling loss, samples by class."""
    config = imagenet64_class_conditional.get_config("smoke")
    config.data.source_kwargs.path = shards
    config.model.learn_sigma = True
    config.diffusion.loss_weights.l1 = config.diffusion.loss_weights.l3 = 1e-3
    config.train.num_steps = 16
    state = jax.device_get(train.train(config, str(tmp_path)))
    assert int(state.step) == 16 and int(state.skipped) == 0
    assert jax.tree.leaves(state.params["class_embedding"])[0].shape == (1000, 64)
    with open(os.path.join(str(tmp_path), "metrics.jsonl")) as f:
        logs = [json.loads(line) for line in f]
    l0 = [m["loss/l0"] for m in logs]
    assert np.mean(l0[-4:]) < 0.95 * np.mean(l0[:4]), l0
    assert all(np.isfinite(m["loss/l1"]) and m["loss/l1"] > 0 for m in logs)
    gen = sample.load_generator(config, str(tmp_path))
    key = jax.random.key(0)
    by_class = gen.generate(key, 4, given={"label": np.array([3, 3, 7, 7], np.int32)})
    other = gen.generate(key, 4, given={"label": np.array([5, 5, 5, 5], np.int32)})
    assert by_class["image"].shape == (4, 16, 16, 3) and np.all(np.isfinite(by_class["image"]))
    np.testing.assert_array_equal(by_class["label"], [3, 3, 7, 7])
    assert not np.allclose(by_class["image"], other["image"])  # the same noise, another class: another image
    drawn = gen.generate(key, 4)["label"]  # not given: drawn at random
    assert drawn.shape == (4,) and drawn.min() >= 0 and drawn.max() < 1000


def test_smoke_recipe_under_fsdp_equals_data_parallel(masked_run, tmp_path):
    """8 fake devices: every parameter (and Adam moment) split over 'fsdp' gives the data-parallel run's losses and
    gradient norms at its first two steps (the smoke recipe's learning rate is constant, so a 2-step run is the
    16-step run's beginning). (Parameters are not compared element by element: Adam's first updates are
    lr x m / sqrt(v) per element, so a gradient element at rounding-noise level, whose summation order differs
    between the two layouts, can move its parameter by a visible fraction of lr: 8.9e-5 on one of 4,096 entries of a
    time-embedding kernel.)"""
    config, dp_workdir, dp = masked_run
    config = config.copy_and_resolve_references()
    config.train.num_steps = 2
    config.mesh.data, config.mesh.fsdp = 1, 8
    fsdp = train.train(config, str(tmp_path / "fsdp"))
    kernel = jax.tree.leaves(fsdp.params["backbone"]["mid1"]["conv1"]["kernel"])[0]  # [3, 3, 32, 32]
    assert kernel.sharding.spec[-1] == "fsdp" and kernel.addressable_shards[0].data.shape == (3, 3, 32, 4)
    logs = [[json.loads(line) for line in open(os.path.join(w, "metrics.jsonl"))]
            for w in (dp_workdir, str(tmp_path / "fsdp"))]
    assert [m["step"] for m in logs[0][:2]] == [m["step"] for m in logs[1]] == [1, 2]
    for a, b in zip(logs[0][:2], logs[1]):
        for key in ("loss/total", "loss/l0", "loss/l2", "grad_norm"):
            np.testing.assert_allclose(a[key], b[key], rtol=2e-5, err_msg=f"{key} at step {a['step']}")
