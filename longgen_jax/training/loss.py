"""The language-model loss: chunked cross-entropy over the final hidden states."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from longgen_jax.model.llama import Llama
from longgen_jax.parallel.layout import sequence_order


def chunked_xent(model: Llama, hidden_BTE, targets_BT, mask_BT, chunk: int, parts: int = 1):
  """(sum of masked token losses, number of counted tokens), logits never all in memory at once.

  The sequence is first cut into `parts` contiguous pieces (the context axis's shards) and chunks of
  `chunk` positions (0: no chunking) are taken within each piece, all pieces at once, so a sequence
  split over devices is never resharded; a piece that is not a whole number of chunks is padded
  (mask 0) at its end.
  """
  B, T, E = hidden_BTE.shape
  if T % parts:
    raise ValueError(f"sequence length {T} does not split into {parts} context shards")
  local = T // parts
  chunk = local if chunk <= 0 or chunk >= local else chunk
  n = -(-local // chunk)

  def split(x):  # [B, T, ...] -> [n, B, parts, chunk, ...]
    x = x.reshape(B, parts, local, *x.shape[2:])
    if n * chunk > local:
      x = jnp.pad(x, [(0, 0), (0, 0), (0, n * chunk - local)] + [(0, 0)] * (x.ndim - 3))
    return jnp.moveaxis(x.reshape(B, parts, n, chunk, *x.shape[3:]), 2, 0)

  @jax.checkpoint
  def one(h_BCE, t_BC, m_BC):
    logits = model.logits(h_BCE)
    lse = jax.nn.logsumexp(logits, axis=-1)
    # The target's logit by a one-hot contraction, not take_along_axis: the logits' vocab axis is split over
    # the mesh like the output embedding, and the gather's backward (a scatter) cannot be partitioned that
    # way (XLA's SPMD partitioner replicated each chunk's logits for it). The same value (one nonzero term).
    tgt = jnp.sum(logits * jax.nn.one_hot(t_BC, logits.shape[-1], dtype=logits.dtype), axis=-1)
    return jnp.sum((lse - tgt) * m_BC)

  total, _ = jax.lax.scan(lambda acc, xs: (acc + one(*xs), None), jnp.float32(0),
                          (split(hidden_BTE), split(targets_BT), split(mask_BT.astype(jnp.float32))))
  return total, jnp.sum(mask_BT.astype(jnp.float32))


def make_loss_fn(graphdef, *, loss_chunk: int, segment_attention: bool, context: int = 1):
  """loss(params, batch[b, T]) -> (loss sum, token count), for batches in the layout of
  parallel.layout over `context` devices (the plain order for context 1).

  segment_attention: packed documents attend only within themselves and restart their positions
  (the batch's segment_ids and positions); off, each row is one sequence at positions 0..T-1.
  """
  def loss_fn(params, mb):
    model = nnx.merge(graphdef, params)
    if segment_attention:
      seg, pos = mb["segment_ids"], mb["positions"]
    else:
      order = sequence_order(mb["inputs"].shape[-1], context)
      seg, pos = None, jnp.broadcast_to(jnp.asarray(order, np.int32), mb["inputs"].shape)
    hidden = model.hidden_states(mb["inputs"], pos, seg)
    return chunked_xent(model, hidden, mb["targets"], mb["loss_mask"], loss_chunk, parts=context)
  return loss_fn
