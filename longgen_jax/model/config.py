"""Model configuration: Llama dimensions plus one AttentionSpec per layer, and presets.

Also the one home of the names configs and CLIs share: dtypes, remat policies, placements of
the full layers, and the default LongGen pattern (3/8 of the layers full in the middle, the
rest sink_window(64,1984): 12 of 32 for Llama-2-7B).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from longgen_jax.attention.residuals import FULL_LSE, FULL_OUT
from longgen_jax.attention.spec import AttentionSpec, parse_spec
from longgen_jax.parallel.context import RING_LSE, RING_OUT

Placement = Literal["middle", "top", "bottom", "interleaved"]
PLACEMENTS = ("middle", "top", "bottom", "interleaved")
LONGGEN_FULL_FRACTION = 3 / 8
DEFAULT_SPARSE = AttentionSpec.sink_window(64, 1984)
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# "full" and "dots" also keep the output and LSE of every full layer's attention, the quadratic part of a
# layer's forward (attention.residuals; under context parallelism the ring's, 1/context of a sequence per
# device), so the backward does not run it a second time: one [B, T, Hq, D] array per full layer.
_ATTENTION_RESIDUALS = (RING_OUT, RING_LSE, FULL_OUT, FULL_LSE)
CUDNN_ATTENTION_FORWARD = "dot_product_attention_fwd_wrapper"   # JAX's cuDNN fused attention forward


def _cudnn_attention_forward(prim, *_, **__) -> bool:
  """A full layer on cuDNN (attn_impl="cudnn"): JAX does not name that kernel's output and softmax
  statistics, so "full" keeps them by primitive, and all-full cuDNN baselines recompute what ours do."""
  return prim.name == CUDNN_ATTENTION_FORWARD


_KEEP_ATTENTION = jax.checkpoint_policies.save_from_both_policies(
    jax.checkpoint_policies.save_only_these_names(*_ATTENTION_RESIDUALS), _cudnn_attention_forward)
# The name of each layer's input inside the remat'd unit: "offload" keeps it (and the ring's output and
# LSE) in the host's pinned memory instead of HBM, which is what grows with the sequence under "full".
LAYER_INPUT = "layer_input"
REMAT_POLICIES = {
    "none": None,                                                   # keep every activation
    "full": _KEEP_ATTENTION,                                        # recompute each layer but full attention
    "dots": jax.checkpoint_policies.save_from_both_policies(        # keep matmul outputs
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable, _KEEP_ATTENTION),
    # the least HBM: what "full" keeps of each layer's input and of the ring goes to the host; full layers'
    # attention is recomputed (offloading it too cost 4.8 GiB more HBM per chip on 7B 128K, docs/scaling.md)
    "offload": jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[], names_which_can_be_offloaded=[LAYER_INPUT, RING_OUT, RING_LSE],
        offload_src="device", offload_dst="pinned_host"),
}


def check_count(name: str, value) -> None:
  """Raises ValueError unless `value` is an int >= 1 (bools and floats like 2.5 are not counts)."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def dtype(name: str):
  """The jnp dtype of a config/CLI dtype name."""
  if name not in DTYPES:
    raise ValueError(f"unknown dtype {name!r}; choose from {list(DTYPES)}")
  return DTYPES[name]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float = 10000.0
  rms_norm_eps: float = 1e-5
  max_seq_len: int = 4096
  tie_embeddings: bool = False
  layer_specs: tuple[AttentionSpec, ...] = ()  # one per layer; empty means all full

  def __post_init__(self):
    if not self.layer_specs:
      object.__setattr__(self, "layer_specs", (AttentionSpec.full(),) * self.num_layers)
    object.__setattr__(self, "layer_specs", tuple(self.layer_specs))
    if len(self.layer_specs) != self.num_layers:
      raise ValueError(f"layer_specs has {len(self.layer_specs)} entries for {self.num_layers} layers")
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                 "num_kv_heads", "head_dim", "max_seq_len"):
      if getattr(self, name) < 1:
        raise ValueError(f"ModelConfig.{name} must be >= 1, got {getattr(self, name)}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
    if self.head_dim % 2:
      raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")

  @property
  def num_full_layers(self) -> int:
    return sum(s.is_full for s in self.layer_specs)

  def replace(self, **changes) -> ModelConfig:
    return dataclasses.replace(self, **changes)

  def with_pattern(self, num_full: int, sparse: AttentionSpec | str,
                   placement: Placement = "middle") -> ModelConfig:
    return self.replace(layer_specs=layer_pattern(self.num_layers, num_full, sparse, placement))

  def all_full(self) -> ModelConfig:
    return self.replace(layer_specs=(AttentionSpec.full(),) * self.num_layers)

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["layer_specs"] = [str(s) for s in self.layer_specs]
    return d

  @classmethod
  def from_dict(cls, d: dict) -> ModelConfig:
    d = dict(d)
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise ValueError(f"unknown ModelConfig keys: {sorted(unknown)}")
    d["layer_specs"] = tuple(parse_spec(s) if isinstance(s, str) else AttentionSpec.from_dict(s)
                             for s in d.get("layer_specs", ()))
    return cls(**d)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2)

  @classmethod
  def from_json(cls, text: str) -> ModelConfig:
    return cls.from_dict(json.loads(text))


