"""Timing primitives shared by the benchmarks: wall time of blocking calls, XLA's FLOP count of a program, and this
machine's matmul peak (the denominator of MFU)."""

from __future__ import annotations

import time
from typing import Any, Callable

import jax
import jax.numpy as jnp


def timeit(fn: Callable[[], Any], repeats: int) -> list[float]:
    """Wall seconds of each of `repeats` calls of `fn`, each waited for (`jax.block_until_ready`)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return times


def flops(stage) -> float:
    """XLA's FLOP count of a `jax.stages.Lowered` or `Compiled` computation."""
    cost = stage.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


def matmul_size(backend: str) -> int:
    """The square matmul that measures the peak: 2048 on CPU; 8192 on an accelerator (2048 does not fill one)."""
    return 2048 if backend == "cpu" else 8192


def matmul_peak(n: int = 2048, dtype: str = "float32") -> float:
    """Best-of-10 GFLOP/s of an n x n `dtype` matmul under jit, at JAX's default precision (the step's: on a GPU a
    float32 dot may run as TF32)."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    dot = jax.jit(jnp.dot)
    dot(a, b).block_until_ready()
    return 2 * n**3 / min(timeit(lambda: dot(a, b), 10)) / 1e9
