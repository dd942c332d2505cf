"""Padding arrays to the lengths kernels tile (one copy for every implementation)."""

from __future__ import annotations

import jax.numpy as jnp


def round_up(x: int, m: int) -> int:
  """The smallest multiple of m that is >= x."""
  return -(-x // m) * m


def pad_axis(x, axis: int, size: int, value=0):
  """x padded with `value` at the end of `axis` to length `size` (x itself when already that long)."""
  if x.shape[axis] == size:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths, constant_values=value)


def pad_segment_ids(q_ids_BT, kv_ids_BS, Tp: int, Sp: int):
  """Segment ids [B, T] / [B, S] as int32 padded to Tp / Sp with ids no real token has and that differ
  (-1 for padded queries, -2 for padded keys): padding matches nothing, not even other padding."""
  return (pad_axis(q_ids_BT.astype(jnp.int32), 1, Tp, -1), pad_axis(kv_ids_BS.astype(jnp.int32), 1, Sp, -2))
