"""cuDNN's fused attention (jax.nn.dot_product_attention) as a registered implementation.

It serves plain causal full attention (no segment ids, queries and keys from position 0):
the strongest dense baseline on NVIDIA GPUs. cuDNN has no attention sink and no strided
blocks, so sparse layers never come here (the registry gives them the auto choice).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from longgen_jax.attention.spec import AttentionSpec


def cudnn_attention(q_BTHD, k_BSKD, v_BSKD, spec: AttentionSpec, *, q_segment_ids=None,
                    kv_segment_ids=None, q_offset: int = 0, return_lse: bool = False):
  if not spec.is_full or q_segment_ids is not None or q_offset or q_BTHD.shape[1] != k_BSKD.shape[1]:
    raise ValueError("the cudnn impl serves causal full attention without segment ids or q_offset")
  out = jax.nn.dot_product_attention(q_BTHD, k_BSKD, v_BSKD, is_causal=True, implementation="cudnn",
                                     return_residual=return_lse)
  if not return_lse:
    return out
  out, lse_BTH = out
  return out, jnp.transpose(lse_BTH, (0, 2, 1)).astype(jnp.float32)

