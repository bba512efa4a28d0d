"""The main job's persistent XLA compilation cache, so that a rerun, a resume, `--mode eval` or `--mode sample` of the
same model loads its compiled programs instead of compiling them again (the default model's train step: about 10 s
of a 31 s, 20-step run on two CPU cores; README "Benchmark").

It is JAX's own cache (`jax_compilation_cache_dir`): an entry is keyed by the program, the devices, the jax / jaxlib
versions and the XLA flags; only process 0 of a multi-process run writes; an unreadable entry is compiled again
with a warning, never fatal. A directory may be a local path or any URL JAX's cache accepts (e.g. `gs://` on a pod).
"""

from __future__ import annotations

import os

_ENV_VAR = "JAX_COMPILATION_CACHE_DIR"


def default_dir() -> str:
    """`$XDG_CACHE_HOME/mmdiff_jax/xla`, or `~/.cache/mmdiff_jax/xla`."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "mmdiff_jax", "xla")


def configure(path: str | None) -> str:
    """Point JAX's persistent compilation cache at `path` before anything compiles; returns a one-line note for the
    log. `path` None: keep the directory JAX_COMPILATION_CACHE_DIR already set, else `default_dir()`; '' turns the
    cache off. A local directory that cannot be created leaves the cache off (said in the note), never the run."""
    import jax

    if path is None:
        current = jax.config.jax_compilation_cache_dir
        if current:
            return f"compilation cache {current} (from {_ENV_VAR})"
        path = default_dir()
    if not path:
        jax.config.update("jax_compilation_cache_dir", None)
        return "compilation cache off"
    if "://" not in path:
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as e:
            jax.config.update("jax_compilation_cache_dir", None)
            return f"compilation cache off: cannot create {path} ({e.strerror}); set --compilation_cache_dir"
    jax.config.update("jax_compilation_cache_dir", path)
    return f"compilation cache {path}"
