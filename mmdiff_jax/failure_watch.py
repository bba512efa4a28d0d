"""In a multi-process run, one process's failure ends every process within seconds, with a message naming it.

Without this, the others wait in a collective for the failed process (gloo's deadline, or for good on an
accelerator) and then in `jax.distributed`'s shutdown barrier (300 s). The failing process writes one line into JAX's
own distributed key-value store (`report`); a daemon thread in every process (`start`) reads that key every two
seconds and, when it appears, logs it and leaves at once (exit 1). If the store itself becomes unreachable (process 0, which hosts it,
died), the thread leaves the same way, saying so.

Tests inject a failure with the environment variable MMDIFF_JAX_FAIL_AT=<process>:<step>
(`injected_failure_step`).
"""

from __future__ import annotations

import os
import sys
import threading

from absl import logging

KEY = "mmdiff_jax/failed"
POLL_S = 2.0
_finished = threading.Event()  # this process is done (normal exit or preemption): the watch ends quietly


def _client():
    """JAX's distributed runtime client, or None in a single-process run."""
    try:
        from jax._src import distributed  # JAX's own runtime; there is no public handle on its key-value store
    except ImportError:
        return None
    return distributed.global_state.client


def start(process_index: int) -> bool:
    """Watch for another process's failure report (multi-process runs only). Returns whether a watch started."""
    client = _client()
    if client is None:
        return False

    def watch():
        # a non-blocking read every POLL_S seconds: a blocking read could hold the interpreter lock while it waits
        while not _finished.wait(POLL_S):
            try:
                report = client.key_value_try_get(KEY)
            except Exception as e:  # noqa: BLE001 - not found means no report yet; anything else, no store
                if _finished.is_set():
                    return
                if "NOT_FOUND" in str(e) or "not found" in str(e).lower():
                    continue
                report = f"the coordination service (hosted by process 0) is unreachable: {str(e).splitlines()[0]}"
            if report.startswith(f"process {process_index} ") or _finished.is_set():
                return  # our own report (the failing process exits by itself), or this process is done
            _leave(f"stopping process {process_index}: {report}")

    threading.Thread(target=watch, name="failure_watch", daemon=True).start()
    return True


def finish() -> None:
    """This process completed (or was preempted and saved): from now on the watch ends quietly, so that
    `jax.distributed`'s shutdown, which closes the store, is not taken for a failure."""
    _finished.set()


def report(process_index: int, process_count: int, message: str) -> None:
    """Tell every process that this one failed (best effort: the store may be gone already). If another process
    reported first, this failure is most likely its consequence (a collective that lost its peer): say which."""
    client = _client()
    if client is None:
        return
    try:
        client.key_value_set(KEY, f"process {process_index} of {process_count} failed: {message}")
    except Exception as e:  # noqa: BLE001
        try:
            first = client.key_value_try_get(KEY)
        except Exception:  # noqa: BLE001
            first = None
        if first and not first.startswith(f"process {process_index} "):
            logging.error("stopping process %d: %s", process_index, first)
            print(f"error: stopping process {process_index}: {first}", file=sys.stderr)
        else:
            logging.warning("Could not report the failure to the other processes: %s", e)


def injected_failure_step(process_index: int) -> int | None:
    """The step at which this process must fail, from MMDIFF_JAX_FAIL_AT=<process>:<step> (tests of the failure
    path), or None; read once, before the training loop."""
    spec = os.environ.get("MMDIFF_JAX_FAIL_AT", "")
    process, _, step = spec.partition(":")
    return int(step) if spec and process == str(process_index) else None


def raise_injected(step: int) -> None:
    raise RuntimeError(f"injected failure at step {step} (MMDIFF_JAX_FAIL_AT={os.environ.get('MMDIFF_JAX_FAIL_AT')})")


def _leave(message: str) -> None:
    logging.error("%s", message)
    print(f"error: {message}", file=sys.stderr)
    logging.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)
