"""Per-layer KV caches at fixed shapes, so prefill and decode compile once.

One cache per layer, chosen by the layer's AttentionSpec (keys stored after RoPE; slot
arithmetic uses absolute positions, one position counter per sequence):
  full:          k, v [B, capacity, K, D]; slot = position. With kv_int8: int8 values and a
                 float32 scale per (sequence, position, kv head).
  sink_window:   sink_k/v [B, sink, K, D] (positions < sink) and ring_k/v [B, window, K, D]
                 (positions >= sink at slot p % window). Size independent of context length.
  block_sparse:  local_k/v [B, L*b, K, D], a ring at slot p % (L*b) that covers the last L
                 blocks; strided_k/v [B, n*b, K, D] per kv head h the n strided blocks
                 kb = r_h + i*V (r_h = -h*s mod V) that some future query can reach as non-local
                 (kb <= last block - L). Strided block kb sits at slot (kb // V) * b + p % b.
Rings and stores are capped at the capacity, so short contexts allocate no more than a full
cache. Writes of padded tokens and of ring positions that a later position of the same
chunk overwrites are dropped (out-of-range scatter index), so scatters never collide.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from longgen_jax.attention.spec import AttentionSpec, strided_block
from longgen_jax.model.config import ModelConfig, check_count

_DROP = np.iinfo(np.int32).max  # scatter index that mode="drop" discards


@dataclasses.dataclass(frozen=True)
class CacheLayout:
  """Static description of one layer's cache (hashable: a jit static argument)."""

  spec: AttentionSpec
  capacity: int        # positions 0..capacity-1 can be stored
  num_kv_heads: int
  head_dim: int
  kv_int8: bool = False

  def __post_init__(self):
    if self.capacity < 1:
      raise ValueError(f"cache capacity must be >= 1, got {self.capacity}")
    if self.kv_int8 and not self.spec.is_full:
      raise ValueError("kv_int8 applies to full layers only")

  @property
  def sink_len(self) -> int:
    return min(self.spec.sink, self.capacity) if self.spec.kind == "sink_window" else 0

  @property
  def ring_len(self) -> int:
    """Slots of the ring buffer (sink_window: window; block_sparse: local blocks)."""
    s = self.spec
    if s.kind == "sink_window":  # positions >= sink only: never more than capacity - sink
      return max(1, min(s.window, self.capacity - self.sink_len))
    if s.kind == "block_sparse":  # the local blocks hold at most L*b positions, and never more than capacity
      return min(s.local_blocks * s.block_size, self.capacity)
    return 0

  @property
  def num_blocks(self) -> int:
    return -(-self.capacity // self.spec.block_size)

  @property
  def strided_blocks(self) -> int:
    """Strided blocks kept per kv head: those with kb <= num_blocks - 1 - local_blocks."""
    s = self.spec
    if s.kind != "block_sparse" or self.num_blocks <= s.local_blocks:
      return 0
    return -(-(self.num_blocks - s.local_blocks) // s.vert_stride)

  def buffer_shapes(self, batch: int, dtype) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    K, D = self.num_kv_heads, self.head_dim
    if self.spec.kind == "full":
      if self.kv_int8:
        shp = (batch, self.capacity, K)
        return {"k": (shp + (D,), jnp.int8), "v": (shp + (D,), jnp.int8),
                "k_scale": (shp, jnp.float32), "v_scale": (shp, jnp.float32)}
      return {"k": ((batch, self.capacity, K, D), dtype), "v": ((batch, self.capacity, K, D), dtype)}
    if self.spec.kind == "sink_window":
      return {"sink_k": ((batch, self.sink_len, K, D), dtype),
              "sink_v": ((batch, self.sink_len, K, D), dtype),
              "ring_k": ((batch, self.ring_len, K, D), dtype),
              "ring_v": ((batch, self.ring_len, K, D), dtype)}
    n = self.strided_blocks * self.spec.block_size
    return {"local_k": ((batch, self.ring_len, K, D), dtype),
            "local_v": ((batch, self.ring_len, K, D), dtype),
            "strided_k": ((batch, n, K, D), dtype), "strided_v": ((batch, n, K, D), dtype)}

  def nbytes(self, batch: int, dtype) -> int:
    return sum(math.prod(shape) * np.dtype(dt).itemsize
               for shape, dt in self.buffer_shapes(batch, dtype).values())

  # --------------------------------------------------------------------------- writes

  def write(self, cache: dict, k_BTKD, v_BTKD, start_B, valid_BT):
    """Stores keys/values of positions start_B + t (valid_BT: real tokens). Returns the cache."""
    B, T, K, _ = k_BTKD.shape
    pos_BT = start_B[:, None] + jnp.arange(T)
    valid_BT = valid_BT & (pos_BT < self.capacity)
    b_idx = jnp.arange(B)[:, None]
    s = self.spec
    cache = dict(cache)

    def put(name, slot_BT, x_BTKD):
      if cache[name].shape[1] == 0:
        return
      slot_BT = jnp.where(slot_BT >= 0, slot_BT, _DROP)
      cache[name] = cache[name].at[b_idx, slot_BT].set(x_BTKD.astype(cache[name].dtype), mode="drop")

    if s.kind == "full":
      slot = jnp.where(valid_BT, pos_BT, -1)
      if self.kv_int8:
        for name, x in (("k", k_BTKD), ("v", v_BTKD)):
          q, scale = quantize_int8(x)
          put(name, slot, q)
          put(name + "_scale", slot, scale)
      else:
        put("k", slot, k_BTKD)
        put("v", slot, v_BTKD)
      return cache
    # Only the last ring_len valid positions of this write survive in the ring.
    last_B = jnp.max(jnp.where(valid_BT, pos_BT, -1), axis=1)
    ring = self.ring_len
    if s.kind == "sink_window":
      in_sink = valid_BT & (pos_BT < s.sink)
      in_ring = valid_BT & (pos_BT >= s.sink) & (pos_BT > last_B[:, None] - ring)
      for name, x in (("k", k_BTKD), ("v", v_BTKD)):
        put("sink_" + name, jnp.where(in_sink, pos_BT, -1), x)
        put("ring_" + name, jnp.where(in_ring, pos_BT % ring, -1), x)
      return cache
    b, V = s.block_size, s.vert_stride
    in_ring = valid_BT & (pos_BT > last_B[:, None] - ring)
    for name, x in (("k", k_BTKD), ("v", v_BTKD)):
      put("local_" + name, jnp.where(in_ring, pos_BT % ring, -1), x)
    if self.strided_blocks:
      kb_BTK = (pos_BT // b)[..., None]
      h_K = jnp.arange(K)
      strided = strided_block(s, kb_BTK, h_K, K) & valid_BT[..., None]
      slot_BTK = jnp.where(strided, (kb_BTK // V) * b + (pos_BT % b)[..., None], _DROP)
      for name, x in (("k", k_BTKD), ("v", v_BTKD)):
        buf = cache["strided_" + name]
        cache["strided_" + name] = buf.at[b_idx[..., None], slot_BTK, h_K].set(
            x.astype(buf.dtype), mode="drop")
    return cache

  # --------------------------------------------------------------------------- reads

  def view(self, cache: dict, last_B) -> list[Slots]:
    """The stored slots as seen after position last_B[b] was written, as a few `Slots` parts.

    Parts are attended together (one softmax) without concatenating the buffers.
    """
    s = self.spec
    p_B1 = last_B[:, None]
    if s.kind == "full":
      pos = jnp.arange(self.capacity)[None, None]
      ks, vs = (cache["k_scale"], cache["v_scale"]) if self.kv_int8 else (None, None)
      return [Slots(cache["k"], cache["v"], pos, pos <= p_B1[:, :, None], k_scale=ks, v_scale=vs)]
    ring = self.ring_len
    q_BR = p_B1 - (p_B1 - jnp.arange(ring)) % ring  # latest position <= last with this residue
    if s.kind == "sink_window":
      j = jnp.arange(self.sink_len)[None, None]
      parts = [Slots(cache["ring_k"], cache["ring_v"], q_BR[:, None], (q_BR >= s.sink)[:, None])]
      if self.sink_len:
        parts.insert(0, Slots(cache["sink_k"], cache["sink_v"], j, j <= p_B1[:, :, None]))
      return parts
    K, b, V = self.num_kv_heads, s.block_size, s.vert_stride
    parts = [Slots(cache["local_k"], cache["local_v"], q_BR[:, None], (q_BR >= 0)[:, None], "local")]
    n = self.strided_blocks
    if n:
      r_K = (-jnp.asarray([s.stride_phase(h, K) for h in range(K)])) % V  # the k_block residues
      kb_Kn = r_K[:, None] + (jnp.arange(n) * V)[None, :]
      spos_1KM = (kb_Kn[:, :, None] * b + jnp.arange(b)).reshape(1, K, n * b)
      parts.append(Slots(cache["strided_k"], cache["strided_v"], spos_1KM,
                         spos_1KM <= p_B1[:, :, None], "nonlocal"))
    return parts


@dataclasses.dataclass
class Slots:
  """Cache slots to attend: k, v [B,N,K,D]; pos, ok [B|1, K|1, N] (absolute position, written).

  only: "local" slots serve local pairs only and "nonlocal" slots the rest, so a block held in
  both the block-sparse ring and strided store counts once. int8 slots carry scales [B,N,K].
  """

  k: jax.Array
  v: jax.Array
  pos: jax.Array
  ok: jax.Array
  only: str | None = None
  k_scale: jax.Array | None = None
  v_scale: jax.Array | None = None


def quantize_int8(x_BTKD):
  """Symmetric int8 per (token, head) over head_dim: int8 values and float32 scales [B,T,K]."""
  x32 = x_BTKD.astype(jnp.float32)
  scale = jnp.max(jnp.abs(x32), axis=-1) / 127.0
  q = jnp.round(x32 / jnp.where(scale > 0, scale, 1.0)[..., None])
  return jnp.clip(q, -127, 127).astype(jnp.int8), scale


def dequantize_int8(q_BTKD, scale_BTK, dtype):
  return (q_BTKD.astype(jnp.float32) * scale_BTK[..., None]).astype(dtype)


def cache_layouts(config: ModelConfig, capacity: int, kv_int8: bool = False) -> tuple[CacheLayout, ...]:
  return tuple(CacheLayout(spec, capacity, config.num_kv_heads, config.head_dim,
                           kv_int8 and spec.is_full) for spec in config.layer_specs)


def init_cache(layouts, batch: int, dtype=jnp.bfloat16) -> list[dict]:
  """Zero-filled buffers, one dict per layer."""
  return [{name: jnp.zeros(shape, dt) for name, (shape, dt) in lay.buffer_shapes(batch, dtype).items()}
          for lay in layouts]


def kv_cache_bytes(config: ModelConfig, context_len: int, batch: int = 1, *, dtype=jnp.bfloat16,
                   kv_int8: bool = False) -> dict:
  """KV-cache bytes for `batch` sequences of `context_len` positions.

  Returns {"by_kind": {kind: bytes}, "per_layer": [bytes], "total", "all_full", "saving"}
  where all_full is the same model with every layer full (no int8) and saving = 1 - total/all_full.
  Equals the bytes `init_cache` allocates for the same arguments.
  """
  for name, n in (("context_len", context_len), ("batch", batch)):
    check_count(f"kv_cache_bytes: {name}", n)
  per_layer = [lay.nbytes(batch, dtype) for lay in cache_layouts(config, context_len, kv_int8)]
  by_kind: dict[str, int] = {}
  for spec, n in zip(config.layer_specs, per_layer):
    by_kind[spec.kind] = by_kind.get(spec.kind, 0) + n
  all_full = sum(lay.nbytes(batch, dtype) for lay in cache_layouts(config.all_full(), context_len))
  total = sum(per_layer)
  return {"by_kind": by_kind, "per_layer": per_layer, "total": total, "all_full": all_full,
          "saving": 1.0 - total / all_full}


def format_bytes(n: float) -> str:
  for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
    if abs(n) < 1024 or unit == "TiB":
      return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
    n /= 1024
  return str(n)


def _relative(saving: float) -> str:
  return f"{100 * saving:.1f}% smaller" if saving >= 0 else f"{-100 * saving:.1f}% larger"


def describe_cache(config: ModelConfig, context_len: int, batch: int = 1, **kw) -> str:
  """One human-readable line per layer kind plus totals (printed by the CLI)."""
  r = kv_cache_bytes(config, context_len, batch, **kw)
  counts: dict[str, int] = {}
  for spec in config.layer_specs:
    counts[str(spec)] = counts.get(str(spec), 0) + 1
  lines = [f"KV cache for batch {batch} x {context_len} positions:"]
  for kind, n in r["by_kind"].items():
    specs = ", ".join(f"{c} x {s}" for s, c in counts.items() if s.split("(")[0] == kind)
    lines.append(f"  {kind:13s} {format_bytes(n):>12s}  ({specs})")
  lines.append(f"  {'total':13s} {format_bytes(r['total']):>12s}  vs all-full {format_bytes(r['all_full'])}"
               f"  ({_relative(r['saving'])})")
  return "\n".join(lines)
