"""A ready model from our checkpoint format or a Hugging Face Llama directory, and back.

`load_pretrained` and `save_model` are what train, generate, evaluate and convert share;
`load_config` reads either kind of directory's config without touching weights.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from longgen_jax.model.config import ModelConfig, preset, resolve_pattern
from longgen_jax.attention.spec import parse_spec
from longgen_jax.model.llama import Llama
from longgen_jax.weights import format as checkpoint_format
from longgen_jax.weights.format import ConversionError, ParamPath, flatten, unflatten
from longgen_jax.weights.hf import hf_to_model_config, iter_hf_params, listing, read_hf_json

# Fields that set parameter shapes: loading weights cannot change them.
_SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                 "num_kv_heads", "head_dim", "tie_embeddings")


def load_config(path: str | os.PathLike) -> ModelConfig:
  """ModelConfig of our checkpoint directory or of a Hugging Face Llama directory."""
  if checkpoint_format.is_checkpoint(path):
    return checkpoint_format.read_config(path)
  return hf_to_model_config(read_hf_json(path))


def apply_overrides(cfg: ModelConfig, overrides: dict[str, Any]) -> ModelConfig:
  fields = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ConversionError(f"unknown config override {unknown}; ModelConfig fields are {sorted(fields)}")
  for k in _SHAPE_FIELDS:
    if k in overrides and overrides[k] != getattr(cfg, k):
      raise ConversionError(f"cannot override {k} ({getattr(cfg, k)} -> {overrides[k]}) when loading "
                            "weights: parameter shapes depend on it")
  overrides = dict(overrides)
  specs = overrides.get("layer_specs")
  if isinstance(specs, str):
    try:
      overrides["layer_specs"] = resolve_pattern(specs, cfg.num_layers)
    except ValueError as e:
      raise ConversionError(str(e)) from None
  elif specs is not None:
    overrides["layer_specs"] = tuple(parse_spec(s) if isinstance(s, str) else s for s in specs)
  try:
    return cfg.replace(**overrides)
  except (ValueError, TypeError) as e:
    raise ConversionError(f"bad config override: {e}") from None


def check_stored(path, stored: dict[ParamPath, jax.ShapeDtypeStruct],
                  expected: dict[ParamPath, jax.ShapeDtypeStruct]):
  show = lambda ps: listing("/".join(p) for p in ps)
  missing = [p for p in expected if p not in stored]
  if missing:
    raise ConversionError(f"missing parameter {show(missing)} in checkpoint {path}")
  unexpected = [p for p in stored if p not in expected]
  if unexpected:
    raise ConversionError(f"unexpected parameter {show(unexpected)} in checkpoint {path}")
  for p, a in expected.items():
    if tuple(stored[p].shape) != tuple(a.shape):
      raise ConversionError(f"shape mismatch for parameter {'/'.join(p)!r} in checkpoint {path}: "
                            f"expected {tuple(a.shape)} (from config.json), got {tuple(stored[p].shape)}")


def load_pretrained(path: str | os.PathLike, *, dtype=jnp.float32, param_dtype=jnp.float32,
                    attn_impl: str = "auto", remat: str = "none", scan_layers: bool = True,
                    **config_overrides) -> Llama:
  """A ready Llama from our checkpoint directory or straight from a Hugging Face Llama directory.

  `config_overrides` replace ModelConfig fields that do not change parameter shapes, e.g.
  layer_specs (AttentionSpecs, spec strings, or a pattern string such as "longgen"),
  rope_theta, max_seq_len: the LongGen recipe starts from a converted Llama this way. The
  model is built abstractly and filled once, so parameters are materialised only once.
  """
  cfg = apply_overrides(load_config(path), config_overrides)
  abstract_model = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype,
                                                attn_impl=attn_impl, remat=remat, scan_layers=scan_layers))
  graphdef, param_state, rest = nnx.split(abstract_model, nnx.Param, ...)
  if jax.tree.leaves(rest):
    raise ConversionError(f"model has non-parameter state that a checkpoint cannot fill: {rest}")
  expected = flatten(nnx.to_pure_dict(param_state))
  if checkpoint_format.is_checkpoint(path):
    check_stored(path, checkpoint_format.param_metadata(path), expected)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = {p: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device) for p, a in expected.items()}
    params = checkpoint_format.restore(path, target)
  else:
    params = {p: jnp.asarray(a) for p, a in iter_hf_params(path, cfg, param_dtype)}
  nnx.replace_by_pure_dict(param_state, unflatten(params))
  return nnx.merge(graphdef, param_state, rest)


def save_model(model: Llama, out_dir: str | os.PathLike, *, hf_config: dict | None = None,
               overwrite: bool = False) -> None:
  """Write `model` in our checkpoint format (config.json + Orbax params/)."""
  params = flatten(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  checkpoint_format.write(out_dir, model.config, params, hf_config, overwrite=overwrite)




def random_model(preset_name: str, *, seed: int = 0, dtype=jnp.float32, param_dtype=jnp.float32,
                 attn_impl: str = "auto", remat: str = "none") -> Llama:
  """A randomly initialised preset model (smoke tests, benchmarks)."""
  return Llama(preset(preset_name), rngs=nnx.Rngs(seed), dtype=dtype, param_dtype=param_dtype,
               attn_impl=attn_impl, remat=remat)
