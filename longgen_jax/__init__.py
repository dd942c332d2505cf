"""longgen_jax: LongGen (sparse-hybrid long-context Llama) in JAX/Flax.

Rooms, bottom to top: `attention` (patterns, kernels, dispatch) <- `model` (config, Llama, KV
caches, generation) <- `parallel`, `data`, `weights`, `training`, `evaluation`; the CLIs
(`train`, `convert`, `sample`, `evaluate`) sit on top and nothing imports them.
"""

from longgen_jax.attention import AttentionSpec, attention, block_layout, dense_mask, parse_spec
from longgen_jax.model.config import ModelConfig, layer_pattern, preset
from longgen_jax.model.generation import generate
from longgen_jax.model.kv_cache import kv_cache_bytes
from longgen_jax.model.llama import Llama
from longgen_jax.weights.pretrained import load_pretrained

__all__ = ["AttentionSpec", "Llama", "ModelConfig", "attention", "block_layout", "dense_mask",
           "generate", "kv_cache_bytes", "layer_pattern", "load_pretrained", "parse_spec", "preset"]
