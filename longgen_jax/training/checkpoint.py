"""Training checkpoints: Orbax CheckpointManager holding train state, data-iterator state and config.

Layout: WORKDIR/checkpoints/<step>/{state, data, config}. Orbax writes each step into a temporary
directory and renames it when complete, so a process killed mid-save leaves the previous step as the
latest complete checkpoint; the half-written temporary directory is ignored and cleaned up later.
Saves are asynchronous: the arrays are copied off the device, then written in a background thread
while training continues. The data iterator's state is captured synchronously at `save`.
"""

from __future__ import annotations

import json
import os
import threading
import zlib
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp


class Checkpointer:

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)
    self._pending: int | None = None      # saved step whose checksums are not written yet
    self._sealer: threading.Thread | None = None

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: Any, data_iterator: Any, config: dict) -> bool:
    """Starts an async save of `state` (a pytree of jax arrays), the iterator and the config."""
    import grain
    self._seal()  # the previous save is complete once Orbax starts the next one
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(data_iterator),
        config=ocp.args.JsonSave(config))
    saved = self.manager.save(step, args=args, force=True)
    self._pending = step if saved else None
    return saved

  def _seal(self, block: bool = False):
    """Waits for the in-flight save, then writes its checksums in a background thread (block: and
    waits for that thread too)."""
    if self._pending is not None:
      self.manager.wait_until_finished()
      if self._sealer is not None:
        self._sealer.join()
      step_dir, self._pending = os.path.join(self.directory, str(self._pending)), None
      if jax.process_index() == 0:
        self._sealer = threading.Thread(target=write_checksums, args=(step_dir,), daemon=True)
        self._sealer.start()
    if block and self._sealer is not None:
      self._sealer.join()

  def restore(self, step: int, abstract_state: Any, data_iterator: Any) -> Any:
    """The train state at `step` laid out like `abstract_state`; `data_iterator` is restored in place."""
    import grain
    verify_checksums(os.path.join(self.directory, str(step)))
    args = ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=grain.checkpoint.CheckpointRestore(data_iterator))
    return self.manager.restore(step, args=args).state

  def restore_newest(self, abstract_state: Any, data_iterator: Any,
                     log: Callable[[str], None]) -> tuple[int | None, Any, dict | None]:
    """(step, state, saved config) of the newest checkpoint that restores, or (None, None, None).

    A checkpoint that fails to restore is reported through `log`, renamed to corrupt-<step> and skipped.
    """
    for step in sorted(self.all_steps(), reverse=True):
      try:
        config = self.restore_config(step)
        state = self.restore(step, abstract_state, data_iterator)
        return step, state, config
      except Exception as e:  # noqa: BLE001  (any decoding failure means: this checkpoint is damaged)
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        aside = os.path.join(self.directory, f"corrupt-{step}")
        os.rename(os.path.join(self.directory, str(step)), aside)
        self.manager.reload()
        log(f"WARNING: checkpoint step {step} does not restore ({type(e).__name__}: {reason}); "
            f"moved it to {aside} and trying the previous one")
    return None, None, None

  def restore_config(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config

  def wait(self):
    """Blocks until the in-flight async save (if any) is committed and checksummed."""
    self.manager.wait_until_finished()
    self._seal(block=True)

  def close(self):
    self._seal(block=True)
    self.manager.close()


CHECKSUMS = "CHECKSUMS.json"


def _files(step_dir: str) -> list[str]:
  return sorted(os.path.relpath(os.path.join(root, f), step_dir)
                for root, _, files in os.walk(step_dir) for f in files if f != CHECKSUMS)


def _crc32(path: str) -> int:
  crc = 0
  with open(path, "rb") as f:
    while chunk := f.read(1 << 24):
      crc = zlib.crc32(chunk, crc)
  return crc


def write_checksums(step_dir: str) -> None:
  """{relative path: [size, crc32]} of every file of a complete checkpoint, written atomically."""
  try:
    sums = {f: [os.path.getsize(os.path.join(step_dir, f)), _crc32(os.path.join(step_dir, f))]
            for f in _files(step_dir)}
    tmp = os.path.join(step_dir, CHECKSUMS + ".tmp")
    with open(tmp, "w") as fh:
      json.dump(sums, fh)
    os.replace(tmp, os.path.join(step_dir, CHECKSUMS))
  except OSError:  # the step was rotated away (max_to_keep) meanwhile: nothing to protect
    pass


def verify_checksums(step_dir: str) -> None:
  """Raises ValueError naming the first file that is missing or changed since its checksums were written
  (a checkpoint without them, e.g. cut off right after its save, is not checked)."""
  path = os.path.join(step_dir, CHECKSUMS)
  if not os.path.exists(path):
    return
  with open(path) as fh:
    sums = json.load(fh)
  for f, (size, crc) in sums.items():
    full = os.path.join(step_dir, f)
    if not os.path.exists(full) or os.path.getsize(full) != size or _crc32(full) != crc:
      raise ValueError(f"{f} is missing or changed since the checkpoint was written (size/CRC-32 mismatch)")
