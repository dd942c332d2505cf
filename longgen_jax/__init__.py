"""longgen_jax: LongGen (sparse-hybrid long-context Llama) in JAX/Flax."""

from longgen_jax.attention import AttentionSpec, attention, block_layout, dense_mask
from longgen_jax.config import ModelConfig, layer_pattern, parse_spec, preset
from longgen_jax.model import Llama

__all__ = ["AttentionSpec", "Llama", "ModelConfig", "attention", "block_layout", "dense_mask",
           "generate", "kv_cache_bytes", "layer_pattern", "load_pretrained", "parse_spec", "preset"]

_LAZY = {"load_pretrained": "longgen_jax.convert", "generate": "longgen_jax.generate",
         "kv_cache_bytes": "longgen_jax.kv_cache"}


def __getattr__(name):  # heavy or optional modules load on first use
  if name in _LAZY:
    import importlib
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # importing the submodule bound the module here; rebind the function
    return value
  raise AttributeError(f"module 'longgen_jax' has no attribute {name!r}")
