"""The model room: config and presets, the NNX Llama (one forward pass), KV caches, prefill/decode
orchestration and text generation."""

from longgen_jax.model.config import (DTYPES, PLACEMENTS, PRESETS, REMAT_POLICIES, ModelConfig, layer_pattern,
                                      longgen_pattern, preset, resolve_pattern)
from longgen_jax.model.llama import Llama, sequence_positions

__all__ = ["DTYPES", "PLACEMENTS", "PRESETS", "REMAT_POLICIES", "Llama", "ModelConfig", "layer_pattern",
           "longgen_pattern", "preset", "resolve_pattern", "sequence_positions"]
