"""Weights in and out: our checkpoint format (`format`), Hugging Face names/config/safetensors
(`hf`), whole-directory conversions (`conversion`) and ready models (`pretrained`)."""

from longgen_jax.weights.conversion import hf_to_jax, jax_to_hf, parse_size
from longgen_jax.weights.format import ConversionError
from longgen_jax.weights.pretrained import load_config, load_pretrained, random_model, save_model

__all__ = ["ConversionError", "hf_to_jax", "jax_to_hf", "load_config", "load_pretrained", "parse_size",
           "random_model", "save_model"]
