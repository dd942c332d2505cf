"""AttentionSpec semantics against a literal loop, and the block layout against the dense mask."""

import itertools

import numpy as np
import pytest

from longgen_jax import AttentionSpec, dense_mask
from longgen_jax.attention.spec import block_layout

SPECS = [
    AttentionSpec.full(),
    AttentionSpec.sink_window(3, 5),
    AttentionSpec.sink_window(0, 7),
    AttentionSpec.sink_window(16, 1),
    AttentionSpec.block_sparse(4, 2, 3),
    AttentionSpec.block_sparse(8, 1, 4),
    AttentionSpec.block_sparse(4, 3, 5, homo_head=True),
    AttentionSpec.block_sparse(2, 1, 2),
    AttentionSpec.block_sparse(4, 1, 16),  # stride > kv heads: several phases uncovered
    AttentionSpec.block_sparse(3, 2, 1),   # every block strided
]


def literal_allowed(spec, i, j, h, num_kv_heads):
  """DESIGN.md's rules, written out one pair at a time."""
  if j > i:
    return False
  if spec.kind == "full":
    return True
  if spec.kind == "sink_window":
    return j < spec.sink or i - j < spec.window
  b, L, V = spec.block_size, spec.local_blocks, spec.vert_stride
  s = 0 if spec.homo_head else max(1, V // num_kv_heads)
  qb, kb = i // b, j // b
  return qb - kb < L or (kb + h * s) % V == 0


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("q_len,kv_len,q_offset", [(23, 23, 0), (6, 29, 23), (1, 17, 16), (9, 30, 5)])
def test_dense_mask_matches_literal_rules(spec, q_len, kv_len, q_offset):
  num_kv_heads = 3
  mask = dense_mask(spec, q_len, kv_len, num_kv_heads, q_offset)
  assert mask.shape == (num_kv_heads, q_len, kv_len) and mask.dtype == bool
  for h, t, j in itertools.product(range(num_kv_heads), range(q_len), range(kv_len)):
    assert mask[h, t, j] == literal_allowed(spec, q_offset + t, j, h, num_kv_heads), (h, t, j)


def test_block_sparse_gqa_phases_spread_over_kv_heads():
  spec = AttentionSpec.block_sparse(1, 1, 8)
  mask = dense_mask(spec, 64, 64, 4, 0)
  # Strided columns far from the diagonal: head h owns phase (-2h) % 8.
  for h in range(4):
    cols = np.nonzero(mask[h, 63, :60])[0]
    assert set(cols % 8) == {(-2 * h) % 8}


def _tile_any_all(mask, bq, bk):
  """Per tile: any allowed pair, and all pairs allowed with no padding."""
  H, T, S = mask.shape
  nq, nk = -(-T // bq), -(-S // bk)
  padded = np.zeros((H, nq * bq, nk * bk), bool)
  padded[:, :T, :S] = mask
  valid = np.zeros((nq * bq, nk * bk), bool)
  valid[:T, :S] = True
  tiles = padded.reshape(H, nq, bq, nk, bk)
  return tiles.any((2, 4)), tiles.all((2, 4)) & valid.reshape(nq, bq, nk, bk).all((1, 3))


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_block_layout_lists_exactly_the_tiles_with_an_allowed_pair(spec):
  for (T, S, off), H, (bq, bk) in itertools.product(
      [(37, 37, 0), (16, 16, 0), (5, 40, 35), (20, 53, 33), (1, 29, 28)], [1, 4],
      [(4, 4), (8, 4), (4, 8), (3, 5), (16, 16)]):
    layout = block_layout(spec, T, S, H, bq, bk, off)
    any_, all_ = _tile_any_all(dense_mask(spec, T, S, H, off), bq, bk)
    assert layout.num_heads in (1, H)
    for h in range(H):
      hl = h % layout.num_heads
      for i in range(any_.shape[1]):
        n = layout.kv_count[hl, i]
        idx = layout.kv_index[hl, i, :n]
        np.testing.assert_array_equal(idx, np.nonzero(any_[h, i])[0])
        np.testing.assert_array_equal(layout.kv_full[hl, i, :n], all_[h, i, idx])
        assert not layout.kv_full[hl, i, n:].any()
        if n:  # padding repeats the last valid entry
          assert (layout.kv_index[hl, i, n:] == idx[-1]).all()
      for j in range(any_.shape[2]):
        n = layout.q_count[hl, j]
        idx = layout.q_index[hl, j, :n]
        np.testing.assert_array_equal(idx, np.nonzero(any_[h, :, j])[0])
        np.testing.assert_array_equal(layout.q_full[hl, j, :n], all_[h, idx, j])


def test_block_layout_at_128k_is_cheap_and_sparse():
  T = 128 * 1024
  spec = AttentionSpec.sink_window(64, 1984)
  layout = block_layout(spec, T, T, 32, 128, 128)
  assert layout.num_heads == 1  # head independent: no per-head copies
  # sink tile + at most 17 window tiles per query tile
  assert layout.kv_count.max() <= 1 + 2048 // 128 + 1
  bs = block_layout(AttentionSpec.block_sparse(64, 16, 64), T, T, 8, 64, 64)
  assert bs.num_heads == 8
  assert bs.kv_count.max() <= 16 + T // 64 // 64 + 1


def test_spec_validation_and_hashing():
  assert AttentionSpec.sink_window(4, 8) == AttentionSpec.sink_window(4, 8)
  assert len({AttentionSpec.full(), AttentionSpec.full(), AttentionSpec.block_sparse(64, 16, 64)}) == 2
  with pytest.raises(ValueError, match="window"):
    AttentionSpec.sink_window(4, 0)
  with pytest.raises(ValueError, match="vert_stride"):
    AttentionSpec.block_sparse(64, 16, 0)
  with pytest.raises(ValueError, match="unknown attention kind"):
    AttentionSpec("dilated")


def test_bad_spec_arguments_are_rejected_at_construction():
  for make, exc in [(lambda: AttentionSpec.sink_window(1.5, 8), TypeError),
                    (lambda: AttentionSpec.sink_window(True, True), TypeError),
                    (lambda: AttentionSpec.sink_window("4", 28), TypeError),
                    (lambda: AttentionSpec.block_sparse(16.0, 2, 4), TypeError),
                    (lambda: AttentionSpec.sink_window(4, 10**12), ValueError)]:
    with pytest.raises(exc):
      make()
  assert AttentionSpec.sink_window(np.int64(4), 28) == AttentionSpec.sink_window(4, 28)
