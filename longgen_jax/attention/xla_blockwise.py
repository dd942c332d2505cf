"""Block-sparse attention in plain XLA: each query tile gathers only its listed key tiles.

Runs on any backend (the CPU default). A `lax.map` over query tiles with a rematerialised
body keeps memory at O(T x budget) for forward and backward, never O(T^2) for sparse specs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from longgen_jax.attention.padding import pad_axis, pad_segment_ids
from longgen_jax.attention.reference import masked_attend
from longgen_jax.attention.spec import AttentionSpec, allowed, block_layout


def default_tile(spec: AttentionSpec) -> int:
  return min(spec.block_size, 128) if spec.kind == "block_sparse" else 64



def blockwise_attention(q_BTHD, k_BSKD, v_BSKD, spec: AttentionSpec, *, q_segment_ids=None,
                        kv_segment_ids=None, q_offset: int = 0, return_lse: bool = False,
                        block_q: int | None = None, block_k: int | None = None):
  B, T, Hq, D = q_BTHD.shape
  S, Hkv = k_BSKD.shape[1], k_BSKD.shape[2]
  G = Hq // Hkv
  bq = block_q or min(default_tile(spec), max(8, 1 << (T - 1).bit_length()))
  bk = block_k or default_tile(spec)
  layout = block_layout(spec, T, S, Hkv, bq, bk, q_offset)
  nq, nk, M = layout.num_q_blocks, layout.num_k_blocks, layout.kv_index.shape[-1]

  # Per-step inputs, query tile axis first.
  q_nBKGqD = pad_axis(q_BTHD, 1, nq * bq).reshape(B, nq, bq, Hkv, G, D).transpose(1, 0, 3, 4, 2, 5)
  kv_index = jnp.asarray(np.broadcast_to(layout.kv_index, (Hkv, nq, M)).transpose(1, 0, 2))
  kv_count = jnp.asarray(np.broadcast_to(layout.kv_count, (Hkv, nq)).T)
  has_segments = q_segment_ids is not None
  if has_segments:
    q_seg, kv_seg = pad_segment_ids(q_segment_ids, kv_segment_ids, nq * bq, nk * bk)
    q_seg_nBq = q_seg.reshape(B, nq, bq).transpose(1, 0, 2)
    kv_seg_BnK = kv_seg.reshape(B, nk, bk)
  else:
    q_seg_nBq = jnp.zeros((nq, 1, 1), jnp.int32)
  k_KnBkD = pad_axis(k_BSKD, 1, nk * bk).reshape(B, nk, bk, Hkv, D).transpose(3, 1, 0, 2, 4)
  v_KnBkD = pad_axis(v_BSKD, 1, nk * bk).reshape(B, nk, bk, Hkv, D).transpose(3, 1, 0, 2, 4)
  heads_K = jnp.arange(Hkv)

  @jax.checkpoint
  def one_query_tile(args):
    t, q_BKGqD, idx_KM, count_K, q_seg_Bq = args
    k_BKMD = k_KnBkD[heads_K[:, None], idx_KM].transpose(2, 0, 1, 3, 4).reshape(B, Hkv, M * bk, D)
    v_BKMD = v_KnBkD[heads_K[:, None], idx_KM].transpose(2, 0, 1, 3, 4).reshape(B, Hkv, M * bk, D)
    k_pos_KM = (idx_KM[:, :, None] * bk + jnp.arange(bk)).reshape(Hkv, M * bk)
    slot_ok_KM = jnp.repeat(jnp.arange(M)[None, :] < count_K[:, None], bk, axis=1)
    q_pos_q = q_offset + t * bq + jnp.arange(bq)
    mask_KqM = allowed(spec, q_pos_q[None, :, None], k_pos_KM[:, None, :], heads_K[:, None, None], Hkv)
    mask_KqM = mask_KqM & ((k_pos_KM < S) & slot_ok_KM)[:, None, :]
    mask_BKqM = mask_KqM[None]
    if has_segments:
      k_seg_BKM = kv_seg_BnK[:, idx_KM].reshape(B, Hkv, M * bk)
      mask_BKqM = mask_BKqM & (q_seg_Bq[:, None, :, None] == k_seg_BKM[:, :, None, :])
    s = jnp.einsum("bkgqd,bkmd->bkgqm", q_BKGqD.astype(jnp.float32),
                   k_BKMD.astype(jnp.float32)) / np.sqrt(D)
    out, lse = masked_attend(s, mask_BKqM[:, :, None], v_BKMD[:, :, None])
    return out.astype(q_BTHD.dtype), lse

  out_nBKGqD, lse_nBKGq = jax.lax.map(
      one_query_tile, (jnp.arange(nq), q_nBKGqD, kv_index, kv_count, q_seg_nBq))
  out = out_nBKGqD.transpose(1, 0, 4, 2, 3, 5).reshape(B, nq * bq, Hq, D)[:, :T]
  if not return_lse:
    return out
  lse = lse_nBKGq.transpose(1, 2, 3, 0, 4).reshape(B, Hq, nq * bq)[:, :, :T]
  return out, lse
