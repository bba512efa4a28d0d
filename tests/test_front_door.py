"""The entry points as a newcomer meets them: configs by shipped name or path, one-line errors (exit 2, no traceback,
nothing written) for every bad config or workdir, `--mode sample` / `--mode eval` never replacing earlier outputs,
and TensorBoard event files that hold the training scalars and the sample grids."""

from __future__ import annotations

import glob
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from mmdiff_jax import cli, configs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(*args, cwd=REPO, timeout=600):
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-m", "mmdiff_jax.main", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=env)


def _one_line_error(result) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-2000:]
    return errors[0]


def test_configs_resolve_by_name_and_by_path(tmp_path):
    assert cli.resolve_config("tiny") == configs.path("tiny")
    assert cli.resolve_config("digits_image_label:any_direction") == configs.path("digits_image_label") + ":any_direction"
    assert cli.resolve_config(configs.path("tiny") + ":mask") == configs.path("tiny") + ":mask"
    for name in configs.names():  # every shipped config declares its presets, and each of them loads
        for preset in configs.presets(name):
            cli.resolve_config(f"{name}:{preset}" if preset else name)


def _bad_config_files(tmp_path):
    syntax = tmp_path / "syntax.py"
    syntax.write_text("def get_config(:\n")
    imports = tmp_path / "imports.py"
    imports.write_text("import no_such_module_anywhere\n\ndef get_config():\n    return None\n")
    raises = tmp_path / "raises.py"
    raises.write_text("def get_config():\n    raise RuntimeError('broken on purpose')\n")
    no_function = tmp_path / "empty.py"
    no_function.write_text("x = 1\n")
    return {
        str(tmp_path / "missing.py"): "neither a config file nor a shipped config",
        "digits_image_labl": "neither a config file nor a shipped config",
        str(syntax): "SyntaxError",
        str(imports): "ModuleNotFoundError",
        str(raises): "RuntimeError: broken on purpose",
        str(no_function): "AttributeError",
        "tiny:no_such_preset": "unknown preset",
    }


def test_a_bad_config_is_one_line_and_writes_nothing(tmp_path):
    workdir = tmp_path / "run"
    for spec, expected in _bad_config_files(tmp_path).items():
        line = _one_line_error(_main("--config", spec, "--workdir", str(workdir)))
        assert expected in line, (spec, line)
        assert "--config" in line
        assert not workdir.exists()


def test_a_bad_workdir_is_one_line_and_creates_nothing(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    line = _one_line_error(_main("--config", "tiny", "--workdir", str(a_file)))
    assert "is a file, not a directory" in line
    line = _one_line_error(_main("--config", "tiny", "--workdir", str(a_file / "run")))
    assert "cannot be created" in line and str(a_file) in line
    assert a_file.read_text() == "not a directory"


def _events(workdir) -> list:
    """Every Event record of the TensorBoard files in `workdir` (TFRecord framing, tensorboardX's protobufs)."""
    from tensorboardX.proto import event_pb2

    events = []
    for path in sorted(glob.glob(os.path.join(workdir, "events.out.tfevents.*"))):
        with open(path, "rb") as f:
            data = f.read()
        at = 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at:at + 8])
            payload = data[at + 12:at + 12 + length]
            at += 12 + length + 4  # length, its CRC, the record, its CRC
            event = event_pb2.Event()
            event.ParseFromString(payload)
            events.append(event)
    return events


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """tiny, 6 steps, logging every 2, without the evaluation."""
    workdir = str(tmp_path_factory.mktemp("front_door") / "run")
    result = _main("--config", "tiny", "--workdir", workdir, "--config.train.num_steps=6", "--config.train.log_every=2",
                   "--config.train.checkpoint_every=6", "--noeval_after_train")
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


def test_training_writes_tensorboard_scalars(trained):
    scalars = {}
    for event in _events(trained):
        for value in event.summary.value:
            if value.HasField("simple_value"):
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    for tag in ("loss/total", "optim/learning_rate", "optim/grad_norm", "optim/skipped_steps", "perf/steps_per_sec"):
        assert tag in scalars, sorted(scalars)
    assert [step for step, _ in scalars["loss/total"]] == [2, 4, 6]
    assert all(np.isfinite(v) for _, v in scalars["loss/total"])
    from mmdiff_jax import train
    from mmdiff_jax.configs import tiny

    schedule = train.learning_rate_schedule(tiny.get_config().optim, 6)  # the rate of the update just applied
    np.testing.assert_allclose([v for _, v in scalars["optim/learning_rate"]], [float(schedule(c)) for c in (1, 3, 5)],
                               rtol=1e-6)
    assert [v for _, v in scalars["optim/skipped_steps"]] == [0.0, 0.0, 0.0]


def test_sample_never_replaces_earlier_samples_and_logs_its_grids(trained):
    first = _main("--config", "tiny", "--workdir", trained, "--mode", "sample")
    assert first.returncode == 0, first.stderr[-3000:]
    out = os.path.join(trained, "samples", "sample_step6_seed1")
    assert out in first.stderr  # says where it wrote
    written = {f: os.path.getmtime(os.path.join(out, f)) for f in os.listdir(out)}
    assert {"joint.npz", "joint.png", "label_to_image.npz", "label_to_image.png"} <= set(written)
    line = _one_line_error(_main("--config", "tiny", "--workdir", trained, "--mode", "sample"))
    assert out in line and "eval.tag" in line
    assert {f: os.path.getmtime(os.path.join(out, f)) for f in os.listdir(out)} == written
    images = {value.tag: value.image for event in _events(trained) for value in event.summary.value
              if value.HasField("image")}
    assert "sample_step6_seed1/joint" in images and "sample_step6_seed1/label_to_image" in images
    assert images["sample_step6_seed1/joint"].height > 0 and images["sample_step6_seed1/joint"].encoded_image_string


def test_eval_never_replaces_an_earlier_evaluation(trained):
    earlier = os.path.join(trained, "eval_step6_seed1.json")
    with open(earlier, "w") as f:
        f.write('{"step": 6}')
    line = _one_line_error(_main("--config", "tiny", "--workdir", trained, "--mode", "eval"))
    assert earlier in line
    with open(earlier) as f:
        assert f.read() == '{"step": 6}'
    line = _one_line_error(_main("--config", "tiny", "--workdir", trained, "--mode", "eval",
                                 "--config.eval.tag=step6_seed1"))
    assert earlier in line


def test_help_lists_the_shipped_configs_and_presets():
    result = subprocess.run([sys.executable, "-m", "mmdiff_jax.main", "--help"], capture_output=True, text=True,
                            timeout=120, cwd="/", env=dict(os.environ, PYTHONPATH=REPO))
    assert "Traceback" not in result.stderr, result.stderr  # (absl's --help exits with status 1)
    for name in configs.names():
        assert f"  {name}" in result.stdout
    assert "any_direction_head_on_dropped" in result.stdout and "docs/configs.md" in result.stdout
