"""Packed documents: which listed tiles other documents own (skipped), and which lie in one (unmasked).

With segment ids a listed tile whose rows and columns share no segment id adds exactly nothing (every
score -inf, p = 0: the online softmax, dQ and dK/dV are unchanged bit for bit), so the kernels skip such
tiles at the ends of their lists. The lists are ascending, so for documents packed in order the earlier
documents' key tiles lead a query tile's list and the later documents' query tiles end a key tile's
list: a full layer over n equal documents then does ~1/n of the causal work. Computed at run time from
the ids (only whole runs of such tiles at the list ends are skipped, so nothing is assumed about the
ids: any tile skipped is one that adds nothing). The Triton kernels (`pallas_gpu`) skip the ends of
their static lists (`leading_foreign`, `live_ends`); the Mosaic GPU ones (`pallas_mgpu`,
`pallas_mgpu_backward`) walk lists rebuilt per batch row (`segment_lists`): other documents' tiles
dropped wherever they are, and tiles inside one document that the pattern fills run unmasked.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

ENABLED = True   # tests and benchmarks turn it off to compare


def tile_ranges(seg_BL, block: int, real: int | None = None):
  """(min, max) segment id per tile of `block` positions, int32[B, L / block] each, over the first
  `real` positions (all by default: padding ids only widen a range, which skips less, never wrongly);
  a tile without such positions gets (int max, int min): it shares nothing."""
  big, small = jnp.iinfo(jnp.int32).max, jnp.iinfo(jnp.int32).min
  real = seg_BL.shape[1] if real is None else real
  real_pos = (jnp.arange(seg_BL.shape[1]) < real)[None]
  lo = jnp.where(real_pos, seg_BL, big).reshape(seg_BL.shape[0], -1, block).min(-1)
  hi = jnp.where(real_pos, seg_BL, small).reshape(seg_BL.shape[0], -1, block).max(-1)
  return lo, hi


def foreign(index, count, row_ranges, entry_ranges):
  """bool[B, H', n, width]: list entry j of row (h', i) is a real entry (j < count) whose tile shares
  no segment id with row i's tile. index [H', n, width] / count [H', n]: tile lists (numpy)."""
  n = index.shape[1]
  (row_lo, row_hi), (ent_lo, ent_hi) = (r[:, :n] for r in row_ranges), entry_ranges
  e_lo, e_hi = ent_lo[:, index], ent_hi[:, index]                  # [B, H', n, width]
  disjoint = (e_hi < row_lo[:, None, :, None]) | (e_lo > row_hi[:, None, :, None])
  return disjoint & (np.arange(index.shape[-1]) < count[..., None])[None]


def leading_foreign(index, count, row_seg, entry_seg, row_block: int, entry_block: int,
                    row_real: int | None = None, entry_real: int | None = None):
  """int32[B, H', n]: per (batch, row) how many leading list entries to skip (0 when not ENABLED).
  Rows are query tiles and entries key tiles (forward, dQ)."""
  if not ENABLED:
    return jnp.zeros((row_seg.shape[0],) + count.shape, jnp.int32)
  f = foreign(index, count, tile_ranges(row_seg, row_block, row_real),
              tile_ranges(entry_seg, entry_block, entry_real))
  return jnp.sum(jnp.cumprod(f, axis=-1), axis=-1, dtype=jnp.int32)


def live_ends(tile, row, slot, count, row_seg, entry_seg, row_block: int, entry_block: int,
              row_real: int | None = None, entry_real: int | None = None):
  """int32[B, H', n]: per (batch, row) one past the last list entry to visit (the trailing entries
  that share no segment with the row's tile are skipped; `count` when not ENABLED). Rows are key
  tiles and entries query tiles (dK/dV). The lists come flat (numpy, one item per real entry): its
  tile, its row (in H' x n order) and its slot in that row; count [H', n]."""
  count = np.asarray(count)
  B = row_seg.shape[0]
  if not ENABLED:
    return jnp.broadcast_to(jnp.asarray(count, jnp.int32), (B,) + count.shape)
  (row_lo, row_hi), (ent_lo, ent_hi) = (tile_ranges(row_seg, row_block, row_real),
                                        tile_ranges(entry_seg, entry_block, entry_real))
  row_tile = row % count.shape[1]
  r_lo, r_hi = row_lo[:, row_tile], row_hi[:, row_tile]                      # [B, E]
  shares = ~((ent_hi[:, tile] < r_lo) | (ent_lo[:, tile] > r_hi))
  last = jnp.where(shares, jnp.asarray(slot + 1), 0)                           # one past a sharing entry
  ends = jnp.zeros((B, count.size), jnp.int32).at[:, row].max(last)           # 0: no entry shares
  return ends.reshape((B,) + count.shape)


def segment_lists(table, row_seg, entry_seg, row_block: int, entry_block: int,
                  row_real: int | None = None, entry_real: int | None = None):
  """int32[B, H', n, 2 + width]: a full-first table ([count, n_full, entries...] per (H', row), numpy,
  as `pallas_mgpu.full_first_table` builds it from the pattern alone) rebuilt for each batch row's
  segment ids, in the same layout. First the entries the pattern fills whose row tile and entry tile
  lie in ONE document (every id of both tiles, padding included, equal): a kernel runs them unmasked;
  then the other entries that share a document with the row (masked); entries sharing none (a
  kernel would add exactly nothing) are dropped (kept, masked, when not ENABLED). Relative order is
  kept within each group, so dropping changes no bit. Rows are query tiles and entries key tiles
  (forward, dQ), or the reverse (dK/dV); `*_real` as in `tile_ranges` (for the dropping only)."""
  index, count, n_full = (jnp.asarray(table[..., i]) for i in (slice(2, None), 0, 1))   # [H', n, W], [H', n]
  n, width = index.shape[1], index.shape[-1]
  slot = jnp.arange(width)
  listed = slot < count[..., None]                                             # [H', n, W]
  filled = slot < n_full[..., None]                                            # full-first: full ones lead
  (row_lo, row_hi), (ent_lo, ent_hi) = tile_ranges(row_seg, row_block), tile_ranges(entry_seg, entry_block)
  row_lo, row_hi = row_lo[:, :n], row_hi[:, :n]
  one_doc_row = (row_lo == row_hi)[:, None, :, None]                           # [B, 1, n, 1]
  e_lo, e_hi = ent_lo[:, index], ent_hi[:, index]                              # [B, H', n, W]
  one_doc = one_doc_row & (e_lo == e_hi) & (e_lo == row_lo[:, None, :, None])
  disjoint = foreign(np.asarray(table[..., 2:]), np.asarray(table[..., 0]),
                     tile_ranges(row_seg, row_block, row_real), tile_ranges(entry_seg, entry_block, entry_real))
  drop = disjoint if ENABLED else jnp.zeros_like(disjoint)
  rank = jnp.where(~listed[None] | drop, 2, jnp.where(filled[None] & one_doc, 0, 1))
  order = jnp.argsort(rank, axis=-1, stable=True)
  entries = jnp.take_along_axis(jnp.broadcast_to(index[None], rank.shape), order, axis=-1)
  new_count = jnp.sum(rank < 2, axis=-1, dtype=jnp.int32)
  new_full = jnp.sum(rank == 0, axis=-1, dtype=jnp.int32)
  return jnp.concatenate([new_count[..., None], new_full[..., None], entries.astype(jnp.int32)], axis=-1)
