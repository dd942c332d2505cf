"""Training CLI (also `longgen-train`):

  python -m longgen_jax.train --config=configs/tiny.py --workdir=DIR [--config.key=value ...] [--distributed]

Every config key is in `training.config.default_config`; the loop is `training.train`.
"""

from __future__ import annotations

import sys


def main(argv):
  import jax
  from absl import flags, logging

  from longgen_jax.training import TrainingDiverged, train
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments: {argv[1:]}")
  if flags.FLAGS.distributed:  # before anything touches a device
    jax.distributed.initialize()
  try:
    train(flags.FLAGS.config, flags.FLAGS.workdir)
  except TrainingDiverged as e:
    print(f"[train] ERROR: {e}", file=sys.stderr)
    sys.exit(1)


def _define_flags():
  from absl import flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None, "ml_collections config file (configs/*.py)",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "checkpoints, metrics.jsonl, TensorBoard events, config.json")
  flags.DEFINE_bool("distributed", False, "one process per host: call jax.distributed.initialize() first "
                    "(finds the other hosts on TPU pods, SLURM and Open MPI)")
  flags.mark_flags_as_required(["config", "workdir"])


def run():
  """Console entry point."""
  from absl import app
  _define_flags()
  app.run(main)


if __name__ == "__main__":
  run()
