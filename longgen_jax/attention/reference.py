"""Dense masked attention in XLA: the ground truth every kernel is tested against."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from longgen_jax.attention.spec import AttentionSpec, dense_mask


def segment_mask(q_segment_ids, kv_segment_ids):
  """bool[B, T, S] (or None): True where query and key share a segment."""
  if q_segment_ids is None:
    return None
  return q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]


def reference_attention(q_BTHD, k_BSKD, v_BSKD, spec: AttentionSpec, *, q_segment_ids=None,
                        kv_segment_ids=None, q_offset: int = 0, return_lse: bool = False):
  """Materialises the T x S scores. Returns out[B,T,Hq,D] (and lse[B,Hq,T] if asked)."""
  B, T, Hq, D = q_BTHD.shape
  S, Hkv = k_BSKD.shape[1], k_BSKD.shape[2]
  G = Hq // Hkv
  mask_KTS = jnp.asarray(dense_mask(spec, T, S, Hkv, q_offset))
  mask_BKTS = jnp.broadcast_to(mask_KTS[None], (B, Hkv, T, S))
  seg_BTS = segment_mask(q_segment_ids, kv_segment_ids)
  if seg_BTS is not None:
    mask_BKTS = mask_BKTS & seg_BTS[:, None]
  q_BTKGD = q_BTHD.reshape(B, T, Hkv, G, D).astype(jnp.float32)
  s_BKGTS = jnp.einsum("btkgd,bskd->bkgts", q_BTKGD, k_BSKD.astype(jnp.float32)) / jnp.sqrt(D)
  mask_BKGTS = mask_BKTS[:, :, None]
  s_BKGTS = jnp.where(mask_BKGTS, s_BKGTS, -jnp.inf)
  m = jnp.max(s_BKGTS, axis=-1, keepdims=True)
  m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
  p = jnp.where(mask_BKGTS, jnp.exp(s_BKGTS - m), 0.0)
  l = jnp.sum(p, axis=-1, keepdims=True)
  out_BKGTD = jnp.einsum("bkgts,bskd->bkgtd", p, v_BSKD.astype(jnp.float32))
  out_BKGTD = out_BKGTD / jnp.where(l > 0, l, 1.0)
  out = out_BKGTD.transpose(0, 3, 1, 2, 4).reshape(B, T, Hq, D).astype(q_BTHD.dtype)
  if not return_lse:
    return out
  lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)[..., 0]
  return out, lse.reshape(B, Hq, T)
