"""Hugging Face Llama <-> longgen_jax checkpoints, and a ready model from either.

  python -m longgen_jax.convert hf-to-jax --hf-dir DIR --out DIR [--pattern longgen] [--rope-theta X]
  python -m longgen_jax.convert jax-to-hf --ckpt DIR --out DIR [--shard-size 5GB]

Safetensors are read with numpy (no torch), one tensor at a time, so host memory stays
near one tensor. Names mirror LlamaForCausalLM: our parameter ("layers", "3", "mlp",
"up_proj", "kernel") is Hugging Face's "model.layers.3.mlp.up_proj.weight" transposed
(Linear kernels are [in, out], torch weights [out, in]); RoPE is rotate-half in both, so
q/k need no permutation. The on-disk format of our side is in checkpoint_io.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from longgen_jax import checkpoint_io
from longgen_jax.attention.spec import AttentionSpec
from longgen_jax.checkpoint_io import ConversionError, ParamPath, flatten, unflatten
from longgen_jax.config import PRESETS, ModelConfig, layer_pattern, parse_spec, preset
from longgen_jax.model import Llama

__all__ = ["ConversionError", "hf_to_jax", "jax_to_hf", "load_config", "load_pretrained", "main",
           "resolve_pattern", "save_model"]

HF_PATTERN_KEY = "longgen_layer_specs"  # our layer pattern, kept in a Hugging Face config.json
DEFAULT_SPARSE = "sink_window(64,1984)"
LONGGEN_FULL_FRACTION = 3 / 8  # 12 of 32 layers for Llama-2-7B
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
          "float16": np.dtype(np.float16)}
_FLOAT_ST_DTYPES = {"F64", "F32", "F16", "BF16"}
_INV_FREQ_RE = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")
# Fields that set parameter shapes: loading weights cannot change them.
_SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                 "num_kv_heads", "head_dim", "tie_embeddings")


def _listing(names, limit: int = 5) -> str:
  names = list(names)
  shown = ", ".join(repr(n) for n in names[:limit])
  return shown + (f" (and {len(names) - limit} more)" if len(names) > limit else "")


# ----------------------------------------------------------------------------- layer patterns


def resolve_pattern(pattern: str, num_layers: int, *, sparse: str | AttentionSpec | None = None,
                    num_full: int | None = None, placement: str = "middle") -> tuple[AttentionSpec, ...]:
  """Layer specs for `pattern`: "full", "longgen", a preset name, or attention spec(s).

  "longgen" keeps 3/8 of the layers full (12 of 32) at `placement`, the rest `sparse`
  (default sink_window(64,1984)). A preset name uses that preset's pattern and needs its
  layer count. Otherwise one spec for every layer ("sink_window(64,1984)") or one per layer
  separated by ';' ("full;sink_window(4,28);full").
  """
  if pattern != "longgen" and (num_full is not None or (sparse is not None and pattern not in PRESETS)):
    raise ConversionError(f"--num-full applies to --pattern longgen and --sparse to longgen or a preset, "
                          f"not to pattern {pattern!r}")
  try:
    if pattern == "full":
      return (AttentionSpec.full(),) * num_layers
    if pattern == "longgen":
      if num_full is None:
        num_full = round(LONGGEN_FULL_FRACTION * num_layers)
      return layer_pattern(num_layers, num_full, sparse or DEFAULT_SPARSE, placement)
    if pattern in PRESETS:
      specs = preset(pattern, sparse=sparse).layer_specs
      if len(specs) != num_layers:
        raise ConversionError(f"pattern preset {pattern!r} has {len(specs)} layers but the model has "
                              f"{num_layers}; use --pattern longgen for a LongGen pattern of any depth")
      return specs
    specs = tuple(parse_spec(s) for s in pattern.split(";") if s.strip())
  except ConversionError:
    raise
  except ValueError as e:
    raise ConversionError(f"bad layer pattern {pattern!r}: {e}") from None
  if len(specs) == 1:
    return specs * num_layers
  if len(specs) != num_layers:
    raise ConversionError(f"layer pattern {pattern!r} lists {len(specs)} specs for {num_layers} layers")
  return specs


# ----------------------------------------------------------------------------- Hugging Face config


def _read_hf_json(hf_dir: str | os.PathLike) -> dict:
  d = Path(hf_dir)
  if not d.is_dir():
    raise ConversionError(f"Hugging Face model directory {d} does not exist")
  f = d / "config.json"
  if not f.exists():
    raise ConversionError(f"missing config.json in {d}: not a Hugging Face model directory")
  try:
    return json.loads(f.read_text())
  except json.JSONDecodeError as e:
    raise ConversionError(f"{f} is not valid JSON: {e}") from None


def _rope_theta(hf: dict) -> float:
  """rope_theta from a Llama config; only plain RoPE (as in Llama-2) is implemented."""
  params = hf.get("rope_parameters") or {}
  for key in ("rope_scaling", "rope_parameters"):
    rope = hf.get(key) or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
      raise ConversionError(f"unsupported RoPE scaling {key}.rope_type={kind!r} in config.json: only "
                            "plain RoPE (Llama-2 style, no rope_scaling) is implemented")
  return float(hf.get("rope_theta", params.get("rope_theta", 10000.0)))


def hf_to_model_config(hf: dict) -> ModelConfig:
  """ModelConfig for a Hugging Face Llama config dict, rejecting what the model cannot run."""
  if hf.get("model_type") != "llama":
    raise ConversionError(f"unsupported model_type {hf.get('model_type')!r} in config.json: only Llama "
                          "(model_type 'llama', LlamaForCausalLM) converts")
  archs = hf.get("architectures") or ["LlamaForCausalLM"]
  if archs != ["LlamaForCausalLM"]:
    raise ConversionError(f"unsupported architectures {archs} in config.json: expected ['LlamaForCausalLM']")
  for flag in ("attention_bias", "mlp_bias"):
    if hf.get(flag):
      raise ConversionError(f"unsupported Llama variant: config.json sets {flag}=true (biases are not implemented)")
  if hf.get("hidden_act", "silu") not in ("silu", "swish"):
    raise ConversionError(f"unsupported hidden_act {hf['hidden_act']!r} in config.json: expected 'silu'")
  missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                         "num_attention_heads") if k not in hf]
  if missing:
    raise ConversionError(f"config.json lacks required Llama fields {missing}")
  heads = hf["num_attention_heads"]
  specs = hf.get(HF_PATTERN_KEY) or ()
  try:
    return ModelConfig(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
        num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads, rope_theta=_rope_theta(hf),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        max_seq_len=hf.get("max_position_embeddings", 4096),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        layer_specs=tuple(parse_spec(s) for s in specs))
  except (ValueError, TypeError) as e:
    raise ConversionError(f"config.json does not describe a valid model: {e}") from None


def model_config_to_hf(cfg: ModelConfig, dtype: np.dtype, base: dict | None = None) -> dict:
  """LlamaForCausalLM config.json; `base` (the source model's config) keeps token ids etc."""
  hf = {k: v for k, v in (base or {}).items() if k not in (HF_PATTERN_KEY, "transformers_version")}
  hf.update(
      architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=cfg.vocab_size,
      hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
      num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
      num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, hidden_act="silu",
      max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.rms_norm_eps,
      rope_theta=cfg.rope_theta, rope_scaling=None,
      rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
      tie_word_embeddings=cfg.tie_embeddings, attention_bias=False, mlp_bias=False,
      torch_dtype=dtype.name, dtype=dtype.name)
  if cfg.num_full_layers != cfg.num_layers:
    hf[HF_PATTERN_KEY] = [str(s) for s in cfg.layer_specs]
  return dict(sorted(hf.items()))


# ----------------------------------------------------------------------------- tensor names


def hf_name(path: ParamPath) -> tuple[str, bool]:
  """Hugging Face tensor name of a parameter path, and whether it is stored transposed."""
  *modules, leaf = path
  if leaf not in ("kernel", "embedding", "weight"):
    raise ConversionError(f"parameter {'/'.join(path)} has no Hugging Face counterpart")
  prefix = "" if modules == ["lm_head"] else "model."
  return prefix + ".".join(modules) + ".weight", leaf == "kernel"


def _sort_key(path: ParamPath):
  return tuple((0, int(k), "") if k.isdigit() else (1, 0, k) for k in path)


def abstract_params(cfg: ModelConfig, param_dtype=jnp.float32) -> dict[ParamPath, jax.ShapeDtypeStruct]:
  """Parameter shapes of the model `cfg` builds, without allocating any."""
  model = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0), param_dtype=param_dtype))
  return flatten(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


@dataclasses.dataclass(frozen=True)
class _Entry:
  path: ParamPath
  transpose: bool
  hf_shape: tuple[int, ...]


def _plan(cfg: ModelConfig) -> dict[str, _Entry]:
  """Hugging Face name -> where it goes, in Hugging Face's own order."""
  plan = {}
  for path, a in sorted(abstract_params(cfg).items(), key=lambda kv: _sort_key(kv[0])):
    name, transpose = hf_name(path)
    plan[name] = _Entry(path, transpose, tuple(a.shape[::-1]) if transpose else tuple(a.shape))
  return plan


# ----------------------------------------------------------------------------- reading safetensors


class _SafetensorsDir:
  """The tensors of one Hugging Face directory: a single model.safetensors or indexed shards."""

  def __init__(self, hf_dir: str | os.PathLike):
    from safetensors import safe_open
    self._safe_open, self.dir = safe_open, Path(hf_dir)
    index, single = self.dir / SAFETENSORS_INDEX, self.dir / SAFETENSORS_FILE
    if index.exists():
      weight_map = json.loads(index.read_text()).get("weight_map")
      if not isinstance(weight_map, dict):
        raise ConversionError(f"{index} has no weight_map")
      missing = sorted({f for f in weight_map.values() if not (self.dir / f).exists()})
      if missing:
        raise ConversionError(f"missing shard file {_listing(missing)} named in {index.name}, "
                              f"not found in {self.dir}")
      self.file_of = {n: self.dir / f for n, f in weight_map.items()}
    elif single.exists():
      with safe_open(single, "numpy") as f:
        self.file_of = {n: single for n in f.keys()}
    else:
      self._no_weights()
    self._meta = {}  # name -> (shape, safetensors dtype), read from the file the index names
    for file in sorted(set(self.file_of.values())):
      with safe_open(file, "numpy") as f:
        for n in f.keys():
          if self.file_of.get(n) == file:
            s = f.get_slice(n)
            self._meta[n] = (tuple(s.get_shape()), s.get_dtype())
    lost = sorted(n for n in self.file_of if n not in self._meta)
    if lost:
      raise ConversionError(f"tensor {_listing(lost)} named in {SAFETENSORS_INDEX} is missing from its shard file")

  def _no_weights(self):
    shards = sorted(p.name for p in self.dir.glob("*.safetensors"))
    if shards:
      raise ConversionError(f"{self.dir} has safetensors shards {_listing(shards)} but no {SAFETENSORS_INDEX}")
    if list(self.dir.glob("pytorch_model*.bin")):
      raise ConversionError(
          f"{self.dir} holds only PyTorch .bin weights; this converter reads safetensors (no torch). "
          "Re-save them: AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(OUT)")
    raise ConversionError(f"no {SAFETENSORS_FILE} or {SAFETENSORS_INDEX} in {self.dir}")

  @property
  def names(self) -> set[str]:
    return set(self.file_of)

  def shape(self, name: str) -> tuple[int, ...]:
    return self._meta[name][0]

  def dtype(self, name: str) -> str:
    return self._meta[name][1]

  def get(self, name: str) -> np.ndarray:
    with self._safe_open(self.file_of[name], "numpy") as f:
      return f.get_tensor(name)


def _check_hf_tensors(reader: _SafetensorsDir, plan: dict[str, _Entry], cfg: ModelConfig):
  """Every expected tensor present with its shape, nothing unexplained left over."""
  names = reader.names
  missing = [n for n in plan if n not in names]
  if missing:
    raise ConversionError(f"missing tensor {_listing(missing)} in {reader.dir}")
  extra = {n for n in names - set(plan) if _INV_FREQ_RE.match(n)}  # derived RoPE buffers
  if cfg.tie_embeddings and "lm_head.weight" in names:
    extra.add("lm_head.weight")  # a tied head stored anyway; checked equal below
  unexpected = sorted(names - set(plan) - extra, key=lambda n: (len(n), n))
  if unexpected:
    raise ConversionError(f"unexpected tensor {_listing(unexpected)} in {reader.dir} "
                          "(not part of a LlamaForCausalLM with this config.json)")
  for name, e in plan.items():
    if reader.shape(name) != e.hf_shape:
      raise ConversionError(f"shape mismatch for tensor {name!r}: expected {e.hf_shape} "
                            f"(from config.json), got {reader.shape(name)}")
    if reader.dtype(name) not in _FLOAT_ST_DTYPES:
      raise ConversionError(f"tensor {name!r} has dtype {reader.dtype(name)}, expected a float type")
  _check_derived(reader, extra, cfg)


def _check_derived(reader: _SafetensorsDir, names: set[str], cfg: ModelConfig):
  inv_freq = 1.0 / cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2, dtype=np.float64) / cfg.head_dim)
  for n in sorted(names):
    if n == "lm_head.weight":
      if not np.array_equal(reader.get(n), reader.get("model.embed_tokens.weight")):
        raise ConversionError("config.json sets tie_word_embeddings=true but lm_head.weight differs "
                              "from model.embed_tokens.weight")
    elif not np.allclose(np.asarray(reader.get(n), np.float64), inv_freq, rtol=1e-3):
      raise ConversionError(f"tensor {n!r} does not match rope_theta={cfg.rope_theta} "
                            f"and head_dim={cfg.head_dim} from config.json")


