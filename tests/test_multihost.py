"""Multi-host: 2 real processes on localhost (jax.distributed, gloo CPU collectives), 2 fake CPU devices each, train
exactly like 1 process with 4 devices; their checkpoint restores in 1 process on another mesh (fsdp) and continues;
the fsdp axis shards parameters and gives the losses of pure data parallelism."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from mmdiff_jax.configs import tiny
from mmdiff_jax import checkpointing, parallel, train
from mmdiff_jax.errors import UserError

pytestmark = pytest.mark.multiprocess  # run alone under pytest-xdist (tests/conftest.py)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER = os.path.join(REPO, "launch", "local_multiprocess.sh")
KEYS = ("loss/total", "loss/l0", "loss/l2", "grad_norm")


def _config(data=4, fsdp=1, num_steps=6):
    c = tiny.get_config()
    c.mesh.data, c.mesh.fsdp = data, fsdp
    c.train.num_steps = num_steps
    return c


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _assert_same_losses(a, b):
    assert [m["step"] for m in a] == [m["step"] for m in b]
    for x, y in zip(a, b):
        for key in KEYS:
            np.testing.assert_allclose(x[key], y[key], rtol=2e-5, err_msg=f"{key} at step {x['step']}")


def _checkpoint(workdir, step):
    """The train state stored at `step`, restored in this (single) process."""
    config = _config()
    diff = train.objective.build_diffusion(config)
    graphdef, params = train.create_model(config, diff)
    template = train.initial_state(config, params, train.make_optimizer(config.optim, config.train.num_steps))
    state, _ = checkpointing.Checkpointer(workdir).restore(step, template)
    return jax.device_get(state)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The tiny config for 6 steps: (workdir of 1 process x 4 devices, workdir of 2 processes x 2 devices)."""
    one = str(tmp_path_factory.mktemp("one_process"))
    train.train(_config(), one)
    two = str(tmp_path_factory.mktemp("two_processes"))
    env = dict(os.environ, PYTHON=sys.executable, CPU_DEVICES_PER_PROCESS="2", TIMEOUT_S="240",
               LOG_DIR=os.path.join(two, "logs"), JAX_PLATFORMS="cpu")  # and the test cache (conftest)
    cmd = [LAUNCHER, "2", "--config", os.path.join(REPO, "mmdiff_jax", "configs", "tiny.py"), "--workdir", two,
           "--eval_after_train=false", "--config.mesh.data=-1"]
    # not alongside the run above: on 2 busy cores a process can miss gloo's 30 s rendezvous deadline
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    logs = "\n".join(open(os.path.join(two, "logs", f"process_{i}.log")).read()[-3000:] for i in range(2))
    assert proc.returncode == 0, f"launcher exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}\n{logs}"
    return one, two, logs


def test_two_processes_match_one_process(runs):
    one, two, logs = runs
    assert "process 1 of 2" in logs and "process 0 of 2" in logs  # really two jax.distributed processes
    _assert_same_losses(_metrics(one), _metrics(two))
    assert len(_metrics(two)) == 6
    s1, s2 = _checkpoint(one, 6), _checkpoint(two, 6)
    for field in ("params", "ema_params", "opt_state"):
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), getattr(s1, field),
                     getattr(s2, field))
    np.testing.assert_array_equal(s1.rng, s2.rng)


def test_two_process_checkpoint_resumes_in_one_process_on_an_fsdp_mesh(runs, tmp_path):
    one, two, _ = runs
    resumed_one, resumed_two = str(tmp_path / "one"), str(tmp_path / "two")
    shutil.copytree(one, resumed_one)
    shutil.copytree(two, resumed_two)
    dp = train.train(_config(num_steps=8), resumed_one)  # 1 process, data parallel over 4 devices
    state = train.train(_config(data=2, fsdp=2, num_steps=8), resumed_two)  # resharded onto data=2 x fsdp=2
    assert int(state.step) == 8
    assert all(x.sharding.is_fully_replicated for x in jax.tree.leaves(dp.params))  # pure data parallelism
    _assert_same_losses(_metrics(resumed_one)[6:], _metrics(resumed_two)[6:])
    assert [m["step"] for m in _metrics(resumed_two)[6:]] == [7, 8]


def test_fsdp_matches_data_parallel_and_shards_parameters(runs, tmp_path):
    one, _, _ = runs  # the same 6 steps, data parallel over 4 devices in one process
    fsdp = train.train(_config(data=2, fsdp=2), str(tmp_path / "fsdp"))
    _assert_same_losses(_metrics(one), _metrics(str(tmp_path / "fsdp")))
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6),
                 _checkpoint(one, 6).params, jax.device_get(fsdp.params))
    leaves = jax.tree.leaves(fsdp.params)
    sharded = [x for x in leaves if "fsdp" in jax.tree.leaves(tuple(x.sharding.spec))]
    # every leaf with a dimension divisible by 2 is split in halves over 'fsdp'
    assert len(sharded) == sum(any(d % 2 == 0 for d in x.shape) for x in leaves) > len(leaves) // 2
    for x in sharded:
        assert x.addressable_shards[0].data.size * 2 == x.size
    for field in ("ema_params", "opt_state"):
        assert any("fsdp" in jax.tree.leaves(tuple(x.sharding.spec)) for x in jax.tree.leaves(getattr(fsdp, field)))


