"""Attention of a few new queries against KV-cache slots that carry explicit positions.

Decode (T = 1) reads every slot of a layer's cache once and is bound by memory bandwidth, so
it is a masked XLA einsum pair with float32 accumulation: one softmax across the cache's parts
(e.g. sink + ring) without concatenating them, and no dequantised copy of an int8 cache (its
per-token scales multiply the scores and the probabilities). The same function serves
block-sparse prefill chunks, with queries tiled to bound the score memory.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from longgen_jax.attention.spec import AttentionSpec, allowed, local_block


class CachePart(NamedTuple):
  """Slots attended together with the other parts (one softmax): k, v [B,N,K,D]; mask
  [B|1, K|1, T, N] (query t may use slot n); int8 slots carry float32 scales [B,N,K]."""

  k: jax.Array
  v: jax.Array
  mask: jax.Array
  k_scale: jax.Array | None = None
  v_scale: jax.Array | None = None


def slot_mask(spec: AttentionSpec, q_pos_BT, pos_BKN, ok_BKN, only: str | None = None):
  """bool[B|1, K|1, T, N]: query t may use slot n (written, causal, in the pattern).

  only="local"/"nonlocal" (block_sparse) restricts a part to local / non-local block pairs.
  """
  K = pos_BKN.shape[1]
  heads = jnp.arange(K)[None, :, None, None]
  q = q_pos_BT[:, None, :, None]
  kp = pos_BKN[:, :, None, :]
  mask = ok_BKN[:, :, None, :] & allowed(spec, q, kp, heads, K)
  if only is not None:
    is_local = local_block(spec, q // spec.block_size, kp // spec.block_size)
    mask = mask & (is_local if only == "local" else ~is_local)
  return mask


def cached_attention(q_BTHD, parts: Sequence[CachePart], *, q_tile: int = 256):
  """softmax(q k^T / sqrt(D)) v jointly over the parts. Rows with no allowed slot return zeros."""
  B, T, Hq, D = q_BTHD.shape
  if T <= q_tile:
    return _attend(q_BTHD, parts)
  # Query tiles bound the score memory; padded rows attend nothing and are cut off.
  n = -(-T // q_tile)
  pad = n * q_tile - T
  q_n = jnp.pad(q_BTHD, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(B, n, q_tile, Hq, D).swapaxes(0, 1)
  masks_n = [jnp.pad(p.mask, ((0, 0), (0, 0), (0, pad), (0, 0)))
             .reshape(p.mask.shape[:2] + (n, q_tile, p.mask.shape[-1])).transpose(2, 0, 1, 3, 4)
             for p in parts]

  def one_tile(args):
    q, masks = args
    return _attend(q, [p._replace(mask=m) for p, m in zip(parts, masks)])

  out = jax.lax.map(one_tile, (q_n, masks_n))
  return out.swapaxes(0, 1).reshape(B, n * q_tile, Hq, D)[:, :T]


def _attend(q_BTHD, parts):
  B, T, Hq, D = q_BTHD.shape
  K = parts[0].k.shape[2]
  q_BTKGD = q_BTHD.reshape(B, T, K, Hq // K, D)
  scores = []
  for part in parts:
    k = part.k if part.k_scale is None else part.k.astype(q_BTHD.dtype)
    s = jnp.einsum("btkgd,bnkd->bkgtn", q_BTKGD, k, preferred_element_type=jnp.float32)
    s = s * np.float32(1.0 / np.sqrt(D))
    if part.k_scale is not None:
      s = s * part.k_scale.transpose(0, 2, 1)[:, :, None, None, :]
    scores.append(jnp.where(part.mask[:, :, None], s, -jnp.inf))
  m = jnp.max(jnp.stack([jnp.max(s, axis=-1) for s in scores]), axis=0)[..., None]
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  probs = [jnp.exp(s - m) for s in scores]  # exp(-inf) = 0 at masked slots
  l = sum(jnp.sum(p, axis=-1, keepdims=True) for p in probs)
  inv_l = 1.0 / jnp.where(l > 0, l, 1.0)
  out = jnp.zeros((B, K, Hq // K, T, D), jnp.float32)
  for p, part in zip(probs, parts):
    p, v = p * inv_l, part.v
    if part.v_scale is not None:
      p = p * part.v_scale.transpose(0, 2, 1)[:, :, None, None, :]
      v = v.astype(q_BTHD.dtype)
    dt = jnp.float32 if v.dtype == jnp.float32 else v.dtype
    out = out + jnp.einsum("bkgtn,bnkd->bkgtd", p.astype(dt), v.astype(dt),
                           preferred_element_type=jnp.float32)
  return out.transpose(0, 3, 1, 2, 4).reshape(B, T, Hq, D).astype(q_BTHD.dtype)
