"""Test setup: CPU only, 8 fake devices, a persistent compilation cache; set before anything touches a device."""

import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The test cache, every program in it: set in the environment, so jax reads it at import and every process a test
# starts (the main job, the launcher's processes) inherits it instead of using the user's ~/.cache.
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(tempfile.gettempdir(), "mmdiff_jax_test_cache")
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

# LLVM at -O1 instead of XLA's default: the suite is dominated by compiling many small programs, each compiled once;
# -O1 cuts the tiny config's train-step compile by about a quarter with no slower steps (measured on the 2-core
# CPU). Floating-point semantics are the same at either level (no fast-math). Subprocesses inherit it.
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=1".strip()

from mmdiff_jax import cpu_backend  # noqa: E402

cpu_backend.configure(8)  # what the main job sets up, with 8 devices
