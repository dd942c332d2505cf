"""Baseline for configs/llama2_7b_longgen_128k.py: the same run with all 32 layers full attention."""

import os

from longgen_jax.training import load_config_file

_LONGGEN_7B = os.path.join(os.path.dirname(__file__), "llama2_7b_longgen_128k.py")


def get_config():
  c = load_config_file(_LONGGEN_7B)
  c.model.preset = "llama2_7b_full"
  c.model.num_full_layers = 32
  c.model.sparse_spec = ""            # all full: no sparse layers
  return c