def _open_checked(hf_dir: str | os.PathLike, cfg: ModelConfig) -> tuple[_SafetensorsDir, dict[str, _Entry]]:
  reader, plan = _SafetensorsDir(hf_dir), _plan(cfg)
  _check_hf_tensors(reader, plan, cfg)
  return reader, plan


def _stream(reader: _SafetensorsDir, plan: dict[str, _Entry], param_dtype,
            progress: bool | None) -> Iterator[tuple[ParamPath, np.ndarray]]:
  from tqdm import tqdm
  dtype = np.dtype(param_dtype)
  rank = {n: i for i, n in enumerate(plan)}
  # File by file, so each shard is opened once and reads stay local.
  order = sorted(plan, key=lambda n: (str(reader.file_of[n]), rank[n]))
  for name in tqdm(order, desc="tensors", unit="tensor", disable=None if progress is None else not progress):
    e, raw = plan[name], reader.get(name)
    yield e.path, np.ascontiguousarray(raw.T if e.transpose else raw, dtype=dtype)
    del raw


def iter_hf_params(hf_dir: str | os.PathLike, cfg: ModelConfig, param_dtype=jnp.float32, *,
                   progress: bool | None = None) -> Iterator[tuple[ParamPath, np.ndarray]]:
  """(path, array in our layout and param_dtype), one tensor at a time.

  All names and shapes are checked (here, eagerly) before the first tensor is read.
  """
  return _stream(*_open_checked(hf_dir, cfg), param_dtype, progress)


