"""Orbax checkpoints of the whole train state (params, EMA, optimizer, step, RNG) plus the data iterator position
and a model signature. Restoring into a model of another shape fails with a clear error; nothing is overwritten.

Orbax writes each step to a temporary directory and renames it when complete, so a crash never leaves a
half-written checkpoint under a valid step number.
"""

from __future__ import annotations

import os
import shutil
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from mmdiff_jax import parallel
from mmdiff_jax.errors import UserError


class CheckpointMismatchError(UserError):
    """The workdir holds a checkpoint of a different model or config."""


def signature(tree: Any) -> dict[str, list[int]]:
    """{'path/to/leaf': shape} of a pytree (used to recognize a checkpoint of another model shape)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(path): list(np.shape(leaf)) for path, leaf in flat}


def abstract(state: Any, shardings: Any) -> Any:
    """A restore target: the shapes and dtypes of `state`, placed with `shardings` (resharding on restore)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), state, shardings)


class Checkpointer:
    def __init__(self, workdir: str, max_to_keep: int = 2):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        self.manager = ocp.CheckpointManager(
            self.directory,
            item_names=("state", "data", "meta"),
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_state: dict, meta: dict) -> None:
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_state),
                meta=ocp.args.JsonSave(meta),
            ),
        )

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def check_compatible(self, step: int, meta: dict) -> None:
        """Compare the stored model signature with the current one; raise naming the first difference."""
        stored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        want, have = meta["params"], stored.get("params", {})
        for name in sorted(set(want) | set(have)):
            if want.get(name) != have.get(name):
                raise CheckpointMismatchError(
                    f"{self.directory} holds a checkpoint (step {step}) of another model: parameter {name} has shape "
                    f"{have.get(name)} there but {want.get(name)} in this config. Use a new --workdir, or the config "
                    "that wrote it; nothing was overwritten."
                )

    def restore_latest(self, template_state: Any, meta: dict) -> tuple[Any, dict, int] | None:
        """Restore the newest readable checkpoint: (state, data iterator state, step), or None if there is none.

        A checkpoint that cannot be read (truncated or corrupt files) is reported, moved to
        `workdir/corrupt_checkpoints/`, and the previous one is tried. If checkpoints exist but none is readable this
        raises: a run never silently starts over. A checkpoint of another model raises CheckpointMismatchError.
        """
        steps = sorted(self.manager.all_steps(), reverse=True)
        if not steps:
            return None
        bad = []
        for step in steps:
            try:
                self.check_compatible(step, meta)
                state, data_state = self.restore(step, template_state)
            except CheckpointMismatchError:
                raise
            except Exception as e:  # noqa: BLE001 - any read failure means this step is unusable
                moved = self._quarantine(step)
                logging.error("Checkpoint step %d in %s is unreadable (%s: %s); moved it to %s and trying the "
                              "previous one.", step, self.directory, type(e).__name__, str(e).splitlines()[0][:300],
                              moved)
                bad.append(step)
                continue
            if bad:
                logging.warning("Resumed from step %d instead of the unreadable step(s) %s.", step, bad)
            return state, data_state, step
        raise UserError(
            f"none of the checkpoints in {self.directory} (steps {bad}) could be read; they were moved to "
            f"{self.quarantine_dir}. Nothing was restored and training did not start over: inspect them, then delete "
            "them (or use a new --workdir) to train from scratch."
        )

    @property
    def quarantine_dir(self) -> str:
        return os.path.join(os.path.dirname(self.directory), "corrupt_checkpoints")

    def _quarantine(self, step: int) -> str:
        """Move a bad step aside (process 0 moves it; every process waits for the move, then re-lists)."""
        target = os.path.join(self.quarantine_dir, f"{step}-{int(time.time())}")
        parallel.sync(f"quarantine-{step}-read")
        if parallel.is_main_process():
            os.makedirs(self.quarantine_dir, exist_ok=True)
            shutil.move(os.path.join(self.directory, str(step)), target)
        parallel.sync(f"quarantine-{step}-moved")
        self.manager.reload()
        return target

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()),
        )
        logging.info("Restored checkpoint step %d from %s", step, self.directory)
        return restored.state, restored.data

    def restore_data(self, step: int) -> dict:
        """The data iterator state stored with a step."""
        return self.manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore())).data
