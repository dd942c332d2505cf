"""Cache orchestration for `Llama`: chunked prefill into per-layer KV caches, one-token decode.

The model's own forward runs both: this module only builds the attend functions that write
a layer's cache and attend over it (see model.llama). Sequences are right-padded: sequence b holds its
prompt at positions 0..lengths[b]-1, so cache slots, RoPE and the sparse patterns all use the
true absolute positions; padded tokens are computed but never written to a cache.

Prefill runs one jitted call per (chunk, layer), so a layer compiles once per distinct
static argument, not once per model:
  full         attention(impl) over the cache prefix [0, c0 + C) at q_offset = c0 (c0 static:
               one compile per chunk offset), or with impl "cudnn": jax.nn.dot_product_attention
               (cuDNN on GPU, XLA elsewhere) over the whole cache with a dynamic key length,
               merged with the chunk's causal self-attention by log-sum-exp (one compile).
  sink_window  attention(impl) over [sink | the ring's last `window` positions | chunk], with
               distances preserved (q_offset = sink + window) and unwritten slots masked by
               kv segment ids (one compile). The first chunk (c0 = 0) attends only to itself,
               so chunk_len >= sink is required when the prompt spans several chunks.
  block_sparse masked XLA attention over exactly the needed keys: ring + strided store + chunk.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from longgen_jax.attention import SegmentIds, attention, registry
from longgen_jax.attention.decode import CachePart, cached_attention, slot_mask
from longgen_jax.model.kv_cache import CacheLayout, dequantize_int8


def _parts(layout: CacheLayout, cache, q_pos_BT, last_B, extra: CachePart | None = None) -> list[CachePart]:
  """The cache's slots as cached_attention parts, plus an optional extra part."""
  parts = []
  for sl in layout.view(cache, last_B):
    mask = slot_mask(layout.spec, q_pos_BT, sl.pos, sl.ok, sl.only)
    parts.append(CachePart(sl.k, sl.v, mask, sl.k_scale, sl.v_scale))
  if extra is not None:
    parts.append(extra)
  return parts


def _uses_cudnn(impl: str, spec) -> bool:
  """Full layers under impl "cudnn" attend the cache through dot_product_attention with a
  dynamic key length (cuDNN on GPU, XLA elsewhere): one compile for every chunk."""
  return impl == "cudnn" and spec.is_full


# ----------------------------------------------------------------------------- prefill


def _full_prefix_cudnn(q, cache_k, cache_v, c0, k, v):
  """Chunk attention = (prefix [0, c0) via dynamic key length) merged with causal self part."""
  B, T = q.shape[:2]
  gpu = jax.default_backend() == "gpu"
  dpa = functools.partial(jax.nn.dot_product_attention, implementation="cudnn" if gpu else None,
                          return_residual=True)
  o_pre, lse_pre = dpa(q, cache_k, cache_v, key_value_seq_lengths=jnp.full((B,), c0, jnp.int32),
                       query_seq_lengths=jnp.full((B,), T, jnp.int32))
  o_self, lse_self = dpa(q, k, v, is_causal=True)
  lse_pre = jnp.where(c0 > 0, lse_pre.astype(jnp.float32), -jnp.inf)  # [B, T, H]
  lse_self = lse_self.astype(jnp.float32)
  m = jnp.maximum(lse_pre, lse_self)
  w_pre, w_self = jnp.exp(lse_pre - m), jnp.exp(lse_self - m)
  o_pre = jnp.where(c0 > 0, o_pre.astype(jnp.float32), 0.0)
  o = (o_pre * w_pre[..., None] + o_self.astype(jnp.float32) * w_self[..., None])
  return (o / (w_pre + w_self)[..., None]).astype(q.dtype)


@functools.partial(jax.jit, static_argnames=("graphdef", "layout", "impl", "static_c0", "history_complete"),
                   donate_argnames=("cache",))