# ----------------------------------------------------------------------------- our checkpoints


def load_config(path: str | os.PathLike) -> ModelConfig:
  """ModelConfig of our checkpoint directory or of a Hugging Face Llama directory."""
  if checkpoint_io.is_checkpoint(path):
    return checkpoint_io.read_config(path)
  return hf_to_model_config(_read_hf_json(path))


def _apply_overrides(cfg: ModelConfig, overrides: dict[str, Any]) -> ModelConfig:
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
    overrides["layer_specs"] = resolve_pattern(specs, cfg.num_layers)
  elif specs is not None:
    overrides["layer_specs"] = tuple(parse_spec(s) if isinstance(s, str) else s for s in specs)
  try:
    return cfg.replace(**overrides)
  except (ValueError, TypeError) as e:
    raise ConversionError(f"bad config override: {e}") from None


def _check_stored(path, stored: dict[ParamPath, jax.ShapeDtypeStruct],
                  expected: dict[ParamPath, jax.ShapeDtypeStruct]):
  show = lambda ps: _listing("/".join(p) for p in ps)
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
                    attn_impl: str = "auto", remat: str = "none", **config_overrides) -> Llama:
  """A ready Llama from our checkpoint directory or straight from a Hugging Face Llama directory.

  `config_overrides` replace ModelConfig fields that do not change parameter shapes, e.g.
  layer_specs (AttentionSpecs, spec strings, or a pattern string such as "longgen"),
  rope_theta, max_seq_len: the LongGen recipe starts from a converted Llama this way. The
  model is built abstractly and filled once, so parameters are materialised only once.
  """
  cfg = _apply_overrides(load_config(path), config_overrides)
  abstract_model = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype,
                                                attn_impl=attn_impl, remat=remat))
  graphdef, param_state, rest = nnx.split(abstract_model, nnx.Param, ...)
  if jax.tree.leaves(rest):
    raise ConversionError(f"model has non-parameter state that a checkpoint cannot fill: {rest}")
  expected = flatten(nnx.to_pure_dict(param_state))
  if checkpoint_io.is_checkpoint(path):
    _check_stored(path, checkpoint_io.param_metadata(path), expected)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = {p: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device) for p, a in expected.items()}
    params = checkpoint_io.restore(path, target)
  else:
    params = {p: jnp.asarray(a) for p, a in iter_hf_params(path, cfg, param_dtype)}
  nnx.replace_by_pure_dict(param_state, unflatten(params))
  return nnx.merge(graphdef, param_state, rest)


