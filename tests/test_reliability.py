"""Reliability: SIGTERM mid-run loses nothing (resume reaches exactly the uninterrupted params); a corrupt newest
checkpoint is reported and the previous one used; non-finite steps are skipped and counted, and too many in a row
stop the run; every malformed config field gets its own message."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from mmdiff_jax.configs import tiny
from mmdiff_jax import checkpointing, config_check, objective, train
from mmdiff_jax.data import pipeline
from mmdiff_jax.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**train_fields):
    c = tiny.get_config()
    c.mesh.data = 1
    for k, v in train_fields.items():
        setattr(c.train, k, v)
    return c


def _template(config):
    diff = objective.build_diffusion(config)
    _, params = train.create_model(config, diff)
    return train.initial_state(config, params, train.make_optimizer(config.optim, config.train.num_steps))


def _steps(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


# ------------------------------------------------------------------------------------------------------------------
# Preemption
# ------------------------------------------------------------------------------------------------------------------

SUBPROCESS_FLAGS = ["--config.train.num_steps=120", "--config.train.log_every=1", "--config.train.checkpoint_every=1000",
                    "--config.mesh.data=1", "--cpu_devices=1", "--noeval_after_train"]


def _launch(workdir, log_path):
    """Start the main job on the tiny config in a subprocess; its log goes to a file (a pipe could fill and block)."""
    with open(log_path, "w") as log:  # the test cache comes with the environment (conftest)
        return subprocess.Popen(
            [sys.executable, "-m", "mmdiff_jax.main", "--config", "mmdiff_jax/configs/tiny.py", "--workdir", workdir]
            + SUBPROCESS_FLAGS, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)


def _count_lines(path):
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return sum(1 for _ in f)


def test_sigterm_saves_and_resume_reaches_the_uninterrupted_params(tmp_path):
    full, interrupted = str(tmp_path / "full"), str(tmp_path / "interrupted")
    logs = [str(tmp_path / f"log{i}.txt") for i in range(3)]
    uninterrupted = _launch(full, logs[2])  # alongside the interrupted run: two processes, two cores
    proc = _launch(interrupted, logs[0])
    metrics = os.path.join(interrupted, "metrics.jsonl")
    deadline = time.time() + 120
    while time.time() < deadline and _count_lines(metrics) < 20:  # wait until training is under way
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0, open(logs[0]).read()[-3000:]
    assert "preempted: SIGTERM at step" in open(logs[0]).read()
    stopped_at = checkpointing.Checkpointer(interrupted).latest_step()
    assert 20 <= stopped_at < 120, stopped_at
    resumed = _launch(interrupted, logs[1])
    assert resumed.wait(timeout=180) == 0, open(logs[1]).read()[-3000:]
    assert uninterrupted.wait(timeout=180) == 0, open(logs[2]).read()[-3000:]

    config = _config(num_steps=120)
    template = _template(config)
    state_full, data_full = checkpointing.Checkpointer(full).restore(120, template)
    state_resumed, data_resumed = checkpointing.Checkpointer(interrupted).restore(120, template)
    for field in ("params", "ema_params", "opt_state", "rng", "step"):
        jax.tree.map(np.testing.assert_array_equal, getattr(state_full, field), getattr(state_resumed, field))
    assert data_full == data_resumed


# ------------------------------------------------------------------------------------------------------------------
# Corrupt checkpoints
# ------------------------------------------------------------------------------------------------------------------


def _corrupt(step_dir):
    """Truncate every array file of a checkpoint step to half its size."""
    truncated = 0
    for root, _, files in os.walk(os.path.join(step_dir, "state")):
        for name in files:
            path = os.path.join(root, name)
            size = os.path.getsize(path)
            with open(path, "r+b") as f:
                f.truncate(size // 2)
            truncated += 1
    assert truncated


def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    workdir = str(tmp_path)
    train.train(_config(), workdir)  # checkpoints at steps 3 and 6
    reference = _steps(workdir)
    _corrupt(os.path.join(workdir, "checkpoints", "6"))
    with caplog.at_level("ERROR"):
        state = train.train(_config(), workdir, num_steps=8)  # same LR schedule: steps 4..6 must repeat exactly
    assert int(state.step) == 8
    assert any("Checkpoint step 6" in r.getMessage() and "unreadable" in r.getMessage() for r in caplog.records)
    assert len(os.listdir(os.path.join(workdir, "corrupt_checkpoints"))) == 1  # kept for inspection, not deleted
    rerun = _steps(workdir)[len(reference):]  # resumed from step 3: steps 4..8
    assert [r["step"] for r in rerun] == [4, 5, 6, 7, 8]
    np.testing.assert_array_equal([r["loss/total"] for r in rerun[:3]], [r["loss/total"] for r in reference[3:6]])


def test_no_readable_checkpoint_never_starts_over(tmp_path):
    workdir = str(tmp_path)
    train.train(_config(), workdir)
    for step in (3, 6):
        _corrupt(os.path.join(workdir, "checkpoints", str(step)))
    with pytest.raises(UserError, match=r"none of the checkpoints .* could be read.*did not start over"):
        train.train(_config(num_steps=9), workdir)


def test_half_written_step_is_never_restored(tmp_path):
    workdir = str(tmp_path)
    train.train(_config(), workdir)
    # what a crash in the middle of orbax's write leaves behind: a temporary directory for a newer step
    os.makedirs(os.path.join(workdir, "checkpoints", "9.orbax-checkpoint-tmp-123", "state"))
    assert checkpointing.Checkpointer(workdir).latest_step() == 6


# ------------------------------------------------------------------------------------------------------------------
# Non-finite steps
# ------------------------------------------------------------------------------------------------------------------


class _Poisoned:
    """Wraps the training iterator: the batches numbered in `bad` (1-based) get NaN images."""

    def __init__(self, inner, bad):
        self.inner, self.bad = inner, set(bad)

    def __iter__(self):
        return self

    def __next__(self):
        batch = dict(next(self.inner))
        if self.inner.get_state()["next_index"] in self.bad:
            batch["image"] = np.full_like(batch["image"], np.nan)
        return batch

    def get_state(self):
        return self.inner.get_state()

    def set_state(self, state):
        self.inner.set_state(state)


def _poison(monkeypatch, bad):
    original = pipeline.train_iterator
    monkeypatch.setattr(pipeline, "train_iterator", lambda *a, **k: _Poisoned(original(*a, **k), bad))


def test_a_nan_batch_is_skipped_and_counted(tmp_path, monkeypatch):
    _poison(monkeypatch, bad={3})
    state = jax.device_get(train.train(_config(), str(tmp_path)))
    records = _steps(str(tmp_path))
    assert not np.isfinite(records[2]["loss/total"])  # step 3 saw the NaN batch ...
    assert [r["skipped_steps"] for r in records] == [0, 0, 1, 1, 1, 1]  # ... was skipped and counted
    assert [r["bad_streak"] for r in records] == [0, 0, 1, 0, 0, 0]
    assert all(np.isfinite(r["loss/total"]) for r in records[3:])  # training went on
    assert int(state.skipped) == 1
    jax.tree.map(lambda x: np.testing.assert_(np.all(np.isfinite(x))), state.params)


def test_too_many_bad_steps_in_a_row_stop_the_run(tmp_path, monkeypatch):
    _poison(monkeypatch, bad={4, 5, 6})
    with pytest.raises(train.NonFiniteError, match=r"3 consecutive steps up to step 6 .* The last good checkpoint is "
                                                   r"step 3"):
        train.train(_config(max_bad_steps=3), str(tmp_path))


# ------------------------------------------------------------------------------------------------------------------
# Malformed configs: one case per field, each with its own message (validated before anything compiles)
# ------------------------------------------------------------------------------------------------------------------

MALFORMED = [
    ("seed", lambda c: setattr(c, "seed", -1), r"seed: must be an integer >= 0"),
    ("latent_shape", lambda c: setattr(c, "latent_shape", (8, 8)), r"latent_shape: must be three positive integers"),
    ("primary", lambda c: setattr(c, "primary", "photo"), r"primary: 'photo' is not one of"),
    ("kind", lambda c: c.modalities.label.update(kind="audio"), r"unknown kind 'audio'"),
    ("num_classes", lambda c: c.modalities.label.update(num_classes=1), r"num_classes must be at least 2"),
    ("modality field", lambda c: c.modalities.label.update(colour=3), r"modalities.label: unknown field\(s\) \['colour'\]"),
    ("weight_schedule", lambda c: c.modalities.label.update(weight_schedule="cubic"),
     r"modalities.label.weight_schedule: unknown shape 'cubic'"),
    ("loss_weight", lambda c: c.modalities.label.update(loss_weight=-1.0), r"modalities.label.loss_weight: must be"),
    ("head_loss_when_dropped",  # a user's config writing the modality as a plain dict (the helper's types refuse it)
     lambda c: setattr(c.modalities, "label", {**c.modalities.label.to_dict(), "head_loss_when_dropped": "yes"}),
     r"modalities.label.head_loss_when_dropped: must be True or False, got 'yes'"),
    ("prior", lambda c: c.modalities.label.update(weight_schedule="constant", weight_scale=0.5),
     r"prior mismatch .* exceeds prior_tol"),
    ("source", lambda c: setattr(c.data, "source", "cifar"), r"data.source: unknown value 'cifar'"),
    ("batch size", lambda c: setattr(c.data, "global_batch_size", 0), r"data.global_batch_size: must be an integer >= 1"),
    ("divisibility", lambda c: (setattr(c.mesh, "data", 8), setattr(c.data, "global_batch_size", 12)),
     r"data.global_batch_size: 12 is not divisible by the 8 devices"),
    ("mesh", lambda c: setattr(c.mesh, "data", 9), r"mesh.data: must be -1 \(all devices\) or in \[1, 8\]"),
    ("groups", lambda c: setattr(c.model, "channels", (12, 32)), r"model.channels: width 12 is not divisible by "
                                                                  r"model.groups=8"),
    ("levels", lambda c: setattr(c.model, "channels", (16, 16, 16, 16, 16)), r"H and W must be divisible by 16"),
    ("temb", lambda c: setattr(c.model, "temb_dim", 33), r"model.temb_dim: must be even"),
    ("dtype", lambda c: setattr(c.model, "dtype", "float16"), r"model.dtype: unknown value 'float16'"),
    ("num_steps", lambda c: setattr(c.diffusion, "num_steps", 0), r"diffusion.num_steps: must be an integer >= 1"),
    ("beta schedule", lambda c: setattr(c.diffusion, "beta_schedule", "quad"), r"diffusion.beta_schedule: unknown"),
    ("loss weights", lambda c: c.diffusion.loss_weights.update(l5=1.0), r"unknown term\(s\) \['l5'\]"),
    ("lr", lambda c: setattr(c.optim, "lr", 0.0), r"optim.lr: must be a finite number in \(0.0, inf\)"),
    ("ema", lambda c: setattr(c.optim, "ema_decay", 1.0), r"optim.ema_decay: must be a finite number in \[0.0, 1.0\)"),
    ("train steps", lambda c: setattr(c.train, "num_steps", 0), r"train.num_steps: must be an integer >= 1"),
    ("max_bad_steps", lambda c: setattr(c.train, "max_bad_steps", 0), r"train.max_bad_steps: must be an integer"),
    ("sampler", lambda c: setattr(c.sample, "sampler", "euler"), r"sample.sampler: unknown value 'euler'"),
    ("sample steps", lambda c: setattr(c.sample, "num_steps", 101), r"sample.num_steps: must be an integer in "
                                                                     r"\[1, 100\]"),
    ("knn", lambda c: setattr(c.eval, "num_samples", 3), r"eval.num_samples: must be an integer >= 4"),
    ("probe steps", lambda c: setattr(c.eval, "head_probe_steps", (1, 101)),
     r"eval.head_probe_steps: must be a tuple of training steps in 1..diffusion.num_steps=100"),
]


@pytest.mark.parametrize("name, override, match", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_config_has_its_own_message(name, override, match):
    config = tiny.get_config()
    override(config)
    with pytest.raises(config_check.ConfigError, match=match):
        config_check.validate(config)


def test_all_problems_are_reported_at_once():
    config = tiny.get_config()
    config.optim.lr = -1.0
    config.train.log_every = 0
    config.sample.sampler = "euler"
    with pytest.raises(config_check.ConfigError, match=r"^3 problem\(s\) in the config") as info:
        config_check.validate(config)
    for field in ("optim.lr", "train.log_every", "sample.sampler"):
        assert field in str(info.value)


def test_the_default_configs_are_valid():
    from mmdiff_jax.configs import digits_image_label, digits_image_only

    for config in (digits_image_label.get_config(), digits_image_only.get_config(), tiny.get_config(),
                   tiny.get_config("learns")):
        config_check.validate(config)
