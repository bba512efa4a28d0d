"""The step-ablation benchmark (benchmarks/step_ablations.py) and the timing primitives (mmdiff_jax/timing.py): the
fused GroupNorm -> SiLU against float64 references, every variant builds and is the program it claims to be."""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import step_ablations
from mmdiff_jax.configs import tiny
from mmdiff_jax import timing

GROUPS, EPS = 4, 1e-6


def _reference_gn_silu(x, scale, bias):
    """float64 numpy: silu((x - mean) / sqrt(var + eps) * scale + bias), statistics per (example, group)."""
    b, h, w, c = x.shape
    xg = x.reshape(b, h, w, GROUPS, c // GROUPS)
    mean = xg.mean(axis=(1, 2, 4), keepdims=True)
    var = ((xg - mean) ** 2).mean(axis=(1, 2, 4), keepdims=True)
    u = ((xg - mean) / np.sqrt(var + EPS)).reshape(x.shape) * scale + bias
    return u / (1.0 + np.exp(-u))


def _inputs():
    rng = np.random.default_rng(0)
    x = 1.5 * rng.standard_normal((3, 4, 4, 8)) + 0.7  # a non-zero mean, so the centring matters
    scale, bias = rng.standard_normal(8), rng.standard_normal(8)
    cotangent = rng.standard_normal(x.shape)
    return x, scale, bias, cotangent


def test_fused_groupnorm_silu_forward_matches_float64_reference():
    x, scale, bias, _ = _inputs()
    fn = lambda x, s, b: step_ablations.fused_groupnorm_silu(x, s, b, GROUPS, EPS)  # noqa: E731
    args = [jnp.asarray(a, jnp.float32) for a in (x, scale, bias)]
    out, out_jit = fn(*args), jax.jit(fn)(*args)
    chex.assert_shape(out, x.shape)
    chex.assert_type(out, jnp.float32)
    np.testing.assert_allclose(out, _reference_gn_silu(x, scale, bias), rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(out_jit, out, rtol=1e-6, atol=1e-6)


def test_fused_groupnorm_silu_vjp_matches_autodiff_and_finite_differences():
    """The hand-written VJP against autodiff of the two-pass formula, both in float64, and a central finite
    difference of <cotangent, y> along a random direction (float64 numpy)."""
    x, scale, bias, cotangent = _inputs()

    def plain(x, s, b):  # autodiff reference, the textbook formula
        xg = x.reshape(*x.shape[:3], GROUPS, -1)
        mean = xg.mean(axis=(1, 2, 4), keepdims=True)
        var = ((xg - mean) ** 2).mean(axis=(1, 2, 4), keepdims=True)
        return jax.nn.silu(((xg - mean) / jnp.sqrt(var + EPS)).reshape(x.shape) * s + b)

    with jax.enable_x64(True):
        args64 = [jnp.asarray(a, jnp.float64) for a in (x, scale, bias)]
        _, vjp_fused = jax.vjp(lambda *a: step_ablations.fused_groupnorm_silu(*a, GROUPS, EPS), *args64)
        _, vjp_plain = jax.vjp(plain, *args64)
        fused, ref = vjp_fused(jnp.asarray(cotangent)), vjp_plain(jnp.asarray(cotangent))
        for got, want in zip(fused, ref):
            chex.assert_type(got, jnp.float64)
            np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-10)
        direction = [np.random.default_rng(1).standard_normal(a.shape) for a in (x, scale, bias)]
        h = 1e-6
        f = lambda *a: float(np.sum(cotangent * _reference_gn_silu(*a)))  # noqa: E731
        numeric = (f(*[a + h * d for a, d in zip((x, scale, bias), direction)])
                   - f(*[a - h * d for a, d in zip((x, scale, bias), direction)])) / (2 * h)
        analytic = sum(float(np.sum(np.asarray(g) * d)) for g, d in zip(fused, direction))
        assert abs(numeric - analytic) < 1e-6 * max(1.0, abs(analytic)), (numeric, analytic)
    # float32, jit vs no jit
    args32 = [jnp.asarray(a, jnp.float32) for a in (x, scale, bias)]
    grad = lambda *a: jax.grad(  # noqa: E731
        lambda *b: jnp.sum(jnp.asarray(cotangent, jnp.float32) * step_ablations.fused_groupnorm_silu(*b, GROUPS, EPS)),
        argnums=(0, 1, 2))(*a)
    for g, g_jit, want in zip(grad(*args32), jax.jit(grad)(*args32), ref):
        chex.assert_type(g, jnp.float32)
        np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(g_jit, g, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def tiny_steps():
    config = tiny.get_config()
    return step_ablations.build_jax_steps(config, step_ablations.JAX_VARIANTS, step_ablations.first_batch(config))


def test_every_variant_builds_and_is_the_program_it_claims(tiny_steps):
    hlo = {k: v["hlo"] for k, v in tiny_steps.items()}
    conv3x3 = lambda text: re.findall(r" convolution\(.*window=\{size=3x3[ }]", text)  # noqa: E731
    assert len(conv3x3(hlo["full"])) >= 2 * 10  # forward and input-gradient convolutions of every 3x3 kernel
    assert conv3x3(hlo["no_conv3x3"]) == []  # every 3x3 convolution is gone (1x1 dots instead)
    assert "rsqrt" in hlo["full"] and "rsqrt" not in hlo["no_groupnorm"]  # no normalization left
    metrics = {k: v["run"]() for k, v in tiny_steps.items()}
    # The fused GroupNorm -> SiLU is the same function: the same first-step loss as the full step.
    np.testing.assert_allclose(metrics["fused_gn_silu"]["loss/total"], metrics["full"]["loss/total"], rtol=1e-5)
    np.testing.assert_allclose(metrics["fused_gn_silu"]["grad_norm"], metrics["full"]["grad_norm"], rtol=1e-4)
    np.testing.assert_allclose(metrics["no_optimizer"]["grad_norm"], metrics["full"]["grad_norm"], rtol=1e-5)
    assert all(np.isfinite(float(m["loss/total"])) for m in metrics.values())


def test_conv3x3_shapes_count_every_3x3_convolution():
    config = tiny.get_config()
    shapes = step_ablations.conv3x3_shapes(config)
    from mmdiff_jax import objective, train

    _, params = train.create_model(config, objective.build_diffusion(config))
    kernels = [x for x in jax.tree.leaves(params) if x.ndim == 4 and x.shape[:2] == (3, 3)]
    assert sum(s["count"] for s in shapes) == len(kernels)  # each 3x3 kernel is applied once per forward pass
    assert all(s["input"][0] == config.data.global_batch_size for s in shapes)
    assert any(s["stride"] == 2 for s in shapes)  # the downsampling convolution
    ms, flops = step_ablations.time_conv_xla(shapes[0], repeats=2)
    b, h, w, c = shapes[0]["input"]
    assert ms > 0 and 0 < flops <= 3 * 2 * b * h * w * 9 * c * shapes[0]["out_channels"]


def test_interleaved_timing_and_timing_primitives():
    calls = []
    medians = step_ablations.interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                                         rounds=2, per_round=3)
    assert calls == ["a", "b"] + ["a"] * 3 + ["b"] * 3 + ["a"] * 3 + ["b"] * 3  # warm-up, then the rounds in turn
    assert set(medians) == {"a", "b"} and all(v >= 0 for v in medians.values())
    n = 64
    lowered = jax.jit(jnp.dot).lower(jnp.ones((n, n)), jnp.ones((n, n)))
    assert timing.flops(lowered) == 2 * n**3
    times = timing.timeit(lambda: jnp.ones(3) + 1, 4)
    assert len(times) == 4 and min(times) > 0
    assert timing.matmul_peak(128) > 0 and timing.matmul_size("cpu") == 2048 and timing.matmul_size("gpu") == 8192


def test_torch_variants_build_and_run():
    """The PyTorch side (skipped where torch is not installed: it is not a dependency of the package)."""
    pytest.importorskip("torch")
    config = tiny.get_config()
    steps = step_ablations.torch_steps(config, step_ablations.TORCH_VARIANTS, step_ablations.first_batch(config))
    assert set(steps) == set(step_ablations.TORCH_VARIANTS)
    assert all(np.isfinite(steps[k]()) for k in steps)
    assert step_ablations.time_conv_torch({"input": [4, 8, 8, 16], "out_channels": 8, "stride": 2}, repeats=2) > 0
