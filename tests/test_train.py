"""Training: 8 devices == 1 device for the same global batch and seed; train(N) == train(k) + resume + train(N-k)
(params, EMA, optimizer, RNG and data position, bit for bit); bad input is a clear error and overwrites nothing."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from mmdiff_jax.configs import tiny
from mmdiff_jax import checkpointing, train
from mmdiff_jax.checkpointing import CheckpointMismatchError
from mmdiff_jax.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**mesh):
    c = tiny.get_config()
    c.mesh.data = mesh.get("data", 1)
    return c


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def one_device_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("one_device"))
    state = train.train(_config(data=1), workdir)
    return workdir, jax.device_get(state)


def test_eight_devices_match_one_device(one_device_run, tmp_path):
    assert jax.device_count() == 8
    workdir_1, state_1 = one_device_run
    state_8 = jax.device_get(train.train(_config(data=8), str(tmp_path)))
    losses_1, losses_8 = _losses(workdir_1), _losses(str(tmp_path))
    assert len(losses_1) == len(losses_8) == 6
    for a, b in zip(losses_1, losses_8):
        for key in ("loss/total", "loss/l0", "loss/l2", "grad_norm"):
            np.testing.assert_allclose(a[key], b[key], rtol=2e-5, err_msg=key)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=2e-5), state_1.params, state_8.params)


def test_resume_is_exact(one_device_run, tmp_path):
    workdir_full, state_full = one_device_run
    config = _config(data=1)
    train.train(config, str(tmp_path), num_steps=4)  # stop at step 4: a checkpoint is written there
    assert checkpointing.Checkpointer(str(tmp_path)).latest_step() == 4
    state_resumed = jax.device_get(train.train(config, str(tmp_path)))  # resumes from 4, trains to 6
    assert int(state_resumed.step) == int(state_full.step) == 6
    for field in ("params", "ema_params", "opt_state", "rng"):
        jax.tree.map(np.testing.assert_array_equal, getattr(state_full, field), getattr(state_resumed, field))
    # the data position too: both checkpoints at step 6 hold the same iterator state
    data = [checkpointing.Checkpointer(d).restore_data(6) for d in (workdir_full, str(tmp_path))]
    assert data[0] == data[1] and data[0]["next_index"] == 6
    # and the recorded losses of the resumed steps equal the uninterrupted ones
    np.testing.assert_array_equal([r["loss/total"] for r in _losses(workdir_full)[4:]],
                                  [r["loss/total"] for r in _losses(str(tmp_path))[4:]])


def test_checkpoint_of_another_model_is_refused_and_kept(one_device_run, tmp_path):
    workdir, _ = one_device_run
    before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
    metrics_before = os.path.getsize(os.path.join(workdir, "metrics.jsonl"))
    config = _config(data=1)
    config.model.channels = (16, 16)
    with pytest.raises(CheckpointMismatchError, match=r"holds a checkpoint \(step 6\) of another model: parameter .* "
                                                      r"Use a new --workdir"):
        train.train(config, workdir)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before
    assert os.path.getsize(os.path.join(workdir, "metrics.jsonl")) == metrics_before


@pytest.mark.parametrize(
    "override, match",
    [
        (lambda c: c.modalities.label.update(kind="audio"), r"unknown kind 'audio'"),
        (lambda c: setattr(c.data, "source", "cifar"), r"data.source: unknown value 'cifar'"),
        (lambda c: (setattr(c.mesh, "data", 8), setattr(c.data, "global_batch_size", 12)),
         r"data.global_batch_size: 12 is not divisible by the 8 devices"),
        (lambda c: setattr(c, "primary", "photo"), r"primary: 'photo' is not one of"),
        (lambda c: c.modalities.label.update(weight_schedule="constant", weight_scale=0.5),
         r"prior mismatch .* \(config: diffusion"),
    ],
)
def test_bad_configs_fail_before_anything_is_written(tmp_path, override, match):
    config = _config()
    override(config)
    with pytest.raises(UserError, match=match):
        train.train(config, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")


def test_config_typo_is_refused_by_the_cli(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mmdiff_jax.main", "--config", "mmdiff_jax/configs/tiny.py", "--workdir", str(tmp_path),
         "--config.optim.lrr=0.1"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "error: bad config override" in result.stderr and "lrr" in result.stderr
    assert 'Did you mean "lr"' in result.stderr and "Traceback" not in result.stderr
    assert not os.listdir(tmp_path)


def test_cli_reports_user_errors_without_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mmdiff_jax.main", "--config", "mmdiff_jax/configs/tiny.py", "--workdir", str(tmp_path),
         "--config.data.source=cifar"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "error: 1 problem(s) in the config:\n  - data.source: unknown value 'cifar'" in result.stderr
    assert "Traceback" not in result.stderr
