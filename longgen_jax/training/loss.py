"""The language-model loss: chunked cross-entropy over the final hidden states."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from longgen_jax.model.llama import Llama, sequence_positions


def chunked_xent(model: Llama, hidden_BTE, targets_BT, mask_BT, chunk: int):
  """(sum of masked token losses, number of counted tokens), logits never all in memory at once."""
  B, T, E = hidden_BTE.shape
  chunk = T if chunk <= 0 or chunk >= T else chunk
  n = T // chunk
  split = lambda x: x.reshape(B, n, chunk, *x.shape[2:]).swapaxes(0, 1)

  @jax.checkpoint
  def one(h_BCE, t_BC, m_BC):
    logits = model.logits(h_BCE)
    lse = jax.nn.logsumexp(logits, axis=-1)
    tgt = jnp.take_along_axis(logits, t_BC[..., None], axis=-1)[..., 0]
    return jnp.sum((lse - tgt) * m_BC)

  total, _ = jax.lax.scan(lambda acc, xs: (acc + one(*xs), None), jnp.float32(0),
                          (split(hidden_BTE), split(targets_BT), split(mask_BT.astype(jnp.float32))))
  return total, jnp.sum(mask_BT.astype(jnp.float32))


def make_loss_fn(graphdef, *, loss_chunk: int, segment_attention: bool):
  """loss(params, batch[b, T]) -> (loss sum, token count).

  segment_attention: packed documents attend only within themselves and restart their positions
  (the batch's segment_ids and positions); off, each row is one sequence at positions 0..T-1.
  """
  def loss_fn(params, mb):
    model = nnx.merge(graphdef, params)
    if segment_attention:
      seg, pos = mb["segment_ids"], mb["positions"]
    else:
      seg, pos = None, sequence_positions(mb["inputs"])
    hidden = model.hidden_states(mb["inputs"], pos, seg)
    return chunked_xent(model, hidden, mb["targets"], mb["loss_mask"], loss_chunk)
  return loss_fn
