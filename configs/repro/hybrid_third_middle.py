"""LongGen: 1/3 of the layers full, in the middle; the rest sink_window.

python scripts/reproduce.py --variants hybrid_third_middle   (or: python -m longgen_jax.train --config=configs/repro/hybrid_third_middle.py
--workdir=DIR --config.init_from=INIT, INIT a checkpoint of base.MODEL: the runner writes one per seed)
"""

import os

from longgen_jax.training import load_config_module

base = load_config_module(os.path.join(os.path.dirname(os.path.abspath(__file__)), "base.py"))

VARIANT = dict(full_fraction=1 / 3, sparse="sink_window", placement="middle")


def get_config():
  return base.make_config(**VARIANT)
