"""`attention(q, k, v, spec, impl=...)`: one entry point over several implementations.

The implementations and the auto choice live in `registry`; the pattern in `spec`. This
package imports nothing above itself (no model, no training).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from longgen_jax.attention import registry
from longgen_jax.attention.registry import available_impls, choose, register_impl, supports
from longgen_jax.attention.sharding import per_shard
from longgen_jax.attention.spec import (AttentionSpec, BlockLayout, allowed, attended_keys_per_query,
                                        block_layout, dense_mask, parse_spec)

__all__ = ["AttentionSpec", "BlockLayout", "SegmentIds", "allowed", "attended_keys_per_query", "attention",
           "available_impls", "block_layout", "choose", "dense_mask", "parse_spec", "register_impl",
           "supports"]


class SegmentIds(NamedTuple):
  """Document ids of the queries [B, T] and of the keys [B, S]: pairs in different documents
  are masked. A plain [B, T] array passed as `segment_ids` means the same ids for both."""

  q: jax.Array
  kv: jax.Array


def attention(q, k, v, spec: AttentionSpec, *, impl: str = "auto",
              segment_ids: SegmentIds | jax.Array | None = None, q_offset: int = 0,
              return_lse: bool = False):
  """Causal attention under a LongGen pattern.

  q: [B, T, Hq, D]; k, v: [B, S, Hkv, D] with Hq a multiple of Hkv. Keys sit at absolute
  positions 0..S-1 and queries at q_offset..q_offset+T-1. segment_ids: a `SegmentIds`, or
  one int[B, T] array when T == S. Rows with no allowed key return zeros. Softmax scale
  1/sqrt(D), float32 accumulation. Returns out [B, T, Hq, D], and lse [B, Hq, T] (natural
  log, -inf for empty rows) if asked. Under a `jax.set_mesh` context the call runs per shard:
  batch over (data, fsdp), heads over tensor (attention.sharding).
  """
  if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
    raise ValueError(f"expected q [B,T,Hq,D] and k, v [B,S,Hkv,D]; got q {q.shape}, k {k.shape}, v {v.shape}")
  B, T, Hq, D = q.shape
  S = k.shape[1]
  if k.shape[0] != B or k.shape[3] != D:
    raise ValueError(f"q {q.shape} and k {k.shape} disagree on batch or head_dim")
  if Hq % k.shape[2]:
    raise ValueError(f"query heads ({Hq}) must be a multiple of kv heads ({k.shape[2]})")
  if not isinstance(spec, AttentionSpec):
    raise TypeError(f"spec must be an AttentionSpec, got {type(spec).__name__}")
  if T < 1 or S < 1:
    raise ValueError(f"attention needs at least one query and one key; got T={T}, S={S}")
  for name, x in (("q", q), ("k", k), ("v", v)):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise TypeError(f"{name} must be a floating-point array, got {x.dtype}")
  if isinstance(q_offset, bool) or not (isinstance(q_offset, (int, np.integer)) or
                                        (hasattr(q_offset, "dtype") and jnp.issubdtype(q_offset.dtype, jnp.integer))):
    raise TypeError(f"q_offset must be an integer, got {q_offset!r}")
  if isinstance(q_offset, (int, np.integer)) and q_offset < 0:
    raise ValueError(f"q_offset must be >= 0 (the first query's absolute position), got {q_offset}")
  seg = _segment_ids(segment_ids, B, T, S)
  features = registry.call_features(segment_ids=seg is not None, q_offset=not _is_zero(q_offset),
                                    lse=return_lse)
  fn = registry.resolve(impl, spec, features)
  return per_shard(fn, q, k, v, spec, q_segment_ids=None if seg is None else seg.q,
                   kv_segment_ids=None if seg is None else seg.kv, q_offset=q_offset, return_lse=return_lse)


def _segment_ids(segment_ids, B: int, T: int, S: int) -> SegmentIds | None:
  if segment_ids is None:
    return None
  if not isinstance(segment_ids, SegmentIds):
    if isinstance(segment_ids, (tuple, list)):
      raise TypeError("pass SegmentIds(q=..., kv=...) for separate query and key ids, not a plain tuple")
    if T != S:
      raise ValueError(f"one segment_ids array needs T == S (got T={T}, S={S}); pass SegmentIds(q, kv)")
    segment_ids = SegmentIds(segment_ids, segment_ids)
  if segment_ids.q.shape != (B, T) or segment_ids.kv.shape != (B, S):
    raise ValueError(f"segment ids must be [B,T]={B, T} and [B,S]={B, S}; "
                     f"got {segment_ids.q.shape} and {segment_ids.kv.shape}")
  return segment_ids


def _is_zero(x) -> bool:
  return isinstance(x, int) and x == 0
