"""Training on data a user brings: a few steps on a folder of 32x32 RGB images write [N, 32, 32, 3] samples, captioned
grids and the evaluation metrics; an image + mask folder through its ArrayRecord shards gets mask metrics; resuming
on array_record reaches the uninterrupted run bit for bit; a corrupt file stops the main job with one line."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from mmdiff_jax.configs import folder_image_label, folder_image_mask
from mmdiff_jax import checkpointing, evaluate, train
from mmdiff_jax.data import prepare
from tests.test_data_sources import write_folder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ("blue", "green", "red")


def write_colour_folder(root: str, per_class: int = 8) -> None:
    """ROOT/{train,test}/<colour>/: 40x48 PNGs, mostly of their colour; every file a little different."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for k, colour in enumerate(CLASSES):
            os.makedirs(os.path.join(root, split, colour))
            for i in range(per_class):
                image = np.full((40, 48, 3), 30, np.int64)
                image[..., 2 - k] = 200
                image = np.clip(image + rng.integers(-20, 20, image.shape), 0, 255).astype(np.uint8)
                Image.fromarray(image).save(os.path.join(root, split, colour, f"{i:02d}.png"))


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("colours"))
    write_colour_folder(root)
    shards = os.path.join(str(tmp_path_factory.mktemp("colour_shards")), "shards")
    prepare.prepare("folder", root, shards, image_size=32, shard_size=10, workers=2)
    return root, shards


def _label_config(preset: str, where: str):
    c = folder_image_label.get_config(preset)
    c.data.image_size = 32
    if preset.startswith("array_record"):
        c.data.source_kwargs.path = where
    else:
        c.data.source_kwargs.root = where
    return c


def test_folder_run_writes_32x32_rgb_samples_captioned_grids_and_metrics(colours, tmp_path):
    root, _ = colours
    workdir = str(tmp_path)
    config = _label_config("smoke", root)
    train.train(config, workdir)
    results = evaluate.evaluate(config, workdir)
    joint = np.load(os.path.join(workdir, "samples", "joint.npz"))
    assert joint["image"].shape == (16, 32, 32, 3) and joint["image"].dtype == np.float32
    assert set(np.unique(joint["label"])) <= {0, 1, 2}
    assert json.load(open(os.path.join(workdir, "class_names.json"))) == list(CLASSES)
    for grid in ("joint.png", "label_to_image.png"):
        with Image.open(os.path.join(workdir, "samples", grid)) as img:
            assert img.mode == "RGB" and img.size[0] >= 10 * 32
    for key in ("image/frechet_distance", "image/precision", "image/recall", "evaluator_test_accuracy",
                "label/image_to_label_accuracy", "label/label_to_image_accuracy", "bpd/image"):
        assert np.isfinite(results[key]), key
    resolved = json.load(open(os.path.join(workdir, "config.json")))
    assert resolved["latent_shape"] == [32, 32, 3] and resolved["modalities"]["label"]["num_classes"] == 3
    assert resolved["model"]["channels"] == [8, 16, 16, 16]  # width 8 x (1, 2, 2, 2) at 32x32


def test_image_mask_folder_through_shards_gets_mask_metrics(tmp_path):
    root, shards, workdir = str(tmp_path / "data"), str(tmp_path / "shards"), str(tmp_path / "run")
    write_folder(root, per_class=4, vectors=False)
    prepare.prepare("folder", root, shards, image_size=16, mask_classes=4, workers=2)
    config = folder_image_mask.get_config("array_record_smoke")
    config.data.source_kwargs.path = shards
    config.modalities.mask.num_classes = 4
    train.train(config, workdir)
    results = evaluate.evaluate(config, workdir)
    for key in ("mask/image_to_mask_miou", "mask/image_to_mask_pixel_accuracy", "mask/joint_consistency_miou"):
        assert 0.0 <= results[key] <= 1.0, key
    assert np.load(os.path.join(workdir, "samples", "joint.npz"))["mask"].shape == (16, 16, 16)


def test_resume_on_array_record_is_exact(colours, tmp_path):
    _, shards = colours
    config = _label_config("array_record_smoke", shards)
    config.data.image_size = 0  # the shards' own 32x32
    full = jax.device_get(train.train(config, str(tmp_path / "full")))
    part = str(tmp_path / "part")
    train.train(config, part, num_steps=2)
    assert checkpointing.Checkpointer(part).latest_step() == 2
    resumed = jax.device_get(train.train(config, part))
    for field in ("params", "ema_params", "opt_state", "rng"):
        jax.tree.map(np.testing.assert_array_equal, getattr(full, field), getattr(resumed, field))
    data = [checkpointing.Checkpointer(str(tmp_path / w)).restore_data(4) for w in ("full", "part")]
    assert data[0] == data[1]


def test_a_corrupt_image_stops_the_main_job_with_one_line(colours, tmp_path):
    root = str(tmp_path / "data")
    write_colour_folder(root, per_class=2)
    bad = os.path.join(root, "train", "green", "01.png")
    with open(bad, "wb") as f:
        f.write(b"not an image")
    workdir = str(tmp_path / "run")
    run = subprocess.run(
        [sys.executable, "-m", "mmdiff_jax.main", "--config", "mmdiff_jax/configs/folder_image_label.py:smoke", "--workdir",
         workdir, f"--config.data.source_kwargs.root={root}", "--cpu_devices=1"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr[-2000:]
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and bad in errors[0] and "Traceback" not in run.stderr
    assert not os.path.exists(os.path.join(workdir, "checkpoints"))
