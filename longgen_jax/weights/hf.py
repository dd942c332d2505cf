"""Hugging Face LlamaForCausalLM <-> our names, shapes and config, and a streaming safetensors reader.

Names mirror LlamaForCausalLM: our parameter ("layers", "3", "mlp", "up_proj", "kernel") is
Hugging Face's "model.layers.3.mlp.up_proj.weight" transposed (Linear kernels are [in, out],
torch weights [out, in]); RoPE is rotate-half in both, so q/k need no permutation.
Safetensors are read with numpy (no torch), one tensor at a time, so host memory stays near
one tensor.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from longgen_jax.attention.spec import parse_spec
from longgen_jax.model.config import ModelConfig
from longgen_jax.model.llama import Llama
from longgen_jax.weights.format import ConversionError, ParamPath, flatten

HF_PATTERN_KEY = "longgen_layer_specs"  # our layer pattern, kept in a Hugging Face config.json
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
_FLOAT_ST_DTYPES = {"F64", "F32", "F16", "BF16"}
_INV_FREQ_RE = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")


def listing(names, limit: int = 5) -> str:
  names = list(names)
  shown = ", ".join(repr(n) for n in names[:limit])
  return shown + (f" (and {len(names) - limit} more)" if len(names) > limit else "")


# ----------------------------------------------------------------------------- config


def read_hf_json(hf_dir: str | os.PathLike) -> dict:
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
class Entry:
  path: ParamPath
  transpose: bool
  hf_shape: tuple[int, ...]


def tensor_plan(cfg: ModelConfig) -> dict[str, Entry]:
  """Hugging Face name -> where it goes, in Hugging Face's own order."""
  plan = {}
  for path, a in sorted(abstract_params(cfg).items(), key=lambda kv: _sort_key(kv[0])):
    name, transpose = hf_name(path)
    plan[name] = Entry(path, transpose, tuple(a.shape[::-1]) if transpose else tuple(a.shape))
  return plan


# ----------------------------------------------------------------------------- reading safetensors


class SafetensorsDir:
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
        raise ConversionError(f"missing shard file {listing(missing)} named in {index.name}, "
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
      raise ConversionError(f"tensor {listing(lost)} named in {SAFETENSORS_INDEX} is missing from its shard file")

  def _no_weights(self):
    shards = sorted(p.name for p in self.dir.glob("*.safetensors"))
    if shards:
      raise ConversionError(f"{self.dir} has safetensors shards {listing(shards)} but no {SAFETENSORS_INDEX}")
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


def _check_hf_tensors(reader: SafetensorsDir, plan: dict[str, Entry], cfg: ModelConfig):
  """Every expected tensor present with its shape, nothing unexplained left over."""
  names = reader.names
  missing = [n for n in plan if n not in names]
  if missing:
    raise ConversionError(f"missing tensor {listing(missing)} in {reader.dir}")
  extra = {n for n in names - set(plan) if _INV_FREQ_RE.match(n)}  # derived RoPE buffers
  if cfg.tie_embeddings and "lm_head.weight" in names:
    extra.add("lm_head.weight")  # a tied head stored anyway; checked equal below
  unexpected = sorted(names - set(plan) - extra, key=lambda n: (len(n), n))
  if unexpected:
    raise ConversionError(f"unexpected tensor {listing(unexpected)} in {reader.dir} "
                          "(not part of a LlamaForCausalLM with this config.json)")
  for name, e in plan.items():
    if reader.shape(name) != e.hf_shape:
      raise ConversionError(f"shape mismatch for tensor {name!r}: expected {e.hf_shape} "
                            f"(from config.json), got {reader.shape(name)}")
    if reader.dtype(name) not in _FLOAT_ST_DTYPES:
      raise ConversionError(f"tensor {name!r} has dtype {reader.dtype(name)}, expected a float type")
  _check_derived(reader, extra, cfg)


def _check_derived(reader: SafetensorsDir, names: set[str], cfg: ModelConfig):
  inv_freq = 1.0 / cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2, dtype=np.float64) / cfg.head_dim)
  for n in sorted(names):
    if n == "lm_head.weight":
      if not np.array_equal(reader.get(n), reader.get("model.embed_tokens.weight")):
        raise ConversionError("config.json sets tie_word_embeddings=true but lm_head.weight differs "
                              "from model.embed_tokens.weight")
    elif not np.allclose(np.asarray(reader.get(n), np.float64), inv_freq, rtol=1e-3):
      raise ConversionError(f"tensor {n!r} does not match rope_theta={cfg.rope_theta} "
                            f"and head_dim={cfg.head_dim} from config.json")


def open_checked(hf_dir: str | os.PathLike, cfg: ModelConfig) -> tuple[SafetensorsDir, dict[str, Entry]]:
  reader, plan = SafetensorsDir(hf_dir), tensor_plan(cfg)
  _check_hf_tensors(reader, plan, cfg)
  return reader, plan


def stream(reader: SafetensorsDir, plan: dict[str, Entry], param_dtype,
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
  return stream(*open_checked(hf_dir, cfg), param_dtype, progress)


