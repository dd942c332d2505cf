"""Names under which a full layer's attention output and log-sum-exp can be kept by a remat policy.

Under `remat="full"` the backward recomputes each layer's forward; for a full (causal) layer the
attention is the quadratic part of that, e.g. 229 ms of a layer's forward at 128K on an H100, while
its output is one [B, T, Hq, D] array. So the kernels' custom_vjp forwards name these two
residuals (`jax.ad_checkpoint.checkpoint_name`) and model/config's policies keep them; sparse layers
are cheap to recompute and are not named. The ring attention of parallel/context names its own.

The named pair passes an optimization barrier first. Under a layer scan the kept residuals are written
into a [layers, ...] stack; XLA's GPU dynamic-slice fusion then CLONES the attention custom call into
a fusion that writes the stacked copy in place, keeping the original for the layer's next op: the
forward kernel ran twice per full layer (seen in the compiled HLO of the 7B train step at 128K on an
H200: 3.35 s for 2 scanned full layers vs 2.87 s unscanned). The barrier's output, not the custom
call, is what gets stacked, so there is nothing to clone.
"""

from __future__ import annotations

from jax import lax
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
  out, lse = lax.optimization_barrier((out, lse))   # see the module docstring: one forward kernel per layer
  return checkpoint_name(out, FULL_OUT), checkpoint_name(lse, FULL_LSE)
