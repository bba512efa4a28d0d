"""CPU backend settings, applied before anything touches a device.

Two settings make the CPU path fast and correct (measured with `python -m mmdiff_jax.bench`, docs/benchmarks.md):
- one XLA device (`jax_num_cpu_devices`, `DEFAULT_CPU_DEVICES`): XLA's intra-op threads already keep every core
  busy, so splitting the batch over one device per core is no faster; and with several CPU devices and the flag
  below, jaxlib 0.10.2 computes some rows of a sharded sampler batch wrong (about 30 of 500 samples of a trained
  digits model, whole samples, not rounding; docs/benchmarks.md, "Several CPU devices").
- XLA's YNNPACK library fusions limited to single dots (`--xla_cpu_experimental_ynn_fusion_type=
  LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT`). By default jaxlib 0.10.2 also hands convolutions and elementwise fusions to
  YNNPACK, which on the U-Net's small convolutions (8x8, 32-48 channels) is slower than XLA's own convolution: the
  default model's train step takes about 1.5x as long (docs/benchmarks.md). The losses are the same to float32
  rounding (tests/test_cpu_backend.py).

The XLA flag is read once, when the first backend starts, so `configure` must run before any device is used. It is
only added on one CPU device, for the jaxlib it was measured on, only when no accelerator plugin is installed (a GPU
or TPU build parses the same XLA_FLAGS), and never over a choice the user made in XLA_FLAGS. Several CPU devices
(`--cpu_devices=N`, for trying sharding on one machine) run XLA's defaults, which gave the one-device samples.
"""

from __future__ import annotations

import importlib.util
import os

YNN_FUSION_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
FAST_YNN_FUSIONS = "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"
MEASURED_JAXLIB = "0.10.2"
DEFAULT_CPU_DEVICES = 1
_ACCELERATOR_PACKAGES = ("jax_plugins", "libtpu", "jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm7_plugin")


def tuning_flag() -> str:
    return f"{YNN_FUSION_FLAG}={FAST_YNN_FUSIONS}"


def _skip_reason(cpu_devices: int = 1) -> str | None:
    """Why the XLA flag is not added here, or None when it is."""
    import jaxlib

    if cpu_devices > 1:
        return f"{cpu_devices} CPU devices (with it, sharded sampling computes some rows wrong; see cpu_backend.py)"
    if YNN_FUSION_FLAG in os.environ.get("XLA_FLAGS", ""):
        return "XLA_FLAGS already sets it"
    if jaxlib.__version__ != MEASURED_JAXLIB:
        return f"measured on jaxlib {MEASURED_JAXLIB}, this is {jaxlib.__version__}"
    installed = [p for p in _ACCELERATOR_PACKAGES if importlib.util.find_spec(p) is not None]
    if installed:
        return f"accelerator packages installed ({', '.join(installed)})"
    return None


def configure(cpu_devices: int, tuned: bool = True) -> str:
    """Expose `cpu_devices` CPU devices and (if `tuned`) add the CPU XLA flag; returns a one-line description of
    what was set, for the log and bench.json. Call before anything touches a device."""
    import jax

    jax.config.update("jax_num_cpu_devices", cpu_devices)
    if not tuned:
        return "XLA defaults (--noxla_cpu_tuned)"
    reason = _skip_reason(cpu_devices)
    if reason is not None:
        return f"XLA CPU flag not added: {reason}"
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {tuning_flag()}".strip()
    return f"XLA_FLAGS += {tuning_flag()}"