def save_model(model: Llama, out_dir: str | os.PathLike, *, hf_config: dict | None = None,
               overwrite: bool = False) -> None:
  """Write `model` in our checkpoint format (config.json + Orbax params/)."""
  params = flatten(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  checkpoint_io.write(out_dir, model.config, params, hf_config, overwrite=overwrite)


# ----------------------------------------------------------------------------- conversions


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
  hf = _read_hf_json(hf_dir)
  cfg = hf_to_model_config(hf)
  changes: dict[str, Any] = {}
  if pattern is not None:
    changes["layer_specs"] = resolve_pattern(pattern, cfg.num_layers, sparse=sparse, num_full=num_full,
                                             placement=placement)
  elif sparse is not None or num_full is not None:
    raise ConversionError("--sparse and --num-full apply to a pattern; pass --pattern longgen (or a preset)")
  if rope_theta is not None:
    changes["rope_theta"] = float(rope_theta)
  if max_seq_len is not None:
    changes["max_seq_len"] = int(max_seq_len)
  cfg = _apply_overrides(cfg, changes)
  out = Path(out_dir)
  if (out / checkpoint_io.PARAMS_DIR).exists() and not overwrite:
    raise ConversionError(f"{out / checkpoint_io.PARAMS_DIR} already exists; pass --force to replace it")
  reader, plan = _open_checked(hf_dir, cfg)  # fail before writing anything
  out.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=out, prefix=".convert-") as scratch:
    params = {path: _spill(arr, os.path.join(scratch, f"{i}.npy"))
              for i, (path, arr) in enumerate(_stream(reader, plan, param_dtype, progress))}
    checkpoint_io.write(out, cfg, params, hf_config=hf, overwrite=overwrite)
    del params
  return cfg


