"""Metrics to `workdir/metrics.jsonl`, TensorBoard event files in the workdir and the absl log, on process 0 only;
a progress line with steps/s and ETA. `tensorboard --logdir <workdir>` shows the scalars and the sample grids."""

from __future__ import annotations

import json
import os
import time
from typing import Mapping

import numpy as np
from absl import logging

from mmdiff_jax import parallel

# train metrics -> TensorBoard tags (the rest keep their own names: loss/*, nll/*, perf/*)
_TAGS = {"grad_norm": "optim/grad_norm", "learning_rate": "optim/learning_rate", "skipped_steps": "optim/skipped_steps",
         "bad_streak": "optim/bad_streak"}


def event_writer(workdir: str):
    """A tensorboardX SummaryWriter on `workdir` (its own events file per writer), or None off process 0."""
    if not parallel.is_main_process():
        return None
    from tensorboardX import SummaryWriter  # protobuf only, no TensorFlow

    return SummaryWriter(logdir=workdir, flush_secs=30)


class MetricWriter:
    def __init__(self, workdir: str, total_steps: int):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.total_steps = total_steps
        self.active = parallel.is_main_process()
        self._events = event_writer(workdir)
        self._last_time, self._last_step = None, None

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.active:
            return
        record = {"step": int(step), **{k: float(np.asarray(v)) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for name, value in record.items():
            if name != "step":
                self._events.add_scalar(_TAGS.get(name, name), value, global_step=int(step))

    def close(self) -> None:
        if self._events is not None:
            self._events.close()

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


def write_evaluation(workdir: str, step: int, prefix: str, results: Mapping, grid_paths: Mapping[str, str]) -> None:
    """An evaluation's numeric results as scalars `<prefix>/<key>` and its PNG sample grids as images
    `<prefix>/<name>`, at the checkpoint's step (process 0 only)."""
    events = event_writer(workdir)
    if events is None:
        return
    from PIL import Image

    for key, value in results.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value):
            events.add_scalar(f"{prefix}/{key}", float(value), global_step=int(step))
    for name, path in grid_paths.items():
        with Image.open(path) as img:
            pixels = np.asarray(img.convert("RGB"))  # [H, W, 3] uint8
        events.add_image(f"{prefix}/{name}", pixels, global_step=int(step), dataformats="HWC")
    events.close()
