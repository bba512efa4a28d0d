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


# ---- Running the suite on several pytest-xdist workers (`-n 2`, README) ----------------------------------------------
# The multi-process tests (marked `multiprocess`) start processes that meet in gloo's CPU collectives, whose
# rendezvous allows 30 s: on a 2-core machine another worker's compiles can make one of those processes miss it. So
# under xdist a test module holds a shared lock while it runs, and a module of multi-process tests holds it
# exclusively: it waits for the other worker's current module to end, and the other worker's next module waits for
# it. A gate lock in front keeps the exclusive request from being overtaken (no starvation). Without xdist the locks
# are never contended.
import fcntl  # noqa: E402

import pytest  # noqa: E402


def _xdist_lock_path(name: str) -> str | None:
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    return os.path.join(tempfile.gettempdir(), f"mmdiff_jax_pytest_{run}.{name}") if run else None


@pytest.fixture(scope="module", autouse=True)
def _module_lock(request):
    """Holds the suite-wide module lock: exclusive for a `multiprocess` module, shared otherwise (under xdist)."""
    main_path, gate_path = _xdist_lock_path("modules"), _xdist_lock_path("gate")
    if main_path is None:
        yield
        return
    exclusive = any(m.name == "multiprocess" for m in request.node.iter_markers())
    with open(gate_path, "a") as gate, open(main_path, "a") as main:
        fcntl.flock(gate, fcntl.LOCK_EX)
        fcntl.flock(main, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        fcntl.flock(gate, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(main, fcntl.LOCK_UN)


def pytest_sessionfinish(session):
    """A worker that has run all its tests removes the lock files: the other worker, if still running, is then alone
    and recreates them unlocked (unlinking never breaks a lock it holds)."""
    for name in ("modules", "gate"):
        path = _xdist_lock_path(name)
        if path is not None and os.path.exists(path):
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
