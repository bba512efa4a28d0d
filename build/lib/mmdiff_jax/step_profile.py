"""Where a compiled step's time goes on CPU: a jax.profiler trace of a few steps, each traced XLA op classified by
what it computes (from the compiled HLO), summed per device and averaged over devices.

Used by `python -m mmdiff_jax.bench --profile`. On the CPU backend each device runs its thunks on one thread of the
XLA pool; an op's event covers the time that thread spends on it. Convolutions that XLA runs on Eigen's own pool
complete asynchronously, so their traced events are short and most of their time shows as the step time the traced
ops do not cover ("untraced").
"""

from __future__ import annotations

import collections
import glob
import re
import tempfile
import time
from typing import Callable

_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*? ([a-z][\w\-]*)\(")
_COMPUTATION = re.compile(r"^%?([\w.\-]+) \(.*?\) -> .*?\{\n(.*?)\n\}", re.S | re.M)
_NESTED = ("Rendezvous", "Wait", "end:", "ThunkExecutor")  # events inside another op's event, or bookkeeping


def op_kinds(hlo_text: str) -> dict[str, str]:
    """Instruction name -> kind, for every instruction of a compiled module's HLO text."""
    bodies = {m.group(1): m.group(2) for m in _COMPUTATION.finditer(hlo_text)}
    kinds = {}
    for line in hlo_text.splitlines():
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        name, op = m.groups()
        if op == "fusion":
            called = re.search(r"calls=%?([\w.\-]+)", line)
            body = bodies.get(called.group(1), "") if called else ""
            if " convolution(" in body:
                op = "convolution"
            elif " dot(" in body:
                op = "dot"
            elif " reduce(" in body or " reduce-window(" in body:
                op = "reduction fusion (norms, means)"
            elif " transpose(" in body or name.startswith("transpose"):
                op = "transpose / layout copy"
            else:
                op = "elementwise fusion"
        elif op in ("copy", "transpose"):
            op = "transpose / layout copy"
        kinds[name] = op
    return kinds


def profile(run_step: Callable[[], object], hlo_text: str, steps: int = 10) -> dict:
    """Traces `steps` calls of `run_step` (which blocks until done); returns the mean step time under tracing and
    the traced time per op kind (ms per step, mean over devices)."""
    import jax

    kinds = op_kinds(hlo_text)
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            start = time.perf_counter()
            for _ in range(steps):
                run_step()
            step_ms = 1e3 * (time.perf_counter() - start) / steps
        (path,) = glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)
        data = jax.profiler.ProfileData.from_file(path)
    per_device = []
    for plane in data.planes:
        for line in plane.lines:
            if "XLAEigen" not in line.name:  # one such line per CPU device
                continue
            totals = collections.Counter()
            for event in line.events:
                if not event.name.startswith(_NESTED):
                    totals[kinds.get(event.name, "other")] += event.duration_ns / 1e6 / steps
            per_device.append(totals)
    if not per_device:
        raise RuntimeError("the trace has no XLA CPU device threads; --profile supports the CPU backend only.")
    by_kind = {k: sum(d[k] for d in per_device) / len(per_device) for k in set().union(*per_device)}
    by_kind = dict(sorted(by_kind.items(), key=lambda kv: -kv[1]))
    return {"steps": steps, "devices": len(per_device), "step_ms": step_ms, "traced_ms_by_kind": by_kind,
            "untraced_ms": max(step_ms - sum(by_kind.values()), 0.0)}
