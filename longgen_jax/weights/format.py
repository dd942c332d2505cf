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
  """Write config.json (+ hf_config.json) and params/ from flat {path: array} params, atomically.

  Everything is written into a hidden sibling `.NAME.partial` and then renamed into place, so a
  crash at any moment leaves either the previous complete checkpoint or the new one, never a mix
  (a leftover `.partial` is discarded by the next write). Other files already in `out_dir` (e.g.
  tokenizer files) are kept. Arrays may be jax arrays (possibly sharded) or numpy arrays, including
  np.memmap (which keeps host memory low when converting large models).
  """
  out = _path(out_dir)
  if (out / PARAMS_DIR).exists() and not overwrite:
    raise ConversionError(f"{out / PARAMS_DIR} already exists; choose a new output directory or overwrite")
  partial = out.parent / f".{out.name}.partial"
  if jax.process_index() == 0 and partial.exists():
    partial.rmtree()
  partial.mkdir(parents=True, exist_ok=True)
  file_backed = any(isinstance(a, np.memmap) for a in params.values())
  # Memory-mapped inputs are written a little at a time so they never all sit in RAM.
  _checkpointer(save_concurrent_gb=1 if file_backed else 96).save(partial / PARAMS_DIR, unflatten(params))
  if jax.process_index() == 0:
    (partial / CONFIG_FILE).write_text(cfg.to_json() + "\n")
    if hf_config is not None:
      (partial / HF_CONFIG_FILE).write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    _swap_in(partial, out)
  return out


_OURS = (CONFIG_FILE, PARAMS_DIR, HF_CONFIG_FILE)


def _swap_in(new: epath.Path, out: epath.Path) -> None:
  """Rename the complete `new` into place as `out`, keeping out's other files; the old checkpoint is
  deleted only after the new one is in place."""
  if not out.exists():
    new.rename(out)
    return
  for entry in out.iterdir():  # files that are not part of the checkpoint stay with the directory
    if entry.name not in _OURS:
      entry.rename(new / entry.name)
  replaced = out.parent / f".{out.name}.replaced"
  if replaced.exists():
    replaced.rmtree()
  out.rename(replaced)
  new.rename(out)
  replaced.rmtree()


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
