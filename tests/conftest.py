"""Test setup: CPU only, 8 fake devices, a persistent compilation cache; set before anything touches a device."""

import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_CACHE = os.path.join(tempfile.gettempdir(), "mmdiff_jax_test_cache")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)  # main-job subprocesses too, not the user's ~/.cache

import jax  # noqa: E402

from mmdiff_jax import cpu_backend  # noqa: E402

cpu_backend.configure(8)  # what the main job sets up, with 8 devices
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
