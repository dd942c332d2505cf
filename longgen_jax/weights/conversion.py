"""Whole-checkpoint conversions: Hugging Face Llama directory <-> our checkpoint format.

Tensors stream one at a time (hf_to_jax through memory-mapped scratch files next to the
output, jax_to_hf one safetensors shard at a time), so host memory stays near one tensor even
for a 70B model.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from longgen_jax.model.config import DTYPES, resolve_pattern
from longgen_jax.model.config import ModelConfig
from longgen_jax.weights import format as checkpoint_format
from longgen_jax.weights.format import ConversionError
from longgen_jax.weights.hf import (SAFETENSORS_FILE, SAFETENSORS_INDEX, abstract_params, hf_to_model_config,
                                    listing, model_config_to_hf, open_checked, read_hf_json, stream, tensor_plan)
from longgen_jax.weights.pretrained import apply_overrides, check_stored


class _FileBacked(np.memmap):
  """A memory-mapped scratch array that Orbax may write without first copying it to RAM."""

  def __deepcopy__(self, memo):
    return self  # read-only and owned by the converter: nothing can change it mid-save


def _spill(arr: np.ndarray, file: str) -> _FileBacked:
  """Move `arr` to a scratch .npy file and return a read-only memory map of it."""
  np.save(file, arr)
  return np.load(file, mmap_mode="r").view(_FileBacked)


def hf_to_jax(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, *, pattern: str | None = None,
              sparse: str | None = None, num_full: int | None = None, placement: str = "middle",
              rope_theta: float | None = None, max_seq_len: int | None = None,
              param_dtype=jnp.float32, overwrite: bool = False, progress: bool | None = None) -> ModelConfig:
  """Convert a Hugging Face Llama directory into our checkpoint; returns the written config.

  pattern None keeps the source's pattern (all full for a plain Llama; the stored one for a
  model we exported). Tensors stream through memory-mapped scratch files next to the
  output, so host memory stays near one tensor even for a 70B model.
  """
  hf = read_hf_json(hf_dir)
  cfg = hf_to_model_config(hf)
  changes: dict[str, Any] = {}
  if pattern is not None:
    try:
      changes["layer_specs"] = resolve_pattern(pattern, cfg.num_layers, sparse=sparse, num_full=num_full,
                                               placement=placement)
    except ValueError as e:
      raise ConversionError(f"{e} (--pattern/--sparse/--num-full)") from None
  elif sparse is not None or num_full is not None:
    raise ConversionError("--sparse and --num-full apply to a pattern; pass --pattern longgen (or a preset)")
  if rope_theta is not None:
    if not rope_theta > 0:
      raise ConversionError(f"--rope-theta must be > 0, got {rope_theta}")
    changes["rope_theta"] = float(rope_theta)
  if max_seq_len is not None:
    if max_seq_len < 1:
      raise ConversionError(f"--max-seq-len must be >= 1, got {max_seq_len}")
    changes["max_seq_len"] = int(max_seq_len)
  cfg = apply_overrides(cfg, changes)
  out = Path(out_dir)
  _refuse_overlap(hf_dir, out, "--hf-dir", "--out")
  if (out / checkpoint_format.PARAMS_DIR).exists() and not overwrite:
    raise ConversionError(f"{out / checkpoint_format.PARAMS_DIR} already exists; pass --force to replace it")
  if (out / "config.json").exists() and not overwrite:
    raise ConversionError(f"{out / 'config.json'} already exists (not written by this conversion); "
                          "choose an empty --out or pass --force to replace it")
  reader, plan = open_checked(hf_dir, cfg)  # fail before writing anything
  out.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.convert-") as scratch:
    params = {path: _spill(arr, os.path.join(scratch, f"{i}.npy"))
              for i, (path, arr) in enumerate(stream(reader, plan, param_dtype, progress))}
    checkpoint_format.write(out, cfg, params, hf_config=hf, overwrite=overwrite)
    del params
  return cfg


def _refuse_overlap(src, out: Path, src_flag: str, out_flag: str):
  """A conversion never writes into (or around) the directory it reads, even with --force."""
  a, b = Path(src).resolve(), out.resolve()
  if a == b or a in b.parents or b in a.parents:
    raise ConversionError(f"{out_flag} {out} overlaps {src_flag} {src}: writing there would destroy the input; "
                          "choose another output directory")


def parse_size(text: str | int) -> int:
  """Bytes in "5GB" (10^9, as Hugging Face), "500MiB" (2^20), "20KB" or a plain integer."""
  if isinstance(text, int):
    size = text
  else:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B)?\s*", text.upper())
    if not m:
      raise ConversionError(f"cannot parse size {text!r}; expected e.g. 5GB, 500MB or 1048576")
    unit = m.group(2) or "B"
    scale = (1024 if "I" in unit else 1000) ** ("BKMGT".index(unit[0]) if unit != "B" else 0)
    size = int(float(m.group(1)) * scale)
  if size < 1:
    raise ConversionError(f"shard size {text!r} must be at least 1 byte (e.g. 5GB)")
  return size


def _shards(sizes: list[tuple[str, int]], limit: int) -> list[list[str]]:
  """Greedy packing in order; a tensor bigger than the limit gets a shard of its own."""
  shards, size = [[]], 0
  for name, n in sizes:
    if shards[-1] and size + n > limit:
      shards.append([])
      size = 0
    shards[-1].append(name)
    size += n
  return shards


def jax_to_hf(ckpt_dir: str | os.PathLike, out_dir: str | os.PathLike, *, shard_size: str | int = "5GB",
              dtype: str | None = None, overwrite: bool = False, progress: bool | None = None) -> list[str]:
  """Write our checkpoint as a Hugging Face LlamaForCausalLM directory; returns the weight files.

  dtype None keeps the stored parameter dtype. Shards are restored one at a time.
  """
  from safetensors.numpy import save_file
  from tqdm import tqdm
  if not checkpoint_format.is_checkpoint(ckpt_dir):
    raise ConversionError(f"{ckpt_dir} is not a longgen_jax checkpoint (missing config.json or params/)")
  cfg = checkpoint_format.read_config(ckpt_dir)
  stored = checkpoint_format.param_metadata(ckpt_dir)
  check_stored(ckpt_dir, stored, abstract_params(cfg))
  plan = tensor_plan(cfg)
  if dtype is None:
    kinds = {np.dtype(a.dtype) for a in stored.values()}
    out_dtype = kinds.pop() if len(kinds) == 1 else np.dtype(np.float32)
  elif dtype in DTYPES:
    out_dtype = np.dtype(DTYPES[dtype])
  else:
    raise ConversionError(f"unsupported dtype {dtype!r}; choose from {list(DTYPES)}")
  out = Path(out_dir)
  _refuse_overlap(ckpt_dir, out, "--ckpt", "--out")
  old = sorted(p.name for p in out.glob("model*.safetensors*")) if out.exists() else []
  if old and not overwrite:
    raise ConversionError(f"{out} already holds weights {listing(old)}; pass --force to replace them")
  if (out / "config.json").exists() and not overwrite:
    raise ConversionError(f"{out / 'config.json'} already exists; choose an empty --out or pass --force to "
                          "replace it")
  out.mkdir(parents=True, exist_ok=True)
  for name in old:
    (out / name).unlink()
  sizes = [(n, int(np.prod(e.hf_shape)) * out_dtype.itemsize) for n, e in plan.items()]
  shards = _shards(sizes, parse_size(shard_size))
  files = ([SAFETENSORS_FILE] if len(shards) == 1 else
           [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
  weight_map = {}
  bar = tqdm(total=len(plan), desc="tensors", unit="tensor", disable=None if progress is None else not progress)
  for names, file in zip(shards, files):
    arrays = checkpoint_format.restore_numpy(ckpt_dir, [plan[n].path for n in names])
    tensors = {}
    for n in names:
      a = arrays.pop(plan[n].path)
      tensors[n] = np.ascontiguousarray(a.T if plan[n].transpose else a, dtype=out_dtype)
      weight_map[n] = file
      bar.update()
    save_file(tensors, str(out / file), metadata={"format": "pt"})
    del tensors, arrays
  bar.close()
  if len(shards) > 1:
    index = {"metadata": {"total_size": sum(n for _, n in sizes)}, "weight_map": weight_map}
    (out / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
  hf = model_config_to_hf(cfg, out_dtype, base=checkpoint_format.read_hf_config(ckpt_dir))
  (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
  return files


