"""The benchmark's pieces run on the tiny config and report what they claim (no timing assertions)."""

import jax
import numpy as np
import pytest

from mmdiff_jax.configs import tiny
from mmdiff_jax import bench


def test_bench_pieces_on_the_tiny_config():
    config = tiny.get_config()
    q = bench.bench_q_sample(config, batch=8)
    assert q["t_1"]["flops"] == q["t_T"]["flops"] > 0  # closed form: the same cost at t = 1 and t = T
    s = bench.bench_sampler(config, num_steps=3, batch=8)
    assert s["scan_samples_per_s"] > 0 and s["python_loop_samples_per_s"] > 0
    assert s["scan_vs_loop_max_abs_diff"] < 1e-5  # the loop runs the very step the scan runs
    g = bench.bench_sharded_sampler(config, num_steps=3, batch=16)
    assert g["one_device"]["devices"] == 1 and g["all_devices"]["devices"] == 8
    assert g["one_device"]["samples_per_s"] > 0 and g["all_devices"]["samples_per_s"] > 0
    t, run = bench.bench_train(config, steps=2, profile=True)
    assert t["flops_per_step"] > 0 and t["one_device"]["devices"] == 1 and t["all_devices"]["devices"] == 8
    assert t["one_device"]["step_ms"] > 0 and t["batch"] == 16
    p = t["profile"]  # the train step's time by op kind, per device
    assert p["devices"] == 8 and p["step_ms"] > 0 and p["untraced_ms"] >= 0
    assert {"convolution", "all-reduce", "elementwise fusion"} <= set(p["traced_ms_by_kind"]), p
    assert sum(p["traced_ms_by_kind"].values()) <= p["step_ms"] * 1.05  # each device's ops fit within the step
    assert np.isfinite(float(run()["grad_norm"]))  # the all-device step, returned for the interleaved PyTorch timing


def test_op_kinds_classifies_compiled_hlo():
    import jax.numpy as jnp

    from mmdiff_jax import step_profile

    def f(x, w):
        y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.mean(jnp.tanh(y) * 2.0 + 1.0), jnp.transpose(x, (3, 1, 2, 0)) + 1.0

    hlo = jax.jit(f).lower(jnp.ones((4, 8, 8, 16)), jnp.ones((3, 3, 16, 16))).compile().as_text()
    kinds = set(step_profile.op_kinds(hlo).values())
    assert "convolution" in kinds and "reduction fusion (norms, means)" in kinds, kinds


def test_torch_reference_is_the_same_network():
    """The optional PyTorch reference (benchmarks/torch_reference.py) has exactly the JAX model's parameter count and
    its step trains; skipped where torch is not installed (it is not a dependency of the package)."""
    torch = pytest.importorskip("torch")
    from benchmarks import torch_reference
    from mmdiff_jax.configs import digits_image_label
    from mmdiff_jax import objective, train
    from mmdiff_jax.data import sources

    config = digits_image_label.get_config()
    diff = objective.build_diffusion(config)
    _, params = train.create_model(config, diff)
    src = sources.get_source("digits", "train").arrays
    step = torch_reference.TrainStep(config, np.asarray(diff.sched.abar), np.asarray(diff.sched.s),
                                     np.asarray(diff.sched.c), diff.modalities.aux[0].codes, src["image"][:16],
                                     src["label"][:16])
    assert torch_reference.param_count(step.model) == sum(x.size for x in jax.tree.leaves(params))
    losses = [step() for _ in range(3)]
    assert all(np.isfinite(losses)) and torch.get_num_threads() >= 1
    calls = []
    ref = bench.bench_torch(config, steps=4, jax_step=lambda: calls.append(1) or jax.numpy.zeros(()), rounds=2)
    assert len(calls) == 4 and ref["rounds"] == 2 and ref["steps_per_round"] == 2  # JAX blocks alternate with torch's
    assert ref["jax_over_torch"] == pytest.approx(ref["step_ms"] / ref["jax_interleaved_step_ms"])
