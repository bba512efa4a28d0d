"""The shipped experiment configs, one file each: `get_config(preset='')` and the tuple `PRESETS` it accepts.

The entry points take `--config NAME[:PRESET]` (a shipped config, from any directory) or `--config PATH[:PRESET]`
(any config file); `docs/configs.md` lists every field with its default.
"""

from __future__ import annotations

import importlib
import os

DIRECTORY = os.path.dirname(os.path.abspath(__file__))


def names() -> list[str]:
    """The shipped configs' names, sorted (the file names without .py)."""
    return sorted(f[:-3] for f in os.listdir(DIRECTORY) if f.endswith(".py") and not f.startswith("_"))


def path(name: str) -> str:
    """The file of shipped config `name`."""
    return os.path.join(DIRECTORY, name + ".py")


def presets(name: str) -> tuple[str, ...]:
    """The presets of shipped config `name` ('' is the config itself)."""
    return tuple(importlib.import_module(f"{__name__}.{name}").PRESETS)


def catalogue() -> str:
    """One line per shipped config with its presets, for --help and error messages."""
    lines = []
    for name in names():
        extra = [p for p in presets(name) if p]
        lines.append(f"  {name}" + (f"  (presets: {', '.join(extra)})" if extra else ""))
    return "\n".join(lines)
