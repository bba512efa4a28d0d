"""A small model trained for real on the digits: the label it is given steers its images (label -> image samples are
read by the evaluator as the requested digit far above chance), and eval/sample write their files."""

import json
import os

import pytest

from mmdiff_jax.configs import tiny
from mmdiff_jax import evaluate, sample, train


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    config = tiny.get_config("learns")
    workdir = str(tmp_path_factory.mktemp("e2e"))
    train.train(config, workdir)
    return config, workdir


def test_label_steers_the_image_and_eval_writes_its_files(trained):
    config, workdir = trained
    results = evaluate.evaluate(config, workdir)
    assert results["evaluator_test_accuracy"] > 0.9
    assert results["label/label_to_image_accuracy"] > 0.5, results  # chance is 0.1
    with open(os.path.join(workdir, "eval.json")) as f:
        assert json.load(f)["label/label_to_image_accuracy"] == results["label/label_to_image_accuracy"]
    for name in ("joint.png", "label_to_image.png", "joint.npz"):
        assert os.path.getsize(os.path.join(workdir, "samples", name)) > 0


def test_sample_mode_writes_npz_and_png(trained):
    config, workdir = trained
    written = sample.sample(config, workdir)
    assert set(written) == {"joint", "label_to_image"}
    for path in written.values():
        assert os.path.exists(path) and os.path.exists(path.replace(".npz", ".png"))
