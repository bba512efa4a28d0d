"""CPU backend settings, applied before anything touches a device.

Two settings make the CPU path fast (measured with `python -m mmdiff_jax.bench`, README "Benchmark"):
- one XLA device per core, so the batch is split across the cores (`jax_num_cpu_devices`);
- XLA's YNNPACK library fusions limited to single dots (`--xla_cpu_experimental_ynn_fusion_type=
  LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT`). By default jaxlib 0.10.2 also hands convolutions and elementwise fusions to
  YNNPACK, which on the U-Net's small convolutions (8x8, 32-48 channels) is slower than XLA's own convolution: the
  default model's train step takes about 1.4x as long on two devices and 2.7x on one (README "Benchmark"). The
  losses are the same to float32 rounding (tests/test_cpu_backend.py).

The XLA flag is read once, when the first backend starts, so `configure` must run before any device is used. It is
only added for the jaxlib it was measured on, only when no accelerator plugin is installed (a GPU or TPU build
parses the same XLA_FLAGS), and never over a choice the user made in XLA_FLAGS.
"""

from __future__ import annotations

import importlib.util
import os

YNN_FUSION_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
FAST_YNN_FUSIONS = "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"
MEASURED_JAXLIB = "0.10.2"
_ACCELERATOR_PACKAGES = ("jax_plugins", "libtpu", "jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm7_plugin")


def tuning_flag() -> str:
    return f"{YNN_FUSION_FLAG}={FAST_YNN_FUSIONS}"


def _skip_reason() -> str | None:
    """Why the XLA flag is not added here, or None when it is."""
    import jaxlib

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
    reason = _skip_reason()
    if reason is not None:
        return f"XLA CPU flag not added: {reason}"
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {tuning_flag()}".strip()
    return f"XLA_FLAGS += {tuning_flag()}"