def prefill_layer(graphdef, state, layout: CacheLayout, cache, x_BTE, c0, lengths_B, *,
                  impl: str, static_c0: int | None, history_complete: bool = False):
  """One block over one chunk at positions c0.. (static_c0: c0 as a Python int, when needed;
  history_complete: a sink_window chunk whose sink and window history are all real positions)."""
  block = nnx.merge(graphdef, state)
  B, T, _ = x_BTE.shape
  spec = layout.spec
  if static_c0 is not None:
    c0 = static_c0
  pos_BT = jnp.broadcast_to(c0 + jnp.arange(T), (B, T))
  valid_BT = pos_BT < lengths_B[:, None]
  start_B = jnp.full((B,), c0, jnp.int32)

  def attend(q, k, v):
    new_cache = layout.write(cache, k, v, start_B, valid_BT)
    if spec.kind == "full":
      if _uses_cudnn(impl, spec):
        kc, vc = _cache_kv(layout, new_cache, q.dtype, None)
        return _full_prefix_cudnn(q, kc, vc, c0, k, v), new_cache
      kc, vc = _cache_kv(layout, new_cache, q.dtype, static_c0 + T)
      return attention(q, kc, vc, spec, impl=impl, q_offset=static_c0), new_cache
    if spec.kind == "sink_window":
      if static_c0 == 0:  # first chunk: only itself
        return attention(q, k, v, spec, impl=impl), new_cache
      return _sink_window_chunk(layout, cache, q, k, v, c0, lengths_B, impl, history_complete), new_cache
    K = layout.num_kv_heads
    pos_BKT = jnp.broadcast_to(pos_BT[:, None], (B, K, T))
    chunk = CachePart(k, v, slot_mask(spec, pos_BT, pos_BKT, jnp.ones((B, K, T), bool)))
    return cached_attention(q, _parts(layout, cache, pos_BT, start_B - 1, chunk)), new_cache

  return block(x_BTE, pos_BT, attend)


def _cache_kv(layout, cache, dtype, length):
  k, v = cache["k"], cache["v"]
  if length is not None:
    k, v = k[:, :length], v[:, :length]
  if layout.kv_int8:
    n = k.shape[1]
    k = dequantize_int8(k, cache["k_scale"][:, :n], dtype)
    v = dequantize_int8(v, cache["v_scale"][:, :n], dtype)
  return k, v


def _sink_window_chunk(layout, cache, q, k, v, c0, lengths_B, impl, history_complete: bool = False):
  """[sink | ring history | chunk] relabelled so that query-key distances are preserved.

  Segment ids mask the sink and history slots that hold no real position (early chunks, short rows). Once
  c0 >= sink + ring (history_complete, static) every slot is real for each row with a query here (its
  length > c0), and rows without one compute unused outputs, so the plain pattern serves, without ids."""
  spec, sink, ring = layout.spec, layout.sink_len, layout.ring_len
  hist_pos = c0 - ring + jnp.arange(ring)
  slots = hist_pos % ring
  keys = [cache["sink_k"], cache["ring_k"][:, slots], k]
  vals = [cache["sink_v"], cache["ring_v"][:, slots], v]
  if history_complete:
    return attention(q, jnp.concatenate(keys, 1), jnp.concatenate(vals, 1), spec, impl=impl, q_offset=sink + ring)
  L = lengths_B[:, None]
  kv_seg = jnp.concatenate([
      jnp.arange(sink)[None] < L,
      (hist_pos >= spec.sink)[None] & (hist_pos[None] < L),
      jnp.ones(k.shape[:2], bool)], axis=1).astype(jnp.int32)
  q_seg = jnp.ones(q.shape[:2], jnp.int32)
  return attention(q, jnp.concatenate(keys, 1), jnp.concatenate(vals, 1), spec, impl=impl,
                   q_offset=sink + ring, segment_ids=SegmentIds(q_seg, kv_seg))


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _embed(graphdef, state, tokens_BT):
  return nnx.merge(graphdef, state)(tokens_BT)


@jax.jit
def _take_last(x_BTE, last_BE, lengths_B, c0):
  idx_B = lengths_B - 1 - c0
  inside = (idx_B >= 0) & (idx_B < x_BTE.shape[1])
  picked = jnp.take_along_axis(x_BTE, jnp.clip(idx_B, 0, x_BTE.shape[1] - 1)[:, None, None], 1)[:, 0]
  return jnp.where(inside[:, None], picked, last_BE)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _final_logits(graphdef, state, hidden_BE):
  model = nnx.merge(graphdef, state)
  return model.logits(model.norm(hidden_BE[:, None]))[:, 0]