def parse_size(text: str | int) -> int:
  """Bytes in "5GB" (10^9, as Hugging Face), "500MiB" (2^20), "20KB" or a plain integer."""
  if isinstance(text, int):
    return text
  m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B)?\s*", text.upper())
  if not m:
    raise ConversionError(f"cannot parse size {text!r}; expected e.g. 5GB, 500MB or 1048576")
  unit = m.group(2) or "B"
  scale = (1024 if "I" in unit else 1000) ** ("BKMGT".index(unit[0]) if unit != "B" else 0)
  return int(float(m.group(1)) * scale)


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
  if not checkpoint_io.is_checkpoint(ckpt_dir):
    raise ConversionError(f"{ckpt_dir} is not a longgen_jax checkpoint (missing config.json or params/)")
  cfg = checkpoint_io.read_config(ckpt_dir)
  stored = checkpoint_io.param_metadata(ckpt_dir)
  _check_stored(ckpt_dir, stored, abstract_params(cfg))
  plan = _plan(cfg)
  if dtype is None:
    kinds = {np.dtype(a.dtype) for a in stored.values()}
    out_dtype = kinds.pop() if len(kinds) == 1 else DTYPES["float32"]
  elif dtype in DTYPES:
    out_dtype = DTYPES[dtype]
  else:
    raise ConversionError(f"unsupported dtype {dtype!r}; choose from {list(DTYPES)}")
  out = Path(out_dir)
  old = sorted(p.name for p in out.glob("model*.safetensors*")) if out.exists() else []
  if old and not overwrite:
    raise ConversionError(f"{out} already holds weights {_listing(old)}; pass --force to replace them")
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
    arrays = checkpoint_io.restore_numpy(ckpt_dir, [plan[n].path for n in names])
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
  hf = model_config_to_hf(cfg, out_dtype, base=checkpoint_io.read_hf_config(ckpt_dir))
  (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
  return files


# ----------------------------------------------------------------------------- CLI


def _describe(cfg: ModelConfig) -> str:
  sparse = sorted({str(s) for s in cfg.layer_specs if not s.is_full})
  pattern = f"{cfg.num_full_layers} full" + (f" + {cfg.num_layers - cfg.num_full_layers} {'/'.join(sparse)}"
                                             if sparse else "")
  return (f"{cfg.num_layers} layers ({pattern}), hidden {cfg.hidden_size}, heads {cfg.num_heads}/"
          f"{cfg.num_kv_heads} kv, vocab {cfg.vocab_size}, rope_theta {cfg.rope_theta:g}")


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m longgen_jax.convert", description=__doc__.split("\n\n")[0])
  sub = p.add_subparsers(dest="command", required=True)
  h = sub.add_parser("hf-to-jax", help="Hugging Face Llama (safetensors) -> longgen_jax checkpoint")
  h.add_argument("--hf-dir", required=True, help="directory with config.json and safetensors")
  h.add_argument("--out", required=True, help="output checkpoint directory")
  h.add_argument("--pattern", default=None,
                 help="full | longgen | a preset name (" + ", ".join(PRESETS) + ") | spec(s), e.g. "
                      "'sink_window(64,1984)' or 'full;block_sparse(64,16,64);full'. Default: keep the "
                      "source's pattern (all full for a plain Llama)")
  h.add_argument("--sparse", default=None, help=f"sparse spec for --pattern longgen/preset (default {DEFAULT_SPARSE})")
  h.add_argument("--num-full", type=int, default=None, help="full layers for --pattern longgen (default 3/8 of them)")
  h.add_argument("--placement", default="middle", choices=["middle", "top", "bottom", "interleaved"])
  h.add_argument("--rope-theta", type=float, default=None, help="replace rope_theta (LongGen extends it for 128K)")
  h.add_argument("--max-seq-len", type=int, default=None)
  h.add_argument("--param-dtype", default="float32", choices=list(DTYPES))
  h.add_argument("--force", action="store_true", help="replace an existing params/ in --out")
  j = sub.add_parser("jax-to-hf", help="longgen_jax checkpoint -> Hugging Face LlamaForCausalLM safetensors")
  j.add_argument("--ckpt", required=True, help="our checkpoint directory")
  j.add_argument("--out", required=True, help="output Hugging Face directory")
  j.add_argument("--shard-size", default="5GB", help="largest safetensors file, e.g. 5GB, 500MB")
  j.add_argument("--dtype", default=None, choices=list(DTYPES), help="default: the stored parameter dtype")
  j.add_argument("--force", action="store_true", help="replace existing weight files in --out")
  return p


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  try:
    if args.command == "hf-to-jax":
      cfg = hf_to_jax(args.hf_dir, args.out, pattern=args.pattern, sparse=args.sparse,
                      num_full=args.num_full, placement=args.placement, rope_theta=args.rope_theta,
                      max_seq_len=args.max_seq_len, param_dtype=DTYPES[args.param_dtype],
                      overwrite=args.force)
      print(f"wrote {args.out}: {_describe(cfg)}")
    else:
      files = jax_to_hf(args.ckpt, args.out, shard_size=args.shard_size, dtype=args.dtype,
                        overwrite=args.force)
      print(f"wrote {args.out}: config.json + {len(files)} safetensors file(s)")
  except ConversionError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
