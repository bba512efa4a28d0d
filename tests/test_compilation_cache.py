"""The main job's persistent compilation cache (mmdiff_jax/compilation_cache.py): where it points, and that a second
run of the same model compiles nothing new."""

import os
import re
import subprocess
import sys

import jax
import pytest

from mmdiff_jax import compilation_cache

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def cache_setting():
    """Give each test the cache setting back as conftest made it (this process's own cache)."""
    before = jax.config.jax_compilation_cache_dir
    yield
    jax.config.update("jax_compilation_cache_dir", before)


def test_the_flag_wins_the_environment_is_kept_and_the_default_is_per_user(tmp_path, monkeypatch, cache_setting):
    chosen = str(tmp_path / "chosen" / "xla")
    assert compilation_cache.configure(chosen) == f"compilation cache {chosen}"
    assert jax.config.jax_compilation_cache_dir == chosen and os.path.isdir(chosen)
    # no flag: a directory JAX_COMPILATION_CACHE_DIR set (jax reads it into its config) is kept
    assert compilation_cache.configure(None) == f"compilation cache {chosen} (from JAX_COMPILATION_CACHE_DIR)"
    jax.config.update("jax_compilation_cache_dir", None)  # neither: the per-user default
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home_cache"))
    expected = str(tmp_path / "home_cache" / "mmdiff_jax" / "xla")
    assert compilation_cache.default_dir() == expected
    assert compilation_cache.configure(None) == f"compilation cache {expected}"
    assert jax.config.jax_compilation_cache_dir == expected
    assert compilation_cache.configure("") == "compilation cache off"
    assert jax.config.jax_compilation_cache_dir is None


def test_a_directory_that_cannot_be_made_turns_the_cache_off_not_the_run(tmp_path, cache_setting):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    note = compilation_cache.configure(str(blocker / "xla"))
    assert note.startswith(f"compilation cache off: cannot create {blocker / 'xla'}")
    assert "--compilation_cache_dir" in note
    assert jax.config.jax_compilation_cache_dir is None
    url = "gs://bucket/xla"  # a URL is left to JAX's cache (no local directory is made)
    assert compilation_cache.configure(url) == f"compilation cache {url}"
    assert not os.path.exists("gs:")


def _main(workdir, cache_dir):
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    # conftest's min compile time and entry size (0) come along; each miss is logged as a warning
    env.update(JAX_PLATFORMS="cpu", JAX_EXPLAIN_CACHE_MISSES="1")
    proc = subprocess.run(
        [sys.executable, "-m", "mmdiff_jax.main", "--config", "mmdiff_jax/configs/tiny.py", "--workdir", str(workdir),
         f"--compilation_cache_dir={cache_dir}", "--config.train.num_steps=2", "--config.train.log_every=1",
         "--config.mesh.data=1", "--cpu_devices=1", "--noeval_after_train"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"compilation cache {cache_dir}" in proc.stderr
    misses = re.findall(r"PERSISTENT COMPILATION CACHE MISS for '([^']+)'", proc.stderr)
    return misses, sorted(os.listdir(cache_dir))


def test_a_second_run_of_the_same_model_compiles_nothing_new(tmp_path):
    cache_dir = str(tmp_path / "xla")
    misses, entries = _main(tmp_path / "run1", cache_dir)
    assert "jit_train_step" in misses and any(e.startswith("jit_train_step-") for e in entries), (misses, entries)
    # a fresh workdir, so it trains from scratch again: every program is read back from the cache
    assert _main(tmp_path / "run2", cache_dir) == ([], entries)
