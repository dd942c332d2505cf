"""Training checkpoints: Orbax CheckpointManager holding train state, data-iterator state and config.

Layout: WORKDIR/checkpoints/<step>/{state, data, config}. Orbax writes each step into a temporary
directory and renames it when complete, so a process killed mid-save leaves the previous step as the
latest complete checkpoint; the half-written temporary directory is ignored and cleaned up later.
Saves are asynchronous: the arrays are copied off the device, then written in a background thread
while training continues. The data iterator's state is captured synchronously at `save`.
"""

from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp


class Checkpointer:

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: Any, data_iterator: Any, config: dict) -> bool:
    """Starts an async save of `state` (a pytree of jax arrays), the iterator and the config."""
    import grain
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(data_iterator),
        config=ocp.args.JsonSave(config))
    return self.manager.save(step, args=args, force=True)

  def restore(self, step: int, abstract_state: Any, data_iterator: Any) -> Any:
    """The train state at `step` laid out like `abstract_state`; `data_iterator` is restored in place."""
    import grain
    args = ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=grain.checkpoint.CheckpointRestore(data_iterator))
    return self.manager.restore(step, args=args).state

  def restore_config(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config

  def wait(self):
    """Blocks until the in-flight async save (if any) is committed."""
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()