def check_chunk_len(layouts, chunk_len: int, prompt_len: int):
  if chunk_len < 1:
    raise ValueError(f"chunk_len must be >= 1, got {chunk_len}")
  if prompt_len > chunk_len:
    sinks = [lay.spec.sink for lay in layouts if lay.spec.kind == "sink_window"]
    if sinks and chunk_len < max(sinks):
      raise ValueError(f"chunk_len={chunk_len} must be >= the attention sink ({max(sinks)}) when the "
                       f"prompt ({prompt_len} tokens) spans several chunks")


def prefill(model, layouts, caches, tokens_BT, lengths_B, *, chunk_len: int = 2048,
            attn_impl: str | None = None):
  """Runs right-padded prompts through the model in chunks, filling `caches` (donated).

  attn_impl (default: the model's) is resolved per layer by the attention registry, so
  "cudnn" serves the full layers and leaves sparse layers to the auto choice. block_sparse
  layers always use the masked XLA path over the cache's parts.

  Returns (caches, logits [B, V] at each sequence's last prompt token).
  """
  tokens_BT = np.asarray(tokens_BT, np.int32)   # chunks are cut on the host: no slice program per shape
  lengths_B = jnp.asarray(lengths_B, jnp.int32)
  B, T = tokens_BT.shape
  impl = attn_impl or model.attn_impl
  if impl not in registry.USER_NAMES:
    raise ValueError(f"attn_impl must be one of {registry.USER_NAMES}, got {impl!r}")
  if T > layouts[0].capacity:
    raise ValueError(f"prompt length {T} exceeds the cache capacity {layouts[0].capacity}")
  check_chunk_len(layouts, chunk_len, T)
  emb_def, emb_state = nnx.split(model.embed_tokens)
  blocks = [nnx.split(blk) for blk in model.layers]
  last_BE = jnp.zeros((B, model.config.hidden_size), model.dtype)
  caches = list(caches)
  for c0 in range(0, T, chunk_len):
    x = _embed(emb_def, emb_state, tokens_BT[:, c0:c0 + chunk_len])
    for i, ((gdef, state), layout) in enumerate(zip(blocks, layouts)):
      kind = layout.spec.kind
      static_c0 = (c0 if kind == "full" and not _uses_cudnn(impl, layout.spec) else
                   0 if kind == "sink_window" and c0 == 0 else None)
      complete = kind == "sink_window" and c0 >= layout.sink_len + layout.ring_len
      x, caches[i] = prefill_layer(gdef, state, layout, caches[i], x, jnp.int32(c0), lengths_B,
                                   impl=impl, static_c0=static_c0, history_complete=complete)
    last_BE = _take_last(x, last_BE, lengths_B, jnp.int32(c0))
  m_def, m_state = nnx.split(model)
  return caches, _final_logits(m_def, m_state, last_BE)


# ----------------------------------------------------------------------------- decode


def decode_step(model, layouts, caches, tokens_B, pos_B):
  """One token per sequence at positions pos_B: the model's forward with cache attends. Pure (use
  inside jit). Returns (logits [B,V], caches)."""
  pos_B1 = pos_B[:, None]
  ones_B1 = jnp.ones_like(pos_B1, bool)

  def cache_attend(layout, cache):
    def attend(q, k, v):
      cache_ = layout.write(cache, k, v, pos_B, ones_B1)
      return cached_attention(q, _parts(layout, cache_, pos_B1, pos_B)), cache_
    return attend

  hidden, new_caches = model.forward(tokens_B[:, None], pos_B1,
                                     [cache_attend(lay, c) for lay, c in zip(layouts, caches)])
  return model.logits(hidden)[:, 0], new_caches


@functools.partial(jax.jit, static_argnames=("graphdef", "layouts"), donate_argnames=("caches",))
def decode_step_jit(graphdef, state, layouts, caches, tokens_B, pos_B):
  return decode_step(nnx.merge(graphdef, state), layouts, caches, tokens_B, pos_B)
