"""Metrics to `workdir/metrics.jsonl` and the absl log, on process 0 only; a progress line with steps/s and ETA."""

from __future__ import annotations

import json
import os
import time
from typing import Mapping

import numpy as np
from absl import logging

from mmdiff_jax import parallel


class MetricWriter:
    def __init__(self, workdir: str, total_steps: int):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.total_steps = total_steps
        self.active = parallel.is_main_process()
        self._last_time, self._last_step = None, None

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.active:
            return
        record = {"step": int(step), **{k: float(np.asarray(v)) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def progress(self, step: int, metrics: Mapping[str, float]) -> dict[str, float]:
        """Log a progress line; returns the perf metrics it computed."""
        now = time.perf_counter()
        perf = {}
        if self._last_time is not None and step > self._last_step:
            rate = (step - self._last_step) / (now - self._last_time)
            eta = (self.total_steps - step) / max(rate, 1e-9)
            perf = {"perf/steps_per_sec": rate}
            shown = " ".join(f"{k}={float(np.asarray(v)):.4g}" for k, v in metrics.items() if k.startswith(("loss/total", "nll/")))
            if self.active:
                logging.info("step %d/%d  %s  |  %.2f steps/s  ETA %dm%02ds", step, self.total_steps, shown, rate,
                             eta // 60, eta % 60)
        self._last_time, self._last_step = now, step
        return perf
