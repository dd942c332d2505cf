"""Baseline for configs/llama2_7b_longgen_128k.py: the same run with all 32 layers full attention."""

import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    "llama2_7b_longgen_128k", os.path.join(os.path.dirname(__file__), "llama2_7b_longgen_128k.py"))
_longgen = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_longgen)


def get_config():
  c = _longgen.get_config()
  c.model.preset = "llama2_7b_full"
  c.model.num_full_layers = 32
  c.model.sparse_spec = ""            # all full: no sparse layers
  return c
