"""Model configuration: Llama dimensions plus one AttentionSpec per layer, and presets."""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Literal

from longgen_jax.attention.spec import AttentionSpec

Placement = Literal["middle", "top", "bottom", "interleaved"]


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


_SPEC_RE = re.compile(r"^\s*(full|sink_window|block_sparse)\s*(?:\(([^)]*)\))?\s*$")


def parse_spec(text: str) -> AttentionSpec:
  """'full', 'sink_window(64,1984)', 'block_sparse(64,16,64)' or 'block_sparse(64,16,64,homo)'."""
  m = _SPEC_RE.match(text)
  if not m:
    raise ValueError(f"cannot parse attention spec {text!r}; expected e.g. 'full', "
                     "'sink_window(64,1984)' or 'block_sparse(64,16,64)'")
  kind, args = m.group(1), [a.strip() for a in (m.group(2) or "").split(",") if a.strip()]
  homo = bool(args) and args[-1] in ("homo", "homo_head", "True")
  if homo:
    args = args[:-1]
  try:
    nums = [int(a) for a in args]
    if kind == "full" and not nums:
      return AttentionSpec.full()
    if kind == "sink_window" and len(nums) == 2:
      return AttentionSpec.sink_window(*nums)
    if kind == "block_sparse" and len(nums) == 3:
      return AttentionSpec.block_sparse(*nums, homo_head=homo)
  except ValueError as e:
    raise ValueError(f"cannot parse attention spec {text!r}: {e}") from None
  raise ValueError(f"wrong arguments in attention spec {text!r}")


def layer_pattern(num_layers: int, num_full: int, sparse: AttentionSpec | str,
                  placement: Placement = "middle") -> tuple[AttentionSpec, ...]:
  """`num_full` full layers placed at `placement`, the rest use `sparse`."""
  sparse = parse_spec(sparse) if isinstance(sparse, str) else sparse
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
    raise ValueError(f"placement must be middle, top, bottom or interleaved, got {placement!r}")
  full_ids = set(full_ids)
  return tuple(AttentionSpec.full() if i in full_ids else sparse for i in range(num_layers))


# ----------------------------------------------------------------------------- presets

_DIMS = {
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=176, num_layers=3, num_heads=4,
                 num_kv_heads=2, head_dim=16, max_seq_len=512),
    "llama2_7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
                      num_heads=32, num_kv_heads=32, head_dim=128, max_seq_len=4096),
    "llama2_70b": dict(vocab_size=32000, hidden_size=8192, intermediate_size=28672, num_layers=80,
                       num_heads=64, num_kv_heads=8, head_dim=128, max_seq_len=4096),
}
# Full layers kept by the LongGen pattern (middle placement) and the default sparse spec.
_LONGGEN = {
    "tiny": (1, AttentionSpec.sink_window(4, 28)),
    "llama2_7b": (12, AttentionSpec.sink_window(64, 1984)),
    "llama2_70b": (30, AttentionSpec.sink_window(64, 1984)),
}
PRESETS = tuple(n for base in _DIMS for n in (base, base + "_full"))


def preset(name: str, sparse: AttentionSpec | str | None = None, **overrides) -> ModelConfig:
  """A preset config. `NAME` is the LongGen pattern, `NAME_full` the all-full baseline."""
  base = name.removesuffix("_full")
  if base not in _DIMS:
    raise ValueError(f"unknown preset {name!r}; choose from {list(PRESETS)}")
  num_full, default_sparse = _LONGGEN[base]
  dims = dict(_DIMS[base])
  num_layers = overrides.pop("num_layers", dims.pop("num_layers"))
  dims.pop("num_layers", None)
  if name.endswith("_full"):
    specs = (AttentionSpec.full(),) * num_layers
  else:
    num_full = round(num_full * num_layers / _DIMS[base]["num_layers"])
    specs = layer_pattern(num_layers, num_full, sparse or default_sparse, "middle")
  cfg = dict(dims, num_layers=num_layers, layer_specs=specs)
  cfg.update(overrides)
  return ModelConfig(**cfg)