def layer_pattern(num_layers: int, num_full: int, sparse: AttentionSpec | str,
                  placement: Placement = "middle") -> tuple[AttentionSpec, ...]:
  """`num_full` full layers placed at `placement`, the rest use `sparse`."""
  sparse = parse_spec(sparse)
  if not 0 <= num_full <= num_layers:
    raise ValueError(f"num_full must be in [0, {num_layers}], got {num_full}")
  if placement == "middle":
    start = (num_layers - num_full) // 2
    full_ids = range(start, start + num_full)
  elif placement == "bottom":
    full_ids = range(num_full)
  elif placement == "top":
    full_ids = range(num_layers - num_full, num_layers)
  elif placement == "interleaved":
    full_ids = [int((i + 0.5) * num_layers / num_full) for i in range(num_full)]
  else:
    raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
  full_ids = set(full_ids)
  return tuple(AttentionSpec.full() if i in full_ids else sparse for i in range(num_layers))


def longgen_pattern(num_layers: int, num_full: int | None = None, sparse: AttentionSpec | str | None = None,
                    placement: Placement = "middle") -> tuple[AttentionSpec, ...]:
  """The LongGen pattern: by default 3/8 of the layers full in the middle, the rest DEFAULT_SPARSE."""
  if num_full is None:
    num_full = round(LONGGEN_FULL_FRACTION * num_layers)
  return layer_pattern(num_layers, num_full, DEFAULT_SPARSE if sparse is None else sparse, placement)


def resolve_pattern(pattern: str, num_layers: int, *, sparse: str | AttentionSpec | None = None,
                    num_full: int | None = None, placement: Placement = "middle") -> tuple[AttentionSpec, ...]:
  """Layer specs for a pattern string: "full", "longgen", a preset name, or attention spec(s).

  "longgen" is `longgen_pattern` (num_full, sparse and placement apply). A preset name uses that
  preset's pattern and needs its layer count. Otherwise one spec for every layer
  ("sink_window(64,1984)") or one per layer separated by ';' ("full;sink_window(4,28);full").
  """
  if pattern != "longgen" and (num_full is not None or (sparse is not None and pattern not in PRESETS)):
    raise ValueError(f"num_full applies to pattern 'longgen' and sparse to 'longgen' or a preset, "
                     f"not to pattern {pattern!r}")
  if pattern == "full":
    return (AttentionSpec.full(),) * num_layers
  if pattern == "longgen":
    return longgen_pattern(num_layers, num_full, sparse, placement)
  if pattern in PRESETS:
    specs = preset(pattern, sparse=sparse).layer_specs
    if len(specs) != num_layers:
      raise ValueError(f"pattern preset {pattern!r} has {len(specs)} layers but the model has "
                       f"{num_layers}; use pattern 'longgen' for a LongGen pattern of any depth")
    return specs
  try:
    specs = tuple(parse_spec(s) for s in pattern.split(";") if s.strip())
  except ValueError as e:
    raise ValueError(f"bad layer pattern {pattern!r}: {e}") from None
  if len(specs) == 1:
    return specs * num_layers
  if len(specs) != num_layers:
    raise ValueError(f"layer pattern {pattern!r} lists {len(specs)} specs for {num_layers} layers")
  return specs


# ----------------------------------------------------------------------------- presets

_DIMS = {
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=176, num_layers=3, num_heads=4,
                 num_kv_heads=2, head_dim=16, max_seq_len=512),
    "llama2_7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
                      num_heads=32, num_kv_heads=32, head_dim=128, max_seq_len=4096),
    "llama2_70b": dict(vocab_size=32000, hidden_size=8192, intermediate_size=28672, num_layers=80,
                       num_heads=64, num_kv_heads=8, head_dim=128, max_seq_len=4096),
}
# The sparse spec of each preset's LongGen pattern when it is not DEFAULT_SPARSE.
_SPARSE = {"tiny": AttentionSpec.sink_window(4, 28)}
PRESETS = tuple(n for base in _DIMS for n in (base, base + "_full"))


def preset(name: str, sparse: AttentionSpec | str | None = None, **overrides) -> ModelConfig:
  """A preset config. `NAME` is the LongGen pattern, `NAME_full` the all-full baseline."""
  base = name.removesuffix("_full")
  if base not in _DIMS:
    raise ValueError(f"unknown preset {name!r}; choose from {list(PRESETS)}")
  dims = dict(_DIMS[base])
  num_layers = overrides.pop("num_layers", dims.pop("num_layers"))
  if name.endswith("_full"):
    specs = (AttentionSpec.full(),) * num_layers
  else:
    specs = longgen_pattern(num_layers, sparse=sparse or _SPARSE.get(base))
  cfg = dict(dims, num_layers=num_layers, layer_specs=specs)
  cfg.update(overrides)
  return ModelConfig(**cfg)