def test_fsdp_sharding_rule():
    mesh = parallel.make_mesh(2, 4)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4}
    assert parallel.fsdp_sharding((3, 3, 16, 32), mesh).spec == P(None, None, None, "fsdp")
    assert parallel.fsdp_sharding((48, 6), mesh).spec == P("fsdp", None)
    assert parallel.fsdp_sharding((3,), mesh).spec == P(None)
    assert parallel.fsdp_sharding((), mesh).spec == P()
    assert parallel.batch_rows(mesh, 64) == (0, 1)  # one process holds the whole batch


def test_distributed_arguments_are_checked():
    with pytest.raises(UserError, match="go together"):
        parallel.initialize_distributed("auto", coordinator_address="127.0.0.1:1234")
    with pytest.raises(UserError, match="process_id"):
        parallel.initialize_distributed("on", "127.0.0.1:1234", num_processes=2, process_id=2)
    with pytest.raises(UserError, match="auto, on or off"):
        parallel.initialize_distributed("maybe")
    assert parallel.initialize_distributed("auto") is False  # a single process on this machine: nothing to start
    with pytest.raises(UserError, match="mesh.fsdp"):
        parallel.make_mesh(-1, 3)


def test_launch_scripts_pass_bash_n_and_shellcheck():
    scripts = [os.path.join(REPO, "launch", f) for f in sorted(os.listdir(os.path.join(REPO, "launch")))
               if f.endswith(".sh") or f.endswith(".sbatch")]
    assert len(scripts) >= 3
    for script in scripts:
        subprocess.run(["bash", "-n", script], check=True)
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed (Debian package shellcheck; .ci/run installs it)")
    subprocess.run(["shellcheck", "-x", *scripts], check=True, cwd=os.path.join(REPO, "launch"))


def test_each_process_block_of_the_pipeline_is_its_rows_of_the_global_batch():
    from mmdiff_jax.data import pipeline, sources

    src = sources.get_source("digits", "train")
    whole = pipeline.train_iterator(src, 16, seed=3)
    blocks = [pipeline.train_iterator(src, 16, 3, b, 4) for b in range(4)]
    for _ in range(100):  # past the end of the first epoch (1,438 examples = 89.9 batches)
        batch, parts = next(whole), [next(it) for it in blocks]
        for key in batch:
            np.testing.assert_array_equal(batch[key], np.concatenate([p[key] for p in parts]))
    state = whole.get_state()
    assert all(it.get_state() == state for it in blocks)  # the stored position means the same under any count
    with pytest.raises(UserError, match="not divisible"):
        pipeline.train_iterator(src, 16, 0, 0, 3)


def _two_processes_one_failing(tmp_path, extra_env: dict, process_1_args: list[str]):
    """Process 0 trains tiny for good; process 1 is set up to fail. Returns (process 1's status, process 0's status,
    seconds process 0 outlived process 1, both logs); a process still running 60 s after process 1 is killed."""
    with socket.socket() as s:  # a free port for the coordinator
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu", **extra_env)
    common = ["--config", os.path.join(REPO, "mmdiff_jax", "configs", "tiny.py"), "--workdir", str(tmp_path / "run"),
              "--eval_after_train=false", "--cpu_devices=1", f"--coordinator_address=127.0.0.1:{port}",
              "--num_processes=2", "--config.train.num_steps=100000", "--config.train.log_every=1000"]
    logs = [tmp_path / f"process_{i}.log" for i in range(2)]
    procs = []
    for i, log in enumerate(logs):
        with open(log, "w") as out:  # the child keeps its own copy of the file descriptor
            procs.append(subprocess.Popen([sys.executable, "-m", "mmdiff_jax.main", *common, f"--process_id={i}",
                                           *(process_1_args if i == 1 else [])],
                                          cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT))
    try:
        failed = procs[1].wait(timeout=240)  # start-up and compilation, then the failure
        failed_at = time.monotonic()
        other = procs[0].wait(timeout=60)  # stopped by its failure watch, not by a launcher
        waited = time.monotonic() - failed_at
    finally:
        for p in procs:
            p.kill()
            p.wait()
    return failed, other, waited, [log.read_text() for log in logs]


def test_a_failing_process_exits_at_once_instead_of_waiting_for_the_others(tmp_path):
    """Process 1 fails (a bad config, after jax.distributed has started) while process 0 trains on. Process 1 exits
    with its error at once, not waiting in jax.distributed's shutdown for a process that will never get there, and
    its report stops process 0 too."""
    failed, other, waited, text = _two_processes_one_failing(tmp_path, {}, ["--config.data.global_batch_size=-3"])
    assert failed == 2, text[1][-3000:]
    assert "data.global_batch_size" in text[1] and "process 1 of 2" in text[1]
    assert other == 1 and "process 1 of 2 failed: ConfigError" in text[0], text[0][-3000:]
    assert waited < 60


def test_a_failure_in_one_process_ends_every_process_within_a_minute(tmp_path):
    """Process 1 raises at step 3 (MMDIFF_JAX_FAIL_AT). It reports the failure through jax.distributed's key-value
    store and exits; process 0, blocked in a collective, is stopped within seconds (by its failure watch, or by its
    broken collective after the report) and says which process failed. Both exit non-zero well within 60 s, without
    any launcher killing them."""
    failed, other, waited, text = _two_processes_one_failing(tmp_path, {"MMDIFF_JAX_FAIL_AT": "1:3"}, [])
    assert failed == 1, text[1][-3000:]
    assert "injected failure at step 3" in text[1]
    assert other != 0, text[0][-3000:]
    assert "process 1 of 2 failed: RuntimeError: injected failure at step 3" in text[0], text[0][-3000:]
    assert waited < 60
