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


def masked_attend(s_XQK, mask_XQK, v_XKD):
  """Softmax(s) @ v over the allowed keys of each row, in float32.

  Shapes are any batch prefix X, Q rows and K keys (v: [..., K, D] matching s's prefix).
  Returns out [..., Q, D] (zeros for rows without an allowed key) and lse [..., Q]
  (natural log, -inf for those rows). The row max is a constant to autodiff, so
  gradients stay finite on empty rows.
  """
  s_XQK = jnp.where(mask_XQK, s_XQK, -jnp.inf)
  m = jnp.max(s_XQK, axis=-1, keepdims=True)
  m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
  p = jnp.where(mask_XQK, jnp.exp(s_XQK - m), 0.0)
  l = jnp.sum(p, axis=-1, keepdims=True)
  safe_l = jnp.where(l > 0, l, 1.0)
  out = jnp.einsum("...qk,...kd->...qd", p, v_XKD.astype(jnp.float32)) / safe_l
  lse = jnp.where(l > 0, m + jnp.log(safe_l), -jnp.inf)[..., 0]
  return out, lse


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
  v_BK1SD = v_BSKD.transpose(0, 2, 1, 3)[:, :, None]
  out_BKGTD, lse = masked_attend(s_BKGTS, mask_BKTS[:, :, None], v_BK1SD)
  out = out_BKGTD.transpose(0, 3, 1, 2, 4).reshape(B, T, Hq, D).astype(q_BTHD.dtype)
  if not return_lse:
    return out
  return out, lse.reshape(B, Hq, T)
