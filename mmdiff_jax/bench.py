"""Performance benchmark (SPEC §6): prints a table and writes bench.json.

    python -m mmdiff_jax.bench [--config digits_image_label] [--out bench.json] [--torch] [--profile]
                               [--noxla_cpu_tuned]

Measures, in one process: this machine's matmul peak (`jnp.dot` in the config's compute dtype, 2048x2048 on CPU and
8192x8192 on an accelerator, best of 10); the default model's train step at its default batch on one device and on
all (compile time, median step time, samples/s, FLOPs per step from XLA's cost analysis of the lowered program on one
CPU device, MFU = achieved FLOP/s / measured peak); the `lax.scan` sampler against a Python loop over the same
jitted step; and `q_sample` at t = 1 vs t = T (XLA flops and time). `--torch` adds the PyTorch reference of the same
step (on CUDA when JAX runs on a GPU), `--profile` the multi-device step's time by op kind, `--noxla_cpu_tuned`
times XLA's CPU defaults. The input pipeline (`--nodata` skips it): images/s delivered, decoded and batched, by an
image folder of JPEGs and by its ArrayRecord shards, in-process and with 2 grain workers.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from typing import Any, Callable

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from mmdiff_jax import cli, configs, cpu_backend, timing

_CONFIG = config_flags.DEFINE_config_file("config", configs.path("digits_image_label"),
                                          "Config to benchmark: a shipped config's name or a file, with :preset.")
_OUT = flags.DEFINE_string("out", "bench.json", "Where to write the JSON results.")
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices", cpu_backend.DEFAULT_CPU_DEVICES, "CPU devices (as in main).")
_XLA_CPU_TUNED = flags.DEFINE_bool("xla_cpu_tuned", True, "As in main: the XLA CPU flag of mmdiff_jax/cpu_backend.py "
                                   "(--noxla_cpu_tuned times XLA's defaults).")
_PROFILE = flags.DEFINE_bool("profile", False, "Also trace the multi-device train step and report its time by op "
                             "kind (mmdiff_jax/step_profile.py).")
_STEPS = flags.DEFINE_integer("steps", 30, "Timed train steps.")
_DATA = flags.DEFINE_bool("data", True, "Also time the input pipeline: a folder of 64x64 JPEGs and its ArrayRecord "
                          "shards, in-process and with 2 grain workers (--nodata skips it).")
_TORCH = flags.DEFINE_bool("torch", False, "Also time the PyTorch reference of the same step "
                           "(benchmarks/torch_reference.py; needs `pip install -r benchmarks/requirements.txt`).")


def train_step_flops(config, diff, graphdef, params, tx, local: dict) -> float:
    """XLA's FLOP count of the whole train step as written (the lowered program on one CPU device, whatever the
    default backend): a compiled multi-device step reports one device's share, a GPU compile counts no cuDNN
    convolution, and lowered programs give no cost analysis on plugin (GPU, TPU) backends."""
    import jax

    from mmdiff_jax import parallel, train

    try:
        cpu = jax.devices("cpu")
    except RuntimeError:
        raise SystemExit("error: the bench counts FLOPs on the CPU backend, which JAX_PLATFORMS leaves out: unset it "
                         "or add cpu (JAX_PLATFORMS=cuda,cpu).") from None
    mesh = parallel.make_mesh(1, devices=cpu)
    state = parallel.replicate(train.initial_state(config, params, tx), mesh)
    step_fn = train.jit_train_step(graphdef, diff, tx, config.optim.ema_decay, mesh, state)
    return timing.flops(step_fn.lower(state, parallel.to_global_batch(local, mesh)))


def bench_train(config, steps: int, profile: bool = False) -> tuple[dict, Callable[[], Any]]:
    """Times the train step on one device and on all of them; returns the results and the all-device step (the main
    job's default), ready to run again."""
    import jax

    from mmdiff_jax import objective, parallel, train
    from mmdiff_jax.data import pipeline, sources

    diff = objective.build_diffusion(config)
    graphdef, params = train.create_model(config, diff)
    tx = train.make_optimizer(config.optim, config.train.num_steps)
    src = sources.get_source(config.data.source, "train", **dict(config.data.source_kwargs))
    local = next(pipeline.train_iterator(src, config.data.global_batch_size, 0))
    results = {}
    passes = (("one_device", 1), ("all_devices", -1)) if jax.device_count() > 1 else (("one_device", 1),)
    for name, n_dev in passes:
        mesh = parallel.make_mesh(n_dev)
        fresh = jax.tree.map(lambda x: x.copy(), params)  # the step donates its state: every pass gets its own
        state = parallel.replicate(train.initial_state(config, fresh, tx), mesh)
        step_fn = train.jit_train_step(graphdef, diff, tx, config.optim.ema_decay, mesh, state)
        batch = parallel.to_global_batch(local, mesh)
        start = time.perf_counter()
        compiled = step_fn.lower(state, batch).compile()
        compile_s = time.perf_counter() - start
        holder = {"state": state}

        def run():
            holder["state"], metrics = compiled(holder["state"], batch)
            return metrics

        run()
        times = timing.timeit(run, steps)
        median = statistics.median(times)
        results[name] = {
            "devices": mesh.devices.size,
            "compile_s": compile_s,
            "step_ms": 1e3 * median,
            "samples_per_s": config.data.global_batch_size / median,
        }
        if profile and n_dev == -1:
            from mmdiff_jax import step_profile

            results["profile"] = step_profile.profile(lambda: jax.block_until_ready(run()), compiled.as_text())
    results["flops_per_step"] = train_step_flops(config, diff, graphdef, params, tx, local)
    results["params"] = int(sum(x.size for x in jax.tree.leaves(params)))
    results["batch"] = config.data.global_batch_size
    return results, run


def bench_sampler(config, num_steps: int = 50, batch: int = 256) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from mmdiff_jax import objective, train
    from mmdiff_jax.diffusion import samplers

    diff = objective.build_diffusion(config)
    graphdef, params = train.create_model(config, diff)
    chain = samplers.respace(diff.betas, diff.weights, num_steps)
    shape = tuple(config.latent_shape)

    def predict(p, z, t):
        return objective.predict(nnx.merge(graphdef, p), diff, z, t)

    scan_fn = jax.jit(lambda p, k: samplers.sample(chain, lambda z, t: predict(p, z, t), k, batch, shape)[0])
    scan_fn(params, jax.random.key(0)).block_until_ready()
    scan_s = min(timing.timeit(lambda: scan_fn(params, jax.random.key(0)), 3))

    init_key, loop_key = jax.random.split(jax.random.key(0))  # as `samplers.sample` does

    @jax.jit
    def one_step(p, z, k):  # the very step `samplers.sample` scans, dispatched from Python
        step = samplers.make_reverse_step(chain, lambda z, t: predict(p, z, t), loop_key, batch, shape)
        return step(z, k)[0]

    def loop():
        z = jax.random.normal(init_key, (batch,) + shape)
        for k in range(chain.num_steps, 0, -1):
            z = one_step(params, z, jnp.int32(k))
        return z

    same = float(jnp.max(jnp.abs(loop() - scan_fn(params, jax.random.key(0)))))  # like for like: same samples
    loop_s = min(timing.timeit(loop, 3))
    return {"num_steps": num_steps, "batch": batch, "scan_samples_per_s": batch / scan_s,
            "python_loop_samples_per_s": batch / loop_s, "scan_speedup": loop_s / scan_s,
            "scan_vs_loop_max_abs_diff": same}


def bench_sharded_sampler(config, num_steps: int = 50, batch: int = 256) -> dict:
    """The evaluation's sampler (`sample.Generator.generate`: ancestral, `num_steps` steps, a batch of `batch`) with
    the batch on one device against split over every device: samples/s of each, best of 3 after a compile."""
    import jax

    from mmdiff_jax import objective, sample, train

    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.sample.num_steps, config.sample.batch_size = num_steps, batch
        config.sample.sampler = "ddpm"
    diff = objective.build_diffusion(config)
    graphdef, params = train.create_model(config, diff)
    out = {"num_steps": num_steps, "batch": batch}
    for name, devices in (("one_device", jax.devices()[:1]), ("all_devices", jax.devices())):
        gen = sample.Generator(config=config, diff=diff, graphdef=graphdef, params=params, step=0, devices=devices)
        gen.generate(jax.random.key(0), batch)  # compile
        seconds = min(timing.timeit(lambda: gen.generate(jax.random.key(0), batch), 3))
        out[name] = {"devices": len(devices), "samples_per_s": batch / seconds}
    return out


def bench_q_sample(config, batch: int = 128) -> dict:
    import jax
    import jax.numpy as jnp

    from mmdiff_jax import objective
    from mmdiff_jax.diffusion import process

    diff = objective.build_diffusion(config)
    shape = tuple(config.latent_shape)
    n = diff.sched.num_modalities
    z, noise = jnp.ones((batch,) + shape), jnp.ones((batch,) + shape)
    enc = jnp.ones((batch, n) + shape)
    out = {}
    for label, t_value in (("t_1", 1), ("t_T", diff.num_steps)):
        fn = jax.jit(lambda z, e, x, tv=t_value: process.q_sample(diff.sched, jnp.full((batch,), tv, jnp.int32), z,
                                                                   e, x))
        compiled = fn.lower(z, enc, noise).compile()
        compiled(z, enc, noise).block_until_ready()
        out[label] = {"flops": timing.flops(compiled),
                      "us": 1e6 * statistics.median(timing.timeit(lambda: compiled(z, enc, noise), 50))}
    return out


def bench_torch(config, steps: int, jax_step: Callable[[], Any], rounds: int = 5) -> dict:
    """The PyTorch reference (same network, loss, optimizer and batch) in this process, timed in `rounds` blocks that
    alternate with blocks of the JAX step `jax_step`, so that a host whose speed drifts slows both alike; the ratio
    JAX / PyTorch samples/s compares the medians of these interleaved steps."""
    import jax

    try:
        import torch

        from benchmarks import torch_reference
    except ImportError as e:
        raise SystemExit(f"error: --torch needs PyTorch ({e}); pip install -r benchmarks/requirements.txt") from None
    from mmdiff_jax import objective
    from mmdiff_jax.data import pipeline, sources

    diff = objective.build_diffusion(config)
    labels_mod = [m for m in diff.modalities.aux if m.kind == "label"]
    if len(diff.modalities.aux) != 1 or not labels_mod:
        raise SystemExit("error: the PyTorch reference models image + one label (configs/digits_image_label.py).")
    src = sources.get_source(config.data.source, "train", **dict(config.data.source_kwargs))
    batch = next(pipeline.train_iterator(src, config.data.global_batch_size, 0))
    device = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
    step = torch_reference.TrainStep(config, np.asarray(diff.sched.abar), np.asarray(diff.sched.s),
                                     np.asarray(diff.sched.c), labels_mod[0].codes, np.asarray(batch["image"]),
                                     np.asarray(batch["label"]), device=device)
    torch_reference.time_steps(step, 0)  # warm-up
    per_round = max(1, steps // rounds)
    torch_times, jax_times = [], []
    for _ in range(rounds):
        jax_times += timing.timeit(jax_step, per_round)
        torch_times += torch_reference.time_steps(step, per_round, warmup=0)
    torch_s, jax_s = statistics.median(torch_times), statistics.median(jax_times)
    return {"torch": torch.__version__, "device": device, "threads": torch.get_num_threads(),
            "cuda_tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32},
            "params": torch_reference.param_count(step.model), "rounds": rounds, "steps_per_round": per_round,
            "step_ms": 1e3 * torch_s, "samples_per_s": config.data.global_batch_size / torch_s,
            "jax_interleaved_step_ms": 1e3 * jax_s, "jax_over_torch": torch_s / jax_s}


def write_image_folder(root: str, num: int, side: int = 80, classes: int = 10, seed: int = 0) -> None:
    """ROOT/{train,test}/<class>/<i>.jpg: `num` smooth random side x side RGB JPEGs (quality 90) in train, a tenth as
    many in test: photo-like files for the input pipeline's speed."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", num), ("test", max(classes, num // 10))):
        for i in range(n):
            folder = os.path.join(root, split, f"class_{i % classes:02d}")
            os.makedirs(folder, exist_ok=True)
            coarse = rng.integers(0, 256, (side // 8, side // 8, 3), dtype=np.uint8)
            Image.fromarray(coarse).resize((side, side), Image.BICUBIC).save(
                os.path.join(folder, f"{i:06d}.jpg"), quality=90)


def _images_per_second(iterator, seconds: float = 4.0) -> float:
    """Steady-state rate: batches for `seconds` after 2 s of warm-up (worker start-up, prefetch buffers filling)."""
    for limit in (2.0, seconds):
        start, n = time.perf_counter(), 0
        while time.perf_counter() - start < limit:
            n += len(next(iterator)["image"])
    return n / (time.perf_counter() - start)


def bench_data(num_images: int = 4000, image_size: int = 64, batch: int = 128, seconds: float = 4.0,
               workers: int = 2) -> dict:
    """Images per second (decoded, batched, in this process) from the folder source and from its ArrayRecord shards
    (`prepare`), each in this process and with `workers` grain worker processes; 64x64 RGB by default."""
    import tempfile

    from mmdiff_jax.data import pipeline, prepare, sources

    results = {"image_size": image_size, "batch": batch, "num_images": num_images, "workers": workers}
    with tempfile.TemporaryDirectory() as tmp:
        root, shards = os.path.join(tmp, "folder"), os.path.join(tmp, "shards")
        write_image_folder(root, num_images, side=image_size + image_size // 4)
        start = time.perf_counter()
        prepare.prepare("folder", root, shards, image_size=image_size, splits=("train",))
        results["prepare_images_per_s"] = num_images / (time.perf_counter() - start)
        folder_src = sources.get_source("folder", "train", root=root, image_size=image_size)
        shard_src = sources.get_source("array_record", "train", path=shards)
        for name, src in (("folder", folder_src), ("array_record", shard_src)):
            for w in (0, workers):
                it = pipeline.train_iterator(src, batch, seed=0, workers=w, worker_buffer=8)
                results[f"{name}_workers_{w}_images_per_s"] = _images_per_second(it, seconds)
                it.close()
    return results


def main(argv):
    del argv
    import jax

    backend_note = cpu_backend.configure(_CPU_DEVICES.value, _XLA_CPU_TUNED.value)
    config = _CONFIG.value
    peak_n, peak_dtype = timing.matmul_size(jax.default_backend()), str(config.model.dtype)
    peak = timing.matmul_peak(peak_n, peak_dtype)
    train_results, jax_step = bench_train(config, _STEPS.value, _PROFILE.value)
    flops = train_results["flops_per_step"]
    passes = [k for k in ("one_device", "all_devices") if k in train_results]
    for key in passes:
        r = train_results[key]
        r["achieved_gflops"] = flops / (r["step_ms"] / 1e3) / 1e9
        r["mfu"] = r["achieved_gflops"] / peak
    results = {
        "machine": {"platform": platform.processor() or platform.machine(), "backend": jax.default_backend(),
                    "devices": [str(d) for d in jax.devices()], "cores": len(os.sched_getaffinity(0)),
                    "jax": jax.__version__, "cpu_backend": backend_note,
                    "xla_flags": os.environ.get("XLA_FLAGS", "")},
        "matmul_peak_gflops": peak,
        "matmul_peak_problem": {"n": peak_n, "dtype": peak_dtype},
        "train": train_results,
        "sampler": bench_sampler(config),
        "sharded_sampler": bench_sharded_sampler(config),
        "q_sample": bench_q_sample(config),
    }
    if _DATA.value:
        results["data"] = bench_data()
    if _TORCH.value:
        ref = bench_torch(config, _STEPS.value, jax_step)
        ref["achieved_gflops"] = flops / (ref["step_ms"] / 1e3) / 1e9  # the JAX step's FLOPs: the same network
        ref["mfu"] = ref["achieved_gflops"] / peak
        results["torch_reference"] = ref
    with open(_OUT.value, "w") as f:
        json.dump(results, f, indent=2)
    t = results["train"]
    rows = [
        ("CPU backend", backend_note),
        (f"matmul peak ({peak_dtype} {peak_n}², jit)", f"{peak:.0f} GFLOP/s"),
        ("model / batch", f"{t['params']:,} params / {t['batch']}"),
        ("XLA FLOPs per train step", f"{flops / 1e9:.2f} GFLOP"),
    ]
    for key in passes:
        r = t[key]
        rows.append((f"train step, {r['devices']} device(s)",
                     f"{r['step_ms']:.1f} ms, {r['samples_per_s']:.0f} samples/s, MFU {100 * r['mfu']:.2g}% "
                     f"(compile {r['compile_s']:.1f} s)"))
    s = results["sampler"]
    rows.append((f"sampler, {s['num_steps']} steps x {s['batch']}",
                 f"scan {s['scan_samples_per_s']:.0f} samples/s vs Python loop "
                 f"{s['python_loop_samples_per_s']:.0f} ({s['scan_speedup']:.2f}x)"))
    g = results["sharded_sampler"]
    rows.append((f"evaluation sampler, {g['num_steps']} steps x {g['batch']}, 1 vs {g['all_devices']['devices']} "
                 "devices", f"{g['one_device']['samples_per_s']:.0f} vs {g['all_devices']['samples_per_s']:.0f} "
                 "samples/s"))
    q = results["q_sample"]
    rows.append(("q_sample t=1 vs t=T", f"{q['t_1']['flops']:.0f} vs {q['t_T']['flops']:.0f} flops, "
                                       f"{q['t_1']['us']:.0f} vs {q['t_T']['us']:.0f} µs"))
    if "data" in results:
        d = results["data"]
        size, w = d["image_size"], d["workers"]
        for name, label in (("array_record", "ArrayRecord shards"), ("folder", "image folder (JPEG, Pillow)")):
            rows.append((f"input pipeline, {label}, {size}x{size} RGB, batch {d['batch']}",
                         f"{d[f'{name}_workers_{w}_images_per_s']:.0f} images/s with {w} grain workers, "
                         f"{d[f'{name}_workers_0_images_per_s']:.0f} in-process"))
        rows.append((f"prepare (folder -> shards), {d['num_images']} images", f"{d['prepare_images_per_s']:.0f} "
                                                                                "images/s"))
    if "torch_reference" in results:
        r = results["torch_reference"]
        where = "CUDA" if r["device"] == "cuda" else f"{r['threads']} threads"
        rows.append((f"PyTorch {r['torch']} reference, eager, {where}",
                     f"{r['step_ms']:.1f} ms, {r['samples_per_s']:.0f} samples/s, MFU {100 * r['mfu']:.2g}%; "
                     f"JAX / PyTorch samples/s = {r['jax_over_torch']:.2f} (steps interleaved: JAX "
                     f"{r['jax_interleaved_step_ms']:.1f} ms)"))
    print("| measure | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    if "profile" in t:
        p = t["profile"]
        print(f"\nTrain step on {p['devices']} devices under the profiler: {p['step_ms']:.1f} ms; time per device by op "
              "kind (ms/step):\n\n| op kind | ms | share |\n|---|---|---|")
        for kind, ms in list(p["traced_ms_by_kind"].items()) + [("untraced (Eigen-pool convolutions, idle)",
                                                                   p["untraced_ms"])]:
            print(f"| {kind} | {ms:.1f} | {100 * ms / p['step_ms']:.0f}% |")


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
