"""The main job: trains (resuming automatically), then evaluates, writing the metrics and the samples behind them.

    python -m mmdiff_jax.main --config digits_image_label --workdir runs/digits [--mode train|eval|sample|summary]
        [--config.train.num_steps=1000 ...]

--config takes a shipped config's name or a config file's path, either with an optional :preset
(`--config digits_image_label:any_direction`, `--config my_configs/run.py`). Any field can be overridden with
--config.<field>=<value>; docs/configs.md lists every field with its default and meaning.
"""

from __future__ import annotations

import logging as py_logging
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from mmdiff_jax import cpu_backend  # touches no device: configured in main()

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A shipped config's name or a config file, with an optional :preset (see above).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, samples and eval results.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "sample", "summary"],
                          "train: train (resume if possible), then evaluate into eval.json and samples/; eval: the "
                          "metrics of the latest checkpoint and the samples behind them, into eval_<tag>.json and "
                          "samples/<tag>/ (tag: --config.eval.tag or step<S>_seed<K>); sample: a small set of .npz + "
                          "PNG samples into samples/<tag>/ (tag: --config.eval.tag or sample_step<S>_seed<K>); "
                          "summary: parameters, FLOPs per example and memory per device of the train step, from "
                          "abstract shapes (nothing allocated), to workdir/summary.json. eval and sample never "
                          "replace earlier outputs.")
_EVAL_AFTER_TRAIN = flags.DEFINE_bool("eval_after_train", True,
                                      "In --mode train, evaluate (and write samples) when done.")
_CPU_DEVICES = flags.DEFINE_integer(
    "cpu_devices", cpu_backend.DEFAULT_CPU_DEVICES,
    "CPU devices to expose when running on CPU (default 1: XLA's threads use every core; N > 1 splits each batch "
    "over N devices, for trying sharding on one machine, without the XLA CPU flag). Ignored on GPU/TPU.")
_XLA_CPU_TUNED = flags.DEFINE_bool(
    "xla_cpu_tuned", True, "Add the XLA CPU flag that keeps small convolutions on XLA's own kernels (about 1.5x "
    "faster on the default model; see mmdiff_jax/cpu_backend.py). Only on one CPU device; not on accelerator installs.")
_COMPILATION_CACHE_DIR = flags.DEFINE_string(
    "compilation_cache_dir", None,
    "JAX's persistent compilation cache, so a rerun, resume, eval or sample of the same model skips compiling again "
    "(mmdiff_jax/compilation_cache.py). Default: JAX_COMPILATION_CACHE_DIR if set, else ~/.cache/mmdiff_jax/xla; "
    "'' turns it off.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "on", "off"],
    "Multi-process runs through jax.distributed. auto: start it when a coordinator is given (flag or "
    "JAX_COORDINATOR_ADDRESS) or a multi-process SLURM / Cloud TPU pod / Open MPI launch is detected; on: always "
    "(JAX detects the rest); off: never.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process runs).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in [0, --num_processes).")
flags.mark_flags_as_required(["config", "workdir"])


class _DropLibraryInfo(py_logging.Filter):
    """Keep the absl log readable: drop INFO records emitted from inside orbax."""

    def filter(self, record: py_logging.LogRecord) -> bool:
        return record.levelno > py_logging.INFO or "orbax" not in record.pathname


def main(argv):
    del argv
    logging.get_absl_handler().addFilter(_DropLibraryInfo())
    import jax  # after flag parsing; nothing touches a device before this point

    from mmdiff_jax import compilation_cache

    backend_note = cpu_backend.configure(_CPU_DEVICES.value, _XLA_CPU_TUNED.value)
    cache_note = compilation_cache.configure(_COMPILATION_CACHE_DIR.value)

    from mmdiff_jax import evaluate, failure_watch, parallel, sample, summary, train
    from mmdiff_jax.errors import UserError

    try:
        if parallel.initialize_distributed(_DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value,
                                           _PROCESS_ID.value):
            failure_watch.start(jax.process_index())  # another process's failure ends this one within seconds
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

    config, workdir = _CONFIG.value, _WORKDIR.value
    logging.info("JAX %s: process %d/%d, devices %s; %s; %s", jax.__version__, jax.process_index(),
                 jax.process_count(), jax.devices(), backend_note, cache_note)
    at_once = jax.process_count() > 1
    try:  # train() and load_generator() validate the whole config before anything compiles
        if _MODE.value == "train":
            train.train(config, workdir)
            if _EVAL_AFTER_TRAIN.value:  # eval writes the samples too: no second restore and compile
                evaluate.evaluate(config, workdir)
        elif _MODE.value == "eval":
            evaluate.evaluate(config, workdir, tagged=True)
        elif _MODE.value == "summary":
            summary.summary(config, workdir)
        else:
            sample.sample(config, workdir)
        failure_watch.finish()
    except train.Preempted as e:
        failure_watch.finish()
        logging.warning("Preempted: %s", e)
        print(f"preempted: {e}", file=sys.stderr)
        sys.exit(0)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        _report(at_once, e)
        _exit(2, at_once)
    except OSError as e:  # a file the run cannot read or write (the workdir, the data): the file and the reason
        if e.filename is None:
            raise
        print(f"error: {e.filename}: {e.strerror or e} (check --workdir and the data paths)", file=sys.stderr)
        _report(at_once, e)
        _exit(2, at_once)
    except Exception as e:  # noqa: BLE001 - reported in full, then the process leaves
        if not at_once:
            raise
        logging.exception("Process %d of %d failed", jax.process_index(), jax.process_count())
        _report(at_once, e)
        _exit(1, at_once)


def _report(at_once: bool, error: BaseException) -> None:
    """In a multi-process run, tell the other processes (they stop within seconds; mmdiff_jax/failure_watch.py)."""
    if at_once:
        import jax

        from mmdiff_jax import failure_watch

        failure_watch.report(jax.process_index(), jax.process_count(),
                             f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")


def _exit(status: int, at_once: bool) -> None:
    """Exit with `status`. In a multi-process run, at once: a normal exit runs jax.distributed's shutdown, which
    waits at a barrier for every other process, and those are stuck in a collective with this one (until gloo's 30 s
    deadline, or for good); a launcher could not see this failure and stop them."""
    if not at_once:
        sys.exit(status)
    logging.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    from mmdiff_jax import cli, configs

    __doc__ += f"\nThe shipped configs (mmdiff_jax/configs/):\n{configs.catalogue()}\n"  # shown by --help
    app.run(main, flags_parser=cli.parse_flags)
