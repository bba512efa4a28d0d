"""What the entry points (main, bench) do with their command line before anything runs: `--config` by shipped name
or by path, and every way a config file or a workdir can be wrong as one line (exit 2) instead of a traceback."""

from __future__ import annotations

import importlib.util
import os
import sys
import traceback

from absl import flags

from mmdiff_jax import configs


class UsageError(Exception):
    """A bad command line: the message names the flag and the fix."""


def resolve_config(spec: str) -> str:
    """`NAME[:PRESET]` of a shipped config or `PATH[:PRESET]` of any config file -> `FILE[:PRESET]`; the file is
    imported and `get_config(PRESET)` called once here, so a missing file, a file that fails to import and an
    unknown preset are each one line."""
    where, sep, preset = spec.partition(":")
    if os.path.isfile(where):
        path = where
    elif where in configs.names():
        path = configs.path(where)
    else:
        hint = "" if where.endswith(".py") or os.sep in where else " (a shipped name is written without .py)"
        raise UsageError(f"--config: {where!r} is neither a config file nor a shipped config{hint}. The shipped "
                         f"configs:\n{configs.catalogue()}")
    module_spec = importlib.util.spec_from_file_location("_mmdiff_config_check", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
        get_config = module.get_config
    except Exception as e:  # noqa: BLE001 - any error in the user's file becomes one line naming it
        raise UsageError(f"--config: {path} failed to load: {_where_in(e, path)}") from None
    try:
        get_config(preset) if sep else get_config()
    except Exception as e:  # noqa: BLE001
        raise UsageError(f"--config: {path}{sep}{preset}: get_config failed: {_where_in(e, path)}") from None
    return path + sep + preset


def _where_in(error: BaseException, path: str) -> str:
    """`Type: message (line N)`, N being the deepest line of `path` in the traceback (or the syntax error's)."""
    line = getattr(error, "lineno", None) if isinstance(error, SyntaxError) else None
    for frame in traceback.extract_tb(error.__traceback__):
        if os.path.abspath(frame.filename) == os.path.abspath(path):
            line = frame.lineno
    message = error.msg if isinstance(error, SyntaxError) else str(error)
    return f"{type(error).__name__}: {message}" + (f" (line {line})" if line else "")


def check_workdir(workdir: str) -> None:
    """A workdir must be a directory this process can write, or creatable; nothing is created here."""
    if not workdir:
        raise UsageError("--workdir: empty; name a directory for checkpoints, metrics and samples.")
    path = os.path.abspath(workdir)
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"--workdir: {workdir} is a file, not a directory; name a directory (new or an earlier run's).")
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UsageError(f"--workdir: {workdir} cannot be created: {existing} is a file.")
    if not os.access(existing, os.W_OK | os.X_OK):
        verb = "is not writable" if existing == path else f"cannot be created: {existing} is not writable"
        raise UsageError(f"--workdir: {workdir} {verb} by this user; choose another directory.")


def _rewrite_config_flag(argv: list[str]) -> list[str]:
    """argv with every `--config X` / `--config=X` value resolved (see `resolve_config`)."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg == "--config" and i + 1 < len(out):
            out[i + 1] = resolve_config(out[i + 1])
        elif arg.startswith("--config="):
            out[i] = "--config=" + resolve_config(arg[len("--config="):])
    return out


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parser for an entry point with a `--config` flag (and, if defined, `--workdir`): one line and exit 2
    for any bad flag, config or workdir."""
    try:
        argv = _rewrite_config_flag(argv)
        rest = flags.FLAGS(argv)
        if "workdir" in flags.FLAGS and flags.FLAGS.workdir is not None:
            check_workdir(flags.FLAGS.workdir)
        return rest
    except UsageError as e:
        _die(str(e))
    except flags.Error as e:
        _die(f"{e}\nSee --helpfull.")
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        _die(f"bad config override: {e}".replace("\\n", " "))


def _die(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)
