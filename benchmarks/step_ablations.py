"""Where the default train step's time goes, by ablation: the step compiled again with one part swapped out, every
variant timed in interleaved rounds in one process (the host's speed drifts by minutes), for JAX and, when torch is
installed, for the PyTorch reference of the same network.

    python -m benchmarks.step_ablations [--config digits_image_label] [--rounds 6] [--out ablations.json]
                                        [--notorch]

Step variants (each a *different program*, built only to account for time; none of them trains the model):
  full            the main job's step (JAX: all CPU devices, as `python -m mmdiff_jax.bench` times it)
  no_optimizer    loss, gradients and their global norm only: no AdamW, EMA or non-finite guard
  no_conv3x3      every 3x3 convolution replaced by its centre tap, i.e. a 1x1 convolution (strided where the original
                  was): what the step costs without its 3x3 convolutions
  no_groupnorm    every GroupNorm replaced by the identity
  fused_gn_silu   JAX only: GroupNorm -> SiLU in every ResBlock as one op with a hand-written VJP (the same function;
                  `fused_groupnorm_silu` below, checked against float64 autodiff by tests/test_step_ablations.py)
Then each 3x3 convolution of the U-Net, forward and both gradients, timed alone at the full batch: XLA on one CPU
device (whose convolutions use every core) against PyTorch (oneDNN, its default threads), with each shape's count
in one forward pass.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from mmdiff_jax import cpu_backend, objective, parallel, timing, train
from mmdiff_jax.data import pipeline, sources
from mmdiff_jax.models import layers

_NNX_CONV_CALL = nnx.Conv.__call__
JAX_VARIANTS = ("full", "no_optimizer", "no_conv3x3", "no_groupnorm", "fused_gn_silu")
TORCH_VARIANTS = ("full", "no_optimizer", "no_conv3x3", "no_groupnorm")


# ---------------------------------------------------------------------------------------------------- JAX pieces
def _group_stats(x, groups: int):
    """x [B, H, W, C] -> per-(example, group) mean and variance [B, G] (one pass: E[x], E[x^2])."""
    b, c = x.shape[0], x.shape[-1]
    xg = x.reshape(b, -1, groups, c // groups)
    mean = jnp.mean(xg, axis=(1, 3))
    var = jnp.maximum(jnp.mean(xg * xg, axis=(1, 3)) - mean * mean, 0.0)
    return mean, var


def _per_channel(v, groups: int, channels: int):
    """[B, G] -> [B, 1, 1, C]: each group's value on each of its channels."""
    return jnp.repeat(v, channels // groups, axis=1)[:, None, None, :]


def _gn_silu_fwd(x, scale, bias, groups: int, eps: float):
    c = x.shape[-1]
    mean, var = _group_stats(x, groups)
    rstd = jax.lax.rsqrt(var + eps)
    u = (x - _per_channel(mean, groups, c)) * _per_channel(rstd, groups, c) * scale + bias
    return u * jax.nn.sigmoid(u), (x, scale, bias, mean, rstd)


def _gn_silu_bwd(groups: int, eps: float, residuals, gy):
    """The VJP from the saved input and statistics: u and sigmoid(u) are recomputed, two per-channel sums are taken
    in one pass (sum of du, sum of du * x_hat), and dx comes out of one more elementwise pass."""
    del eps
    x, scale, bias, mean, rstd = residuals
    b, h, w, c = x.shape
    n = h * w * (c // groups)  # elements per (example, group)
    r = _per_channel(rstd, groups, c)
    xhat = (x - _per_channel(mean, groups, c)) * r
    u = xhat * scale + bias
    sig = jax.nn.sigmoid(u)
    du = gy * sig * (1.0 + u * (1.0 - sig))
    sum_du = jnp.sum(du, axis=(1, 2))  # [B, C]
    sum_du_xhat = jnp.sum(du * xhat, axis=(1, 2))  # [B, C]
    mean_dxhat = (sum_du * scale).reshape(b, groups, -1).sum(-1) / n  # [B, G]
    mean_dxhat_xhat = (sum_du_xhat * scale).reshape(b, groups, -1).sum(-1) / n
    dx = r * (du * scale - _per_channel(mean_dxhat, groups, c) - xhat * _per_channel(mean_dxhat_xhat, groups, c))
    return dx, jnp.sum(sum_du_xhat, 0), jnp.sum(sum_du, 0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def fused_groupnorm_silu(x, scale, bias, groups: int, eps: float):
    """silu(GroupNorm(x) * scale + bias) for x [B, H, W, C], scale and bias [C], as one op with its own VJP."""
    return _gn_silu_fwd(x, scale, bias, groups, eps)[0]


fused_groupnorm_silu.defvjp(_gn_silu_fwd, _gn_silu_bwd)


def _stride(conv: nnx.Conv) -> int:
    """An nnx.Conv's stride (the same along both spatial axes in this model)."""
    return int(conv.strides if isinstance(conv.strides, int) else (conv.strides or (1,))[0])


def _conv_centre_tap(conv, x):
    """An nnx.Conv's 3x3 kernel reduced to its centre tap: a 1x1 convolution (as a dot), strided like the original."""
    kernel = conv.kernel[...]
    if kernel.shape[:2] != (3, 3):
        return _NNX_CONV_CALL(conv, x)
    stride = _stride(conv)
    x = x[:, ::stride, ::stride] if stride > 1 else x
    y = jnp.einsum("bhwc,co->bhwo", x, kernel[1, 1])
    return y if conv.bias is None else y + conv.bias[...]


@contextlib.contextmanager
def _patched(obj, name: str, value):
    original = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, original)


def _grad_only_step(graphdef, diff, tx, ema_decay):
    """A step with the loss, the gradients and their norm, and nothing else (the state only counts the step)."""
    del tx, ema_decay

    def step(state, batch):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        (_, metrics), grads = jax.value_and_grad(
            lambda p: objective.compute_loss(nnx.merge(graphdef, p), diff, batch, key), has_aux=True)(state.params)
        metrics["grad_norm"] = optax.tree.norm(grads)
        return state.replace(step=state.step + 1), metrics

    return step


def _fused_res_block(block, x, temb):
    def norm_silu(norm, h):
        return fused_groupnorm_silu(h, norm.scale[...], norm.bias[...], norm.num_groups, norm.epsilon)

    h = block.conv1(norm_silu(block.norm1, x))
    h = h + block.temb(nnx.silu(temb))[:, None, None, :]
    h = block.conv2(norm_silu(block.norm2, h))
    return (x if block.skip is None else block.skip(x)) + h


def jax_variant(name: str):
    """The context in which `train.jit_train_step` traces the variant `name`."""
    if name == "full":
        return contextlib.nullcontext()
    if name == "no_optimizer":
        return _patched(train, "make_train_step", _grad_only_step)
    if name == "no_conv3x3":
        return _patched(nnx.Conv, "__call__", _conv_centre_tap)
    if name == "no_groupnorm":
        return _patched(nnx.GroupNorm, "__call__", lambda self, x, **kw: x)
    if name == "fused_gn_silu":
        return _patched(layers.ResBlock, "__call__", _fused_res_block)
    raise ValueError(f"unknown JAX variant {name!r}; use one of {JAX_VARIANTS}.")


def first_batch(config) -> dict[str, np.ndarray]:
    """The first training batch of the config's data, as the main job would draw it."""
    src = sources.get_source(config.data.source, "train", **dict(config.data.source_kwargs))
    return next(pipeline.train_iterator(src, config.data.global_batch_size, 0))


def build_jax_steps(config, names, local: dict) -> dict[str, dict]:
    """Each variant compiled on all devices for the batch `local`; name -> {'run': one step, 'compile_s', 'hlo',
    'devices'}."""
    diff = objective.build_diffusion(config)
    graphdef, params = train.create_model(config, diff)
    tx = train.make_optimizer(config.optim, config.train.num_steps)
    mesh = parallel.make_mesh(-1)
    batch = parallel.to_global_batch(local, mesh)
    steps = {}
    for name in names:
        state = parallel.replicate(train.initial_state(config, jax.tree.map(lambda x: x.copy(), params), tx), mesh)
        with jax_variant(name):
            step_fn = train.jit_train_step(graphdef, diff, tx, config.optim.ema_decay, mesh, state)
            start = time.perf_counter()
            compiled = step_fn.lower(state, batch).compile()
            compile_s = time.perf_counter() - start
        holder = {"state": state}

        def run(compiled=compiled, holder=holder):
            holder["state"], metrics = compiled(holder["state"], batch)
            return metrics

        steps[name] = {"run": run, "compile_s": compile_s, "hlo": compiled.as_text(),
                       "devices": mesh.devices.size}
    return steps


def conv3x3_shapes(config) -> list[dict]:
    """Every 3x3 convolution of one forward pass of the model at the config's batch: input shape, output channels,
    stride, and how many times that combination occurs."""
    diff = objective.build_diffusion(config)
    graphdef, params = train.create_model(config, diff)
    seen: list[tuple] = []

    def recording(conv, x):
        kernel = conv.kernel[...]
        if kernel.shape[:2] == (3, 3):
            seen.append((tuple(x.shape), int(kernel.shape[-1]), _stride(conv)))
        return _NNX_CONV_CALL(conv, x)

    b = config.data.global_batch_size
    zt = jax.ShapeDtypeStruct((b, *config.latent_shape), jnp.float32)
    t = jax.ShapeDtypeStruct((b,), jnp.int32)
    with _patched(nnx.Conv, "__call__", recording):
        jax.eval_shape(lambda p, z, tt: nnx.merge(graphdef, p)(z, tt), params, zt, t)
    counts: dict[tuple, int] = {}
    for key in seen:
        counts[key] = counts.get(key, 0) + 1
    return [{"input": list(k[0]), "out_channels": k[1], "stride": k[2], "count": n} for k, n in counts.items()]


def _median_ms(fn: Callable[[], Any], repeats: int) -> float:
    return 1e3 * statistics.median(timing.timeit(fn, repeats))


def time_conv_xla(shape: dict, repeats: int = 30) -> tuple[float, float]:
    """One 3x3 'SAME' convolution's forward and both gradients (input and kernel, for a given output cotangent) on one
    CPU device: (median ms, XLA's FLOP count of the three convolutions, which leaves out the zero padding's taps as
    the bench's count of the step does)."""
    x = jax.random.normal(jax.random.key(0), tuple(shape["input"]), jnp.float32)
    w = 0.1 * jax.random.normal(jax.random.key(1), (3, 3, x.shape[-1], shape["out_channels"]), jnp.float32)
    s = shape["stride"]

    def conv(x, w):
        return jax.lax.conv_general_dilated(x, w, (s, s), ((1, 1), (1, 1)),
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def forward_and_grads(x, w, cotangent):
        y, vjp = jax.vjp(conv, x, w)
        return y, *vjp(cotangent)

    cotangent = jax.random.normal(jax.random.key(2), jax.eval_shape(conv, x, w).shape, jnp.float32)
    x, w, cotangent = jax.device_put((x, w, cotangent), jax.devices("cpu")[0])
    step = jax.jit(forward_and_grads)
    flops = float(step.lower(x, w, cotangent).cost_analysis()["flops"])
    for _ in range(3):
        jax.block_until_ready(step(x, w, cotangent))
    return _median_ms(lambda: step(x, w, cotangent), repeats), flops


# ------------------------------------------------------------------------------------------------ PyTorch pieces
def torch_steps(config, names, local: dict) -> dict[str, Callable[[], float]]:
    from torch import nn

    from benchmarks import torch_reference

    diff = objective.build_diffusion(config)
    codes = [m for m in diff.modalities.aux if m.name == "label"][0].codes
    steps = {}
    for name in names:
        if name not in TORCH_VARIANTS:
            raise ValueError(f"unknown PyTorch variant {name!r}; use one of {TORCH_VARIANTS}.")
        step = torch_reference.TrainStep(config, np.asarray(diff.sched.abar), np.asarray(diff.sched.s),
                                         np.asarray(diff.sched.c), codes, np.asarray(local["image"]),
                                         np.asarray(local["label"]))
        for module in step.model.modules():
            if name == "no_conv3x3" and isinstance(module, nn.Conv2d) and module.kernel_size == (3, 3):
                module.forward = functools.partial(
                    lambda m, x: nn.functional.conv2d(x, m.weight[:, :, 1:2, 1:2], m.bias, m.stride), module)
            if name == "no_groupnorm" and isinstance(module, nn.GroupNorm):
                module.forward = lambda x: x
        steps[name] = _torch_grad_only(step) if name == "no_optimizer" else step
    return steps


def _torch_grad_only(step) -> Callable[[], float]:
    """The reference's loss, gradients and their global norm, and nothing else."""
    import torch

    def run() -> float:
        step.loss_and_grads()
        return float(torch.nn.utils.get_total_norm([p.grad for p in step.model.parameters()]))

    return run


def time_conv_torch(shape: dict, repeats: int = 30) -> float:
    """As `time_conv_xla`, in PyTorch (NCHW, its CPU convolution: oneDNN)."""
    import torch

    b, h, w, c = shape["input"]
    x = torch.randn(b, c, h, w, requires_grad=True)
    conv = torch.nn.Conv2d(c, shape["out_channels"], 3, stride=shape["stride"], padding=1, bias=False)
    cotangent = torch.randn_like(conv(x))

    def run():
        x.grad = None
        conv.weight.grad = None
        conv(x).backward(cotangent)

    for _ in range(3):
        run()
    return _median_ms(run, repeats)


# ------------------------------------------------------------------------------------------------------- driver
def interleaved(runs: dict[str, Callable[[], Any]], rounds: int, per_round: int) -> dict[str, float]:
    """Median ms per call of each function (JAX results waited for), after one warm-up call each, timed in `rounds`
    rounds of `per_round` calls each, in turn."""
    times: dict[str, list[float]] = {k: [] for k in runs}
    for fn in runs.values():
        timing.timeit(fn, 1)
    for _ in range(rounds):
        for fn_name, fn in runs.items():
            times[fn_name] += timing.timeit(fn, per_round)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def main(argv):
    del argv
    FLAGS = flags.FLAGS  # noqa: N806

    backend_note = cpu_backend.configure(len(os.sched_getaffinity(0)))
    config = FLAGS.config
    try:
        import torch  # noqa: F401

        with_torch = FLAGS.torch
    except ImportError:
        with_torch = False
    if jax.default_backend() != "cpu":
        raise SystemExit("error: step_ablations times the CPU path (XLA CPU against PyTorch on the CPU).")
    local = first_batch(config)
    jax_steps = build_jax_steps(config, JAX_VARIANTS, local)
    runs = {f"jax/{k}": v["run"] for k, v in jax_steps.items()}
    if with_torch:
        runs.update({f"torch/{k}": fn for k, fn in torch_steps(config, TORCH_VARIANTS, local).items()})
    step_ms = interleaved(runs, FLAGS.rounds, FLAGS.per_round)
    peak = timing.matmul_peak(timing.matmul_size("cpu"))
    convs = conv3x3_shapes(config)
    for shape in convs:
        shape["xla_ms"], flops = time_conv_xla(shape)
        shape["gflop"] = flops / 1e9
        if with_torch:
            shape["torch_ms"] = time_conv_torch(shape)
    results = {
        "config": {"batch": config.data.global_batch_size, "channels": list(config.model.channels)},
        "cpu_backend": backend_note, "jax": jax.__version__, "devices": jax_steps["full"]["devices"],
        "matmul_peak_gflops": peak, "rounds": FLAGS.rounds, "per_round": FLAGS.per_round,
        "step_ms": step_ms, "compile_s": {k: v["compile_s"] for k, v in jax_steps.items()},
        "conv3x3": convs,
    }
    if with_torch:
        import torch

        results["torch"] = {"version": torch.__version__, "threads": torch.get_num_threads()}
    with open(FLAGS.out, "w") as f:
        json.dump(results, f, indent=2)

    full = {fw: step_ms.get(f"{fw}/full") for fw in ("jax", "torch")}
    print(f"Step variants, median ms ({FLAGS.rounds} interleaved rounds of {FLAGS.per_round} steps; JAX on "
          f"{results['devices']} CPU devices, {backend_note}):\n")
    print("| variant | JAX ms | JAX saved | PyTorch ms | PyTorch saved |\n|---|---|---|---|---|")
    for name in JAX_VARIANTS:
        cells = []
        for fw in ("jax", "torch"):
            ms = step_ms.get(f"{fw}/{name}")
            cells += ["–", "–"] if ms is None else [f"{ms:.1f}", "" if name == "full" else f"{full[fw] - ms:+.1f}"]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(f"\nEach 3x3 convolution, forward + both gradients, alone at the full batch (XLA: one CPU device; % of the "
          f"{peak:.0f} GFLOP/s f32 matmul peak measured in this run):\n")
    print("| input [B, H, W, C] | out | stride | count | GFLOP (XLA) | XLA ms | XLA % of peak | PyTorch ms |\n"
          "|---|---|---|---|---|---|---|---|")
    rows = [dict(s, label=f"{s['input']} | {s['out_channels']} | {s['stride']} | {s['count']}") for s in convs]
    total = {k: sum(s[k] * s["count"] for s in convs if k in s) for k in ("xla_ms", "torch_ms", "gflop")}
    rows.append(dict(total, label=f"**all, times their counts** | | | {sum(s['count'] for s in convs)}"))
    for r in rows:
        torch_cell = f"{r['torch_ms']:.2f}" if with_torch else "–"
        print(f"| {r['label']} | {r['gflop']:.3f} | {r['xla_ms']:.2f} | "
              f"{100 * r['gflop'] / r['xla_ms'] * 1e3 / peak:.0f}% | {torch_cell} |")


def _define_flags() -> None:
    """The command line's flags, defined only when this file runs as a program, so that importing it (the tests do,
    beside `mmdiff_jax.bench`, which defines `--config` and `--out` too) defines none."""
    config_flags.DEFINE_config_file("config", "mmdiff_jax/configs/digits_image_label.py", "Config whose step is ablated.")
    flags.DEFINE_string("out", "ablations.json", "Where to write the JSON results.")
    flags.DEFINE_integer("rounds", 6, "Interleaved rounds; every variant runs `--per_round` steps in each.")
    flags.DEFINE_integer("per_round", 8, "Timed steps per variant per round.")
    flags.DEFINE_bool("torch", True, "Also ablate the PyTorch reference (skipped when torch is not installed).")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
