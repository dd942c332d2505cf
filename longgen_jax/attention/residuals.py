"""Names under which a full layer's attention output and log-sum-exp can be kept by a remat policy.

Under `remat="full"` the backward recomputes each layer's forward; for a full (causal) layer the
attention is the quadratic part of that, e.g. 229 ms of a layer's forward at 128K on an H100, while
its output is one [B, T, Hq, D] array. So the kernels' custom_vjp forwards name these two
residuals (`jax.ad_checkpoint.checkpoint_name`) and model/config's policies keep them; sparse layers
are cheap to recompute and are not named. The ring attention of parallel/context names its own.
"""

from __future__ import annotations

from jax.ad_checkpoint import checkpoint_name

from longgen_jax.attention.spec import AttentionSpec

FULL_OUT = "full_attention_out"
FULL_LSE = "full_attention_lse"


def name_full_residuals(spec: AttentionSpec, out, lse, *, T: int, S: int, q_offset: int):
  """(out, lse) named FULL_OUT / FULL_LSE where the call is a full layer's attention of a whole sequence
  over itself (full spec, T == S, q_offset 0), unchanged otherwise: pieces of context-parallel layers
  (a halo's strided keys, an all-gather's local queries) are cheap or kept by the ring's own names."""
  if not (spec.is_full and T == S and q_offset == 0):
    return out, lse
  return checkpoint_name(out, FULL_OUT), checkpoint_name(lse, FULL_LSE)
