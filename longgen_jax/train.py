"""Training CLI (also `longgen-train`):

  python -m longgen_jax.train --config=configs/tiny.py --workdir=DIR [--config.key=value ...] [--distributed]

Every config key is in `training.config.default_config`; the loop is `training.train`.
"""

from __future__ import annotations

import sys


def main(argv):
  import jax
  from absl import flags, logging

  from longgen_jax.parallel.runtime import (HOST_MEMORY_ENV, allow_offload_host_memory, heartbeat_default_for,
                                           claim_device_memory, detect_launch, initialize, plan_for_devices)
  from longgen_jax.training import TrainingDiverged, train
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments: {argv[1:]}")
  claim_device_memory()  # before the GPU backend starts
  remat = flags.FLAGS.config.model.remat
  host_gib = allow_offload_host_memory(remat)  # read when the GPU backend starts
  if host_gib is not None:
    print(f"[train] remat='offload': pinned host memory up to {host_gib} GiB per GPU ({HOST_MEMORY_ENV}; "
          "XLA's pool grows toward it, so set it to the need `--config.dry_run=True` prints)", file=sys.stderr)
  planned = flags.FLAGS.config.dry_run_devices if flags.FLAGS.config.dry_run else 0
  if planned > 0:  # a mesh this machine does not have, compiled from this one process
    if flags.FLAGS.distributed or detect_launch(cluster=False).kind != "single":
      raise ValueError("config.dry_run_devices plans a mesh from one process: run it without a multi-process launch")
    plan_for_devices(planned)
  # before anything touches a device; pinning the offload pool can keep a process from heartbeats for minutes
  launch = initialize(cluster=flags.FLAGS.distributed, heartbeat_default_s=heartbeat_default_for(remat))
  if launch.kind != "single" and jax.process_index() == 0:
    print(f"[train] {launch.kind} launch: {jax.process_count()} processes, {jax.device_count()} devices",
          file=sys.stderr)
  elif flags.FLAGS.distributed:
    print("[train] --distributed: no multi-process launch found (SLURM, TPU pod, Open MPI or LONGGEN_JAX_*); "
          "running as one process", file=sys.stderr)
  try:
    train(flags.FLAGS.config, flags.FLAGS.workdir)
  except TrainingDiverged as e:  # (OutOfDeviceMemory is a ValueError: one line, see run())
    print(f"[train] ERROR: {e}", file=sys.stderr)
    sys.exit(1)


def _define_flags():
  from absl import flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None, "ml_collections config file (configs/*.py)",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "checkpoints, metrics.jsonl, TensorBoard events, config.json")
  flags.DEFINE_bool("distributed", False, "one process per host (or per GPU): join the other processes of a "
                    "SLURM job, TPU pod slice or Open MPI run (an explicit LONGGEN_JAX_COORDINATOR launch "
                    "needs no flag); see launch/")
  flags.mark_flags_as_required(["config", "workdir"])


def check_config_flags(argv: list[str]) -> str | None:
  """An error line for a --config.KEY=... flag naming a key the config does not have (ml_collections
  would raise a long traceback), else None."""
  from longgen_jax.training.config import config_keys, default_config
  known = config_keys(default_config())
  for arg in argv:
    if arg.startswith("--config."):
      key = arg[len("--config."):].split("=", 1)[0]
      if key not in known and not any(k.startswith(key + ".") for k in known):
        close = sorted(k for k in known if k.split(".")[-1] == key.split(".")[-1])
        return f"unknown config key {key!r}" + (f"; did you mean {close}?" if close else
                                                "; every key is listed in longgen_jax/training/config.py")
  return None


def run():
  """Console entry point: user errors (bad config values, unknown keys, missing files) end in one line;
  LONGGEN_JAX_DEBUG=1 shows the traceback."""
  import os

  from absl import app
  error = check_config_flags(sys.argv[1:])
  if error:
    print(f"[train] error: {error}", file=sys.stderr)
    sys.exit(2)
  _define_flags()
  try:
    app.run(main)
  except (ValueError, FileNotFoundError) as e:
    if os.environ.get("LONGGEN_JAX_DEBUG"):
      raise
    print(f"[train] error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  run()
