"""Performance benchmark (SPEC §6): prints a table and writes bench.json.

    python -m mmdiff_jax.bench [--config configs/digits_image_label.py] [--out bench.json] [--torch] [--profile]
                               [--noxla_cpu_tuned]

Measures, in one process: this machine's f32 matmul peak (2048x2048 `jnp.dot`, best of 10); the default model's
train step at its default batch (compile time, median step time, samples/s, XLA FLOPs per step from the cost analysis
of a one-device compile, MFU = achieved FLOP/s / measured peak); the `lax.scan` sampler against a Python loop over the
same jitted step; and `q_sample` at t = 1 vs t = T (XLA flops and time). `--torch` adds the PyTorch reference of
the same step, `--profile` the multi-device step's time by op kind, `--noxla_cpu_tuned` times XLA's CPU defaults.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time

import numpy as np
from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/digits_image_label.py", "Config to benchmark.")
_OUT = flags.DEFINE_string("out", "bench.json", "Where to write the JSON results.")
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices", len(os.sched_getaffinity(0)), "CPU devices (as in main).")
_XLA_CPU_TUNED = flags.DEFINE_bool("xla_cpu_tuned", True, "As in main: the XLA CPU flag of mmdiff_jax/cpu_backend.py "
                                   "(--noxla_cpu_tuned times XLA's defaults).")
_PROFILE = flags.DEFINE_bool("profile", False, "Also trace the multi-device train step and report its time by op "
                             "kind (mmdiff_jax/step_profile.py).")
_STEPS = flags.DEFINE_integer("steps", 30, "Timed train steps.")
_TORCH = flags.DEFINE_bool("torch", False, "Also time the PyTorch reference of the same step "
                           "(benchmarks/torch_reference.py; needs `pip install -r benchmarks/requirements.txt`).")


def _timeit(fn, repeats: int) -> list[float]:
    import jax

    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return times


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


def matmul_peak() -> float:
    """Best-of-10 GFLOP/s of a 2048x2048 float32 matmul under jit."""
    import jax
    import jax.numpy as jnp

    n = 2048
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    dot = jax.jit(jnp.dot)
    dot(a, b).block_until_ready()
    return 2 * n**3 / min(_timeit(lambda: dot(a, b), 10)) / 1e9


def bench_train(config, steps: int, profile: bool = False) -> dict:
    import jax

    from mmdiff_jax import objective, parallel, train
    from mmdiff_jax.data import pipeline, sources

    diff = objective.build_diffusion(config)
    graphdef, params = train.create_model(config, diff)
    tx = train.make_optimizer(config.optim, config.train.num_steps)
    src = sources.get_source(config.data.source, "train", **dict(config.data.source_kwargs))
    local = next(pipeline.train_iterator(src, config.data.global_batch_size, 0))
    results = {}
    for name, n_dev in (("one_device", 1), ("all_devices", -1)):
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
        times = _timeit(run, steps)
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
        if n_dev == 1:  # the whole step's FLOPs (a multi-device compile reports one device's share)
            results["flops_per_step"] = _flops(compiled)
    results["params"] = int(sum(x.size for x in jax.tree.leaves(params)))
    results["batch"] = config.data.global_batch_size
    return results


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
    mods = diff.modalities

    def predict(p, z, t):
        eps, heads = nnx.merge(graphdef, p)(z, t)
        return eps, mods.expected_encodings(heads, z.shape[0]), heads

    scan_fn = jax.jit(lambda p, k: samplers.sample(chain, lambda z, t: predict(p, z, t), k, batch, shape)[0])
    scan_fn(params, jax.random.key(0)).block_until_ready()
    scan_s = min(_timeit(lambda: scan_fn(params, jax.random.key(0)), 3))

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
    loop_s = min(_timeit(loop, 3))
    return {"num_steps": num_steps, "batch": batch, "scan_samples_per_s": batch / scan_s,
            "python_loop_samples_per_s": batch / loop_s, "scan_speedup": loop_s / scan_s,
            "scan_vs_loop_max_abs_diff": same}


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
        out[label] = {"flops": _flops(compiled),
                      "us": 1e6 * statistics.median(_timeit(lambda: compiled(z, enc, noise), 50))}
    return out


def bench_torch(config, steps: int) -> dict:
    """The PyTorch reference (same network, loss, optimizer and batch) in this process, after the JAX runs."""
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
    step = torch_reference.TrainStep(config, np.asarray(diff.sched.abar), np.asarray(diff.sched.s),
                                     np.asarray(diff.sched.c), labels_mod[0].codes, np.asarray(batch["image"]),
                                     np.asarray(batch["label"]))
    median = statistics.median(torch_reference.time_steps(step, steps))
    return {"torch": torch.__version__, "threads": torch.get_num_threads(),
            "params": torch_reference.param_count(step.model), "step_ms": 1e3 * median,
            "samples_per_s": config.data.global_batch_size / median}


def main(argv):
    del argv
    import jax

    from mmdiff_jax import cpu_backend

    backend_note = cpu_backend.configure(_CPU_DEVICES.value, _XLA_CPU_TUNED.value)
    config = _CONFIG.value
    peak = matmul_peak()
    train_results = bench_train(config, _STEPS.value, _PROFILE.value)
    flops = train_results["flops_per_step"]
    for key in ("one_device", "all_devices"):
        r = train_results[key]
        r["achieved_gflops"] = flops / (r["step_ms"] / 1e3) / 1e9
        r["mfu"] = r["achieved_gflops"] / peak
    results = {
        "machine": {"platform": platform.processor() or platform.machine(), "backend": jax.default_backend(),
                    "devices": [str(d) for d in jax.devices()], "cores": len(os.sched_getaffinity(0)),
                    "jax": jax.__version__, "cpu_backend": backend_note,
                    "xla_flags": os.environ.get("XLA_FLAGS", "")},
        "matmul_peak_gflops": peak,
        "train": train_results,
        "sampler": bench_sampler(config),
        "q_sample": bench_q_sample(config),
    }
    if _TORCH.value:
        ref = bench_torch(config, _STEPS.value)
        ref["achieved_gflops"] = flops / (ref["step_ms"] / 1e3) / 1e9  # the JAX step's FLOPs: the same network
        ref["mfu"] = ref["achieved_gflops"] / peak
        best = max(train_results[k]["samples_per_s"] for k in ("one_device", "all_devices"))
        ref["jax_over_torch"] = best / ref["samples_per_s"]
        results["torch_reference"] = ref
    with open(_OUT.value, "w") as f:
        json.dump(results, f, indent=2)
    t = results["train"]
    rows = [
        ("CPU backend", backend_note),
        ("matmul peak (f32 2048², jit)", f"{peak:.0f} GFLOP/s"),
        ("model / batch", f"{t['params']:,} params / {t['batch']}"),
        ("XLA FLOPs per train step", f"{flops / 1e9:.2f} GFLOP"),
    ]
    for key in ("one_device", "all_devices"):
        r = t[key]
        rows.append((f"train step, {r['devices']} device(s)",
                     f"{r['step_ms']:.1f} ms, {r['samples_per_s']:.0f} samples/s, MFU {100 * r['mfu']:.0f}% "
                     f"(compile {r['compile_s']:.1f} s)"))
    s = results["sampler"]
    rows.append((f"sampler, {s['num_steps']} steps x {s['batch']}",
                 f"scan {s['scan_samples_per_s']:.0f} samples/s vs Python loop "
                 f"{s['python_loop_samples_per_s']:.0f} ({s['scan_speedup']:.2f}x)"))
    q = results["q_sample"]
    rows.append(("q_sample t=1 vs t=T", f"{q['t_1']['flops']:.0f} vs {q['t_T']['flops']:.0f} flops, "
                                       f"{q['t_1']['us']:.0f} vs {q['t_T']['us']:.0f} µs"))
    if "torch_reference" in results:
        r = results["torch_reference"]
        rows.append((f"PyTorch {r['torch']} reference, eager, {r['threads']} threads",
                     f"{r['step_ms']:.1f} ms, {r['samples_per_s']:.0f} samples/s, MFU {100 * r['mfu']:.0f}%; "
                     f"JAX / PyTorch samples/s = {r['jax_over_torch']:.2f}"))
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
    app.run(main)
