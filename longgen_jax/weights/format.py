"""The one model format train, generate, evaluate and convert share.

A directory holding
  config.json      ModelConfig.to_dict()
  params/          an Orbax (StandardCheckpointer) checkpoint of the parameters as a nested
                   dict of arrays with string keys, mirroring nnx.to_pure_dict(nnx.state(model,
                   nnx.Param)): {"embed_tokens": {"embedding": [V, E]}, "layers": {"0": {...}},
                   ..., "lm_head": {"kernel": [E, V]}} (no lm_head when embeddings are tied)
  hf_config.json   optional: the Hugging Face config the weights came from, so an export
                   back to Hugging Face keeps token ids and other fields we do not model.

Paths may be local or anything etils.epath understands (e.g. gs://).
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable, Mapping

import jax
import numpy as np
from etils import epath

from longgen_jax.model.config import ModelConfig

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
HF_CONFIG_FILE = "hf_config.json"

ParamPath = tuple[str, ...]


class ConversionError(ValueError):
  """A checkpoint or config that cannot be read or converted; the message names the problem."""


def _path(p: str | os.PathLike) -> epath.Path:
  p = os.fspath(p)
  return epath.Path(p if "://" in p else os.path.abspath(p))


def is_checkpoint(path: str | os.PathLike) -> bool:
  """True for a directory in our format (config.json next to params/)."""
  p = _path(path)
  return (p / CONFIG_FILE).exists() and (p / PARAMS_DIR).is_dir()


def read_config(path: str | os.PathLike) -> ModelConfig:
  p = _path(path) / CONFIG_FILE
  if not p.exists():
    raise ConversionError(f"missing {CONFIG_FILE} in checkpoint directory {_path(path)}")
  try:
    return ModelConfig.from_json(p.read_text())
  except (ValueError, TypeError) as e:
    raise ConversionError(f"{p} is not a valid longgen_jax model config: {e}") from None


def read_hf_config(path: str | os.PathLike) -> dict | None:
  """The Hugging Face config stored alongside the weights, if any."""
  p = _path(path) / HF_CONFIG_FILE
  return json.loads(p.read_text()) if p.exists() else None


def flatten(tree: Mapping[Any, Any], prefix: ParamPath = ()) -> dict[ParamPath, Any]:
  """{("layers", "0", "mlp", "up_proj", "kernel"): leaf, ...}; keys become strings."""
  out = {}
  for k, v in tree.items():
    path = prefix + (str(k),)
    if isinstance(v, Mapping):
      out.update(flatten(v, path))
    else:
      out[path] = v
  return out


def unflatten(flat: Mapping[ParamPath, Any]) -> dict:
  tree: dict = {}
  for path, v in flat.items():
    node = tree
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = v
  return tree


def _checkpointer(save_concurrent_gb: int = 96):
  import orbax.checkpoint as ocp
  return ocp.Checkpointer(ocp.StandardCheckpointHandler(save_concurrent_gb=save_concurrent_gb))


def write(out_dir: str | os.PathLike, cfg: ModelConfig, params: Mapping[ParamPath, Any],
          hf_config: dict | None = None, *, overwrite: bool = False) -> epath.Path:
  """Write config.json (+ hf_config.json) and params/ from flat {path: array} params.

  Arrays may be jax arrays (possibly sharded) or numpy arrays, including np.memmap
  (which keeps host memory low when converting large models).
  """
  out = _path(out_dir)
  params_dir = out / PARAMS_DIR
  if params_dir.exists():
    if not overwrite:
      raise ConversionError(f"{params_dir} already exists; choose a new output directory or overwrite")
    params_dir.rmtree()
  out.mkdir(parents=True, exist_ok=True)
  file_backed = any(isinstance(a, np.memmap) for a in params.values())
  # Memory-mapped inputs are written a little at a time so they never all sit in RAM.
  _checkpointer(save_concurrent_gb=1 if file_backed else 96).save(params_dir, unflatten(params))
  if jax.process_index() == 0:
    (out / CONFIG_FILE).write_text(cfg.to_json() + "\n")
    if hf_config is not None:
      (out / HF_CONFIG_FILE).write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    elif (out / HF_CONFIG_FILE).exists():
      (out / HF_CONFIG_FILE).unlink()
  return out


def param_metadata(path: str | os.PathLike) -> dict[ParamPath, jax.ShapeDtypeStruct]:
  """Stored shape and dtype of every parameter, without reading any array."""
  import orbax.checkpoint as ocp
  tree = ocp.PyTreeCheckpointer().metadata(_path(path) / PARAMS_DIR).item_metadata.tree
  return {k: jax.ShapeDtypeStruct(tuple(m.shape), np.dtype(m.dtype)) for k, m in flatten(tree).items()}


def restore(path: str | os.PathLike, target: Mapping[ParamPath, jax.ShapeDtypeStruct]) -> dict:
  """Restore all parameters as jax arrays with target's dtype (cast on read) and sharding.

  Each target leaf must carry a sharding; arrays go straight from storage to devices.
  """
  restored = _checkpointer().restore(_path(path) / PARAMS_DIR, unflatten(target))
  return flatten(restored)


def restore_numpy(path: str | os.PathLike, names: Iterable[ParamPath]) -> dict[ParamPath, np.ndarray]:
  """Restore only `names` as host numpy arrays (stored dtype): memory stays near their size."""
  import orbax.checkpoint as ocp
  names = list(names)
  item = unflatten({n: 0 for n in names})
  restore_args = unflatten({n: ocp.RestoreArgs(restore_type=np.ndarray) for n in names})
  restored = ocp.PyTreeCheckpointer().restore(
      _path(path) / PARAMS_DIR,
      args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True))
  return {n: np.asarray(v) for n, v in flatten(restored).items()}
