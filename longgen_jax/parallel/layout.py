"""The load-balanced sequence layout of context parallelism (dual chunk swap).

With `context` = cp devices splitting each sequence, the sequence is cut into 2*cp chunks of c
tokens and device r holds chunks r and 2*cp-1-r, in that order: under a causal mask every
device then owns the same amount of attention work (an early chunk, which attends little, and
a late one, which attends much). The batch is reordered ONCE, on the host, before it is sent to
the devices: inputs, targets, positions, segment ids and the loss mask travel together, so
the loss (a sum over tokens) needs no un-reordering. Attention recovers each token's place in
the sequence from this layout (`parallel.context`), so masks use the original token order.

A length that does not divide into 2*cp chunks is padded at its end (segment id 0, loss mask 0,
positions continuing): padding comes after every real token, so causally no real token sees it,
and no real token is dropped.
"""

from __future__ import annotations

import numpy as np


def padded_length(seq_len: int, context: int) -> int:
  """seq_len rounded up to a multiple of 2*context (seq_len itself without context parallelism)."""
  if context <= 1:
    return seq_len
  return -(-seq_len // (2 * context)) * (2 * context)


def sequence_order(seq_len: int, context: int) -> np.ndarray:
  """int32[seq_len]: the original index of the token in each slot of the layout (arange for context 1).

  Sharding the slots contiguously over `context` devices gives device r the chunks (r, 2*context-1-r).
  """
  if context <= 1:
    return np.arange(seq_len, dtype=np.int32)
  if seq_len % (2 * context):
    raise ValueError(f"a sequence of {seq_len} tokens does not split into 2 x context = {2 * context} equal "
                     f"chunks; pad it to padded_length(...) = {padded_length(seq_len, context)}")
  chunks = np.arange(seq_len, dtype=np.int32).reshape(2 * context, -1)
  device_chunks = [(r, 2 * context - 1 - r) for r in range(context)]
  return np.concatenate([chunks[i] for pair in device_chunks for i in pair])


def to_context_layout(batch: dict[str, np.ndarray], context: int) -> dict[str, np.ndarray]:
  """A host batch of [..., T] arrays, padded to padded_length(T, context) and reordered along T.

  Padding is 0 everywhere (segment id 0 = no document, loss mask 0) except `positions`, which
  continue from the last real token. Identity for context 1.
  """
  if context <= 1:
    return batch
  T = next(iter(batch.values())).shape[-1]
  Tp = padded_length(T, context)
  order = sequence_order(Tp, context)
  out = {}
  for name, x in batch.items():
    if x.shape[-1] != T:
      raise ValueError(f"batch field {name!r} has length {x.shape[-1]}, the others {T}")
    if Tp > T:
      widths = [(0, 0)] * (x.ndim - 1) + [(0, Tp - T)]
      if name == "positions":
        x = np.concatenate([x, x[..., -1:] + np.arange(1, Tp - T + 1, dtype=x.dtype)], axis=-1)
      else:
        x = np.pad(x, widths)
    out[name] = np.take(x, order, axis=-1)
  return out
