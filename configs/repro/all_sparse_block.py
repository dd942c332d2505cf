"""Every layer block_sparse: the paper says retrieval fails beyond the local blocks.

python scripts/reproduce.py --variants all_sparse_block   (or: python -m longgen_jax.train --config=configs/repro/all_sparse_block.py
--workdir=DIR --config.init_from=INIT, INIT a checkpoint of base.MODEL: the runner writes one per seed)
"""

import os

from longgen_jax.training import load_config_module

base = load_config_module(os.path.join(os.path.dirname(os.path.abspath(__file__)), "base.py"))

VARIANT = dict(full_fraction=0, sparse="block_sparse", placement="middle")


def get_config():
  return base.make_config(**VARIANT)
